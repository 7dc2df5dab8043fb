using System;
using System.Collections.Generic;
using System.Diagnostics.CodeAnalysis;
using System.Linq;
using System.Threading;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace TorchLinear
{
    /// <summary>
    /// Applies a linear transformation to the incoming data: <c>y = x Wᵀ + b</c>, built from two
    /// <see cref="Parameter"/>s and bit-for-bit identical to TorchSharp's <c>nn.Linear</c>, forward and backward.
    /// </summary>
    /// <remarks>
    /// <para>Shapes: input <c>(*, in_features)</c>, output <c>(*, out_features)</c>, where <c>*</c> is any
    /// number of leading dimensions, including none (a single vector).</para>
    /// <para><see cref="weight"/> has shape <c>(out_features, in_features)</c> and <see cref="bias"/> shape
    /// <c>(out_features)</c>; both are initialised from <c>U(-1/sqrt(in_features), 1/sqrt(in_features))</c>
    /// (the weight through <c>kaiming_uniform_</c> with <c>a = sqrt(5)</c>), in that order, so that under the
    /// same <c>torch.manual_seed</c> they hold exactly the numbers <c>nn.Linear</c> holds (and PyTorch's).</para>
    /// <code>
    /// using var layer = new CustomLinear(3, 2);
    /// using var x = torch.randn(64, 3);
    /// using var y = layer.forward(x);   // shape (64, 2)
    /// </code>
    /// </remarks>
    public sealed class CustomLinear : AdaptableLayer
    {
        private const string WeightName = nameof(weight);
        private const string BiasName = nameof(bias);

        [ComponentName(Name = WeightName)]
        private Parameter _weight;

        [ComponentName(Name = BiasName)]
        private Parameter? _bias;


        // Wᵀ, kept between calls: nn.Linear pays for a fresh weight.t() on every call, and that view is most of
        // the per-call cost of a small layer. What would make a kept view wrong, and how each case is handled:
        //  - a view made under no_grad carries no gradient: it is always made with grad mode on;
        //  - requires_grad of the weight changes (freezing, unfreezing): a view made while the weight requires grad
        //    carries the autograd edge to it, one made while it does not carries none, so one view is kept for each
        //    value of the flag and the forward takes the one that matches. A training loop that freezes and unfreezes
        //    every step switches between the two: at most two views are ever kept, and none is freed while another
        //    thread may still hold it;
        //  - the weight is replaced (the setter, .to(dtype/device)): SetWeight drops both views;
        //  - a caller's dispose scope would free them: they are detached from every scope, and freed with the layer;
        //  - in-place updates (optimizers, load_state_dict) need nothing: the views share the weight's storage.
        private Tensor? _weightTTracking, _weightTFrozen;
        private readonly object _viewLock = new();

        /// <summary>Creates a layer with freshly initialised parameters, as <c>nn.Linear(in_features, out_features)</c> does.</summary>
        /// <param name="in_features">Size of each input sample (the input's last dimension).</param>
        /// <param name="out_features">Size of each output sample.</param>
        /// <param name="bias">If false, the layer learns no additive bias.</param>
        /// <param name="device">Device of the parameters; the default device if null.</param>
        /// <param name="dtype">Floating-point or complex dtype of the parameters (as <c>nn.Linear</c> accepts:
        /// Float16, BFloat16, Float32, Float64, ComplexFloat32, ComplexFloat64); the default dtype if null.</param>
        /// <exception cref="ArgumentOutOfRangeException">A feature count is negative.</exception>
        /// <exception cref="ArgumentException"><paramref name="dtype"/> is neither floating-point nor complex.</exception>
        public CustomLinear(long in_features, long out_features, bool bias = true, Device? device = null, ScalarType? dtype = null)
            : base(nameof(CustomLinear))
        {
            if (in_features < 0)
                throw new ArgumentOutOfRangeException(nameof(in_features), in_features, $"CustomLinear: in_features must be 0 or more, but was {in_features}.");
            if (out_features < 0)
                throw new ArgumentOutOfRangeException(nameof(out_features), out_features, $"CustomLinear: out_features must be 0 or more, but was {out_features}.");
            // Parameters require gradients, which libtorch allows for floating-point and complex tensors only.
            if (dtype is { } requested && !is_floating_point(requested) && !is_complex(requested))
                throw new ArgumentException($"CustomLinear: dtype must be a floating-point or complex type (for example Float32, BFloat16 or ComplexFloat32), but was {requested}: libtorch lets only those require gradients. For integer arithmetic, call LinearFunctional.linear with integer tensors.", nameof(dtype));

            this.in_features = in_features;
            this.out_features = out_features;
            SetWeight(new Parameter(empty(out_features, in_features, device: device, dtype: dtype)));
            if (bias)
                this.bias = new Parameter(empty(out_features, device: device, dtype: dtype));
            reset_parameters();
        }

        /// <summary>
        /// Creates a layer around existing parameters, as <c>nn.Linear(weight, bias)</c> does. The layer takes
        /// ownership: it detaches them from any dispose scope and disposes them when it is disposed.
        /// </summary>
        /// <param name="weight">Weight of shape <c>(out_features, in_features)</c>.</param>
        /// <param name="bias">Optional bias of shape <c>(out_features)</c>, same dtype and device as the weight.</param>
        /// <exception cref="ArgumentException">The weight is not 2-D, or the bias does not fit it.</exception>
        public CustomLinear(Parameter weight, Parameter? bias = null)
            : base(nameof(CustomLinear))
        {
            ArgumentNullException.ThrowIfNull(weight);
            if (weight.dim() != 2)
                throw new ArgumentException($"CustomLinear: weight must be 2-D, shaped (out_features, in_features), but has shape {TensorFacts.Shape(weight)}.", nameof(weight));

            in_features = weight.shape[1];
            out_features = weight.shape[0];
            if (bias is not null)
                CheckBias(bias, weight);
            SetWeight(weight);
            this.bias = bias;
        }

        /// <summary>
        /// Which primitive sequence <see cref="forward"/> follows: <see cref="LinearDispatch.TorchSharp"/> (the
        /// default) matches TorchSharp's <c>nn.Linear</c> bit for bit; <see cref="LinearDispatch.PyTorch"/> follows
        /// PyTorch's Python <c>F.linear</c>, for results that round like a model running in Python.
        /// </summary>
        public LinearDispatch Dispatch { get; set; } = LinearDispatch.TorchSharp;

        /// <summary>Size of each input sample.</summary>
        public long in_features { get; }

        /// <summary>Size of each output sample.</summary>
        public long out_features { get; }

        /// <summary>
        /// The learnable weight, shape <c>(out_features, in_features)</c>. Setting it disposes the previous
        /// parameter and registers the new one under the same state_dict key (<c>weight</c>).
        /// </summary>
        /// <remarks>
        /// A new weight must have the bias's dtype and device, so that a mismatch is refused here rather than at the
        /// next forward. <c>Module.to(...)</c>, which replaces the weight and then the bias through these setters, is
        /// let through: the layer knows when it is being converted.
        /// </remarks>
        /// <exception cref="ArgumentException">The new weight's shape is not <c>(out_features, in_features)</c>, or
        /// its dtype or device differs from the bias's.</exception>
        public Parameter weight
        {
            get
            {
                ThrowIfDisposed();
                return _weight;
            }
            set
            {
                ThrowIfDisposed();
                ArgumentNullException.ThrowIfNull(value);
                if (value.Handle == _weight.Handle)
                    return;
                if (value.dim() != 2 || value.shape[0] != out_features || value.shape[1] != in_features)
                    throw new ArgumentException($"{this}: a new weight must have shape [{out_features}, {in_features}], but has shape {TensorFacts.Shape(value)}.", nameof(value));
                ThrowIfUnlike(value, "weight", _bias, "bias");
                SetWeight(value);
            }
        }

        /// <summary>
        /// The learnable bias, shape <c>(out_features)</c>, or null when the layer has none. Setting it disposes
        /// the previous parameter and (re-)registers the new one under the key <c>bias</c>; null removes it.
        /// </summary>
        /// <exception cref="ArgumentException">The new bias is not 1-D of length <c>out_features</c>, or its dtype
        /// or device differs from the weight's (except while <c>Module.to(...)</c> converts the layer).</exception>
        public Parameter? bias
        {
            get
            {
                ThrowIfDisposed();
                return _bias;
            }
            set
            {
                ThrowIfDisposed();
                if (value is not null && value.Handle == _bias?.Handle)
                    return;
                if (value is not null && (value.dim() != 1 || value.shape[0] != out_features))
                    throw new ArgumentException($"{this}: a new bias must have shape [{out_features}], but has shape {TensorFacts.Shape(value)}.", nameof(value));
                if (value is not null)
                    ThrowIfUnlike(value, "bias", _weight, "weight");
                _bias = Replace(_bias, value, BiasName);
            }
        }

        /// <summary>
        /// Re-initialises the parameters as <c>nn.Linear</c> does: <c>kaiming_uniform_(weight, a: sqrt(5))</c>,
        /// then <c>bias ~ U(-1/sqrt(in_features), 1/sqrt(in_features))</c> (0 when in_features is 0).
        /// </summary>
        public void reset_parameters()
        {
            ThrowIfDisposed();
            // The weight draws from the global generator first, then the bias: the order is part of the
            // contract, because under a fixed seed another order would give other numbers.
            // A weight without elements (in_features or out_features 0) is left alone, as PyTorch's Python init
            // does. libtorch's C++ kaiming_uniform_ instead derives an infinite bound from fan_in = 0 and throws,
            // which is why TorchSharp's own nn.Linear(0, n) cannot be constructed.
            if (_weight.numel() > 0)
                nn.init.kaiming_uniform_(_weight, a: Math.Sqrt(5));
            if (_bias is not null)
            {
                double bound = in_features > 0 ? 1 / Math.Sqrt(in_features) : 0;
                nn.init.uniform_(_bias, -bound, bound);
            }
        }

        /// <summary>Computes <c>y = x Wᵀ + b</c> for input of shape <c>(*, in_features)</c>.</summary>
        /// <param name="input">At least 1-D, last dimension <c>in_features</c>, same dtype and device as the weight.</param>
        /// <returns>A new tensor of shape <c>(*, out_features)</c>; no other tensor is left alive.</returns>
        /// <exception cref="ArgumentException">The input does not fit the layer; the message says how.</exception>
        /// <exception cref="ObjectDisposedException">The layer has been disposed.</exception>
        public override Tensor forward(Tensor input)
        {
            ThrowIfDisposed();
            ArgumentNullException.ThrowIfNull(input);
            Tensor output = LinearFunctional.Compute(this, input, _weight, _bias, Dispatch, WeightT());
            return WithAdapter(input, output);
        }

        /// <summary>Mirrors PyTorch's <c>extra_repr</c>: <c>CustomLinear(in_features=3, out_features=2, bias=True)</c>.</summary>
        public override string ToString() =>
            $"CustomLinear(in_features={in_features}, out_features={out_features}, bias={(_bias is null ? "False" : "True")})";

        /// <inheritdoc />
        protected override void Dispose(bool disposing)
        {
            if (disposing)
                DropWeightT();
            base.Dispose(disposing);
        }

        private static void CheckBias(Tensor bias, Tensor weight)
        {
            if (bias.dim() != 1 || bias.shape[0] != weight.shape[0])
                throw new ArgumentException($"CustomLinear: bias must have shape [{weight.shape[0]}] to fit a weight of shape {TensorFacts.Shape(weight)}, but has shape {TensorFacts.Shape(bias)}.", nameof(bias));
            if (bias.dtype != weight.dtype)
                throw new ArgumentException($"CustomLinear: bias dtype {bias.dtype} does not match weight dtype {weight.dtype}.", nameof(bias));
            if (!TensorFacts.SameDevice(bias, weight))
                throw new ArgumentException($"CustomLinear: bias is on device {bias.device} but the weight is on {weight.device}.", nameof(bias));
        }

        private Tensor WeightT()
        {
            bool tracksGrad = _weight.requires_grad;
            Tensor? cached = tracksGrad ? Volatile.Read(ref _weightTTracking) : Volatile.Read(ref _weightTFrozen);
            if (cached is not null)
                return cached;
            lock (_viewLock)
            {
                cached = tracksGrad ? _weightTTracking : _weightTFrozen;
                if (cached is not null)
                    return cached;
                Tensor view;
                using (enable_grad())
                    view = _weight.t();
                view.DetachFromDisposeScope();
                if (tracksGrad)
                    Volatile.Write(ref _weightTTracking, view);
                else
                    Volatile.Write(ref _weightTFrozen, view);
                return view;
            }
        }

        private void DropWeightT()
        {
            lock (_viewLock)
            {
                _weightTTracking?.Dispose();
                _weightTFrozen?.Dispose();
                _weightTTracking = _weightTFrozen = null;
            }
        }

        [MemberNotNull(nameof(_weight))]
        private void SetWeight(Parameter value)
        {
            DropWeightT();
            _weight = Replace(_weight, value, WeightName);
        }
    }
}
