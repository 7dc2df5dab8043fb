// A hand-written TorchSharp port of Hugging Face transformers' LlamaForCausalLM, as modeling_llama.py is at the commit the
// tiny_llama recording was made from (transformers v4.47.1, 9feae5fb0164e89d4998e5776897c16f7330d3df), for the eager
// attention, no cache and no padding mask: one class per transformers class, submodules under transformers' names (so the
// state_dicts match key for key), children invoked with call(...) so that Parity.Replay sees every call, and every forward
// computing with the operations transformers uses, in its order (the replay compares each module's output, and a
// different order of the same arithmetic rounds differently).
using System;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Tests.RealModels
{
    /// <summary>
    /// The fields of transformers' <c>LlamaConfig</c> this port reads, under the config's names and with its defaults
    /// (for those that have a usable one). <c>head_dim</c> is <c>hidden_size / num_attention_heads</c> unless given.
    /// </summary>
    public sealed record LlamaConfig
    {
        /// <summary>Rows of the token embedding and of the logits.</summary>
        public required long vocab_size { get; init; }
        /// <summary>Width of the residual stream.</summary>
        public required long hidden_size { get; init; }
        /// <summary>Width inside the MLP.</summary>
        public required long intermediate_size { get; init; }
        /// <summary>Decoder layers.</summary>
        public required int num_hidden_layers { get; init; }
        /// <summary>Query heads.</summary>
        public required long num_attention_heads { get; init; }
        /// <summary>Key and value heads (grouped-query attention when fewer than the query heads).</summary>
        public required long num_key_value_heads { get; init; }
        /// <summary>Width of one head.</summary>
        public long? head_dim { get; init; }
        /// <summary>The epsilon of every RMSNorm.</summary>
        public double rms_norm_eps { get; init; } = 1e-6;
        /// <summary>The base of the rotary frequencies.</summary>
        public double rope_theta { get; init; } = 10000.0;
        /// <summary>Dropout probability on the attention weights (applied in training mode only, as transformers').</summary>
        public double attention_dropout { get; init; }

        /// <summary><c>head_dim</c>, or <c>hidden_size / num_attention_heads</c> when it is not given.</summary>
        public long HeadDim => head_dim ?? hidden_size / num_attention_heads;
    }

    /// <summary>
    /// Porting mistakes a parity test plants in the first decoder layer's attention, to see the replay name that module.
    /// A port has none of them: leave this <see cref="None"/>. (A wrong RMSNorm epsilon needs no flag: give the config
    /// another <see cref="LlamaConfig.rms_norm_eps"/>.)
    /// </summary>
    [Flags]
    public enum LlamaPortMistakes
    {
        /// <summary>A faithful port.</summary>
        None = 0,
        /// <summary>rotate_half returns cat(x2, -x1) instead of cat(-x2, x1).</summary>
        RotateHalfSwapped = 1,
        /// <summary>The attention scores divided by head_dim instead of sqrt(head_dim).</summary>
        AttentionScaledByHeadDim = 2,
    }

    /// <summary>
    /// Root-mean-square layer norm (T5's LayerNorm): <c>weight * x / sqrt(mean(x²) + eps)</c> over the last dimension,
    /// computed in float32 whatever the input's dtype, as transformers does. <c>(*, hidden_size) -> (*, hidden_size)</c>.
    /// </summary>
    public sealed class LlamaRMSNorm : nn.Module<Tensor, Tensor>
    {
        private Parameter weight;
        private readonly double variance_epsilon;

        /// <summary>A norm over <paramref name="hidden_size"/> features, its weight all ones.</summary>
        public LlamaRMSNorm(long hidden_size, double eps = 1e-6) : base(nameof(LlamaRMSNorm))
        {
            weight = new Parameter(torch.ones(hidden_size));
            variance_epsilon = eps;
            RegisterComponents();
        }

        /// <summary>The normalised <paramref name="hidden_states"/>, in their dtype.</summary>
        public override Tensor forward(Tensor hidden_states)
        {
            using var scope = NewDisposeScope();
            var input_dtype = hidden_states.dtype;
            hidden_states = hidden_states.to(ScalarType.Float32);
            var variance = hidden_states.pow(2).mean(new long[] { -1 }, keepdim: true);
            hidden_states = hidden_states * torch.rsqrt(variance + variance_epsilon);
            return (weight * hidden_states.to(input_dtype)).MoveToOuterDisposeScope();
        }

        /// <summary>As transformers' <c>extra_repr</c>: <c>LlamaRMSNorm((16,), eps=1e-06)</c>.</summary>
        public override string ToString() => $"{nameof(LlamaRMSNorm)}(({weight.size(0)},), eps={variance_epsilon:0.######e-00})";
    }

    /// <summary>
    /// The rotary position embedding's cos and sin (the "default" rope type: no scaling). <c>inv_freq</c> is a buffer
    /// that is not in the state_dict (transformers registers it with <c>persistent=False</c>): it is computed here as
    /// there, <c>1 / rope_theta^(arange(0, head_dim, 2) / head_dim)</c>. Forward: <c>(x, position_ids) -> (cos, sin)</c>,
    /// each <c>(batch of position_ids, seq, head_dim)</c> in <c>x</c>'s dtype, computed in float32 without gradients.
    /// </summary>
    public sealed class LlamaRotaryEmbedding : nn.Module<Tensor, Tensor, (Tensor cos, Tensor sin)>
    {
        // The default rope type's post-processing factor, 1.0 (transformers' attention_factor).
        private const double attention_scaling = 1.0;

        /// <summary>The rotary embedding for the heads of <paramref name="config"/>.</summary>
        public LlamaRotaryEmbedding(LlamaConfig config) : base(nameof(LlamaRotaryEmbedding))
        {
            long dim = config.HeadDim;
            using var scope = NewDisposeScope();
            // base ** (arange(0, dim, 2, int64).float() / dim), then 1.0 / that: Tensor.__rtruediv__ is reciprocal() * 1.0.
            var exponent = torch.arange(0, dim, 2, dtype: ScalarType.Int64).to(ScalarType.Float32) / dim;
            var inv_freq = torch.tensor(config.rope_theta, ScalarType.Float32).pow(exponent).reciprocal() * 1.0;
            register_buffer("inv_freq", inv_freq.MoveToOuterDisposeScope(), persistent: false);
        }

        /// <summary>The inverse frequencies, one per pair of head features.</summary>
        public Tensor inv_freq => get_buffer("inv_freq")!;

        /// <summary>cos and sin of <c>position × inv_freq</c>, the frequencies repeated twice along the last dimension.</summary>
        public override (Tensor cos, Tensor sin) forward(Tensor x, Tensor position_ids)
        {
            using var noGrad = torch.no_grad();
            using var scope = NewDisposeScope();
            var inv_freq_expanded = inv_freq[TensorIndex.None, TensorIndex.Colon, TensorIndex.None].to(ScalarType.Float32).expand(position_ids.size(0), -1, 1);
            var position_ids_expanded = position_ids[TensorIndex.Colon, TensorIndex.None, TensorIndex.Colon].to(ScalarType.Float32);
            var freqs = inv_freq_expanded.matmul(position_ids_expanded).transpose(1, 2);
            var emb = torch.cat(new[] { freqs, freqs }, dim: -1);
            var cos = emb.cos() * attention_scaling;
            var sin = emb.sin() * attention_scaling;
            return (cos.to(x.dtype).MoveToOuterDisposeScope(), sin.to(x.dtype).MoveToOuterDisposeScope());
        }

        // TorchSharp's Module.to(...) converts the buffers named_buffers() lists, and named_buffers() leaves out
        // non-persistent ones whatever its include_nonpersistent says (0.107.0): inv_freq is converted here, as PyTorch's
        // Module.to converts every floating-point buffer.
        /// <inheritdoc/>
        protected override void _toEpilog(ScalarType? dtype, Device? device, bool non_blocking)
        {
            base._toEpilog(dtype, device, non_blocking);
            var old = inv_freq;
            var converted = old.to(dtype ?? old.dtype, device ?? old.device, non_blocking: non_blocking);
            if (ReferenceEquals(converted, old))
                return;
            ConditionallyRegisterBuffer("inv_freq", converted, persistent: false);
            old.Dispose();
        }
    }

    /// <summary>The gated feed-forward part: <c>down_proj(silu(gate_proj(x)) * up_proj(x))</c>, no biases.</summary>
    public sealed class LlamaMLP : nn.Module<Tensor, Tensor>
    {
        private readonly Linear gate_proj;
        private readonly Linear up_proj;
        private readonly Linear down_proj;
        private readonly SiLU act_fn;

        /// <summary>The MLP of <paramref name="config"/>'s sizes.</summary>
        public LlamaMLP(LlamaConfig config) : base(nameof(LlamaMLP))
        {
            gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, hasBias: false);
            up_proj = nn.Linear(config.hidden_size, config.intermediate_size, hasBias: false);
            down_proj = nn.Linear(config.intermediate_size, config.hidden_size, hasBias: false);
            // transformers' ACT2FN["silu"] is an nn.SiLU instance, a submodule named act_fn.
            act_fn = nn.SiLU();
            RegisterComponents();
        }

        /// <summary><c>(*, hidden_size) -> (*, hidden_size)</c>.</summary>
        public override Tensor forward(Tensor x)
        {
            using var scope = NewDisposeScope();
            // Python evaluates the product's operands left to right, as C# does: gate_proj, act_fn, then up_proj.
            return down_proj.call(act_fn.call(gate_proj.call(x)) * up_proj.call(x)).MoveToOuterDisposeScope();
        }
    }

    /// <summary>
    /// Eager multi-head attention with grouped key/value heads and rotary position embeddings ("Attention Is All You
    /// Need" as Llama uses it). Forward takes the tensors transformers' LlamaDecoderLayer passes it, in that order
    /// (<c>hidden_states, attention_mask, position_ids, cache_position, position_embeddings</c>; the ids only serve a
    /// cache, which this port has not) and returns <c>attn_output</c>, <c>(batch, seq, hidden_size)</c>: transformers
    /// returns <c>(attn_output, None, None)</c> without <c>output_attentions</c> and a cache.
    /// </summary>
    public sealed class LlamaAttention : nn.Module<Tensor, Tensor, Tensor, Tensor, (Tensor cos, Tensor sin), Tensor>
    {
        private readonly Linear q_proj;
        private readonly Linear k_proj;
        private readonly Linear v_proj;
        private readonly Linear o_proj;
        private readonly long head_dim;
        private readonly long num_heads;
        private readonly long num_key_value_groups;
        private readonly double attention_dropout;
        private readonly LlamaPortMistakes _mistakes;

        /// <summary>The attention of <paramref name="config"/>'s sizes; <paramref name="mistakes"/> plants porting mistakes.</summary>
        public LlamaAttention(LlamaConfig config, LlamaPortMistakes mistakes = LlamaPortMistakes.None) : base(nameof(LlamaAttention))
        {
            head_dim = config.HeadDim;
            num_heads = config.num_attention_heads;
            num_key_value_groups = config.num_attention_heads / config.num_key_value_heads;
            attention_dropout = config.attention_dropout;
            _mistakes = mistakes;
            q_proj = nn.Linear(config.hidden_size, num_heads * head_dim, hasBias: false);
            k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * head_dim, hasBias: false);
            v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * head_dim, hasBias: false);
            o_proj = nn.Linear(num_heads * head_dim, config.hidden_size, hasBias: false);
            RegisterComponents();
        }

        /// <summary>
        /// Attention of <paramref name="hidden_states"/> <c>(batch, seq, hidden_size)</c> under the additive
        /// <paramref name="attention_mask"/> <c>(batch, 1, seq, keys ≥ seq)</c> (its first seq keys are used), with the
        /// rotary <paramref name="position_embeddings"/> <c>(cos, sin)</c>.
        /// </summary>
        public override Tensor forward(Tensor hidden_states, Tensor attention_mask, Tensor position_ids, Tensor cache_position, (Tensor cos, Tensor sin) position_embeddings)
        {
            using var scope = NewDisposeScope();
            long bsz = hidden_states.size(0), q_len = hidden_states.size(1);

            var query_states = q_proj.call(hidden_states);
            var key_states = k_proj.call(hidden_states);
            var value_states = v_proj.call(hidden_states);

            query_states = query_states.view(bsz, q_len, -1, head_dim).transpose(1, 2);
            key_states = key_states.view(bsz, q_len, -1, head_dim).transpose(1, 2);
            value_states = value_states.view(bsz, q_len, -1, head_dim).transpose(1, 2);

            var (cos, sin) = position_embeddings;
            (query_states, key_states) = apply_rotary_pos_emb(query_states, key_states, cos, sin);

            key_states = repeat_kv(key_states, num_key_value_groups);
            value_states = repeat_kv(value_states, num_key_value_groups);
            // transformers divides by math.sqrt(head_dim) (a Python float), not multiplies by its inverse.
            double divisor = _mistakes.HasFlag(LlamaPortMistakes.AttentionScaledByHeadDim) ? head_dim : Math.Sqrt(head_dim);
            var attn_weights = torch.matmul(query_states, key_states.transpose(2, 3)) / divisor;

            var causal_mask = attention_mask[TensorIndex.Colon, TensorIndex.Colon, TensorIndex.Colon, TensorIndex.Slice(null, key_states.size(-2))];
            attn_weights = attn_weights + causal_mask;

            // Softmax upcast to float32, as transformers does.
            attn_weights = attn_weights.softmax(-1, ScalarType.Float32).to(query_states.dtype);
            attn_weights = nn.functional.dropout(attn_weights, attention_dropout, training);
            var attn_output = torch.matmul(attn_weights, value_states);

            if (!attn_output.shape.AsSpan().SequenceEqual(new[] { bsz, num_heads, q_len, head_dim }))
                throw new InvalidOperationException($"attn_output should be of size ({bsz}, {num_heads}, {q_len}, {head_dim}), but is ({string.Join(", ", attn_output.shape)}).");

            attn_output = attn_output.transpose(1, 2).contiguous();
            attn_output = attn_output.reshape(bsz, q_len, -1);
            return o_proj.call(attn_output).MoveToOuterDisposeScope();
        }

        /// <summary>transformers' <c>apply_rotary_pos_emb</c> with <c>unsqueeze_dim=1</c>: cos and sin broadcast over the heads.</summary>
        private (Tensor q_embed, Tensor k_embed) apply_rotary_pos_emb(Tensor q, Tensor k, Tensor cos, Tensor sin)
        {
            cos = cos.unsqueeze(1);
            sin = sin.unsqueeze(1);
            var q_embed = (q * cos) + (rotate_half(q) * sin);
            var k_embed = (k * cos) + (rotate_half(k) * sin);
            return (q_embed, k_embed);
        }

        /// <summary>Rotates half the hidden dims of the input: <c>cat(-x2, x1)</c> for the halves x1, x2 of the last dimension.</summary>
        private Tensor rotate_half(Tensor x)
        {
            long half = x.size(-1) / 2;
            var x1 = x[TensorIndex.Ellipsis, TensorIndex.Slice(null, half)];
            var x2 = x[TensorIndex.Ellipsis, TensorIndex.Slice(half)];
            return _mistakes.HasFlag(LlamaPortMistakes.RotateHalfSwapped)
                ? torch.cat(new[] { x2, -x1 }, dim: -1)
                : torch.cat(new[] { -x2, x1 }, dim: -1);
        }

        /// <summary>
        /// torch.repeat_interleave(x, dim=1, repeats=n_rep) as transformers writes it: (batch, num_key_value_heads, seq,
        /// head_dim) to (batch, num_attention_heads, seq, head_dim).
        /// </summary>
        private static Tensor repeat_kv(Tensor hidden_states, long n_rep)
        {
            if (n_rep == 1)
                return hidden_states;
            long batch = hidden_states.size(0), num_key_value_heads = hidden_states.size(1), slen = hidden_states.size(2), head_dim = hidden_states.size(3);
            hidden_states = hidden_states[TensorIndex.Colon, TensorIndex.Colon, TensorIndex.None, TensorIndex.Colon, TensorIndex.Colon].expand(batch, num_key_value_heads, n_rep, slen, head_dim);
            return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim);
        }
    }

    /// <summary>
    /// One pre-norm decoder layer: <c>h = x + self_attn(input_layernorm(x))</c>, then <c>h + mlp(post_attention_layernorm(h))</c>.
    /// Forward takes the tensors LlamaModel passes it, in its order (<c>hidden_states</c> positionally, then
    /// <c>attention_mask, position_ids, cache_position, position_embeddings</c> by keyword) and returns the hidden
    /// states: transformers returns them as a 1-tuple without <c>output_attentions</c> and a cache, the same single
    /// recorded tensor.
    /// </summary>
    public sealed class LlamaDecoderLayer : nn.Module<Tensor, Tensor, Tensor, Tensor, (Tensor cos, Tensor sin), Tensor>
    {
        private readonly LlamaAttention self_attn;
        private readonly LlamaMLP mlp;
        private readonly LlamaRMSNorm input_layernorm;
        private readonly LlamaRMSNorm post_attention_layernorm;

        /// <summary>A layer of <paramref name="config"/>'s sizes; <paramref name="mistakes"/> go to its attention.</summary>
        public LlamaDecoderLayer(LlamaConfig config, LlamaPortMistakes mistakes = LlamaPortMistakes.None) : base(nameof(LlamaDecoderLayer))
        {
            self_attn = new LlamaAttention(config, mistakes);
            mlp = new LlamaMLP(config);
            input_layernorm = new LlamaRMSNorm(config.hidden_size, config.rms_norm_eps);
            post_attention_layernorm = new LlamaRMSNorm(config.hidden_size, config.rms_norm_eps);
            RegisterComponents();
        }

        /// <summary>The layer on <paramref name="hidden_states"/> <c>(batch, seq, hidden_size)</c>.</summary>
        public override Tensor forward(Tensor hidden_states, Tensor attention_mask, Tensor position_ids, Tensor cache_position, (Tensor cos, Tensor sin) position_embeddings)
        {
            using var scope = NewDisposeScope();
            var residual = hidden_states;
            hidden_states = input_layernorm.call(hidden_states);
            hidden_states = self_attn.call(hidden_states, attention_mask, position_ids, cache_position, position_embeddings);
            hidden_states = residual + hidden_states;

            residual = hidden_states;
            hidden_states = post_attention_layernorm.call(hidden_states);
            hidden_states = mlp.call(hidden_states);
            hidden_states = residual + hidden_states;
            return hidden_states.MoveToOuterDisposeScope();
        }
    }

    /// <summary>
    /// The decoder: token embedding, the layers, the final norm; <c>input_ids (batch, seq) -> last hidden state (batch,
    /// seq, hidden_size)</c>, with no cache and no padding mask (every token attends to itself and those before it).
    /// </summary>
    public sealed class LlamaModel : nn.Module<Tensor, Tensor>
    {
        private readonly Embedding embed_tokens;
        private readonly ModuleList<LlamaDecoderLayer> layers;
        private readonly LlamaRMSNorm norm;
        private readonly LlamaRotaryEmbedding rotary_emb;

        /// <summary>The decoder of <paramref name="config"/>'s sizes; <paramref name="mistakes"/> go to the first layer.</summary>
        public LlamaModel(LlamaConfig config, LlamaPortMistakes mistakes = LlamaPortMistakes.None) : base(nameof(LlamaModel))
        {
            // pad_token_id is None in the config: no padding row.
            embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size);
            layers = new ModuleList<LlamaDecoderLayer>();
            for (int layer_idx = 0; layer_idx < config.num_hidden_layers; layer_idx++)
                layers.Add(new LlamaDecoderLayer(config, layer_idx == 0 ? mistakes : LlamaPortMistakes.None));
            norm = new LlamaRMSNorm(config.hidden_size, config.rms_norm_eps);
            rotary_emb = new LlamaRotaryEmbedding(config);
            RegisterComponents();
        }

        /// <summary>The last hidden state for <paramref name="input_ids"/>.</summary>
        public override Tensor forward(Tensor input_ids)
        {
            using var scope = NewDisposeScope();
            var inputs_embeds = embed_tokens.call(input_ids);

            var cache_position = torch.arange(0, inputs_embeds.size(1), dtype: ScalarType.Int64);
            var position_ids = cache_position.unsqueeze(0);

            var causal_mask = _update_causal_mask(inputs_embeds, cache_position);
            var hidden_states = inputs_embeds;

            // create position embeddings to be shared across the decoder layers
            var position_embeddings = rotary_emb.call(hidden_states, position_ids);

            foreach (var decoder_layer in layers)
                hidden_states = decoder_layer.call(hidden_states, causal_mask, position_ids, cache_position, position_embeddings);

            hidden_states = norm.call(hidden_states);
            return hidden_states.MoveToOuterDisposeScope();
        }

        /// <summary>
        /// The eager attention's additive causal mask as <c>_update_causal_mask</c> and
        /// <c>_prepare_4d_causal_attention_mask_with_cache_position</c> make it with no attention mask and no cache:
        /// <c>(batch, 1, seq, seq + 1)</c>, the dtype's lowest value where a key comes after the query, zero elsewhere
        /// (the extra key column is transformers' target length without a mask, <c>past_seen_tokens + seq + 1</c>).
        /// </summary>
        private static Tensor _update_causal_mask(Tensor input_tensor, Tensor cache_position)
        {
            var dtype = input_tensor.dtype;
            long sequence_length = input_tensor.size(1);
            long target_length = sequence_length + 1;
            double min_dtype = torch.finfo(dtype).min;
            var causal_mask = torch.full(sequence_length, target_length, min_dtype, dtype: dtype);
            if (sequence_length != 1)
                causal_mask = torch.triu(causal_mask, diagonal: 1);
            causal_mask.mul_(torch.arange(target_length) > cache_position.reshape(-1, 1));
            return causal_mask[TensorIndex.None, TensorIndex.None, TensorIndex.Colon, TensorIndex.Colon].expand(input_tensor.size(0), 1, -1, -1);
        }
    }

    /// <summary>
    /// transformers' LlamaForCausalLM: the decoder and the language-model head (not tied to the embedding, as the
    /// config's default <c>tie_word_embeddings=False</c>); <c>input_ids (batch, seq) -> logits (batch, seq, vocab_size)</c>.
    /// Example: <c>var logits = new LlamaForCausalLM(config).call(input_ids);</c>
    /// </summary>
    public sealed class LlamaForCausalLM : nn.Module<Tensor, Tensor>
    {
        private readonly LlamaModel model;
        private readonly Linear lm_head;

        /// <summary>The model of <paramref name="config"/>'s sizes; <paramref name="mistakes"/> are planted in its first layer.</summary>
        public LlamaForCausalLM(LlamaConfig config, LlamaPortMistakes mistakes = LlamaPortMistakes.None) : base(nameof(LlamaForCausalLM))
        {
            model = new LlamaModel(config, mistakes);
            lm_head = nn.Linear(config.hidden_size, config.vocab_size, hasBias: false);
            RegisterComponents();
        }

        /// <summary>The logits for every position of <paramref name="input_ids"/>.</summary>
        public override Tensor forward(Tensor input_ids)
        {
            using var scope = NewDisposeScope();
            var hidden_states = model.call(input_ids);
            // transformers takes hidden_states[:, -num_logits_to_keep:, :] with num_logits_to_keep 0: every position.
            return lm_head.call(hidden_states).MoveToOuterDisposeScope();
        }
    }
}
