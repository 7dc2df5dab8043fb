using System;
using System.Collections.Generic;
using System.Linq;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Lora
{
    /// <summary>
    /// One base-layer type that takes LoRA adapters, described once (PEFT's <c>lora.Linear</c>, <c>lora.Embedding</c>, ...
    /// in <c>layer.py</c>, with <c>model.py</c>'s dispatch): its weight and bias, what it refuses, PEFT's attributes and
    /// file keys with their shapes, how its adapter is made, and how it hosts adapters (a slot of its own, a wrapper, or a
    /// forward hook). The targeting (<see cref="LoraModel"/>'s <c>Targets</c>), the adapted layer
    /// (<see cref="AdaptedLayer"/>), the folder format (<see cref="PeftFolder"/>) and inject/load ask this, never the
    /// concrete type. A new layer type is a new file implementing this, registered in <see cref="LoraLayerTypes.All"/>,
    /// with its tests.
    /// </summary>
    internal interface ILoraLayerType
    {
        /// <summary>The type's name in messages, as a user writes it (<c>nn.Linear</c>, <c>CustomLinear</c>, <c>nn.Embedding</c>).</summary>
        string Name { get; }

        /// <summary>Whether PEFT's <c>all-linear</c> takes it (linear layers only).</summary>
        bool IsLinear { get; }

        /// <summary>Whether <paramref name="module"/> is of this type.</summary>
        bool Matches(nn.Module module);

        /// <summary>The base weight the adapters' update is added to (what a merge writes).</summary>
        Parameter Weight(nn.Module module);

        /// <summary>The base bias, or null.</summary>
        Parameter? Bias(nn.Module module);

        /// <summary>
        /// Why this layer cannot take an adapter of <paramref name="config"/> (a weight of the wrong rank, a variant the type
        /// lacks, a slot taken), as a clause after the layer's path; null when it can. <paramref name="adaptedAlready"/>: the
        /// layer holds another adapter of the model already. The dtype is checked by the caller, for every type alike.
        /// </summary>
        string? Refusal(string path, nn.Module module, LoraConfig config, bool adaptedAlready);

        /// <summary>PEFT's attributes of an adapted layer of this type (<c>lora_A</c>, <c>lora_B</c>, ...), each a
        /// <c>ModuleDict</c> or (<see cref="AdapterAttribute.HoldsParameters"/>) a <c>ParameterDict</c> by adapter name.</summary>
        IReadOnlyList<AdapterAttribute> Attributes { get; }

        /// <summary>The tensors of one adapter in PEFT's file, by part, with their key suffixes.</summary>
        IReadOnlyList<FilePart> FileParts { get; }

        /// <summary>The shape of <paramref name="part"/> for an adapter of rank <paramref name="rank"/> on <paramref name="module"/>.</summary>
        long[] PartShape(nn.Module module, string part, int rank);

        /// <summary>
        /// A new adapter for <paramref name="module"/> with the config's settings (its variant included). With
        /// <paramref name="draw"/>, initialised as PEFT's <c>get_peft_model</c> draws it (<c>init_lora_weights</c>); without,
        /// no random number is drawn (its values are loaded or computed next).
        /// </summary>
        IAdapter Create(nn.Module module, int rank, double alpha, LoraConfig config, bool draw);

        /// <summary>
        /// For a type that runs adapters in a slot of its own (CustomLinear's <c>Adapter</c>): puts the layer's forward term
        /// there, remembers it in <see cref="AdaptedLayer.Attached"/>, and returns how to take it out (which leaves a
        /// delegate some other code put there since); null for a type without one.
        /// </summary>
        Action? AttachInPlace(nn.Module module, AdaptedLayer layer);

        /// <summary>What the layer's own adapter slot holds now (compared with <see cref="AdaptedLayer.Attached"/>); null for a type without one.</summary>
        Delegate? Slot(nn.Module module) => null;

        /// <summary>The wrapper that can stand in for the layer in a field or container slot (PEFT's replacement), or null.</summary>
        Type? WrapperType { get; }

        /// <summary>A wrapper (of <see cref="WrapperType"/>) that runs <paramref name="layer"/>'s adapters in its own forward.</summary>
        nn.Module Wrap(nn.Module module, AdaptedLayer layer);

        /// <summary>The update <see cref="IAdapter.get_delta_weight"/> as the matrix B A (out × in) whose best low-rank factors a weighted <c>svd</c> combination takes.</summary>
        Tensor DeltaMatrix(Tensor delta);

        /// <summary>Why a weighted <c>svd</c> combination cannot be made for this layer (the layer at <paramref name="path"/> named), or null when it can.</summary>
        string? SvdRefusal(string path, nn.Module module) => null;

        /// <summary>
        /// What PEFT's dispatch sets the config's <c>fan_in_fan_out</c> to when it adapts a layer of this type (true for
        /// transformers' Conv1D, false for a Linear), or null for a type whose dispatch leaves it (embeddings, convolutions).
        /// </summary>
        bool? SetsFanInFanOut => null;

        /// <summary>Whether a mixed batch may stack this type's plain adapters into one pair of products (<see cref="LoraLayer.AddLowRank(Tensor, Tensor, Tensor, Tensor, Tensor)"/>).</summary>
        bool Stacks { get; }
    }

    /// <summary>A PEFT attribute of an adapted layer: a <c>ModuleDict</c> of modules by adapter name, or a <c>ParameterDict</c>.</summary>
    internal sealed record AdapterAttribute(string Name, bool HoldsParameters);

    /// <summary>
    /// One tensor of an adapter in PEFT's file: its part (the attribute, <c>lora_A</c>), the key suffix after the layer's
    /// path (<c>.lora_A.weight</c>; DoRA's and an embedding's have no <c>.weight</c>), and whether only a DoRA adapter
    /// (<c>use_dora</c>) holds it.
    /// </summary>
    internal sealed record FilePart(string Part, string Suffix, bool DoraOnly = false);

    /// <summary>The registry of layer types: the one place a new type is added.</summary>
    internal static class LoraLayerTypes
    {
        /// <summary>Every layer type that takes adapters, in the order messages list them.</summary>
        internal static readonly IReadOnlyList<ILoraLayerType> All = new ILoraLayerType[]
        {
            new LinearLayerType(),
            new CustomLinearLayerType(),
            new Conv1DLayerType(),
            new EmbeddingLayerType(),
            new ConvLayerType(1),
            new ConvLayerType(2),
        };

        /// <summary>The type of <paramref name="module"/>, or null when no adapter fits it.</summary>
        internal static ILoraLayerType? Of(nn.Module module)
        {
            foreach (var type in All)
            {
                if (type.Matches(module))
                    return type;
            }
            return null;
        }

        /// <summary>The type of an adapted layer's module, which was one of them when it was adapted.</summary>
        internal static ILoraLayerType OfAdapted(nn.Module module, string path) =>
            Of(module) ?? throw new InvalidOperationException($"{path}: {module.GetType().Name} is not a layer type that takes adapters.");

        /// <summary>"neither nn.Linear, CustomLinear nor nn.Embedding" (with every registered type).</summary>
        internal static string Neither => $"neither {string.Join(", ", All.Take(All.Count - 1).Select(t => t.Name))} nor {All[^1].Name}";

        /// <summary>"nn.Linear, CustomLinear or nn.Embedding" (with every registered type).</summary>
        internal static string AnyOf => $"{string.Join(", ", All.Take(All.Count - 1).Select(t => t.Name))} or {All[^1].Name}";

        /// <summary>Every attribute name any type's adapted layer registers, and <c>lora_layer</c>: a layer with a child of such a name cannot be adapted.</summary>
        internal static IEnumerable<string> ReservedChildren =>
            All.SelectMany(t => t.Attributes.Select(a => a.Name)).Append(AdaptedLayer.StateAttribute).Distinct(StringComparer.Ordinal);

        /// <summary>The layer path and part of a file key's name (<c>q_proj.lora_A.weight</c> → (q_proj, lora_A)), for any type's parts; null for another name.</summary>
        internal static (string Path, string Part)? PartOf(string name)
        {
            foreach (var part in All.SelectMany(t => t.FileParts).DistinctBy(p => p.Suffix))
            {
                if (name.EndsWith(part.Suffix, StringComparison.Ordinal) && name.Length > part.Suffix.Length)
                    return (name[..^part.Suffix.Length], part.Part);
            }
            return null;
        }
    }
}
