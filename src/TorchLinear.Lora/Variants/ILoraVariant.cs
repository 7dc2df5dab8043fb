using System;
using System.Collections.Generic;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Lora
{
    /// <summary>
    /// A LoRA variant of one adapter type (PEFT's <c>LoraVariant</c> in <c>tuners/lora/layer.py</c>, implemented in
    /// <c>variants.py</c> and <c>dora.py</c>): how the adapter's term enters the layer's output, and what merging writes
    /// into the base weight. Plain LoRA (<see cref="PlainLora"/>) and DoRA (<see cref="DoraLinear"/>) are the variants of
    /// <see cref="LoraLayer"/>. A new variant is a new file implementing this, chosen where the adapter is made
    /// (<see cref="LoraLayer"/>'s <c>EnableDora</c> for DoRA), with its tests.
    /// </summary>
    /// <typeparam name="TAdapter">The adapter type the variant applies to (its factors, scaling and dropout).</typeparam>
    /// <remarks>PEFT's <c>init</c> is the variant's constructor; <c>merge_safe</c>/<c>merge_unsafe</c> are
    /// <see cref="Merge"/> (the adapter checks finiteness first and keeps the weight for an exact <c>unmerge</c>, so the
    /// variant never unmerges by arithmetic); <c>forward</c> is <see cref="AddTerm"/>.</remarks>
    internal interface ILoraVariant<TAdapter> : IDisposable
    {
        /// <summary>The config key that selects the variant (<c>use_dora</c>), or null for plain LoRA: for messages.</summary>
        string? ConfigKey { get; }

        /// <summary>The variant's own trainable tensors by PEFT's attribute (<c>lora_magnitude_vector</c>), as modules the host registers.</summary>
        IEnumerable<(string Attribute, nn.Module Module, Parameter Parameter)> Parts();

        /// <summary>
        /// Adds the adapter's term to <paramref name="output"/> (the base layer's output, written in place).
        /// <paramref name="x"/> is the adapter's input (the layer's input, dropped out when <paramref name="dropped"/>).
        /// </summary>
        void AddTerm(TAdapter adapter, Tensor output, Tensor x, bool dropped, Tensor weight, Tensor? bias);

        /// <summary>
        /// Writes the merged weight into <paramref name="weight"/> (no gradients; the caller checked it stays finite).
        /// <paramref name="normBase"/> is the layer's weight before any adapter of this merge went in, which DoRA takes its
        /// rows' norm from, as its unmerged forward does (PEFT after 0.18.1, huggingface/peft#3609).
        /// </summary>
        void Merge(TAdapter adapter, Tensor weight, Tensor normBase);

        /// <summary>
        /// Whether the merged weight is W + Δ, so that |W| + |Δ| bounds it and a cheap bound can vouch for its finiteness;
        /// false when the variant rescales (DoRA divides by the rows' norm): then only the merged weight itself can tell.
        /// </summary>
        bool MergeIsAdditive { get; }

        /// <summary>
        /// Whether the variant's term is the plain low-rank product <c>((x Aᵀ) · scaling) Bᵀ</c> and nothing else, so that a
        /// mixed batch may stack the adapter's factors with other adapters' into one pair of products.
        /// </summary>
        bool Stackable { get; }

        /// <summary>For a variant that changes the weight beyond Δ: its formula and its file part, for the message that refuses a weight that is not finite.</summary>
        (string Formula, string Part)? Rescaled { get; }
    }
}
