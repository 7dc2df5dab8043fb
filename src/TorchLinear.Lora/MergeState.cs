using System;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Lora
{
    /// <summary>
    /// Whether an adapter is merged into its host's weight, and the weight before merging, kept for an exact unmerge: the
    /// state <see cref="LoraLayer"/> and <see cref="LoraEmbeddingLayer"/> share.
    /// </summary>
    internal sealed class MergeState : IDisposable
    {
        /// <summary>Whether the adapter's update is in the host's weight.</summary>
        internal bool Merged { get; private set; }

        /// <summary>The host's weight before merging, or null (not merged, or merged for good).</summary>
        internal Tensor? Kept { get; private set; }

        /// <summary>
        /// Keeps a copy of <paramref name="weight"/> (unless merging for good), then <paramref name="addUpdate"/> writes the
        /// update into it, without gradients and with its temporaries freed.
        /// </summary>
        internal void Merge(Parameter weight, bool keep, Action<Parameter> addUpdate)
        {
            using var noGrad = no_grad();
            using var scope = NewDisposeScope();
            // A copy that no dispose scope frees, without the detach() wrapper left alive.
            var kept = keep ? weight.detach().clone().DetachFromDisposeScope() : null;
            addUpdate(weight);
            Kept = kept;
            Merged = true;
        }

        /// <summary>Restores the kept weight into <paramref name="weight"/> bit for bit; nothing when not merged.</summary>
        /// <exception cref="InvalidOperationException">Merged for good: there is no weight to restore (the message names <paramref name="owner"/>).</exception>
        internal void Unmerge(Parameter weight, string owner)
        {
            if (!Merged)
                return;
            if (Kept is null)
                throw new InvalidOperationException($"{owner}: merged for good (merge_and_unload), so there is no weight to restore.");
            using (no_grad())
                weight.copy_(Kept);
            Forget();
            Merged = false;
        }

        /// <summary>Frees the kept weight without restoring it: the host keeps W + Δ for good.</summary>
        internal void Forget()
        {
            Kept?.Dispose();
            Kept = null;
        }

        /// <summary>Converts the kept weight as the host is converted (<c>.to(...)</c>).</summary>
        internal void Convert(ScalarType? dtype, Device? device)
        {
            if (Kept is not { } kept)
                return;
            Tensor converted = kept.to(dtype ?? kept.dtype, device ?? kept.device).DetachFromDisposeScope();
            if (!ReferenceEquals(converted, kept))
            {
                kept.Dispose();
                Kept = converted;
            }
        }

        public void Dispose() => Forget();
    }
}
