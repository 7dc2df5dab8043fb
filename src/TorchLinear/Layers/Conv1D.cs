using System;
using System.Collections.Generic;
using System.Diagnostics.CodeAnalysis;
using System.Runtime.InteropServices;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace TorchLinear
{
    /// <summary>
    /// transformers' <c>Conv1D</c> (<c>transformers.pytorch_utils.Conv1D</c>, the "1D convolution" of OpenAI GPT and GPT-2):
    /// a linear layer whose weight is stored transposed, <c>y = x W + b</c>, computed with transformers' own operations,
    /// so that it gives transformers' bits.
    /// </summary>
    /// <remarks>
    /// <para>Shapes: input <c>(*, nx)</c>, output <c>(*, nf)</c>, where <c>*</c> is any number of leading dimensions,
    /// including none. <see cref="weight"/> has shape <c>(nx, nf)</c> — (in, out), the transpose of <c>nn.Linear</c>'s —
    /// and <see cref="bias"/> shape <c>(nf)</c>; the state_dict keys are transformers' (<c>weight</c>, <c>bias</c>).</para>
    /// <para>The forward is transformers' line for line: <c>size_out = x.size()[:-1] + (nf,)</c>,
    /// <c>addmm(bias, x.view(-1, nx), weight)</c>, <c>view(size_out)</c>.</para>
    /// <para>Initialisation as transformers' constructor: <c>weight ~ N(0, 0.02²)</c> (<c>normal_(std=0.02)</c>), bias zeros.
    /// (A transformers model re-initialises its layers in <c>_init_weights</c>; a port loads the weights anyway.)</para>
    /// <para>TorchLinear.Lora adapts it as PEFT does (<c>lora.Linear</c> with <c>fan_in_fan_out=True</c>), in its
    /// <see cref="AdaptableLayer.Adapter"/> slot, so the adapter runs however the port invokes the layer.</para>
    /// <code>
    /// using var layer = new Conv1D(nf: 96, nx: 32);   // GPT-2's c_attn for n_embd 32
    /// using var x = torch.randn(2, 5, 32);
    /// using var y = layer.forward(x);                 // shape (2, 5, 96)
    /// </code>
    /// </remarks>
    public sealed class Conv1D : AdaptableLayer
    {
        private const string WeightName = nameof(weight);
        private const string BiasName = nameof(bias);

        [ComponentName(Name = WeightName)]
        private Parameter _weight;

        [ComponentName(Name = BiasName)]
        private Parameter _bias;


        /// <summary>Creates a layer with freshly initialised parameters, as transformers' <c>Conv1D(nf, nx)</c> does.</summary>
        /// <param name="nf">The number of output features (transformers' order: outputs first).</param>
        /// <param name="nx">The number of input features (the input's last dimension).</param>
        /// <param name="device">Device of the parameters; the default device if null.</param>
        /// <param name="dtype">Floating-point or complex dtype of the parameters; the default dtype if null.</param>
        /// <exception cref="ArgumentOutOfRangeException">A feature count is negative.</exception>
        /// <exception cref="ArgumentException"><paramref name="dtype"/> is neither floating-point nor complex.</exception>
        public Conv1D(long nf, long nx, Device? device = null, ScalarType? dtype = null)
            : base(nameof(Conv1D))
        {
            if (nf < 0)
                throw new ArgumentOutOfRangeException(nameof(nf), nf, $"Conv1D: nf (the number of output features) must be 0 or more, but was {nf}.");
            if (nx < 0)
                throw new ArgumentOutOfRangeException(nameof(nx), nx, $"Conv1D: nx (the number of input features) must be 0 or more, but was {nx}.");
            // Parameters require gradients, which libtorch allows for floating-point and complex tensors only.
            if (dtype is { } requested && !is_floating_point(requested) && !is_complex(requested))
                throw new ArgumentException($"Conv1D: dtype must be a floating-point or complex type (for example Float32, BFloat16 or ComplexFloat32), but was {requested}: libtorch lets only those require gradients.", nameof(dtype));

            this.nf = nf;
            this.nx = nx;
            SetWeight(new Parameter(empty(nx, nf, device: device, dtype: dtype)));
            SetBias(new Parameter(empty(nf, device: device, dtype: dtype)));
            reset_parameters();
        }

        /// <summary>The number of output features (transformers' <c>nf</c>).</summary>
        public long nf { get; }

        /// <summary>The number of input features (transformers' <c>nx</c>).</summary>
        public long nx { get; }

        /// <summary>
        /// The learnable weight, shape <c>(nx, nf)</c>: (in, out), transposed against <c>nn.Linear</c>'s. Setting it
        /// disposes the previous parameter and registers the new one under the same state_dict key (<c>weight</c>).
        /// </summary>
        /// <remarks>
        /// A new weight must have the bias's dtype and device, so that a mismatch is refused here rather than at the next
        /// forward. <c>Module.to(...)</c>, which replaces the weight and then the bias through these setters, is let
        /// through: the layer knows when it is being converted.
        /// </remarks>
        /// <exception cref="ArgumentException">The new weight's shape is not <c>(nx, nf)</c>, or its dtype or device differs
        /// from the bias's.</exception>
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
                if (value.dim() != 2 || value.size(0) != nx || value.size(1) != nf)
                    throw new ArgumentException($"{this}: a new weight must have shape [{nx}, {nf}] (nx, nf), but has shape {TensorFacts.Shape(value)}.", nameof(value));
                ThrowIfUnlike(value, "weight", _bias, "bias");
                SetWeight(value);
            }
        }

        /// <summary>
        /// The learnable bias, shape <c>(nf)</c> (transformers' Conv1D always has one). Setting it disposes the previous
        /// parameter and registers the new one under the key <c>bias</c>.
        /// </summary>
        /// <exception cref="ArgumentException">The new bias is not 1-D of length <c>nf</c>, or its dtype or device differs
        /// from the weight's (except while <c>Module.to(...)</c> converts the layer).</exception>
        public Parameter bias
        {
            get
            {
                ThrowIfDisposed();
                return _bias;
            }
            set
            {
                ThrowIfDisposed();
                ArgumentNullException.ThrowIfNull(value);
                if (value.Handle == _bias.Handle)
                    return;
                if (value.dim() != 1 || value.size(0) != nf)
                    throw new ArgumentException($"{this}: a new bias must have shape [{nf}], but has shape {TensorFacts.Shape(value)}.", nameof(value));
                ThrowIfUnlike(value, "bias", _weight, "weight");
                SetBias(value);
            }
        }

        /// <summary>
        /// Re-initialises the parameters as transformers' constructor does: <c>normal_(weight, std=0.02)</c> (the one draw
        /// from the global generator), bias zeros.
        /// </summary>
        public void reset_parameters()
        {
            ThrowIfDisposed();
            using var noGrad = no_grad();
            // transformers fills the bias with zeros when it makes it, then draws the weight.
            nn.init.zeros_(_bias);
            if (_weight.numel() > 0)
                nn.init.normal_(_weight, std: 0.02);
        }

        /// <summary>
        /// Computes <c>y = x W + b</c> for input of shape <c>(*, nx)</c>, with transformers' operations:
        /// <c>addmm(bias, x.view(-1, nx), weight).view(*, nf)</c>; then runs <see cref="AdaptableLayer.Adapter"/>, if set.
        /// </summary>
        /// <param name="input">At least 1-D, last dimension <c>nx</c>, same dtype and device as the weight; viewable as
        /// <c>(-1, nx)</c> (as transformers requires: a non-contiguous input such as a transposed one is refused, as PyTorch's
        /// <c>view</c> refuses it).</param>
        /// <returns>A new tensor of shape <c>(*, nf)</c>; no other tensor is left alive.</returns>
        /// <exception cref="ArgumentException">The input does not fit the layer; the message says how.</exception>
        /// <exception cref="ObjectDisposedException">The layer has been disposed.</exception>
        public override Tensor forward(Tensor input)
        {
            ThrowIfDisposed();
            ArgumentNullException.ThrowIfNull(input);
            Tensor output = Compute(input);
            return WithAdapter(input, output);
        }

        private Tensor Compute(Tensor input)
        {
            long dims = input.dim();
            if (dims == 0)
                throw new ArgumentException($"{this}: the input must have at least 1 dimension, shaped (*, {nx}), but is 0-d (a scalar).", nameof(input));
            if (input.size(-1) != nx)
                throw new ArgumentException($"{this}: the input's last dimension must be nx = {nx}, but the input has shape {TensorFacts.Shape(input)}; the weight has shape [{nx}, {nf}].", nameof(input));
            if (input.dtype != _weight.dtype)
                throw new ArgumentException($"{this}: the input is {input.dtype}, but the weight is {_weight.dtype}; convert the input (input.to({_weight.dtype})) or the layer (.to({input.dtype})).", nameof(input));
            if (!TensorFacts.SameDevice(input, _weight))
                throw new ArgumentException($"{this}: the input is on {input.device}, but the weight is on {_weight.device}; move one of them.", nameof(input));
            // size_out = x.size()[:-1] + (self.nf,)
            var sizeOut = new long[dims];
            long rows = 1;
            for (int i = 0; i < dims - 1; i++)
            {
                sizeOut[i] = input.size(i);
                rows *= sizeOut[i];
            }
            sizeOut[^1] = nf;
            Tensor flat;
            try
            {
                // x.view(-1, x.size(-1)): the row count written out, which is the same wherever -1 is defined, and defined
                // where -1 is ambiguous (no elements and nx 0).
                flat = input.view(rows, nx);
            }
            catch (ExternalException error)
            {
                throw new ArgumentException($"{this}: the input of shape {TensorFacts.Shape(input)} cannot be viewed as [{rows}, {nx}] (transformers' x.view(-1, x.size(-1)) needs a layout that allows it, for example a contiguous input: pass input.contiguous()). libtorch: {error.Message}", nameof(input), error);
            }
            using (flat)
            {
                // x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight); x = x.view(size_out)
                using Tensor product = _bias.addmm(flat, _weight);
                return product.view(sizeOut);
            }
        }

        /// <summary>Mirrors transformers' <c>__repr__</c>: <c>Conv1D(nf=96, nx=32)</c>.</summary>
        public override string ToString() => $"Conv1D(nf={nf}, nx={nx})";

        [MemberNotNull(nameof(_weight))]
        private void SetWeight(Parameter value) => _weight = Replace(_weight, value, WeightName);

        [MemberNotNull(nameof(_bias))]
        private void SetBias(Parameter value) => _bias = Replace(_bias, value, BiasName);
    }
}
