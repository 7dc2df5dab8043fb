using System;
using System.Collections.Generic;
using System.Globalization;
using System.Linq;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Lora
{
    /// <summary>
    /// One LoRA adapter of an embedding (PEFT's <c>lora.Embedding</c>): <c>lora_embedding_A</c> (r, num_embeddings) and
    /// <c>lora_embedding_B</c> (embedding_dim, r), the update <c>embedding(x, Aᵀ) Bᵀ · scaling</c> added to the base
    /// lookup, and <c>Δ = (B A)ᵀ · scaling</c> (num_embeddings, embedding_dim) for merging.
    /// </summary>
    /// <remarks>
    /// PEFT initialises A with zeros and B from a standard normal (loralib's choice for embeddings), so a fresh adapter
    /// adds nothing. PEFT applies no dropout to embedding adapters; neither does this. TorchSharp's <c>Embedding</c> does not
    /// expose its <c>padding_idx</c> or <c>max_norm</c>: the adapter's lookup is a plain one, the same forward as PEFT's for
    /// any padding_idx (which only stops the padding row's gradient there), and an embedding made with max_norm (which
    /// PEFT would also apply to A's columns) is not supported (docs/lora.md).
    /// </remarks>
    public sealed class LoraEmbeddingLayer : nn.Module, IAdapter
    {
        private static readonly Scalar One = 1;
        private readonly Scalar _scaling;
        private readonly MergeState _merge = new();
        private bool _disposed;

        internal LoraEmbeddingLayer(long num_embeddings, long embedding_dim, int r, double lora_alpha, bool use_rslora,
                                    ScalarType dtype, Device? device, string init_lora_weights, bool draw)
            : base(nameof(LoraEmbeddingLayer))
        {
            LoraLayer.CheckArguments(num_embeddings, embedding_dim, r, lora_alpha, 0, dtype);
            this.num_embeddings = num_embeddings;
            this.embedding_dim = embedding_dim;
            this.r = r;
            this.lora_alpha = lora_alpha;
            this.use_rslora = use_rslora;
            scaling = LoraConfig.Scaling(lora_alpha, r, use_rslora);
            if (!double.IsFinite(LoraLayer.ScalingIn(scaling, dtype)))
                throw new ArgumentException($"LoraEmbeddingLayer: scaling = {scaling.ToString(CultureInfo.InvariantCulture)} is not finite in {dtype} (lora_alpha {lora_alpha.ToString(CultureInfo.InvariantCulture)}, r {r}).", nameof(lora_alpha));
            _scaling = scaling;
            using (NewDisposeScope())
            {
                // PEFT's update_layer draws A, then B, from a standard normal, and reset_lora_parameters then sets A to
                // zeros and draws B again (unless init_lora_weights is false): the same draws, in the same order.
                Tensor a = draw ? randn(r, num_embeddings, dtype: dtype, device: device) : empty(r, num_embeddings, dtype: dtype, device: device);
                Tensor b = draw ? randn(embedding_dim, r, dtype: dtype, device: device) : empty(embedding_dim, r, dtype: dtype, device: device);
                if (draw && init_lora_weights != "false")
                {
                    a.zero_();
                    b.normal_();
                }
                lora_embedding_A = (Parameter)new Parameter(a).DetachFromDisposeScope();
                lora_embedding_B = (Parameter)new Parameter(b).DetachFromDisposeScope();
            }
        }

        /// <summary>The embedding's number of rows.</summary>
        public long num_embeddings { get; }

        /// <summary>The embedding's width.</summary>
        public long embedding_dim { get; }

        /// <summary>The adapter's rank.</summary>
        public int r { get; }

        /// <summary>The scale numerator.</summary>
        public double lora_alpha { get; }

        /// <summary>Whether the scaling is lora_alpha / √r.</summary>
        public bool use_rslora { get; }

        /// <summary>lora_alpha / r, or lora_alpha / √r with rsLoRA.</summary>
        public double scaling { get; }

        /// <summary>A, (r, num_embeddings). Registered by the host under <c>lora_embedding_A.&lt;adapter&gt;</c>.</summary>
        public Parameter lora_embedding_A { get; }

        /// <summary>B, (embedding_dim, r). Registered by the host under <c>lora_embedding_B.&lt;adapter&gt;</c>.</summary>
        public Parameter lora_embedding_B { get; }

        /// <summary>The adapter's name in its model.</summary>
        public string adapter_name { get; internal set; } = "default";

        /// <summary>Whether the update is folded into the host's weight.</summary>
        public bool merged => _merge.Merged;

        internal string Owner { get; set; } = nameof(LoraEmbeddingLayer);

        string IAdapter.Name { get => adapter_name; set => adapter_name = value; }

        string IAdapter.Owner { get => Owner; set => Owner = value; }

        double IAdapter.lora_dropout => 0;

        IEnumerable<Parameter> IAdapter.Parameters()
        {
            yield return lora_embedding_A;
            yield return lora_embedding_B;
        }

        IEnumerable<(string Attribute, nn.Module? Module, Parameter? Parameter)> IAdapter.Registrations()
        {
            yield return ("lora_embedding_A", null, lora_embedding_A);
            yield return ("lora_embedding_B", null, lora_embedding_B);
        }

        IEnumerable<(string Part, Tensor Value)> IAdapter.Tensors()
        {
            yield return ("lora_embedding_A", lora_embedding_A);
            yield return ("lora_embedding_B", lora_embedding_B);
        }

        (Tensor A, Tensor B) IAdapter.Factors => (lora_embedding_A, lora_embedding_B);

        /// <summary>An embedding's term is a lookup of A, not a product with the input: a mixed batch runs each adapter on its own rows.</summary>
        bool IAdapter.Stackable => false;

        void IAdapter.CheckRunsIn(Tensor output) => CheckRunsIn(output);

        (string Formula, string Part)? IAdapter.Rescaled => null;

        Tensor IAdapter.AddTerm(Tensor output, Tensor input, bool training, Tensor weight, Tensor? bias) => AddTo(output, input);

        /// <summary>
        /// Adds <c>embedding(indices, Aᵀ) · scaling · Bᵀ</c> to <paramref name="output"/> (the base lookup) in place and
        /// returns it; nothing while merged. (PEFT scales after the product with B; the last bit may differ.)
        /// </summary>
        /// <param name="output">The base embedding's output, (*, embedding_dim).</param>
        /// <param name="indices">The indices it looked up, (*).</param>
        public Tensor AddTo(Tensor output, Tensor indices)
        {
            ThrowIfDisposed();
            if (_merge.Merged)
                return output;
            CheckRunsIn(output);
            using var scope = NewDisposeScope();
            output.add_(Lookup(indices).mul_(_scaling).matmul(lora_embedding_B.t()), One);
            return output;
        }

        /// <summary>The old name of <see cref="AddTo"/>, which it calls.</summary>
        [Obsolete("use LoraEmbeddingLayer.AddTo")]
        public Tensor add_to(Tensor output, Tensor indices) => AddTo(output, indices);

        /// <summary>The old name of <see cref="get_delta_weight"/> (PEFT's name), which it calls.</summary>
        [Obsolete("use LoraEmbeddingLayer.get_delta_weight")]
        public Tensor delta_weight() => get_delta_weight();

        /// <summary>Refuses an output of another dtype or device than the adapter's, naming the layer.</summary>
        internal void CheckRunsIn(Tensor output)
        {
            if (lora_embedding_A.dtype != output.dtype || lora_embedding_A.device_type != output.device_type)
                throw new InvalidOperationException($"{Owner}: the adapter is {lora_embedding_A.dtype} on {lora_embedding_A.device}, but the embedding computes {output.dtype} on {output.device}: convert the model before the adapter is put in.");
        }

        /// <summary><c>embedding(indices, Aᵀ)</c>: the rows of Aᵀ the indices name, shape (*, r).</summary>
        internal Tensor Lookup(Tensor indices) => Lookup(lora_embedding_A, indices);

        internal static Tensor Lookup(Tensor a, Tensor indices)
        {
            var shape = new long[indices.dim() + 1];
            for (int i = 0; i < indices.dim(); i++)
                shape[i] = indices.size(i);
            shape[^1] = a.size(0);
            return a.t().index_select(0, indices.reshape(-1)).view(shape);
        }

        /// <summary><c>(B A)ᵀ · scaling</c>, (num_embeddings, embedding_dim), PEFT's get_delta_weight (fp16 and bf16 via float32 on the CPU). The caller owns it.</summary>
        public Tensor get_delta_weight()
        {
            ThrowIfDisposed();
            Tensor a = lora_embedding_A, b = lora_embedding_B;
            if (b.device_type == DeviceType.CPU && b.dtype is ScalarType.Float16 or ScalarType.BFloat16)
            {
                using var scope = NewDisposeScope();
                return b.to(ScalarType.Float32).matmul(a.to(ScalarType.Float32)).t().mul(_scaling).to(b.dtype).MoveToOuterDisposeScope();
            }
            using (NewDisposeScope())
                return b.matmul(a).t().mul(_scaling).MoveToOuterDisposeScope();
        }

        bool IAdapter.MergesFinite(Tensor weight)
        {
            using var noGrad = no_grad();
            using var scope = NewDisposeScope();
            if (!isfinite(lora_embedding_A).all().item<bool>() || !isfinite(lora_embedding_B).all().item<bool>())
                return false;
            return isfinite(weight.detach() + get_delta_weight()).all().item<bool>();
        }

        bool IAdapter.UpdateFinite(Tensor weight) => ((IAdapter)this).DeltaFinite();

        bool IAdapter.DeltaFinite()
        {
            using var noGrad = no_grad();
            using var scope = NewDisposeScope();
            if (LoraLayer.UpdateBounded(lora_embedding_A, lora_embedding_B, r, LoraLayer.ScalingIn(scaling, lora_embedding_B.dtype)))
                return true;
            return isfinite(get_delta_weight()).all().item<bool>();
        }

        // No DoRA on embeddings: the merge takes no norm, and normBase is not read.
        void IAdapter.MergeChecked(Parameter weight, bool keep, Tensor? normBase)
        {
            CheckWeight(weight);
            _merge.Merge(weight, keep, w => w.add_(get_delta_weight(), One));
        }

        /// <summary>Takes a merged update out of <paramref name="weight"/> again, restoring it bit for bit.</summary>
        public void unmerge(Parameter weight)
        {
            ThrowIfDisposed();
            _merge.Unmerge(weight, Owner);
        }

        void IAdapter.ApplyMerge(Tensor weight, Tensor? normBase)
        {
            using var noGrad = no_grad();
            using var scope = NewDisposeScope();
            weight.add_(get_delta_weight(), One);
        }

        void IAdapter.ForgetUnmerged() => _merge.Forget();

        internal void CheckWeight(Tensor weight)
        {
            if (weight.dim() != 2 || weight.size(0) != num_embeddings || weight.size(1) != embedding_dim)
                throw new ArgumentException($"{Owner}: the adapter is for an embedding of shape [{num_embeddings}, {embedding_dim}], but was given [{string.Join(", ", weight.shape)}].", nameof(weight));
        }

        /// <summary>Registers nothing: the host registers A and B under its own names.</summary>
        protected override void RegisterComponents()
        {
        }

        /// <inheritdoc />
        protected override void Dispose(bool disposing)
        {
            if (disposing && !_disposed)
            {
                _merge.Dispose();
                lora_embedding_A.Dispose();
                lora_embedding_B.Dispose();
            }
            base.Dispose(disposing);
            _disposed = true;
        }

        private void ThrowIfDisposed() => ObjectDisposedException.ThrowIf(_disposed, this);

        /// <summary>For example <c>LoraEmbeddingLayer(r=4, lora_alpha=8, scaling=2, merged=False)</c>.</summary>
        public override string ToString() =>
            $"LoraEmbeddingLayer(r={r}, lora_alpha={lora_alpha.ToString(CultureInfo.InvariantCulture)}, scaling={scaling.ToString(CultureInfo.InvariantCulture)}, merged={(merged ? "True" : "False")})";
    }
}
