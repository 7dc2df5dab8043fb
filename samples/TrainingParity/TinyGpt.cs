// The TorchSharp port of pytorch/tiny_gpt.py, a GPT shaped as Karpathy's minGPT. Written as a port should be for
// Parity.ReplayTraining to check it: fields under the PyTorch model's names (so the state_dicts match), and children
// invoked with call(x), which runs the forward hooks the replay observes through (forward(x) does not).
using System;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Samples.TrainingParity
{
    /// <summary>The sizes of the recorded model and its training (pytorch/tiny_gpt.py has the same).</summary>
    public static class TinyGptConfig
    {
        /// <summary>Tokens in the vocabulary.</summary>
        public const long Vocab = 8;
        /// <summary>The longest sequence.</summary>
        public const long Block = 6;
        /// <summary>Embedding width.</summary>
        public const long Embd = 12;
        /// <summary>Attention heads.</summary>
        public const long Heads = 2;
        /// <summary>Transformer blocks.</summary>
        public const int Layers = 2;
    }

    /// <summary>Causal multi-head self-attention: one Linear for q, k and v, a lower-triangular mask, one Linear out.</summary>
    public sealed class CausalSelfAttention : nn.Module<Tensor, Tensor>
    {
        // Declared in PyTorch's order; `bias` is the mask, a buffer (PyTorch's register_buffer), as in minGPT.
        private readonly Linear c_attn;
        private readonly Linear c_proj;
        private readonly Tensor bias;

        /// <summary>Creates the layer with <see cref="TinyGptConfig"/>'s sizes.</summary>
        public CausalSelfAttention() : base(nameof(CausalSelfAttention))
        {
            c_attn = nn.Linear(TinyGptConfig.Embd, 3 * TinyGptConfig.Embd);
            c_proj = nn.Linear(TinyGptConfig.Embd, TinyGptConfig.Embd);
            bias = ones(TinyGptConfig.Block, TinyGptConfig.Block).tril().view(1, 1, TinyGptConfig.Block, TinyGptConfig.Block);
            RegisterComponents();
        }

        /// <summary>(batch, time, embd) → (batch, time, embd), each position attending to itself and those before it.</summary>
        public override Tensor forward(Tensor x)
        {
            using var scope = NewDisposeScope();
            long b = x.size(0), t = x.size(1), c = x.size(2), head = c / TinyGptConfig.Heads;
            Tensor[] qkv = c_attn.call(x).split(TinyGptConfig.Embd, dim: 2);
            Tensor Heads(Tensor u) => u.view(b, t, TinyGptConfig.Heads, head).transpose(1, 2);
            Tensor q = Heads(qkv[0]), k = Heads(qkv[1]), v = Heads(qkv[2]);
            Tensor att = q.matmul(k.transpose(-2, -1)) * (1.0 / Math.Sqrt(head));
            Tensor mask = bias.index(TensorIndex.Colon, TensorIndex.Colon, TensorIndex.Slice(0, t), TensorIndex.Slice(0, t)).eq(0);
            att = att.masked_fill(mask, float.NegativeInfinity).softmax(-1);
            Tensor y = att.matmul(v).transpose(1, 2).contiguous().view(b, t, c);
            return c_proj.call(y).MoveToOuterDisposeScope();
        }
    }

    /// <summary>c_fc, GELU, c_proj.</summary>
    public sealed class Mlp : nn.Module<Tensor, Tensor>
    {
        private readonly Linear c_fc;
        private readonly GELU act;
        private readonly Linear c_proj;

        /// <summary>Creates the MLP, four times the embedding wide inside.</summary>
        public Mlp() : base(nameof(Mlp))
        {
            c_fc = nn.Linear(TinyGptConfig.Embd, 4 * TinyGptConfig.Embd);
            act = nn.GELU();
            c_proj = nn.Linear(4 * TinyGptConfig.Embd, TinyGptConfig.Embd);
            RegisterComponents();
        }

        /// <summary>c_proj(GELU(c_fc(x))).</summary>
        public override Tensor forward(Tensor x)
        {
            using var scope = NewDisposeScope();
            return c_proj.call(act.call(c_fc.call(x))).MoveToOuterDisposeScope();
        }
    }

    /// <summary>A pre-LayerNorm block: x + attn(ln_1(x)), then + mlp(ln_2(x)).</summary>
    public sealed class Block : nn.Module<Tensor, Tensor>
    {
        private readonly LayerNorm ln_1;
        private readonly CausalSelfAttention attn;
        private readonly LayerNorm ln_2;
        private readonly Mlp mlp;

        /// <summary>Creates the block.</summary>
        public Block() : base(nameof(Block))
        {
            ln_1 = nn.LayerNorm(TinyGptConfig.Embd);
            attn = new CausalSelfAttention();
            ln_2 = nn.LayerNorm(TinyGptConfig.Embd);
            mlp = new Mlp();
            RegisterComponents();
        }

        /// <summary>The block on (batch, time, embd).</summary>
        public override Tensor forward(Tensor x)
        {
            using var scope = NewDisposeScope();
            Tensor h = x + attn.call(ln_1.call(x));
            return (h + mlp.call(ln_2.call(h))).MoveToOuterDisposeScope();
        }
    }

    /// <summary>Token and position embeddings, the blocks, a final LayerNorm and an lm_head without bias.</summary>
    public sealed class TinyGpt : nn.Module<Tensor, Tensor>
    {
        private readonly Embedding wte;
        private readonly Embedding wpe;
        private readonly ModuleList<Block> h;
        private readonly LayerNorm ln_f;
        private readonly Linear lm_head;

        /// <summary>Creates the model with <see cref="TinyGptConfig"/>'s sizes (weights drawn by TorchSharp; a replay loads PyTorch's).</summary>
        public TinyGpt() : base(nameof(TinyGpt))
        {
            wte = nn.Embedding(TinyGptConfig.Vocab, TinyGptConfig.Embd);
            wpe = nn.Embedding(TinyGptConfig.Block, TinyGptConfig.Embd);
            h = new ModuleList<Block>();
            for (int i = 0; i < TinyGptConfig.Layers; i++)
                h.Add(new Block());
            ln_f = nn.LayerNorm(TinyGptConfig.Embd);
            lm_head = nn.Linear(TinyGptConfig.Embd, TinyGptConfig.Vocab, hasBias: false);
            RegisterComponents();
        }

        /// <summary>Token ids (batch, time) → logits (batch, time, vocab).</summary>
        public override Tensor forward(Tensor idx)
        {
            using var scope = NewDisposeScope();
            long t = idx.size(1);
            Tensor x = wte.call(idx) + wpe.call(arange(t, dtype: ScalarType.Int64).unsqueeze(0));
            foreach (var block in h)
                x = block.call(x);
            return lm_head.call(ln_f.call(x)).MoveToOuterDisposeScope();
        }
    }
}
