using System;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace TorchLinear.Tests
{
    /// <summary>
    /// Wraps a linear function and its two parameters (state_dict keys weight and bias) as a module, so that
    /// Equivalence.CompareModules can drive a function, or an explicit sequence of primitives, like a layer.
    /// </summary>
    internal sealed class FunctionalLayer : nn.Module<Tensor, Tensor>
    {
        private readonly Func<Tensor, Tensor, Tensor?, Tensor> _linear;

        [ComponentName(Name = "weight")]
        private readonly Parameter _weight;

        [ComponentName(Name = "bias")]
        private readonly Parameter? _bias;

        public FunctionalLayer(Func<Tensor, Tensor, Tensor?, Tensor> linear, Parameter weight, Parameter? bias)
            : base(nameof(FunctionalLayer))
        {
            _linear = linear;
            _weight = weight;
            _bias = bias;
            RegisterComponents();
        }

        public override Tensor forward(Tensor input) => _linear(input, _weight, _bias);
    }
}
