using System;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Lora
{
    /// <summary>
    /// TorchLinear's <see cref="Conv1D"/> (transformers' Conv1D, weight (in, out)), adapted as PEFT 0.18.1 adapts
    /// transformers' Conv1D: a <c>lora.Linear</c> with <c>fan_in_fan_out=True</c> (<c>dispatch_default</c> in PEFT's
    /// <c>layer.py</c>). in_features is the weight's first size and out_features its second; lora_A is (r, in) and lora_B
    /// (out, r) as for any linear layer, the forward adds <c>lora_B(lora_A(dropout(x))) · scaling</c>, and a merge adds
    /// <c>(B A)ᵀ · scaling</c> to the (in, out) weight (<see cref="LoraLayer.fan_in_fan_out"/>). The adapters run in the
    /// layer's own <see cref="AdaptableLayer.Adapter"/> slot, whatever holds it; a slot some other code filled is refused
    /// (<see cref="SlotLayerType"/>).
    /// </summary>
    internal sealed class Conv1DLayerType : SlotLayerType
    {
        public override string Name => "Conv1D";

        public override bool FanInFanOut => true;

        public override bool Matches(nn.Module module) => module is Conv1D;

        public override Parameter Weight(nn.Module module) => ((Conv1D)module).weight;

        public override Parameter? Bias(nn.Module module) => ((Conv1D)module).bias;
    }
}
