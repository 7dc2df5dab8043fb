using System;
using System.Collections.Generic;
using System.Linq;
using System.Globalization;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Lora
{
    /// <summary>
    /// One LoRA adapter of a linear layer and its arithmetic, written once (PEFT's <c>LoraLayer</c> with
    /// <c>lora.Linear</c>'s <c>get_delta_weight</c>, <c>merge</c>, <c>unmerge</c> and forward term):
    /// <c>y = x Wᵀ + b + lora_B(lora_A(dropout(x))) · scaling</c>, scaling = lora_alpha / r (or / √r with rsLoRA), with
    /// <c>lora_A</c> (r, in) and <c>lora_B</c> (out, r) bias-free projections.
    /// </summary>
    /// <remarks>
    /// <para>The layer does not own the base weight: a host (a <see cref="CustomLinear"/> or a <see cref="Conv1D"/> through its
    /// <c>Adapter</c> slot, a <see cref="LoraWrapper"/>, a sealed <c>nn.Linear</c> through a forward
    /// hook, or your own module such as the sample's <c>LoraLinear</c>) computes <c>x Wᵀ + b</c>, hands it to
    /// <see cref="AddTo(Tensor, Tensor, bool, Tensor, Tensor?)"/>, and passes its weight to <see cref="merge"/> and <see cref="unmerge"/>. The weight before a
    /// merge is kept by this module (one extra copy of W while merged), so that <see cref="unmerge"/> restores it bit for
    /// bit (PEFT subtracts Δ again, which can leave an element one rounding step off), and freed with it.</para>
    /// <para>The host registers <see cref="lora_A"/> and <see cref="lora_B"/> under its own names; this module registers
    /// nothing of its own, so it adds no key to any state_dict.</para>
    /// <para>The update is computed as <c>((x Aᵀ) · scaling) Bᵀ</c> and added to the output — for a float32 2-D batch
    /// accumulated into it by one <c>addmm_</c>, with no full-size temporary. PEFT scales after the second product
    /// (<c>(x Aᵀ Bᵀ) · scaling</c>): the last bit may differ. Scaling the r-wide product is what lets a batch whose rows
    /// use different adapters (<see cref="LoraModel.MixedBatch"/>) give each row the bits it gets alone with its
    /// adapter. A float32 merge is one <c>addmm_</c> into W with the scaling as its alpha; other dtypes add
    /// <see cref="get_delta_weight"/>, PEFT's formula.</para>
    /// <para>With <see cref="use_dora"/> the adapter is DoRA's (PEFT's <c>DoraLinearLayer</c>): a trainable magnitude per
    /// output row, <see cref="lora_magnitude_vector"/>, rescales the adapted weight's rows to it; the rows' norm
    /// ‖W + scaling · B A‖ is computed afresh in every forward and detached from the graph, as the DoRA paper and PEFT
    /// do.</para>
    /// </remarks>
    public sealed class LoraLayer : nn.Module, IAdapter
    {
        private static readonly Scalar One = 1;
        private readonly Scalar _scaling;
        private readonly MergeState _merge = new();
        private ILoraVariant<LoraLayer> _variant = PlainLora.Instance;
        private bool _disposed;

        /// <summary>Creates an adapter for a layer of <paramref name="in_features"/> → <paramref name="out_features"/>, initialised with <see cref="reset_lora_parameters"/>.</summary>
        /// <param name="in_features">The base layer's input size.</param>
        /// <param name="out_features">The base layer's output size.</param>
        /// <param name="r">The rank, 1 or more.</param>
        /// <param name="lora_alpha">The scale numerator, a finite number.</param>
        /// <param name="lora_dropout">Dropout on the adapter's input in training mode, in [0, 1).</param>
        /// <param name="use_rslora">Rank-stabilised LoRA: scaling = lora_alpha / √r.</param>
        /// <param name="dtype">The base weight's dtype: Float32, Float64, Float16 or BFloat16.</param>
        /// <param name="device">The base weight's device; the default device if null.</param>
        /// <param name="init_lora_weights">As <see cref="LoraConfig.init_lora_weights"/>: <c>"true"</c>, <c>"gaussian"</c> or <c>"false"</c>.</param>
        /// <exception cref="ArgumentOutOfRangeException">An argument is out of its range; the message names it.</exception>
        /// <exception cref="ArgumentException">The dtype is not a real floating-point type, or the scaling is not finite in it.</exception>
        public LoraLayer(long in_features, long out_features, int r, double lora_alpha = 8, double lora_dropout = 0, bool use_rslora = false,
                         ScalarType dtype = ScalarType.Float32, Device? device = null, string init_lora_weights = "true")
            : this(in_features, out_features, r, lora_alpha, lora_dropout, use_rslora, dtype, device, init_lora_weights, Init.Once)
        {
        }

        /// <summary>How a new adapter draws its first values.</summary>
        private enum Init
        {
            /// <summary>Not at all: its values are loaded from a file at once (PEFT would draw, then overwrite them).</summary>
            None,

            /// <summary><see cref="reset_lora_parameters"/> only, as loralib does: one draw for A with the default.</summary>
            Once,

            /// <summary>
            /// As PEFT's <c>update_layer</c>: lora_A and lora_B made as <c>nn.Linear</c> layers (each drawing its
            /// kaiming-uniform weight), then reset: under the same seed, PEFT's numbers.
            /// </summary>
            Peft,
        }

        /// <summary>An adapter whose values are loaded from a file next: no random numbers are drawn.</summary>
        internal static LoraLayer ForLoading(long in_features, long out_features, int r, double lora_alpha, double lora_dropout, bool use_rslora,
                                             ScalarType dtype, Device? device, bool fan_in_fan_out = false) =>
            new(in_features, out_features, r, lora_alpha, lora_dropout, use_rslora, dtype, device, "true", Init.None) { fan_in_fan_out = fan_in_fan_out };

        /// <summary>A fresh adapter drawn as PEFT's <c>get_peft_model</c> draws it.</summary>
        internal static LoraLayer ForInject(long in_features, long out_features, int r, double lora_alpha, double lora_dropout, bool use_rslora,
                                            ScalarType dtype, Device? device, string init_lora_weights, bool fan_in_fan_out = false) =>
            new(in_features, out_features, r, lora_alpha, lora_dropout, use_rslora, dtype, device, init_lora_weights, Init.Peft) { fan_in_fan_out = fan_in_fan_out };

        private LoraLayer(long in_features, long out_features, int r, double lora_alpha, double lora_dropout, bool use_rslora,
                          ScalarType dtype, Device? device, string init_lora_weights, Init init)
            : base(nameof(LoraLayer))
        {
            CheckArguments(in_features, out_features, r, lora_alpha, lora_dropout, dtype);
            this.in_features = in_features;
            this.out_features = out_features;
            this.r = r;
            this.lora_alpha = lora_alpha;
            this.lora_dropout = lora_dropout;
            this.use_rslora = use_rslora;
            scaling = LoraConfig.Scaling(lora_alpha, r, use_rslora);
            if (!double.IsFinite(ScalingIn(dtype)))
                throw new ArgumentException($"LoraLayer: scaling = {(use_rslora ? "lora_alpha / √r" : "lora_alpha / r")} = {scaling.ToString(CultureInfo.InvariantCulture)} is not finite in {dtype} (lora_alpha {lora_alpha.ToString(CultureInfo.InvariantCulture)}, r {r}).", nameof(lora_alpha));
            _scaling = scaling;
            if (init_lora_weights is not ("true" or "gaussian" or "false"))
                throw new ArgumentException($"LoraLayer: init_lora_weights must be \"true\", \"gaussian\" or \"false\", but is \"{init_lora_weights}\".", nameof(init_lora_weights));
            lora_A = new LoraProjection(r, in_features, dtype, device, initialise: init == Init.Peft);
            lora_B = new LoraProjection(out_features, r, dtype, device, initialise: init == Init.Peft);
            // PEFT leaves nn.Linear's values in place for init_lora_weights = false.
            if (init == Init.Once || init == Init.Peft && init_lora_weights != "false")
                reset_lora_parameters(init_lora_weights);
        }

        /// <summary>The base layer's input size.</summary>
        public long in_features { get; }

        /// <summary>The base layer's output size.</summary>
        public long out_features { get; }

        /// <summary>The adapter's rank.</summary>
        public int r { get; }

        /// <summary>The scale numerator.</summary>
        public double lora_alpha { get; }

        /// <summary>Dropout probability on the adapter's input (training mode only).</summary>
        public double lora_dropout { get; }

        /// <summary>Whether the scaling is lora_alpha / √r.</summary>
        public bool use_rslora { get; }

        /// <summary>
        /// Whether the host's weight is stored (in_features, out_features), transposed against a Linear's — transformers'
        /// <c>Conv1D</c>, which PEFT adapts as <c>lora.Linear</c> with <c>fan_in_fan_out=True</c>. lora_A (r, in) and lora_B
        /// (out, r) and the forward term are the same either way; what changes is the weight's side: <see cref="merge"/>,
        /// <see cref="unmerge"/> and DoRA's row norms read and write the weight through its transpose, and
        /// <see cref="get_delta_weight"/> returns <c>(B A)ᵀ · scaling</c>, (in, out), as PEFT's does.
        /// </summary>
        public bool fan_in_fan_out { get; private init; }

        /// <summary>lora_alpha / r, or lora_alpha / √r with rsLoRA.</summary>
        public double scaling { get; }

        /// <summary>The down-projection, weight (r, in_features). Registered by the host, under its own name.</summary>
        public LoraProjection lora_A { get; }

        /// <summary>The up-projection, weight (out_features, r). Registered by the host, under its own name.</summary>
        public LoraProjection lora_B { get; }

        /// <summary>Whether the update is folded into the host's weight (<see cref="merge"/>); a merged adapter adds nothing in <see cref="AddTo(Tensor, Tensor, bool, Tensor, Tensor?)"/>.</summary>
        public bool merged => _merge.Merged;

        /// <summary>
        /// While merged, the host's weight as it was before the merge (kept by this adapter, which frees it); otherwise null.
        /// Public for hosts outside this package, such as samples/Lora's <c>LoraLinear</c>, whose state_dict describes the
        /// unmerged layer.
        /// </summary>
        public Tensor? WeightBeforeMerge => _merge.Kept;

        /// <summary>The old name of <see cref="WeightBeforeMerge"/>.</summary>
        [Obsolete("use LoraLayer.WeightBeforeMerge")]
        public Tensor? weight_before_merge => WeightBeforeMerge;

        /// <summary>Who hosts this adapter, for messages (the module's path in its model, or the host's description).</summary>
        internal string Owner { get; set; } = nameof(LoraLayer);

        /// <summary>The adapter's name in its model (PEFT's adapter_name; <c>default</c> unless named).</summary>
        public string adapter_name { get; internal set; } = "default";

        /// <summary>DoRA's magnitude, one per output row (PEFT's <c>lora_magnitude_vector</c>), or null for plain LoRA.</summary>
        public DoraMagnitude? lora_magnitude_vector => _variant.Parts().Select(p => p.Module).OfType<DoraMagnitude>().FirstOrDefault();

        /// <summary>Whether this is a DoRA adapter (see <see cref="lora_magnitude_vector"/>).</summary>
        public bool use_dora => lora_magnitude_vector is not null;

        /// <summary>The variant: how the term enters the output and what a merge writes (<see cref="PlainLora"/>, <see cref="DoraLinear"/>).</summary>
        internal ILoraVariant<LoraLayer> Variant => _variant;

        /// <summary>The scaling as a <see cref="Scalar"/> made once (TorchSharp's <c>mul_(double)</c> would make one per call).</summary>
        internal Scalar ScalingScalar => _scaling;

        string IAdapter.Name { get => adapter_name; set => adapter_name = value; }

        string IAdapter.Owner { get => Owner; set => Owner = value; }

        bool IAdapter.MergesFinite(Tensor weight) => MergesFinite(weight);

        bool IAdapter.UpdateFinite(Tensor weight) => UpdateFinite(weight);

        bool IAdapter.DeltaFinite() => DeltaFinite();

        void IAdapter.MergeChecked(Parameter weight, bool keep, Tensor? normBase) => MergeChecked(weight, keep, normBase);

        void IAdapter.ForgetUnmerged() => ForgetUnmerged();

        void IAdapter.ApplyMerge(Tensor weight, Tensor? normBase)
        {
            using var noGrad = no_grad();
            AddDelta(weight, normBase);
        }

        IEnumerable<Parameter> IAdapter.Parameters()
        {
            yield return lora_A.weight;
            yield return lora_B.weight;
            foreach (var (_, _, parameter) in _variant.Parts())
                yield return parameter;
        }

        IEnumerable<(string Attribute, nn.Module? Module, Parameter? Parameter)> IAdapter.Registrations()
        {
            yield return ("lora_A", lora_A, null);
            yield return ("lora_B", lora_B, null);
            foreach (var (attribute, module, _) in _variant.Parts())
                yield return (attribute, module, null);
        }

        IEnumerable<(string Part, Tensor Value)> IAdapter.Tensors()
        {
            yield return ("lora_A", lora_A.weight);
            yield return ("lora_B", lora_B.weight);
            foreach (var (attribute, _, parameter) in _variant.Parts())
                yield return (attribute, parameter);
        }

        (Tensor A, Tensor B) IAdapter.Factors => (lora_A.weight, lora_B.weight);

        bool IAdapter.Stackable => _variant.Stackable;

        void IAdapter.CheckRunsIn(Tensor output) => CheckRunsIn(output);

        (string Formula, string Part)? IAdapter.Rescaled => _variant.Rescaled;

        Tensor IAdapter.AddTerm(Tensor output, Tensor input, bool training, Tensor weight, Tensor? bias) => AddTo(output, input, training, weight, bias);

        /// <summary>
        /// Makes this a DoRA adapter for <paramref name="weight"/>, the host's weight (<see cref="DoraLinear"/>): the
        /// magnitude starts as the rows' norm ‖W + scaling · B A‖ (PEFT's <c>DoraLinearLayer.update_layer</c>), so the layer
        /// computes what it did; with <paramref name="compute"/> false (its values are loaded next) it is only allocated.
        /// The host registers the magnitude under its own name.
        /// </summary>
        /// <exception cref="InvalidOperationException">It is DoRA already, or merged.</exception>
        internal void EnableDora(Tensor weight, bool compute = true)
        {
            ThrowIfDisposed();
            if (use_dora || merged)
                throw new InvalidOperationException($"{Owner}: the adapter is {(use_dora ? "DoRA already" : "merged")}.");
            CheckWeight(weight);
            using Tensor? transposed = fan_in_fan_out ? weight.t() : null;
            _variant = new DoraLinear(this, transposed ?? weight, compute);
        }

        /// <summary>
        /// Re-initialises the adapter as PEFT does: <c>"true"</c> — A kaiming-uniform (a = √5), B zero (the adapter then
        /// adds nothing); <c>"gaussian"</c> — A normal with std 1/r, B zero; <c>"false"</c> — A and B as
        /// <c>nn.Linear</c> initialises its weight (kaiming-uniform, a = √5).
        /// </summary>
        /// <exception cref="ArgumentException">Another initialisation is named.</exception>
        public void reset_lora_parameters(string init_lora_weights = "true")
        {
            ThrowIfDisposed();
            ArgumentNullException.ThrowIfNull(init_lora_weights);
            using var noGrad = no_grad();
            switch (init_lora_weights)
            {
                case "true":
                    nn.init.kaiming_uniform_(lora_A.weight, a: Math.Sqrt(5));
                    nn.init.zeros_(lora_B.weight);
                    break;
                case "gaussian":
                    nn.init.normal_(lora_A.weight, std: 1.0 / r);
                    nn.init.zeros_(lora_B.weight);
                    break;
                case "false":
                    nn.init.kaiming_uniform_(lora_A.weight, a: Math.Sqrt(5));
                    nn.init.kaiming_uniform_(lora_B.weight, a: Math.Sqrt(5));
                    break;
                default:
                    throw new ArgumentException($"{Owner}: init_lora_weights must be \"true\", \"gaussian\" or \"false\", but is \"{init_lora_weights}\".", nameof(init_lora_weights));
            }
        }

        /// <summary>
        /// The weight update the adapter stands for, <c>(B A) · scaling</c>, in the host weight's shape: (out_features,
        /// in_features), or (in_features, out_features) transposed with <see cref="fan_in_fan_out"/>, as PEFT's
        /// <c>get_delta_weight</c> computes it (on the CPU, float16 and bfloat16 adapters are multiplied in float32 and the
        /// result rounded back). The caller owns the result.
        /// </summary>
        public Tensor get_delta_weight()
        {
            ThrowIfDisposed();
            if (!fan_in_fan_out)
                return DeltaOutIn();
            // PEFT: transpose(B @ A, fan_in_fan_out) * scaling; the transpose made contiguous, so the caller owns one tensor.
            using Tensor delta = DeltaOutIn();
            using Tensor transposed = delta.t();
            return transposed.contiguous();
        }

        /// <summary><c>(B A) · scaling</c>, (out_features, in_features), whatever the host's layout: what the variants add to the weight as a Linear's.</summary>
        internal Tensor DeltaOutIn()
        {
            Tensor a = lora_A.weight, b = lora_B.weight;
            ScalarType dtype = b.dtype;
            if (b.device_type == DeviceType.CPU && dtype is ScalarType.Float16 or ScalarType.BFloat16)
            {
                using var scope = NewDisposeScope();
                return b.to(ScalarType.Float32).matmul(a.to(ScalarType.Float32)).mul_(_scaling).to(dtype).MoveToOuterDisposeScope();
            }
            // Scaled in place: the same bits as (B A) * scaling, one full-size tensor fewer.
            return b.matmul(a).mul_(_scaling);
        }

        /// <summary>
        /// Adds the adapter's term, <c>lora_B(lora_A(dropout(input))) · scaling</c>, to <paramref name="output"/> in place
        /// (the host's <c>x Wᵀ + b</c>, whose value no backward needs) and returns it. Adds nothing while merged. Dropout
        /// applies in training mode only, and only to the adapter's input. A DoRA adapter needs the base layer's weight
        /// and bias: use the other overload.
        /// </summary>
        /// <param name="output">The base layer's output, shape (*, out_features).</param>
        /// <param name="input">The base layer's input, shape (*, in_features), already accepted by the base layer.</param>
        /// <param name="training">Whether the host is in training mode.</param>
        /// <exception cref="InvalidOperationException">The adapter's dtype or device differs from the output's (a model
        /// converted with <c>.to(...)</c> after the adapter was put into a sealed <c>nn.Linear</c>, which does not convert its
        /// children), or it is a DoRA adapter; the message names the layer.</exception>
        public Tensor AddTo(Tensor output, Tensor input, bool training)
        {
            if (use_dora)
                throw new InvalidOperationException($"{Owner}: a DoRA adapter rescales the base layer's output: pass the base layer's weight and bias to AddTo.");
            return AddTo(output, input, training, null!, null);
        }

        /// <summary>
        /// As <see cref="AddTo(Tensor, Tensor, bool)"/>, for any adapter: a DoRA adapter adds
        /// <c>(m / ‖W + scaling · B A‖ − 1) · (x Wᵀ) + m / ‖W + scaling · B A‖ · lora_B(lora_A(x)) · scaling</c>, PEFT's
        /// <c>DoraLinearLayer.forward</c>, where x Wᵀ is the output without its bias (or, with dropout in training,
        /// computed again from the dropped input).
        /// </summary>
        /// <param name="output">The base layer's output, shape (*, out_features).</param>
        /// <param name="input">The base layer's input.</param>
        /// <param name="training">Whether the host is in training mode.</param>
        /// <param name="weight">The base layer's weight (only read by DoRA).</param>
        /// <param name="bias">The base layer's bias, or null (only read by DoRA).</param>
        public Tensor AddTo(Tensor output, Tensor input, bool training, Tensor weight, Tensor? bias)
        {
            ThrowIfDisposed();
            if (_merge.Merged)
                return output;
            CheckRunsIn(output);
            using var scope = NewDisposeScope();
            bool dropped = training && lora_dropout > 0;
            Tensor x = dropped ? nn.functional.dropout(input, lora_dropout, training: true) : input;
            // The variants see the weight as a Linear's (out, in): a Conv1D's through its transpose, a view (freed by the scope).
            _variant.AddTerm(this, output, x, dropped, fan_in_fan_out && weight is not null ? weight.t() : weight!, bias);
            return output;
        }

        /// <summary>
        /// The low-rank term, written once for every path that adds it (one adapter, and a mixed batch's stacked adapters):
        /// <c>h = (x Aᵀ) · scale</c>, then <c>h Bᵀ</c> added to <paramref name="output"/> — for a float32 2-D batch accumulated
        /// into it by one <c>addmm_</c>, with no full-size temporary. <paramref name="scale"/> is the adapter's scaling.
        /// </summary>
        internal static void AddLowRank(Tensor output, Tensor x, Tensor a, Tensor b, Scalar scale) =>
            Accumulate(output, nn.functional.linear(x, a).mul_(scale), b);  // libtorch: linear without a bias is matmul(x, aᵀ), in one call

        /// <summary>As <see cref="AddLowRank(Tensor, Tensor, Tensor, Tensor, Scalar)"/>, with a scale per row and rank column (broadcast over <c>x Aᵀ</c>).</summary>
        internal static void AddLowRank(Tensor output, Tensor x, Tensor a, Tensor b, Tensor scales) =>
            Accumulate(output, nn.functional.linear(x, a).mul_(scales), b);

        private static void Accumulate(Tensor output, Tensor h, Tensor b)
        {
            if (output.dtype == ScalarType.Float32 && h.dim() == 2 && output.dim() == 2)
                output.addmm_(h, b.t(), 1, 1);  // accumulated into the output: no full-size temporary
            else
                output.add_(h.matmul(b.t()), One);
        }

        /// <summary>The old name of <see cref="AddTo(Tensor, Tensor, bool)"/>, which it calls.</summary>
        [Obsolete("use LoraLayer.AddTo")]
        public Tensor add_to(Tensor output, Tensor input, bool training) => AddTo(output, input, training);

        /// <summary>The old name of <see cref="AddTo(Tensor, Tensor, bool, Tensor, Tensor?)"/>, which it calls.</summary>
        [Obsolete("use LoraLayer.AddTo")]
        public Tensor add_to(Tensor output, Tensor input, bool training, Tensor weight, Tensor? bias) => AddTo(output, input, training, weight, bias);

        /// <summary>The old name of <see cref="get_delta_weight"/> (PEFT's name), which it calls.</summary>
        [Obsolete("use LoraLayer.get_delta_weight")]
        public Tensor delta_weight() => get_delta_weight();

        /// <summary>Refuses an output of another dtype or device than the adapter's, naming the layer.</summary>
        internal void CheckRunsIn(Tensor output)
        {
            Tensor a = lora_A.weight;
            if (a.dtype != output.dtype || a.device_type != output.device_type || a.device_index != output.device_index)
                throw new InvalidOperationException(
                    $"{Owner}: the adapter is {a.dtype} on {a.device}, but the layer computes {output.dtype} on {output.device}. " +
                    "TorchSharp's nn.Linear does not pass .to(...) on to its children: convert the model before the adapter is injected or loaded (or unload it, convert, and load it again).");
        }

        /// <summary>
        /// Folds the adapter into <paramref name="weight"/> (<c>W += Δ</c>, PEFT's merge with <c>safe_merge</c>): refused,
        /// with nothing written, when the merged weight would hold NaN or infinity. The weight before merging is kept for
        /// <see cref="unmerge"/>. A second call does nothing. While merged, the adapter gets no gradients.
        /// </summary>
        /// <param name="weight">The host's weight, (out_features, in_features); (in_features, out_features) with <see cref="fan_in_fan_out"/>.</param>
        /// <exception cref="InvalidOperationException">The merged weight would not be finite; nothing was changed.</exception>
        public void merge(Parameter weight)
        {
            ThrowIfDisposed();
            ArgumentNullException.ThrowIfNull(weight);
            if (merged)
                return;
            CheckWeight(weight);
            if (!MergesFinite(weight))
                throw new InvalidOperationException($"{Owner}: merging its adapter would put NaN or infinity into its weight; no weight was changed.");
            MergeChecked(weight);
        }

        /// <summary>
        /// Takes the adapter out of <paramref name="weight"/> again, restoring the weight kept by <see cref="merge"/> bit
        /// for bit. Does nothing when not merged.
        /// </summary>
        public void unmerge(Parameter weight)
        {
            ThrowIfDisposed();
            ArgumentNullException.ThrowIfNull(weight);
            _merge.Unmerge(weight, Owner);
        }

        /// <summary>Forgets the kept weight without restoring it: the host keeps W + Δ for good (merge_and_unload).</summary>
        internal void ForgetUnmerged() => _merge.Forget();

        /// <summary>
        /// The merge itself, for callers that have checked every layer with <see cref="MergesFinite"/> first. Without
        /// <paramref name="keep"/> (merge_and_unload) the weight before merging is not kept: there is nothing to unmerge to.
        /// </summary>
        internal void MergeChecked(Parameter weight, bool keep = true, Tensor? normBase = null) => _merge.Merge(weight, keep, w => AddDelta(w, normBase));

        /// <summary>
        /// Whether W + Δ stays finite. Cheap where it can be: when A, B and W are finite and
        /// |W| + r · max|B| · max|A| · |scaling| is below the dtype's largest value, it does; otherwise the merged weight is
        /// computed on the side and checked, as PEFT's safe_merge does.
        /// </summary>
        internal bool MergesFinite(Tensor weight)
        {
            using var noGrad = no_grad();
            using var scope = NewDisposeScope();
            Tensor a = lora_A.weight, b = lora_B.weight;
            if (!isfinite(a).all().item<bool>() || !isfinite(b).all().item<bool>())
                return false;
            // Largest magnitudes through max and min, which reduce without allocating a |W| as large as W.
            static double Largest(Tensor t) => t.numel() == 0 ? 0 : Math.Max(Math.Abs(t.max().to(ScalarType.Float64).item<double>()), Math.Abs(t.min().to(ScalarType.Float64).item<double>()));
            double bound = Largest(weight.detach()) + r * Largest(a.detach()) * Largest(b.detach()) * Math.Abs(scaling);
            // DoRA divides by the rows' norm: only the merged weight itself can tell.
            if (_variant.MergeIsAdditive && double.IsFinite(bound) && bound < finfo(weight.dtype).max)
                return true;
            using Tensor side = weight.detach().clone();
            AddDelta(side);
            return isfinite(side).all().item<bool>();
        }

        /// <summary>
        /// Whether the update <c>scaling · B A</c> is finite in the adapter's dtype (a scaling finite in float32, 2.5e38,
        /// times B A can still overflow), and for DoRA the rescaled weight <c>m / ‖W + ΔW‖ · (W + ΔW)</c>, which the forward
        /// applies, too. Cheap when <c>r · max|A| · max|B| · |scaling|</c> is far below the dtype's largest value.
        /// </summary>
        internal bool UpdateFinite(Tensor weight)
        {
            if (!DeltaFinite())
                return false;
            if (_variant.MergeIsAdditive)
                return true;
            using var noGrad = no_grad();
            using var scope = NewDisposeScope();
            using Tensor side = weight.detach().clone();
            AddDelta(side);
            return isfinite(side).all().item<bool>();
        }

        /// <summary>Whether <c>scaling · B A</c> alone is finite in the adapter's dtype.</summary>
        internal bool DeltaFinite()
        {
            using var noGrad = no_grad();
            using var scope = NewDisposeScope();
            return UpdateBounded(lora_A.weight, lora_B.weight, r, ScalingIn(lora_B.weight.dtype)) || isfinite(get_delta_weight()).all().item<bool>();
        }

        /// <summary>
        /// Whether A and B are finite and every element of <c>scaling · B A</c> is bounded below half the dtype's largest
        /// value by <c>r · max|A| · max|B| · |scaling|</c> (half: room for the products' rounding). False means "compute it".
        /// </summary>
        internal static bool UpdateBounded(Tensor a, Tensor b, int r, double scaling)
        {
            if (!isfinite(a).all().item<bool>() || !isfinite(b).all().item<bool>())
                return false;
            static double Largest(Tensor t) => t.numel() == 0 ? 0 : Math.Max(Math.Abs(t.max().to(ScalarType.Float64).item<double>()), Math.Abs(t.min().to(ScalarType.Float64).item<double>()));
            double bound = r * Largest(a.detach()) * Largest(b.detach()) * Math.Abs(scaling);
            return double.IsFinite(bound) && bound < finfo(b.dtype).max / 2;
        }

        /// <summary>
        /// Writes the merged weight into <paramref name="weight"/>, as the variant merges (<c>W += Δ</c> for plain LoRA);
        /// <paramref name="normBase"/>, the weight before any adapter of this merge (DoRA's norm), or null: the weight itself.
        /// </summary>
        private void AddDelta(Tensor weight, Tensor? normBase = null)
        {
            if (!fan_in_fan_out)
            {
                _variant.Merge(this, weight, normBase ?? weight);
                return;
            }
            // The variants write a Linear's (out, in) weight: a Conv1D's (in, out) one through its transpose, a view that
            // shares its storage, so the in-place writes land in the weight itself.
            using Tensor transposed = weight.t();
            if (normBase is null)
            {
                _variant.Merge(this, transposed, transposed);
                return;
            }
            using Tensor baseTransposed = normBase.t();
            _variant.Merge(this, transposed, baseTransposed);
        }

        /// <summary>The weight a host passes must be the one this adapter was made for.</summary>
        internal void CheckWeight(Tensor weight)
        {
            var (rows, columns) = fan_in_fan_out ? (in_features, out_features) : (out_features, in_features);
            if (weight.dim() != 2 || weight.size(0) != rows || weight.size(1) != columns)
                throw new ArgumentException($"{Owner}: the adapter is for a weight of shape [{rows}, {columns}]{(fan_in_fan_out ? " (in, out: fan_in_fan_out)" : "")}, but was given [{string.Join(", ", weight.shape)}].", nameof(weight));
        }

        /// <summary>The scaling as the given dtype holds it.</summary>
        internal double ScalingIn(ScalarType dtype) => ScalingIn(scaling, dtype);

        internal static double ScalingIn(double scaling, ScalarType dtype) => dtype switch
        {
            ScalarType.Float64 => scaling,
            ScalarType.Float32 => (float)scaling,
            ScalarType.Float16 => (double)(Half)scaling,
            ScalarType.BFloat16 => BFloat16(scaling),
            _ => scaling,
        };

        /// <summary>bfloat16 has float32's exponent range: finite exactly where the float is (rounding aside).</summary>
        private static double BFloat16(double value)
        {
            float f = (float)value;
            if (!float.IsFinite(f))
                return f;
            return Math.Abs(f) > 3.3895313892515355e38 ? double.PositiveInfinity * Math.Sign(f) : f;
        }

        /// <summary>
        /// Throws what the constructor throws for these arguments, without making anything or drawing a random number:
        /// for this package's hosts, which check an adapter's arguments before they make anything.
        /// </summary>
        /// <exception cref="ArgumentOutOfRangeException">An argument is out of its range; the exception names it.</exception>
        /// <exception cref="ArgumentException">The dtype is not Float32, Float64, Float16 or BFloat16.</exception>
        internal static void CheckArguments(long in_features, long out_features, int r, double lora_alpha, double lora_dropout, ScalarType dtype)
        {
            if (in_features < 1)
                throw new ArgumentOutOfRangeException(nameof(in_features), in_features, $"LoraLayer: in_features must be 1 or more, but is {in_features}.");
            if (out_features < 1)
                throw new ArgumentOutOfRangeException(nameof(out_features), out_features, $"LoraLayer: out_features must be 1 or more, but is {out_features}.");
            if (r < 1)
                throw new ArgumentOutOfRangeException(nameof(r), r, $"LoraLayer: the rank r must be 1 or more, but is {r}.");
            if (!double.IsFinite(lora_alpha))
                throw new ArgumentOutOfRangeException(nameof(lora_alpha), lora_alpha, $"LoraLayer: lora_alpha must be a finite number, but is {lora_alpha.ToString(CultureInfo.InvariantCulture)}.");
            if (!(lora_dropout >= 0 && lora_dropout < 1))
                throw new ArgumentOutOfRangeException(nameof(lora_dropout), lora_dropout, $"LoraLayer: lora_dropout must be in [0, 1), but is {lora_dropout.ToString(CultureInfo.InvariantCulture)}.");
            if (dtype is not (ScalarType.Float32 or ScalarType.Float64 or ScalarType.Float16 or ScalarType.BFloat16))
                throw new ArgumentException($"LoraLayer: adapters are made for Float32, Float64, Float16 and BFloat16 layers, not {dtype}.", nameof(dtype));
        }

        /// <summary>Registers nothing: the host registers <see cref="lora_A"/> and <see cref="lora_B"/> under its own names.</summary>
        protected override void RegisterComponents()
        {
        }

        /// <inheritdoc />
        protected override void _toEpilog(ScalarType? dtype, Device? device, bool non_blocking)
        {
            // The projections are converted as children of the host; the kept weight is this module's own state.
            base._toEpilog(dtype, device, non_blocking);
            _merge.Convert(dtype, device);
        }

        /// <inheritdoc />
        protected override void Dispose(bool disposing)
        {
            if (disposing && !_disposed)
            {
                _merge.Dispose();
                lora_A.Dispose();
                lora_B.Dispose();
                _variant.Dispose();
            }
            base.Dispose(disposing);
            _disposed = true;
        }

        private void ThrowIfDisposed() => ObjectDisposedException.ThrowIf(_disposed, this);

        /// <summary>For example <c>LoraLayer(r=4, lora_alpha=8, scaling=2, merged=False)</c>.</summary>
        public override string ToString() =>
            $"LoraLayer(r={r}, lora_alpha={lora_alpha.ToString(CultureInfo.InvariantCulture)}, scaling={scaling.ToString(CultureInfo.InvariantCulture)}" +
            $"{(use_rslora ? ", use_rslora=True" : "")}{(lora_dropout > 0 ? $", lora_dropout={lora_dropout.ToString(CultureInfo.InvariantCulture)}" : "")}, merged={(merged ? "True" : "False")})";
    }

    /// <summary>
    /// A bias-free linear map with one parameter, <c>weight</c> (out, in): PEFT's <c>lora_A</c> and <c>lora_B</c>, so that
    /// an adapted layer's state_dict has PEFT's keys <c>&lt;path&gt;.lora_A.weight</c> and <c>&lt;path&gt;.lora_B.weight</c>.
    /// </summary>
    public sealed class LoraProjection : nn.Module<Tensor, Tensor>
    {
        private Parameter _weight;

        internal LoraProjection(long out_features, long in_features, ScalarType dtype, Device? device, bool initialise) : base(nameof(LoraProjection))
        {
            // Made in a dispose scope and detached from it: new Parameter(t) takes over t's handle there.
            using (NewDisposeScope())
            {
                var weight = new Parameter(empty(out_features, in_features, dtype: dtype, device: device));
                // nn.Linear's own initialisation of its weight (PEFT's lora_A and lora_B are nn.Linear layers).
                if (initialise)
                {
                    using (no_grad())
                        nn.init.kaiming_uniform_(weight, a: Math.Sqrt(5));
                }
                _weight = (Parameter)weight.DetachFromDisposeScope();
            }
            register_parameter("weight", _weight);
        }

        /// <summary>The projection's weight, (out, in). Setting it disposes the old parameter and registers the new one.</summary>
        public Parameter weight
        {
            get => _weight;
            set
            {
                ArgumentNullException.ThrowIfNull(value);
                if (value.Handle == _weight.Handle)
                    return;
                if (value.dim() != 2 || value.size(0) != _weight.size(0) || value.size(1) != _weight.size(1))
                    throw new ArgumentException($"LoraProjection: a new weight must have shape [{_weight.size(0)}, {_weight.size(1)}], but has [{string.Join(", ", value.shape)}].", nameof(value));
                _weight.Dispose();
                _weight = (Parameter)value.DetachFromDisposeScope();
                ConditionallyRegisterParameter("weight", _weight);
            }
        }

        /// <summary><c>x Wᵀ</c>.</summary>
        public override Tensor forward(Tensor input) => LinearFunctional.linear(input, _weight);

        /// <summary>Registers nothing beyond <c>weight</c>.</summary>
        protected override void RegisterComponents()
        {
        }

        /// <summary>For example <c>LoraProjection(in_features=16, out_features=4)</c>.</summary>
        public override string ToString() => $"LoraProjection(in_features={_weight.size(1)}, out_features={_weight.size(0)})";
    }
}
