using System;
using System.Collections.Generic;
using System.Linq;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Lora
{
    /// <summary>
    /// What <see cref="LoraWrapper"/> and <see cref="LoraEmbeddingWrapper"/> share: the base layer they stand in for, whose
    /// parameters they register under the base layer's own names, a forward of the base layer's output plus the active
    /// adapters' terms, and giving the base layer back whole when the adapters are taken out.
    /// </summary>
    /// <typeparam name="TBase">The wrapped layer's type.</typeparam>
    public abstract class AdapterWrapper<TBase> : nn.Module<Tensor, Tensor>, IAdapterWrapper where TBase : nn.Module<Tensor, Tensor>
    {
        private readonly AdaptedLayer _layer;
        private readonly string[] _registered;
        private bool _unwrapped;

        private protected AdapterWrapper(string name, TBase base_layer, AdaptedLayer layer, params (string Name, Parameter? Value)[] parameters) : base(name)
        {
            this.base_layer = base_layer;
            _layer = layer;
            // The order of the base layer's state_dict, then the adapters'.
            foreach (var (parameterName, value) in parameters)
            {
                if (value is not null)
                    ConditionallyRegisterParameter(parameterName, value);
            }
            _registered = parameters.Select(p => p.Name).ToArray();
            if (!base_layer.training)
                train(false);
        }

        /// <summary>The layer this wrapper stands in for; it holds the same parameters.</summary>
        public TBase base_layer { get; }

        private protected AdaptedLayer Layer => _layer;

        /// <summary>The base layer's output for <paramref name="input"/>.</summary>
        private protected abstract Tensor BaseOutput(Tensor input);

        /// <summary>The base layer's output plus the active adapters' terms.</summary>
        public override Tensor forward(Tensor input)
        {
            Tensor output = BaseOutput(input);
            try
            {
                return _layer.Apply(output, input, training);
            }
            catch
            {
                output.Dispose();
                throw;
            }
        }

        /// <summary>Registers nothing more: the constructor registered the parameters, the model the adapters.</summary>
        protected override void RegisterComponents()
        {
        }

        /// <summary>Takes the parameters' registrations out again and frees this wrapper: the base layer is whole again.</summary>
        internal TBase Unwrap()
        {
            foreach (string parameterName in _registered)
                ConditionallyRegisterParameter(parameterName, null);
            _unwrapped = true;
            Dispose();
            return base_layer;
        }

        nn.Module IAdapterWrapper.Unwrap() => Unwrap();

        /// <inheritdoc />
        protected override void Dispose(bool disposing)
        {
            base.Dispose(disposing);
            if (disposing && !_unwrapped)
                base_layer.Dispose();
        }
    }

    /// <summary>
    /// An <c>nn.Linear</c> with LoRA adapters that run in its own <see cref="AdapterWrapper{TBase}.forward"/>, put in place of a Linear that a
    /// model holds in a field (or a <c>ModuleList</c> / <c>ModuleDict</c> slot) typed <c>nn.Module&lt;Tensor, Tensor&gt;</c>
    /// or anything else it fits, as PEFT wraps a target layer: the adapters then run whether the model invokes the layer
    /// with <c>call(x)</c> or <c>forward(x)</c>.
    /// </summary>
    /// <remarks>
    /// The base layer's weight and bias are registered under their own names, beside the adapters' <c>lora_A</c> and
    /// <c>lora_B</c> containers, so the model's state_dict has the base model's keys (<c>q_proj.weight</c> loads as before)
    /// and PEFT's adapter keys (<c>q_proj.lora_A.default.weight</c>). <see cref="LoraModel"/> puts it in and takes it out:
    /// <c>unload</c> and <c>merge_and_unload</c> give the original <c>Linear</c> back, in the same field and slot.
    /// </remarks>
    public sealed class LoraWrapper : AdapterWrapper<Linear>
    {
        internal LoraWrapper(Linear base_layer, AdaptedLayer layer)
            : base(nameof(LoraWrapper), base_layer, layer, ("weight", base_layer.weight), ("bias", base_layer.bias))
        {
        }

        /// <summary>The adapters of this layer, in the order they were added.</summary>
        public IReadOnlyList<LoraLayer> LoraLayers => Layer.Adapters.OfType<LoraLayer>().ToList();

        /// <summary>The old name of <see cref="LoraLayers"/>.</summary>
        [Obsolete("use LoraWrapper.LoraLayers")]
        public IReadOnlyList<LoraLayer> lora_layers => LoraLayers;

        /// <summary>The base layer's weight, (out_features, in_features).</summary>
        public Parameter weight
        {
            get => base_layer.weight;
            // For Module.to(...), which replaces each parameter through the property of the same name.
            private set
            {
                base_layer.weight = value;
                ConditionallyRegisterParameter("weight", base_layer.weight);
            }
        }

        /// <summary>The base layer's bias, (out_features), or null.</summary>
        public Parameter? bias
        {
            get => base_layer.bias;
            private set
            {
                base_layer.bias = value;
                ConditionallyRegisterParameter("bias", base_layer.bias);
            }
        }

        /// <summary><c>x Wᵀ + b</c> as <c>nn.Linear</c> computes it.</summary>
        private protected override Tensor BaseOutput(Tensor input) => LinearFunctional.linear(input, weight, bias);

        /// <summary>For example <c>LoraWrapper(in_features=24, out_features=8, bias=True, adapters=default (r=4))</c>.</summary>
        public override string ToString() =>
            $"LoraWrapper(in_features={base_layer.in_features}, out_features={base_layer.out_features}, bias={(base_layer.bias is null ? "False" : "True")}, " +
            $"adapters={string.Join(", ", Layer.Adapters.Select(a => $"{a.Name} (r={a.r})"))})";
    }

    /// <summary>
    /// An <c>nn.Embedding</c> with LoRA adapters that run in its own <see cref="AdapterWrapper{TBase}.forward"/>, put in place of an Embedding that
    /// a model holds in a field typed <c>nn.Module&lt;Tensor, Tensor&gt;</c> (see <see cref="LoraWrapper"/>): the base
    /// weight is registered as <c>weight</c>, the adapters as <c>lora_embedding_A.&lt;name&gt;</c> and
    /// <c>lora_embedding_B.&lt;name&gt;</c>.
    /// </summary>
    public sealed class LoraEmbeddingWrapper : AdapterWrapper<Embedding>
    {
        internal LoraEmbeddingWrapper(Embedding base_layer, AdaptedLayer layer)
            : base(nameof(LoraEmbeddingWrapper), base_layer, layer, ("weight", base_layer.weight))
        {
        }

        /// <summary>The base embedding's weight, (num_embeddings, embedding_dim).</summary>
        public Parameter weight
        {
            get => base_layer.weight!;
            private set
            {
                base_layer.weight = value;
                ConditionallyRegisterParameter("weight", value);
            }
        }

        /// <summary>The base embedding's lookup.</summary>
        private protected override Tensor BaseOutput(Tensor input) => base_layer.forward(input);
    }

    /// <summary>A wrapper that gives its base layer back whole (<see cref="AdapterWrapper{TBase}.Unwrap"/>), whatever the base layer's type.</summary>
    internal interface IAdapterWrapper
    {
        /// <summary>Takes the parameters' registrations out, frees the wrapper, and returns the base layer.</summary>
        nn.Module Unwrap();
    }
}
