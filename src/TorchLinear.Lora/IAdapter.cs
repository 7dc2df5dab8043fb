using System;
using System.Collections.Generic;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Lora
{
    /// <summary>
    /// What a model's adapted layer asks of one adapter, whatever the layer's type (<see cref="LoraLayer"/> for linear
    /// layers, <see cref="LoraEmbeddingLayer"/> for embeddings; the layer type that makes it is an
    /// <see cref="ILoraLayerType"/>): its tensors under PEFT's names, its forward term, its update and merge. Nothing
    /// outside the adapter switches on its concrete type.
    /// </summary>
    internal interface IAdapter : IDisposable
    {
        /// <summary>The adapter's name in its model (PEFT's adapter_name).</summary>
        string Name { get; set; }

        /// <summary>Who hosts it, for messages (the layer's path).</summary>
        string Owner { get; set; }

        int r { get; }
        double lora_alpha { get; }
        double scaling { get; }
        double lora_dropout { get; }
        bool merged { get; }

        /// <summary>Every trainable tensor of the adapter (its factors and its variant's).</summary>
        IEnumerable<Parameter> Parameters();

        /// <summary>What the adapted layer registers under PEFT's attributes: a module (<c>lora_A</c>: a <c>ModuleDict</c> entry) or a parameter (<c>lora_embedding_A</c>: a <c>ParameterDict</c> entry).</summary>
        IEnumerable<(string Attribute, nn.Module? Module, Parameter? Parameter)> Registrations();

        /// <summary>The adapter's tensors by their part in PEFT's file (the layer type's <see cref="ILoraLayerType.FileParts"/>): what is loaded into and saved from.</summary>
        IEnumerable<(string Part, Tensor Value)> Tensors();

        /// <summary>The low-rank factors A and B whose product B A (times the scaling) is the update, as a weighted combination reads and writes them.</summary>
        (Tensor A, Tensor B) Factors { get; }

        /// <summary>
        /// Whether the adapter's term is the plain <c>((x Aᵀ) · scaling) Bᵀ</c> of a linear layer with <see cref="Factors"/>
        /// as matrices (a plain LoRA adapter of a linear layer; not DoRA, an embedding or a convolution), so that a mixed
        /// batch may stack it with others into one pair of products.
        /// </summary>
        bool Stackable { get; }

        /// <summary>Refuses, naming the layer, an output of another dtype or device than the adapter's (a model converted after the adapter was hooked in).</summary>
        void CheckRunsIn(Tensor output);

        /// <summary>For a variant that rescales the weight (DoRA): its formula and its file part, for messages; otherwise null.</summary>
        (string Formula, string Part)? Rescaled { get; }

        /// <summary>Adds the adapter's term to <paramref name="output"/> (the base layer's output for <paramref name="input"/>) in place and returns it; nothing while merged.</summary>
        Tensor AddTerm(Tensor output, Tensor input, bool training, Tensor weight, Tensor? bias);

        /// <summary>The update in the base weight's shape, PEFT's <c>get_delta_weight</c>. The caller owns it.</summary>
        Tensor get_delta_weight();

        bool MergesFinite(Tensor weight);

        /// <summary>Whether <c>scaling · B A</c> alone is finite in the adapter's dtype.</summary>
        bool DeltaFinite();

        /// <summary>
        /// Whether the update <c>scaling · B A</c> is finite in the adapter's dtype, and for DoRA the rescaled weight
        /// <c>m / ‖W + ΔW‖ · (W + ΔW)</c> too: otherwise the layer's output would hold NaN or infinity.
        /// </summary>
        bool UpdateFinite(Tensor weight);
        /// <summary>Merges (the caller checked it stays finite); <paramref name="normBase"/>: the layer's weight before any adapter
        /// of this merge went in (DoRA's norm), or null when the adapter merges alone.</summary>
        void MergeChecked(Parameter weight, bool keep = true, Tensor? normBase = null);
        void unmerge(Parameter weight);
        void ForgetUnmerged();

        /// <summary>What a merge writes, applied to <paramref name="weight"/> (a side copy), without becoming merged;
        /// <paramref name="normBase"/> as for <see cref="MergeChecked"/>.</summary>
        void ApplyMerge(Tensor weight, Tensor? normBase = null);
    }
}
