using System;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Lora
{
    /// <summary>
    /// An <c>nn.Linear</c> with a LoRA adapter that runs in its own <see cref="forward"/>, put in place of a Linear that a
    /// model holds in a field (or a <c>ModuleList</c> / <c>ModuleDict</c> slot) typed <c>nn.Module&lt;Tensor, Tensor&gt;</c>
    /// or anything else it fits, as PEFT wraps a target layer: the adapter then runs whether the model invokes the layer
    /// with <c>call(x)</c> or <c>forward(x)</c>.
    /// </summary>
    /// <remarks>
    /// The base layer's weight and bias are registered under their own names, beside <c>lora_A</c> and <c>lora_B</c>, so
    /// the model's state_dict has the base model's keys (<c>q_proj.weight</c> loads as before) and PEFT's adapter keys
    /// (<c>q_proj.lora_A.weight</c>). <see cref="LoraModel"/> puts it in and takes it out: <c>unload</c> and
    /// <c>merge_and_unload</c> give the original <c>Linear</c> back, in the same field and slot.
    /// </remarks>
    public sealed class LoraWrapper : nn.Module<Tensor, Tensor>
    {
        private bool _unwrapped;

        internal LoraWrapper(Linear base_layer, LoraLayer lora_layer) : base(nameof(LoraWrapper))
        {
            this.base_layer = base_layer;
            this.lora_layer = lora_layer;
            // The order of the base layer's state_dict, then the adapter's: weight, bias, lora_A, lora_B.
            ConditionallyRegisterParameter("weight", base_layer.weight);
            if (base_layer.bias is not null)
                ConditionallyRegisterParameter("bias", base_layer.bias);
            register_module("lora_A", lora_layer.lora_A);
            register_module("lora_B", lora_layer.lora_B);
            register_module("lora_layer", lora_layer);
            if (!base_layer.training)
                train(false);
        }

        /// <summary>The Linear this wrapper stands in for; it holds the same weight and bias parameters.</summary>
        public Linear base_layer { get; }

        /// <summary>The adapter.</summary>
        public LoraLayer lora_layer { get; }

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

        /// <summary><c>x Wᵀ + b</c> as <c>nn.Linear</c> computes it, plus the adapter's term.</summary>
        public override Tensor forward(Tensor input)
        {
            Tensor output = LinearFunctional.linear(input, weight, bias);
            try
            {
                return lora_layer.add_to(output, input, training);
            }
            catch
            {
                output.Dispose();
                throw;
            }
        }

        /// <summary>Registers nothing more: the constructor registered the parameters and the adapter.</summary>
        protected override void RegisterComponents()
        {
        }

        /// <summary>
        /// Takes the registrations out again (the parameters stay the base layer's, the adapter's modules are left to
        /// the caller) and frees this wrapper: the base layer is whole again.
        /// </summary>
        internal Linear Unwrap()
        {
            ConditionallyRegisterParameter("weight", null);
            ConditionallyRegisterParameter("bias", null);
            register_module("lora_A", null!);
            register_module("lora_B", null!);
            register_module("lora_layer", null!);
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

        /// <summary>For example <c>LoraWrapper(in_features=24, out_features=8, bias=True, r=4)</c>.</summary>
        public override string ToString() =>
            $"LoraWrapper(in_features={base_layer.in_features}, out_features={base_layer.out_features}, bias={(base_layer.bias is null ? "False" : "True")}, r={lora_layer.r})";
    }
}
