using System;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Lora
{
    /// <summary>
    /// TorchLinear's <see cref="CustomLinear"/>: it runs its adapters in its own <see cref="AdaptableLayer.Adapter"/> slot,
    /// whatever holds it, so it keeps its type and place; a slot some other code filled is refused (<see cref="SlotLayerType"/>).
    /// </summary>
    internal sealed class CustomLinearLayerType : SlotLayerType
    {
        public override string Name => "CustomLinear";

        public override bool Matches(nn.Module module) => module is CustomLinear;

        public override Parameter Weight(nn.Module module) => ((CustomLinear)module).weight;

        public override Parameter? Bias(nn.Module module) => ((CustomLinear)module).bias;
    }
}
