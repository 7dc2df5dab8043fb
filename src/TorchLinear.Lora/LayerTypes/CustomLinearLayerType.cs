using System;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Lora
{
    /// <summary>
    /// TorchLinear's <see cref="CustomLinear"/>: it runs its adapters in its own <see cref="CustomLinear.Adapter"/> slot,
    /// whatever holds it, so it keeps its type and place; a slot some other code filled is refused.
    /// </summary>
    internal sealed class CustomLinearLayerType : LinearLikeLayerType
    {
        public override string Name => "CustomLinear";

        public override bool Matches(nn.Module module) => module is CustomLinear;

        public override Parameter Weight(nn.Module module) => ((CustomLinear)module).weight;

        public override Parameter? Bias(nn.Module module) => ((CustomLinear)module).bias;

        public override string? Refusal(string path, nn.Module module, LoraConfig config, bool adaptedAlready) =>
            base.Refusal(path, module, config, adaptedAlready)
            ?? (!adaptedAlready && ((CustomLinear)module).Adapter is not null ? $"{path} already has an adapter in its Adapter slot" : null);

        public override Action? AttachInPlace(nn.Module module, AdaptedLayer layer)
        {
            var custom = (CustomLinear)module;
            custom.Adapter = (input, output) => layer.Apply(output, input, custom.training);
            return () => custom.Adapter = null;
        }

        public override Type? WrapperType => null;

        public override nn.Module Wrap(nn.Module module, AdaptedLayer layer) =>
            throw new InvalidOperationException($"{Name} runs its adapters in its own Adapter slot; it is never wrapped.");
    }
}
