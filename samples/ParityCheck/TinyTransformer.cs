// The TorchSharp port of pytorch/tiny_transformer.py, written as a port should be for Parity.Replay to check it:
// submodules under the PyTorch model's names (so the state_dicts match), and children invoked with call(x), which runs
// forward hooks (forward(x) does not, in TorchSharp as in PyTorch).
using System;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Samples.ParityCheck
{
    /// <summary>
    /// Porting mistakes that the parity test plants one at a time, to show that the report names the module where each
    /// one is. A port has none of them: leave this <see cref="None"/>.
    /// </summary>
    [Flags]
    public enum PortingMistakes
    {
        /// <summary>A faithful port.</summary>
        None = 0,
        /// <summary>GELU's tanh approximation instead of the exact erf form PyTorch's nn.GELU() computes.</summary>
        GeluTanh = 1,
        /// <summary>LayerNorm with eps 1e-6 instead of PyTorch's default 1e-5, in the first block's first norm.</summary>
        LayerNormEps = 2,
        /// <summary>The first block forgets the residual around its attention.</summary>
        MissingResidual = 4,
        /// <summary>Attention's softmax over the wrong dimension (the queries, -2, instead of the keys, -1).</summary>
        SoftmaxDim = 8,
    }

    /// <summary>Multi-head self-attention written with four linear layers and softmax.</summary>
    public sealed class Attention : nn.Module<Tensor, Tensor>
    {
        private readonly CustomLinear q_proj, k_proj, v_proj, o_proj;
        private readonly long _heads;
        private readonly long _softmaxDim;

        /// <summary>Creates the layer for <paramref name="dModel"/> features in <paramref name="heads"/> heads.</summary>
        public Attention(long dModel, long heads, PortingMistakes mistakes = PortingMistakes.None) : base(nameof(Attention))
        {
            _heads = heads;
            _softmaxDim = mistakes.HasFlag(PortingMistakes.SoftmaxDim) ? -2 : -1;
            // PyTorch's F.linear flattens contiguous 3-D input into one addmm: the PyTorch dispatch rounds as it does.
            q_proj = new CustomLinear(dModel, dModel) { Dispatch = LinearDispatch.PyTorch };
            k_proj = new CustomLinear(dModel, dModel) { Dispatch = LinearDispatch.PyTorch };
            v_proj = new CustomLinear(dModel, dModel) { Dispatch = LinearDispatch.PyTorch };
            o_proj = new CustomLinear(dModel, dModel) { Dispatch = LinearDispatch.PyTorch };
            RegisterComponents();
        }

        /// <summary>(batch, time, dModel) → (batch, time, dModel).</summary>
        public override Tensor forward(Tensor x)
        {
            using var scope = NewDisposeScope();
            long batch = x.size(0), time = x.size(1), dModel = x.size(2), head = dModel / _heads;
            Tensor Split(Tensor t) => t.view(batch, time, _heads, head).transpose(1, 2);
            Tensor q = Split(q_proj.call(x)), k = Split(k_proj.call(x)), v = Split(v_proj.call(x));
            Tensor scores = q.matmul(k.transpose(-2, -1)) / Math.Sqrt(head);
            Tensor weights = scores.softmax(_softmaxDim);
            Tensor mixed = weights.matmul(v).transpose(1, 2).reshape(batch, time, dModel);
            return o_proj.call(mixed).MoveToOuterDisposeScope();
        }
    }

    /// <summary>The feed-forward part: fc1, GELU, fc2.</summary>
    public sealed class Mlp : nn.Module<Tensor, Tensor>
    {
        private readonly CustomLinear fc1;
        private readonly GELU act;
        private readonly CustomLinear fc2;

        /// <summary>Creates the MLP, 4 × <paramref name="dModel"/> wide inside.</summary>
        public Mlp(long dModel, PortingMistakes mistakes = PortingMistakes.None) : base(nameof(Mlp))
        {
            fc1 = new CustomLinear(dModel, 4 * dModel) { Dispatch = LinearDispatch.PyTorch };
            act = mistakes.HasFlag(PortingMistakes.GeluTanh) ? nn.GELU(GELU.Approximate.tanh) : nn.GELU();
            fc2 = new CustomLinear(4 * dModel, dModel) { Dispatch = LinearDispatch.PyTorch };
            RegisterComponents();
        }

        /// <summary>fc2(GELU(fc1(x))).</summary>
        public override Tensor forward(Tensor x)
        {
            using var scope = NewDisposeScope();
            return fc2.call(act.call(fc1.call(x))).MoveToOuterDisposeScope();
        }
    }

    /// <summary>A pre-norm transformer block: x + attn(ln1(x)), then + mlp(ln2(x)).</summary>
    public sealed class Block : nn.Module<Tensor, Tensor>
    {
        private readonly LayerNorm ln1;
        private readonly Attention attn;
        private readonly LayerNorm ln2;
        private readonly Mlp mlp;
        private readonly bool _residual;

        /// <summary>Creates the block; <paramref name="mistakes"/> plants porting mistakes for the parity test.</summary>
        public Block(long dModel, long heads, PortingMistakes mistakes = PortingMistakes.None) : base(nameof(Block))
        {
            ln1 = nn.LayerNorm(dModel, eps: mistakes.HasFlag(PortingMistakes.LayerNormEps) ? 1e-6 : 1e-5);
            attn = new Attention(dModel, heads, mistakes);
            ln2 = nn.LayerNorm(dModel);
            mlp = new Mlp(dModel, mistakes);
            _residual = !mistakes.HasFlag(PortingMistakes.MissingResidual);
            RegisterComponents();
        }

        /// <summary>The block on (batch, time, dModel).</summary>
        public override Tensor forward(Tensor x)
        {
            using var scope = NewDisposeScope();
            Tensor attended = attn.call(ln1.call(x));
            Tensor h = _residual ? x + attended : attended;
            return (h + mlp.call(ln2.call(h))).MoveToOuterDisposeScope();
        }
    }

    /// <summary>in_proj, two blocks, ln_f and head: the PyTorch TinyTransformer, module for module.</summary>
    public sealed class TinyTransformer : nn.Module<Tensor, Tensor>
    {
        // Declared in the PyTorch model's order, which RegisterComponents keeps: the state_dicts list the same keys in the
        // same order.
        private readonly CustomLinear in_proj;
        private readonly ModuleList<Block> blocks;
        private readonly LayerNorm ln_f;
        private readonly CustomLinear head;

        /// <summary>The sizes of the recorded model; <paramref name="mistakes"/> plants porting mistakes (in the first block).</summary>
        public TinyTransformer(long features = 8, long dModel = 32, long heads = 4, int layers = 2, long classes = 4, PortingMistakes mistakes = PortingMistakes.None)
            : base(nameof(TinyTransformer))
        {
            in_proj = new CustomLinear(features, dModel) { Dispatch = LinearDispatch.PyTorch };
            blocks = new ModuleList<Block>();
            for (int i = 0; i < layers; i++)
                blocks.Add(new Block(dModel, heads, i == 0 ? mistakes : PortingMistakes.None));
            ln_f = nn.LayerNorm(dModel);
            head = new CustomLinear(dModel, classes) { Dispatch = LinearDispatch.PyTorch };
            RegisterComponents();
        }

        /// <summary>(batch, time, features) → (batch, time, classes).</summary>
        public override Tensor forward(Tensor x)
        {
            using var scope = NewDisposeScope();
            Tensor h = in_proj.call(x);
            foreach (var block in blocks)
                h = block.call(h);
            return head.call(ln_f.call(h)).MoveToOuterDisposeScope();
        }
    }
}
