// The template for a layer of your own, built from Parameters. Copy this file and change the mathematics.
//
// InOutLinear stores its weight the other way round from nn.Linear, as (in_features, out_features), and
// computes y = x W + b. Same mathematics as nn.Linear, different structure: a good layer to learn the
// pattern on, and to see what Equivalence.CompareModules reports for it.
using System;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace TorchLinear.Samples
{
    /// <summary>A linear layer whose weight is stored as (in_features, out_features): <c>y = x W + b</c>.</summary>
    public sealed class InOutLinear : nn.Module<Tensor, Tensor>
    {
        // 1. Parameters live in private fields; [ComponentName] fixes their state_dict keys.
        [ComponentName(Name = "weight")]
        private Parameter _weight = null!;  // set in the constructor, through the property

        [ComponentName(Name = "bias")]
        private Parameter? _bias;

        /// <summary>Creates the layer with nn.Linear's initial distribution, U(-1/√in, 1/√in).</summary>
        public InOutLinear(long in_features, long out_features, bool bias = true, Device? device = null, ScalarType? dtype = null)
            : base(nameof(InOutLinear))
        {
            if (in_features < 0)
                throw new ArgumentOutOfRangeException(nameof(in_features), in_features, "in_features must be 0 or more.");
            if (out_features < 0)
                throw new ArgumentOutOfRangeException(nameof(out_features), out_features, "out_features must be 0 or more.");
            this.in_features = in_features;
            this.out_features = out_features;
            // 2. Assign through the properties: they register each parameter under its key.
            weight = new Parameter(empty(in_features, out_features, device: device, dtype: dtype));
            if (bias)
                this.bias = new Parameter(empty(out_features, device: device, dtype: dtype));
            reset_parameters();
        }

        /// <summary>Size of each input sample.</summary>
        public long in_features { get; }

        /// <summary>Size of each output sample.</summary>
        public long out_features { get; }

        /// <summary>
        /// The weight, (in_features, out_features). 3. A setter that frees the old tensor, detaches the new one from
        /// any dispose scope and registers it: Module.to(dtype/device) replaces parameters through it.
        /// </summary>
        public Parameter weight
        {
            get => _weight;
            set
            {
                if (value.Handle == _weight?.Handle)
                    return;
                _weight?.Dispose();
                _weight = (Parameter)value.DetachFromDisposeScope();
                ConditionallyRegisterParameter("weight", _weight);
            }
        }

        /// <summary>The bias, (out_features), or null.</summary>
        public Parameter? bias
        {
            get => _bias;
            set
            {
                if (value is not null && value.Handle == _bias?.Handle)
                    return;
                _bias?.Dispose();
                _bias = (Parameter?)value?.DetachFromDisposeScope();
                ConditionallyRegisterParameter("bias", _bias);
            }
        }

        /// <summary>4. Initialisation in its own method, weight first, then bias.</summary>
        public void reset_parameters()
        {
            // Not kaiming_uniform_: it reads fan_in from dimension 1, which here is out_features. For nn.Linear,
            // kaiming_uniform_(a = √5) comes down to U(-1/√in, 1/√in), so that is what we draw, explicitly.
            double bound = in_features > 0 ? 1 / Math.Sqrt(in_features) : 0;
            if (_weight.numel() > 0)
                nn.init.uniform_(_weight, -bound, bound);
            if (_bias is not null)
                nn.init.uniform_(_bias, -bound, bound);
        }

        /// <summary>5. Forward: check the input first, then compute <c>x W + b</c>.</summary>
        public override Tensor forward(Tensor input)
        {
            // TorchSharp 0.107's matmul terminates the process on a shape error instead of throwing: check first.
            if (input.dim() == 0 || input.shape[^1] != in_features || input.dtype != _weight.dtype)
                throw new ArgumentException(
                    $"{this}: expected input of shape (*, {in_features}) and dtype {_weight.dtype}, but got shape [{string.Join(", ", input.shape)}] and dtype {input.dtype}.",
                    nameof(input));
            Tensor output = input.matmul(_weight);
            if (_bias is not null)
                output.add_(_bias);
            return output;
        }

        /// <summary>For example <c>InOutLinear(in_features=3, out_features=2, bias=True)</c>.</summary>
        public override string ToString() =>
            $"InOutLinear(in_features={in_features}, out_features={out_features}, bias={(_bias is null ? "False" : "True")})";
    }
}
