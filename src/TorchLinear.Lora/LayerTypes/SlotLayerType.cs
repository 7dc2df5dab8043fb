using System;
using TorchSharp;
using static TorchSharp.torch;

namespace TorchLinear.Lora
{
    /// <summary>
    /// What the layer types with an <c>Adapter</c> slot of their own share (<see cref="CustomLinear"/>, <see cref="Conv1D"/>:
    /// <see cref="AdaptableLayer"/>s): the layer runs its adapters from that slot in its own forward, so it keeps its type
    /// and place.
    /// The library puts one delegate there and remembers it (<see cref="AdaptedLayer.Attached"/>): a slot some other code
    /// filled before is refused; a slot some other code emptied or refilled after is refused by every operation on the
    /// adapters but <c>unload</c> (<see cref="LoraModel.CheckSlots"/>), and <c>unload</c> leaves such a slot as that code
    /// set it.
    /// </summary>
    internal abstract class SlotLayerType : LinearLikeLayerType
    {
        public override Delegate? Slot(nn.Module module) => ((AdaptableLayer)module).Adapter;

        public override string? Refusal(string path, nn.Module module, LoraConfig config, bool adaptedAlready) =>
            base.Refusal(path, module, config, adaptedAlready)
            ?? (!adaptedAlready && ((AdaptableLayer)module).Adapter is not null ? $"{path} already has an adapter in its Adapter slot" : null);

        public override Action? AttachInPlace(nn.Module module, AdaptedLayer layer)
        {
            Func<Tensor, Tensor, Tensor> attached = (input, output) => layer.Apply(output, input, module.training);
            ((AdaptableLayer)module).Adapter = attached;
            layer.Attached = attached;
            // A delegate some other code put there since is left as it is: it is that code's, not the library's.
            return () =>
            {
                if (ReferenceEquals(((AdaptableLayer)module).Adapter, attached))
                    ((AdaptableLayer)module).Adapter = null;
            };
        }

        public override Type? WrapperType => null;

        public override nn.Module Wrap(nn.Module module, AdaptedLayer layer) =>
            throw new InvalidOperationException($"{Name} runs its adapters in its own Adapter slot; it is never wrapped.");
    }
}
