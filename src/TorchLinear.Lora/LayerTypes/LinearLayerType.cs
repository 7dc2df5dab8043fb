using System;
using System.Collections.Generic;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Lora
{
    /// <summary>
    /// What the linear layer types share (PEFT's <c>lora.Linear</c>): a 2-D weight (out, in) — or (in, out) for a type with
    /// <see cref="FanInFanOut"/> (transformers' Conv1D) —, a <see cref="LoraLayer"/> adapter with <c>lora_A</c> (r, in),
    /// <c>lora_B</c> (out, r) and, for DoRA, <c>lora_magnitude_vector</c> (out), saved as <c>&lt;path&gt;.lora_A.weight</c>,
    /// <c>.lora_B.weight</c>, <c>.lora_magnitude_vector</c>.
    /// </summary>
    internal abstract class LinearLikeLayerType : ILoraLayerType
    {
        private static readonly AdapterAttribute[] LinearAttributes =
        {
            new("lora_A", false), new("lora_B", false), new("lora_magnitude_vector", false),
        };

        private static readonly FilePart[] LinearParts =
        {
            new("lora_A", ".lora_A.weight"), new("lora_B", ".lora_B.weight"), new("lora_magnitude_vector", ".lora_magnitude_vector", DoraOnly: true),
        };

        public abstract string Name { get; }

        public bool IsLinear => true;

        /// <summary>Whether the weight is stored (in, out), PEFT's <c>fan_in_fan_out</c> (transformers' Conv1D).</summary>
        public virtual bool FanInFanOut => false;

        /// <summary>PEFT's <c>dispatch_default</c> sets the config's flag to the layer's layout (with a warning when it differed).</summary>
        public bool? SetsFanInFanOut => FanInFanOut;

        private (long In, long Out) Features(Tensor weight) => FanInFanOut ? (weight.size(0), weight.size(1)) : (weight.size(1), weight.size(0));

        public abstract bool Matches(nn.Module module);

        public abstract Parameter Weight(nn.Module module);

        public abstract Parameter? Bias(nn.Module module);

        public virtual string? Refusal(string path, nn.Module module, LoraConfig config, bool adaptedAlready)
        {
            var weight = Weight(module);
            return weight.dim() != 2 ? $"{path} has a weight of shape [{string.Join(", ", weight.shape)}], not 2-D" : null;
        }

        public IReadOnlyList<AdapterAttribute> Attributes => LinearAttributes;

        public IReadOnlyList<FilePart> FileParts => LinearParts;

        public long[] PartShape(nn.Module module, string part, int rank)
        {
            var (inFeatures, outFeatures) = Features(Weight(module));
            return part switch
            {
                "lora_A" => new[] { (long)rank, inFeatures },
                "lora_B" => new[] { outFeatures, (long)rank },
                "lora_magnitude_vector" => new[] { outFeatures },
                _ => throw new ArgumentException($"{Name} adapters have no part {part}.", nameof(part)),
            };
        }

        public IAdapter Create(nn.Module module, int rank, double alpha, LoraConfig config, bool draw)
        {
            var weight = Weight(module);
            var (inFeatures, outFeatures) = Features(weight);
            var layer = draw
                ? LoraLayer.ForInject(inFeatures, outFeatures, rank, alpha, config.lora_dropout, config.use_rslora, weight.dtype, weight.device, config.init_lora_weights, FanInFanOut)
                : LoraLayer.ForLoading(inFeatures, outFeatures, rank, alpha, config.lora_dropout, config.use_rslora, weight.dtype, weight.device, FanInFanOut);
            try
            {
                if (config.use_dora)
                    layer.EnableDora(weight, compute: draw);
            }
            catch
            {
                layer.Dispose();
                throw;
            }
            return layer;
        }

        public abstract Action? AttachInPlace(nn.Module module, AdaptedLayer layer);

        public virtual Delegate? Slot(nn.Module module) => null;

        public abstract Type? WrapperType { get; }

        public abstract nn.Module Wrap(nn.Module module, AdaptedLayer layer);

        /// <summary>The update as B A (out × in): PEFT's svd combination transposes a <c>fan_in_fan_out</c> layer's (in, out) update (<c>delta_weight.T</c>).</summary>
        public Tensor DeltaMatrix(Tensor delta) => FanInFanOut ? delta.t() : delta;

        public bool Stacks => true;
    }

    /// <summary>TorchSharp's <c>nn.Linear</c>: wrapped by a <see cref="LoraWrapper"/> where a field or slot can hold one, hooked otherwise.</summary>
    internal sealed class LinearLayerType : LinearLikeLayerType
    {
        public override string Name => "nn.Linear";

        public override bool Matches(nn.Module module) => module is Linear;

        public override Parameter Weight(nn.Module module) => ((Linear)module).weight;

        public override Parameter? Bias(nn.Module module) => ((Linear)module).bias;

        public override Action? AttachInPlace(nn.Module module, AdaptedLayer layer) => null;

        public override Type? WrapperType => typeof(LoraWrapper);

        public override nn.Module Wrap(nn.Module module, AdaptedLayer layer) => new LoraWrapper((Linear)module, layer);
    }
}
