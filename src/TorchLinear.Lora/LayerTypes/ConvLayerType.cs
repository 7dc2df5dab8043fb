using System;
using System.Collections.Generic;
using System.Linq;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Lora
{
    /// <summary>
    /// TorchSharp's <c>nn.Conv1d</c> or <c>nn.Conv2d</c> (PEFT's <c>lora.Conv1d</c> / <c>lora.Conv2d</c>): a
    /// <see cref="LoraConvLayer"/> adapter with <c>lora_A</c> (r, in_channels, *kernel_size) and <c>lora_B</c>
    /// (out_channels, r, 1[, 1]), saved as <c>&lt;path&gt;.lora_A.weight</c> and <c>.lora_B.weight</c> (3-D for Conv1d, 4-D
    /// for Conv2d); wrapped by a <see cref="LoraConvWrapper"/> where a field or slot can hold one, hooked otherwise.
    /// Not a linear layer for <c>all-linear</c>. Refused by name: what <see cref="LoraConvLayer.Unsupported"/> names
    /// (groups &gt; 1, dilation, padding modes other than zeros) and DoRA.
    /// </summary>
    internal sealed class ConvLayerType : ILoraLayerType
    {
        private static readonly AdapterAttribute[] ConvAttributes = { new("lora_A", false), new("lora_B", false) };

        private static readonly FilePart[] ConvParts = { new("lora_A", ".lora_A.weight"), new("lora_B", ".lora_B.weight") };

        private readonly int _dimensions;

        /// <param name="dimensions">1 for <c>nn.Conv1d</c>, 2 for <c>nn.Conv2d</c>.</param>
        internal ConvLayerType(int dimensions) => _dimensions = dimensions;

        public string Name => $"nn.Conv{_dimensions}d";

        public bool IsLinear => false;

        public bool Matches(nn.Module module) => _dimensions == 1 ? module is Conv1d : module is Conv2d;

        public Parameter Weight(nn.Module module) => ((Convolution)module).weight;

        public Parameter? Bias(nn.Module module) => ((Convolution)module).bias;

        public string? Refusal(string path, nn.Module module, LoraConfig config, bool adaptedAlready)
        {
            if (LoraConvLayer.Unsupported((Convolution)module) is { } why)
                return $"{path} is {why}";
            return config.use_dora ? $"{path} is an {Name}, and DoRA on convolutions is not implemented (use_dora)" : null;
        }

        public IReadOnlyList<AdapterAttribute> Attributes => ConvAttributes;

        public IReadOnlyList<FilePart> FileParts => ConvParts;

        public long[] PartShape(nn.Module module, string part, int rank)
        {
            var conv = (Convolution)module;
            return part switch
            {
                "lora_A" => new[] { (long)rank, conv.in_channels }.Concat(conv.kernel_size).ToArray(),
                "lora_B" => new[] { conv.out_channels, (long)rank }.Concat(Enumerable.Repeat(1L, conv.kernel_size.Length)).ToArray(),
                _ => throw new ArgumentException($"{Name} adapters have no part {part}.", nameof(part)),
            };
        }

        public IAdapter Create(nn.Module module, int rank, double alpha, LoraConfig config, bool draw)
        {
            var conv = (Convolution)module;
            return new LoraConvLayer(LoraConvLayer.Geometry.Of(conv, Name), rank, alpha, config.lora_dropout, config.use_rslora,
                                     conv.weight.dtype, conv.weight.device, draw ? config.init_lora_weights : "true", draw);
        }

        public Action? AttachInPlace(nn.Module module, AdaptedLayer layer) => null;

        public Type? WrapperType => typeof(LoraConvWrapper);

        public nn.Module Wrap(nn.Module module, AdaptedLayer layer) => new LoraConvWrapper((Convolution)module, layer);

        /// <summary>
        /// The update as a matrix (out_channels, in_channels · kernel): PEFT's svd combination flattens a Conv2d's delta
        /// from its second dimension (its 1×1 case squeezes, which is the same matrix), and reshapes the factors into
        /// lora_B's and lora_A's shapes. (A Conv1d is refused: <see cref="SvdRefusal"/>.)
        /// </summary>
        public Tensor DeltaMatrix(Tensor delta) => delta.flatten(1);

        /// <summary>
        /// PEFT 0.18.1 flattens only a Conv2d's update for svd (<c>isinstance(target, Conv2d)</c>); for a Conv1d it takes the
        /// svd of the 3-D update and fails (measured: <c>RuntimeError: size mismatch</c>), so there is no PEFT result to
        /// give: refused by name.
        /// </summary>
        public string? SvdRefusal(string path, nn.Module module) => _dimensions == 1
            ? $"{path} is an nn.Conv1d, and PEFT 0.18.1's svd combination fails on Conv1d adapters (it flattens only Conv2d updates: \"size mismatch\"), so there is no PEFT result to match; use combination_type cat or linear"
            : null;

        /// <summary>A mixed batch runs each adapter on its own rows (the stacked products are the linear layers').</summary>
        public bool Stacks => false;
    }

    /// <summary>
    /// An <c>nn.Conv1d</c> or <c>nn.Conv2d</c> with LoRA adapters that run in its own
    /// <see cref="AdapterWrapper{TBase}.forward"/>, put in place of a convolution that a model holds in a field (or a
    /// <c>ModuleList</c> / <c>ModuleDict</c> slot) typed <c>nn.Module&lt;Tensor, Tensor&gt;</c>, as PEFT wraps a target
    /// layer: the adapters then run whether the model invokes the layer with <c>call(x)</c> or <c>forward(x)</c>.
    /// </summary>
    /// <remarks>
    /// The base convolution's weight and bias are registered under their own names, beside the adapters' <c>lora_A</c> and
    /// <c>lora_B</c> containers, so the model's state_dict has the base model's keys (<c>stem.weight</c>) and PEFT's
    /// adapter keys (<c>stem.lora_A.default.weight</c>). <c>unload</c> and <c>merge_and_unload</c> give the original
    /// convolution back, in the same field and slot.
    /// </remarks>
    public sealed class LoraConvWrapper : AdapterWrapper<Convolution>
    {
        internal LoraConvWrapper(Convolution base_layer, AdaptedLayer layer)
            : base(nameof(LoraConvWrapper), base_layer, layer, ("weight", base_layer.weight), ("bias", base_layer.bias))
        {
        }

        /// <summary>The adapters of this layer, in the order they were added.</summary>
        public IReadOnlyList<LoraConvLayer> LoraLayers => Layer.Adapters.OfType<LoraConvLayer>().ToList();

        /// <summary>The base convolution's weight, (out_channels, in_channels, *kernel_size).</summary>
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

        /// <summary>The base convolution's bias, (out_channels), or null.</summary>
        public Parameter? bias
        {
            get => base_layer.bias;
            private set
            {
                base_layer.bias = value;
                ConditionallyRegisterParameter("bias", base_layer.bias);
            }
        }

        /// <summary>The convolution as the base layer computes it (its padding mode included).</summary>
        private protected override Tensor BaseOutput(Tensor input) => base_layer.forward(input);

        /// <summary>For example <c>LoraConvWrapper(Conv2d, in_channels=8, out_channels=16, kernel_size=(3, 3), adapters=default (r=4))</c>.</summary>
        public override string ToString() =>
            $"LoraConvWrapper({base_layer.GetType().Name}, in_channels={base_layer.in_channels}, out_channels={base_layer.out_channels}, " +
            $"kernel_size=({string.Join(", ", base_layer.kernel_size)}), adapters={string.Join(", ", Layer.Adapters.Select(a => $"{a.Name} (r={a.r})"))})";
    }
}
