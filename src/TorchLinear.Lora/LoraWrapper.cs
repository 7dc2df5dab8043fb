using System;
using System.Collections.Generic;
using System.Linq;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Lora
{
    /// <summary>
    /// An <c>nn.Linear</c> with LoRA adapters that run in its own <see cref="forward"/>, put in place of a Linear that a
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
    public sealed class LoraWrapper : nn.Module<Tensor, Tensor>
    {
        private readonly AdaptedLayer _layer;
        private bool _unwrapped;

        internal LoraWrapper(Linear base_layer, AdaptedLayer layer) : base(nameof(LoraWrapper))
        {
            this.base_layer = base_layer;
            _layer = layer;
            // The order of the base layer's state_dict, then the adapters': weight, bias, lora_A, lora_B.
            ConditionallyRegisterParameter("weight", base_layer.weight);
            if (base_layer.bias is not null)
                ConditionallyRegisterParameter("bias", base_layer.bias);
            if (!base_layer.training)
                train(false);
        }

        /// <summary>The Linear this wrapper stands in for; it holds the same weight and bias parameters.</summary>
        public Linear base_layer { get; }

        /// <summary>The adapters of this layer, in the order they were added.</summary>
        public IReadOnlyList<LoraLayer> lora_layers => _layer.Adapters.OfType<LoraLayer>().ToList();

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

        /// <summary><c>x Wᵀ + b</c> as <c>nn.Linear</c> computes it, plus the active adapters' terms.</summary>
        public override Tensor forward(Tensor input)
        {
            Tensor output = LinearFunctional.linear(input, weight, bias);
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
        internal Linear Unwrap()
        {
            ConditionallyRegisterParameter("weight", null);
            ConditionallyRegisterParameter("bias", null);
            _unwrapped = true;
            Dispose();
            return base_layer;
        }

        /// <inheritdoc />
        protected override void Dispose(bool disposing)
        {
            base.Dispose(disposing);
            if (disposing && !_unwrapped)
                base_layer.Dispose();
        }

        /// <summary>For example <c>LoraWrapper(in_features=24, out_features=8, bias=True, adapters=default (r=4))</c>.</summary>
        public override string ToString() =>
            $"LoraWrapper(in_features={base_layer.in_features}, out_features={base_layer.out_features}, bias={(base_layer.bias is null ? "False" : "True")}, " +
            $"adapters={string.Join(", ", _layer.Adapters.Select(a => $"{a.Name} (r={a.r})"))})";
    }

    /// <summary>
    /// An <c>nn.Embedding</c> with LoRA adapters that run in its own <see cref="forward"/>, put in place of an Embedding that
    /// a model holds in a field typed <c>nn.Module&lt;Tensor, Tensor&gt;</c> (see <see cref="LoraWrapper"/>): the base
    /// weight is registered as <c>weight</c>, the adapters as <c>lora_embedding_A.&lt;name&gt;</c> and
    /// <c>lora_embedding_B.&lt;name&gt;</c>.
    /// </summary>
    public sealed class LoraEmbeddingWrapper : nn.Module<Tensor, Tensor>
    {
        private readonly AdaptedLayer _layer;
        private bool _unwrapped;

        internal LoraEmbeddingWrapper(Embedding base_layer, AdaptedLayer layer) : base(nameof(LoraEmbeddingWrapper))
        {
            this.base_layer = base_layer;
            _layer = layer;
            ConditionallyRegisterParameter("weight", base_layer.weight);
            if (!base_layer.training)
                train(false);
        }

        /// <summary>The Embedding this wrapper stands in for; it holds the same weight.</summary>
        public Embedding base_layer { get; }

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

        /// <summary>The base lookup plus the active adapters' terms.</summary>
        public override Tensor forward(Tensor input)
        {
            Tensor output = base_layer.forward(input);
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

        /// <summary>Registers nothing more.</summary>
        protected override void RegisterComponents()
        {
        }

        internal Embedding Unwrap()
        {
            ConditionallyRegisterParameter("weight", null);
            _unwrapped = true;
            Dispose();
            return base_layer;
        }

        /// <inheritdoc />
        protected override void Dispose(bool disposing)
        {
            base.Dispose(disposing);
            if (disposing && !_unwrapped)
                base_layer.Dispose();
        }
    }
}
