using System.Collections.Generic;
using System.Linq;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Lora
{
    /// <summary>
    /// Plain LoRA on a linear layer (PEFT's <c>lora.Linear</c> without a variant): the term
    /// <c>lora_B(lora_A(dropout(x))) · scaling</c>, computed as <c>((x Aᵀ) · scaling) Bᵀ</c> by
    /// <see cref="LoraLayer.AddLowRank(Tensor, Tensor, Tensor, Tensor, Scalar)"/>, the one place that arithmetic is written
    /// (a mixed batch's stacked adapters use it too); merging adds <c>scaling · B A</c> to W.
    /// </summary>
    internal sealed class PlainLora : ILoraVariant<LoraLayer>
    {
        private static readonly Scalar One = 1;

        /// <summary>Plain LoRA keeps no state: one instance serves every adapter.</summary>
        internal static readonly PlainLora Instance = new();

        private PlainLora()
        {
        }

        public string? ConfigKey => null;

        public IEnumerable<(string Attribute, nn.Module Module, Parameter Parameter)> Parts() => Enumerable.Empty<(string, nn.Module, Parameter)>();

        public void AddTerm(LoraLayer adapter, Tensor output, Tensor x, bool dropped, Tensor weight, Tensor? bias) =>
            LoraLayer.AddLowRank(output, x, adapter.lora_A.weight, adapter.lora_B.weight, adapter.ScalingScalar);

        /// <summary>
        /// <c>W += Δ</c>. For float32, as in the forward, fused: one <c>addmm_</c> with the scaling as its alpha, no
        /// full-size temporary (PEFT adds the product times the scaling, which can differ in the last bit); every other
        /// dtype adds <see cref="LoraLayer.get_delta_weight"/>, PEFT's formula.
        /// </summary>
        public void Merge(LoraLayer adapter, Tensor weight, Tensor normBase)
        {
            Tensor a = adapter.lora_A.weight, b = adapter.lora_B.weight;
            if (weight.dtype == ScalarType.Float32 && b.dtype == ScalarType.Float32)
                weight.addmm_(b, a, 1, (float)adapter.scaling);
            else
            {
                using var delta = adapter.DeltaOutIn();
                weight.add_(delta, One);
            }
        }

        public bool MergeIsAdditive => true;

        public bool Stackable => true;

        public (string Formula, string Part)? Rescaled => null;

        public void Dispose()
        {
        }
    }
}
