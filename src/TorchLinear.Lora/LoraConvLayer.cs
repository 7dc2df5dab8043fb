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
    /// One LoRA adapter of a convolution, <c>nn.Conv1d</c> or <c>nn.Conv2d</c>, as PEFT's <c>lora.Conv1d</c> and
    /// <c>lora.Conv2d</c> (<c>_ConvNd</c>) build and compute it: <c>lora_A</c> a convolution of the base's
    /// <c>in_channels</c> to r channels with the base's kernel_size, stride and padding, <c>lora_B</c> a kernel-1
    /// convolution (1×1 for Conv2d) of r to <c>out_channels</c>, both without bias;
    /// <c>y = conv(x, W) + b + lora_B(lora_A(dropout(x))) · scaling</c>, scaling = lora_alpha / r (or / √r with rsLoRA).
    /// </summary>
    /// <remarks>
    /// <para>The weights: <c>lora_A.weight</c> (r, in_channels, *kernel_size), <c>lora_B.weight</c> (out_channels, r, 1[, 1]),
    /// PEFT's tensors and keys (<c>&lt;path&gt;.lora_A.weight</c>, 4-D for Conv2d, 3-D for Conv1d).</para>
    /// <para>Merging adds PEFT's <c>get_delta_weight</c> to the base weight: for a 1×1 Conv2d kernel
    /// <c>(B A) · scaling</c> as matrices, otherwise <c>conv(Aᵀ, B)ᵀ · scaling</c> (A's first two dimensions swapped,
    /// convolved with B as the kernel, swapped back), which is <c>Σⱼ B[o, j] A[j, i, …]</c>. The weight before a merge is
    /// kept (one copy of W while merged), so that <see cref="unmerge"/> restores it bit for bit (PEFT subtracts Δ again).</para>
    /// <para>What PEFT does not compute consistently is refused by name (<see cref="Unsupported"/>): <c>groups</c> &gt; 1
    /// (PEFT builds lora_B with the base's groups and cannot merge it), a dilation other than 1 (PEFT builds lora_A
    /// without it, so its update has another size than the base output: measured, a RuntimeError in its forward), a padding
    /// mode other than zeros (PEFT's lora_A pads with zeros whatever the base does, so its merged layer computes something
    /// else than its unmerged one), transposed convolutions and Conv3d (not implemented here).</para>
    /// <para>The layer does not own the base weight: a host computes <c>conv(x, W) + b</c>, hands it to
    /// <see cref="AddTo"/>, and passes its weight to <see cref="merge"/> and <see cref="unmerge"/>. The host registers
    /// <see cref="lora_A"/> and <see cref="lora_B"/> under its own names; this module registers nothing of its own.</para>
    /// </remarks>
    public sealed class LoraConvLayer : nn.Module, IAdapter
    {
        private static readonly Scalar One = 1;
        private readonly Scalar _scaling;
        private readonly MergeState _merge = new();
        private bool _disposed;

        /// <summary>
        /// Creates an adapter for <paramref name="base_layer"/> (an <c>nn.Conv1d</c> or <c>nn.Conv2d</c>) drawn as PEFT's
        /// <c>update_layer</c> draws it: lora_A and lora_B made as convolutions (each drawing its kaiming-uniform weight),
        /// then reset as <paramref name="init_lora_weights"/> says.
        /// </summary>
        /// <param name="base_layer">The convolution to adapt; only its shape and geometry are read.</param>
        /// <param name="r">The rank, 1 or more.</param>
        /// <param name="lora_alpha">The scale numerator, a finite number.</param>
        /// <param name="lora_dropout">Dropout on the adapter's input in training mode, in [0, 1).</param>
        /// <param name="use_rslora">Rank-stabilised LoRA: scaling = lora_alpha / √r.</param>
        /// <param name="init_lora_weights">As <see cref="LoraConfig.init_lora_weights"/>: <c>"true"</c>, <c>"gaussian"</c> or <c>"false"</c>.</param>
        /// <exception cref="NotSupportedException">The convolution is one PEFT does not adapt consistently (<see cref="Unsupported"/>).</exception>
        /// <exception cref="ArgumentOutOfRangeException">An argument is out of its range; the message names it.</exception>
        /// <exception cref="ArgumentException">The base weight's dtype is not a real floating-point type, or the scaling is not finite in it.</exception>
        public LoraConvLayer(Convolution base_layer, int r, double lora_alpha = 8, double lora_dropout = 0, bool use_rslora = false, string init_lora_weights = "true")
            : this(Geometry.Of(base_layer ?? throw new ArgumentNullException(nameof(base_layer)), nameof(LoraConvLayer)), r, lora_alpha, lora_dropout, use_rslora,
                   base_layer.weight.dtype, base_layer.weight.device, init_lora_weights, draw: true)
        {
        }

        /// <summary>An adapter whose values are loaded from a file next (<paramref name="draw"/> false: no random numbers drawn), or one drawn as PEFT draws it.</summary>
        internal LoraConvLayer(Geometry geometry, int r, double lora_alpha, double lora_dropout, bool use_rslora,
                               ScalarType dtype, Device? device, string init_lora_weights, bool draw)
            : base(nameof(LoraConvLayer))
        {
            LoraLayer.CheckArguments(geometry.InChannels, geometry.OutChannels, r, lora_alpha, lora_dropout, dtype);
            if (init_lora_weights is not ("true" or "gaussian" or "false"))
                throw new ArgumentException($"LoraConvLayer: init_lora_weights must be \"true\", \"gaussian\" or \"false\", but is \"{init_lora_weights}\".", nameof(init_lora_weights));
            Layout = geometry;
            this.r = r;
            this.lora_alpha = lora_alpha;
            this.lora_dropout = lora_dropout;
            this.use_rslora = use_rslora;
            scaling = LoraConfig.Scaling(lora_alpha, r, use_rslora);
            if (!double.IsFinite(LoraLayer.ScalingIn(scaling, dtype)))
                throw new ArgumentException($"LoraConvLayer: scaling = {(use_rslora ? "lora_alpha / √r" : "lora_alpha / r")} = {scaling.ToString(CultureInfo.InvariantCulture)} is not finite in {dtype} (lora_alpha {lora_alpha.ToString(CultureInfo.InvariantCulture)}, r {r}).", nameof(lora_alpha));
            _scaling = scaling;
            long[] ones = Enumerable.Repeat(1L, geometry.KernelSize.Length).ToArray();
            // PEFT: conv_layer(in_features, r, kernel_size, stride, padding, bias=False), then
            // conv_layer(r, out_features, (1,)*k, (1,)*k, bias=False): each draws its weight in its constructor.
            lora_A = new LoraConvProjection(new[] { (long)r, geometry.InChannels }.Concat(geometry.KernelSize).ToArray(), geometry.Stride, geometry.Padding, geometry.PaddingType, dtype, device, draw);
            lora_B = new LoraConvProjection(new[] { geometry.OutChannels, r }.Concat(ones).ToArray(), ones, new long[ones.Length], null, dtype, device, draw);
            if (draw && init_lora_weights != "false")
                reset_lora_parameters(init_lora_weights);
        }

        /// <summary>The base convolution's shape and geometry, as far as the adapter needs them.</summary>
        internal Geometry Layout { get; }

        /// <summary>The base convolution's input channels.</summary>
        public long in_channels => Layout.InChannels;

        /// <summary>The base convolution's output channels.</summary>
        public long out_channels => Layout.OutChannels;

        /// <summary>The base convolution's kernel size (one entry for Conv1d, two for Conv2d); lora_A's too.</summary>
        public IReadOnlyList<long> kernel_size => Layout.KernelSize;

        /// <summary>The adapter's rank.</summary>
        public int r { get; }

        /// <summary>The scale numerator.</summary>
        public double lora_alpha { get; }

        /// <summary>Dropout probability on the adapter's input (training mode only).</summary>
        public double lora_dropout { get; }

        /// <summary>Whether the scaling is lora_alpha / √r.</summary>
        public bool use_rslora { get; }

        /// <summary>lora_alpha / r, or lora_alpha / √r with rsLoRA.</summary>
        public double scaling { get; }

        /// <summary>The down-projection: a convolution with the base's kernel, stride and padding, weight (r, in_channels, *kernel_size).</summary>
        public LoraConvProjection lora_A { get; }

        /// <summary>The up-projection: a kernel-1 convolution, weight (out_channels, r, 1[, 1]).</summary>
        public LoraConvProjection lora_B { get; }

        /// <summary>Whether the update is folded into the host's weight; a merged adapter adds nothing in <see cref="AddTo"/>.</summary>
        public bool merged => _merge.Merged;

        /// <summary>The adapter's name in its model (PEFT's adapter_name; <c>default</c> unless named).</summary>
        public string adapter_name { get; internal set; } = "default";

        internal string Owner { get; set; } = nameof(LoraConvLayer);

        string IAdapter.Name { get => adapter_name; set => adapter_name = value; }

        string IAdapter.Owner { get => Owner; set => Owner = value; }

        IEnumerable<Parameter> IAdapter.Parameters()
        {
            yield return lora_A.weight;
            yield return lora_B.weight;
        }

        IEnumerable<(string Attribute, nn.Module? Module, Parameter? Parameter)> IAdapter.Registrations()
        {
            yield return ("lora_A", lora_A, null);
            yield return ("lora_B", lora_B, null);
        }

        IEnumerable<(string Part, Tensor Value)> IAdapter.Tensors()
        {
            yield return ("lora_A", lora_A.weight);
            yield return ("lora_B", lora_B.weight);
        }

        (Tensor A, Tensor B) IAdapter.Factors => (lora_A.weight, lora_B.weight);

        /// <summary>A convolution's factors are kernels, not matrices: a mixed batch runs each adapter on its own rows.</summary>
        bool IAdapter.Stackable => false;

        void IAdapter.CheckRunsIn(Tensor output) => CheckRunsIn(output);

        (string Formula, string Part)? IAdapter.Rescaled => null;

        Tensor IAdapter.AddTerm(Tensor output, Tensor input, bool training, Tensor weight, Tensor? bias) => AddTo(output, input, training);

        /// <summary>
        /// Why PEFT's LoRA cannot be put on <paramref name="conv"/> as it computes it, or null when it can: a Conv1d or
        /// Conv2d, not transposed, groups 1, dilation 1 wherever the kernel is wider than 1, zero padding.
        /// </summary>
        public static string? Unsupported(Convolution conv)
        {
            ArgumentNullException.ThrowIfNull(conv);
            if (conv.transposed)
                return $"a transposed convolution ({conv.GetType().Name}); LoRA is implemented for nn.Conv1d and nn.Conv2d";
            if (conv.kernel_size.Length is not (1 or 2))
                return $"a {conv.GetType().Name}; LoRA is implemented for nn.Conv1d and nn.Conv2d (PEFT's Conv3d is not)";
            if (conv.groups != 1)
                return $"a {conv.GetType().Name} with groups={conv.groups}; PEFT builds lora_B with the base's groups and cannot merge such an adapter (\"Merging is not supported for _ConvNd layers with groups > 1\"), and this library does not implement it";
            for (int i = 0; i < conv.kernel_size.Length; i++)
            {
                if (conv.dilation[i] != 1 && conv.kernel_size[i] != 1)
                    return $"a {conv.GetType().Name} with dilation=({string.Join(", ", conv.dilation)}); PEFT builds lora_A without the dilation, so its update does not have the base output's size (PEFT 0.18.1 fails in its forward)";
            }
            if (conv.padding_mode != PaddingModes.Zeros)
                return $"a {conv.GetType().Name} with padding_mode={conv.padding_mode}; PEFT's lora_A pads with zeros whatever the base does, so its merged layer would compute something else than its unmerged one";
            return null;
        }

        /// <summary>
        /// Re-initialises the adapter as PEFT does: <c>"true"</c> — A kaiming-uniform (a = √5), B zero (the adapter then
        /// adds nothing); <c>"gaussian"</c> — A normal with std 1/r, B zero; <c>"false"</c> — A and B kaiming-uniform.
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
        /// PEFT's <c>get_delta_weight</c>, shape (out_channels, in_channels, *kernel_size): for a 1×1 Conv2d kernel
        /// <c>(B A) · scaling</c> with the kernel's dimensions squeezed out and put back; otherwise
        /// <c>conv(Aᵀ, B)ᵀ · scaling</c> with the first two dimensions transposed (PEFT's "permute/conv trick"). On the CPU,
        /// float16 and bfloat16 adapters are computed in float32 and rounded back, as PEFT does. The caller owns the result.
        /// </summary>
        public Tensor get_delta_weight()
        {
            ThrowIfDisposed();
            using var scope = NewDisposeScope();
            Tensor a = lora_A.weight, b = lora_B.weight;
            ScalarType dtype = a.dtype;
            bool castToFloat32 = b.device_type == DeviceType.CPU && dtype is ScalarType.Float16 or ScalarType.BFloat16;
            if (castToFloat32)
            {
                a = a.to(ScalarType.Float32);
                b = b.to(ScalarType.Float32);
            }
            Tensor delta;
            // PEFT tests weight.size()[2:4] == (1, 1): a 1×1 Conv2d only (a Conv1d's size()[2:4] has one entry).
            if (Layout.KernelSize is [1, 1])
                delta = b.squeeze(3).squeeze(2).matmul(a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3).mul_(_scaling);
            else
                delta = Convolve(a.transpose(0, 1), b, null, null, null).transpose(0, 1).mul(_scaling);
            if (castToFloat32)
                delta = delta.to(dtype);
            return delta.MoveToOuterDisposeScope();
        }

        /// <summary>
        /// Adds the adapter's term, <c>lora_B(lora_A(dropout(input))) · scaling</c>, to <paramref name="output"/> in place
        /// (the host's <c>conv(x, W) + b</c>) and returns it; nothing while merged. Dropout applies in training mode only,
        /// and only to the adapter's input.
        /// </summary>
        /// <param name="output">The base convolution's output, (N, out_channels, *) or (out_channels, *).</param>
        /// <param name="input">The base convolution's input, already accepted by it.</param>
        /// <param name="training">Whether the host is in training mode.</param>
        /// <exception cref="InvalidOperationException">The adapter's dtype or device differs from the output's, or its
        /// update has another shape than the output; the message names the layer.</exception>
        public Tensor AddTo(Tensor output, Tensor input, bool training)
        {
            ThrowIfDisposed();
            if (_merge.Merged)
                return output;
            CheckRunsIn(output);
            using var scope = NewDisposeScope();
            Tensor x = training && lora_dropout > 0 ? nn.functional.dropout(input, lora_dropout, training: true) : input;
            Tensor update = lora_B.forward(lora_A.forward(x));
            if (update.dim() != output.dim() || Enumerable.Range(0, (int)output.dim()).Any(i => update.size(i) != output.size(i)))
                throw new InvalidOperationException($"{Owner}: the adapter's update has shape [{string.Join(", ", update.shape)}], the convolution's output [{string.Join(", ", output.shape)}].");
            // PEFT: result + lora_B(lora_A(dropout(x))) * scaling.
            output.add_(update, _scaling);
            return output;
        }

        /// <summary>Refuses an output of another dtype or device than the adapter's, naming the layer.</summary>
        internal void CheckRunsIn(Tensor output)
        {
            Tensor a = lora_A.weight;
            if (a.dtype != output.dtype || a.device_type != output.device_type || a.device_index != output.device_index)
                throw new InvalidOperationException(
                    $"{Owner}: the adapter is {a.dtype} on {a.device}, but the convolution computes {output.dtype} on {output.device}. " +
                    "TorchSharp's convolutions do not pass .to(...) on to their children: convert the model before the adapter is injected or loaded.");
        }

        /// <summary>
        /// Folds the adapter into <paramref name="weight"/> (<c>W += get_delta_weight()</c>, PEFT's merge with
        /// <c>safe_merge</c>): refused, with nothing written, when the merged weight would hold NaN or infinity. The weight
        /// before merging is kept for <see cref="unmerge"/>. A second call does nothing.
        /// </summary>
        /// <param name="weight">The host's weight, (out_channels, in_channels, *kernel_size).</param>
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

        /// <summary>Takes the adapter out of <paramref name="weight"/> again, restoring the weight kept by <see cref="merge"/> bit for bit; nothing when not merged.</summary>
        public void unmerge(Parameter weight)
        {
            ThrowIfDisposed();
            ArgumentNullException.ThrowIfNull(weight);
            _merge.Unmerge(weight, Owner);
        }

        void IAdapter.ForgetUnmerged() => _merge.Forget();

        internal void MergeChecked(Parameter weight, bool keep = true)
        {
            CheckWeight(weight);
            _merge.Merge(weight, keep, AddDelta);
        }

        // No DoRA on convolutions: the merge takes no norm, and normBase is not read.
        void IAdapter.MergeChecked(Parameter weight, bool keep, Tensor? normBase) => MergeChecked(weight, keep);

        void IAdapter.ApplyMerge(Tensor weight, Tensor? normBase)
        {
            using var noGrad = no_grad();
            AddDelta(weight);
        }

        /// <summary>PEFT's <c>base_layer.weight.data += delta_weight.to(orig_dtype)</c>.</summary>
        private void AddDelta(Tensor weight)
        {
            using var scope = NewDisposeScope();
            weight.add_(get_delta_weight().to(weight.dtype), One);
        }

        /// <summary>Whether W + Δ stays finite: cheap when W, A and B are finite and |W| + r · max|A| · max|B| · |scaling| is below the dtype's largest value.</summary>
        internal bool MergesFinite(Tensor weight)
        {
            using var noGrad = no_grad();
            using var scope = NewDisposeScope();
            if (!isfinite(weight).all().item<bool>())
                return false;
            if (LoraLayer.UpdateBounded(lora_A.weight, lora_B.weight, r, LoraLayer.ScalingIn(scaling, lora_B.weight.dtype)))
            {
                double largest = weight.numel() == 0 ? 0 : weight.abs().max().to(ScalarType.Float64).item<double>();
                if (largest < finfo(weight.dtype).max / 2)
                    return true;
            }
            using Tensor side = weight.detach().clone();
            AddDelta(side);
            return isfinite(side).all().item<bool>();
        }

        bool IAdapter.MergesFinite(Tensor weight) => MergesFinite(weight);

        /// <summary>Whether <c>scaling · Δ</c> is finite in the adapter's dtype (each element is a sum of r products of A and B).</summary>
        internal bool DeltaFinite()
        {
            using var noGrad = no_grad();
            using var scope = NewDisposeScope();
            return LoraLayer.UpdateBounded(lora_A.weight, lora_B.weight, r, LoraLayer.ScalingIn(scaling, lora_B.weight.dtype)) || isfinite(get_delta_weight()).all().item<bool>();
        }

        bool IAdapter.DeltaFinite() => DeltaFinite();

        bool IAdapter.UpdateFinite(Tensor weight) => DeltaFinite();

        /// <summary>The weight a host passes must be the one this adapter was made for.</summary>
        internal void CheckWeight(Tensor weight)
        {
            long[] expected = new[] { out_channels, in_channels }.Concat(Layout.KernelSize).ToArray();
            if (!weight.shape.SequenceEqual(expected))
                throw new ArgumentException($"{Owner}: the adapter is for a convolution weight of shape [{string.Join(", ", expected)}], but was given [{string.Join(", ", weight.shape)}].", nameof(weight));
        }

        /// <summary>conv1d or conv2d as the kernel's dimensions say.</summary>
        internal static Tensor Convolve(Tensor input, Tensor weight, long[]? stride, long[]? padding, Padding? paddingType)
        {
            if (weight.dim() == 3)
            {
                if (paddingType is { } type1)
                    return nn.functional.conv1d_padding(input, weight, null, stride?[0], type1);
                return nn.functional.conv1d(input, weight, null, stride?[0], padding?[0]);
            }
            if (paddingType is { } type2)
                return nn.functional.conv2d_padding(input, weight, null, stride, type2);
            return nn.functional.conv2d(input, weight, null, stride, padding);
        }

        /// <summary>Registers nothing: the host registers <see cref="lora_A"/> and <see cref="lora_B"/> under its own names.</summary>
        protected override void RegisterComponents()
        {
        }

        /// <inheritdoc />
        protected override void _toEpilog(ScalarType? dtype, Device? device, bool non_blocking)
        {
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
            }
            base.Dispose(disposing);
            _disposed = true;
        }

        private void ThrowIfDisposed() => ObjectDisposedException.ThrowIf(_disposed, this);

        /// <summary>For example <c>LoraConvLayer(kernel_size=(3, 3), r=4, lora_alpha=8, scaling=2, merged=False)</c>.</summary>
        public override string ToString() =>
            $"LoraConvLayer(kernel_size=({string.Join(", ", Layout.KernelSize)}), r={r}, lora_alpha={lora_alpha.ToString(CultureInfo.InvariantCulture)}, scaling={scaling.ToString(CultureInfo.InvariantCulture)}" +
            $"{(use_rslora ? ", use_rslora=True" : "")}{(lora_dropout > 0 ? $", lora_dropout={lora_dropout.ToString(CultureInfo.InvariantCulture)}" : "")}, merged={(merged ? "True" : "False")})";

        /// <summary>A convolution's channels, kernel, stride and padding: what PEFT passes on to lora_A.</summary>
        internal sealed record Geometry(long InChannels, long OutChannels, long[] KernelSize, long[] Stride, long[] Padding, Padding? PaddingType)
        {
            /// <summary>The geometry of <paramref name="conv"/>, or a <see cref="NotSupportedException"/> naming why not (<see cref="Unsupported"/>).</summary>
            internal static Geometry Of(Convolution conv, string owner)
            {
                if (Unsupported(conv) is { } why)
                    throw new NotSupportedException($"{owner}: cannot adapt {why}.");
                return new Geometry(conv.in_channels, conv.out_channels, conv.kernel_size.ToArray(), conv.stride.ToArray(),
                                    conv.padding?.ToArray() ?? new long[conv.kernel_size.Length], conv.padding_type);
            }
        }
    }

    /// <summary>
    /// A bias-free convolution with one parameter, <c>weight</c> (out, in, *kernel): PEFT's <c>lora_A</c> and <c>lora_B</c>
    /// of a convolution (<c>nn.Conv1d</c>/<c>nn.Conv2d</c> there), so that an adapted layer's state_dict has PEFT's keys
    /// <c>&lt;path&gt;.lora_A.&lt;adapter&gt;.weight</c>.
    /// </summary>
    public sealed class LoraConvProjection : nn.Module<Tensor, Tensor>
    {
        private readonly long[] _stride, _padding;
        private readonly Padding? _paddingType;
        private Parameter _weight;

        internal LoraConvProjection(long[] shape, long[] stride, long[] padding, Padding? paddingType, ScalarType dtype, Device? device, bool initialise)
            : base(nameof(LoraConvProjection))
        {
            _stride = stride;
            _padding = padding;
            _paddingType = paddingType;
            using (NewDisposeScope())
            {
                var weight = new Parameter(empty(shape, dtype: dtype, device: device));
                // The convolution's own initialisation of its weight (PEFT's lora_A and lora_B are conv layers).
                if (initialise)
                {
                    using (no_grad())
                        nn.init.kaiming_uniform_(weight, a: Math.Sqrt(5));
                }
                _weight = (Parameter)weight.DetachFromDisposeScope();
            }
            register_parameter("weight", _weight);
        }

        /// <summary>The projection's weight. Setting it disposes the old parameter and registers the new one.</summary>
        /// <exception cref="ArgumentException">The new weight has another shape.</exception>
        public Parameter weight
        {
            get => _weight;
            set
            {
                ArgumentNullException.ThrowIfNull(value);
                if (value.Handle == _weight.Handle)
                    return;
                if (!value.shape.SequenceEqual(_weight.shape))
                    throw new ArgumentException($"LoraConvProjection: a new weight must have shape [{string.Join(", ", _weight.shape)}], but has [{string.Join(", ", value.shape)}].", nameof(value));
                _weight.Dispose();
                _weight = (Parameter)value.DetachFromDisposeScope();
                ConditionallyRegisterParameter("weight", _weight);
            }
        }

        /// <summary>The convolution of <paramref name="input"/> with <see cref="weight"/>, with the stride and padding it was made with.</summary>
        public override Tensor forward(Tensor input) => LoraConvLayer.Convolve(input, _weight, _stride, _padding, _paddingType);

        /// <summary>Registers nothing beyond <c>weight</c>.</summary>
        protected override void RegisterComponents()
        {
        }

        /// <summary>For example <c>LoraConvProjection(in_channels=8, out_channels=4, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))</c>.</summary>
        public override string ToString() =>
            $"LoraConvProjection(in_channels={_weight.size(1)}, out_channels={_weight.size(0)}, kernel_size=({string.Join(", ", _weight.shape.Skip(2))}), " +
            $"stride=({string.Join(", ", _stride)}), padding={(_paddingType is { } type ? type.ToString().ToLowerInvariant() : $"({string.Join(", ", _padding)})")})";
    }
}
