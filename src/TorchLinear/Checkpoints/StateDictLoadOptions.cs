namespace TorchLinear
{
    /// <summary>
    /// Ways out for state_dicts that do not match a module key for key and dtype for dtype, accepted by
    /// <see cref="StateDicts.LoadPyTorchFile"/> and <see cref="StateDicts.LoadChecked"/>. Each one is an explicit opt-in:
    /// the default (no options, or <c>new StateDictLoadOptions()</c>) is strict, and every check still runs on what the
    /// options make of the state_dict, before anything is copied. A refusal's message names the option that would help,
    /// when one would. See docs/checkpoints.md, "When a checkpoint does not fit".
    /// </summary>
    /// <example>
    /// A file saved from a model wrapped in <c>nn.DataParallel</c> (every key begins with <c>module.</c>):
    /// <code>
    /// StateDicts.LoadPyTorchFile(model, "checkpoint.pt", options: new StateDictLoadOptions { StripPrefix = "module." });
    /// </code>
    /// </example>
    public sealed record StateDictLoadOptions
    {
        /// <summary>
        /// Removed from the start of every key of the state_dict that begins with it, before the keys are matched; keys
        /// that do not begin with it stay as they are (as PyTorch's <c>consume_prefix_in_state_dict_if_present</c> does).
        /// For files saved from a wrapped model: <c>"module."</c> (<c>nn.DataParallel</c>, <c>DistributedDataParallel</c>),
        /// <c>"_orig_mod."</c> (<c>torch.compile</c>), <c>"model."</c> (a training framework's wrapper). Two keys that
        /// would become one are refused. Null or empty: no prefix is removed.
        /// </summary>
        public string? StripPrefix { get; init; }

        /// <summary>
        /// Put before every key of the state_dict (after <see cref="StripPrefix"/>), for a module that holds the saved
        /// model as a child: <c>AddPrefix = "model."</c> loads a plain model's file into a module whose keys are
        /// <c>model.*</c>. Null or empty: nothing is added.
        /// </summary>
        public string? AddPrefix { get; init; }

        /// <summary>
        /// Converts a tensor whose dtype differs from the module's to the module's dtype, as PyTorch's
        /// <c>load_state_dict</c> does (it copies with <c>copy_</c>): floating-point to floating-point (float16,
        /// bfloat16, float32, float64; rounded to nearest), complex to complex, integer to integer (<c>num_batches_tracked</c>
        /// stored as int32 loads into TorchSharp's int64 buffer). Stricter than PyTorch in two ways: a conversion between
        /// kinds (floating-point into an integer buffer, integer into a floating-point parameter, real into complex) is
        /// still refused, and so is a conversion that would change a value beyond rounding: a finite value that
        /// overflows to infinity, an integer out of the target's range. Off by default: a dtype mismatch is refused.
        /// </summary>
        public bool CastDtypes { get; init; }

        /// <summary>
        /// Accepts a state_dict that lacks the <c>num_batches_tracked</c> buffer of BatchNorm (and InstanceNorm) modules
        /// that track running statistics, as checkpoints saved before PyTorch 0.4.1 do, and sets those buffers to 0 —
        /// what PyTorch's own <c>_NormBase._load_from_state_dict</c> puts there for such a checkpoint (and what a fresh
        /// module holds). The count is used only when training with <c>momentum = null</c> (a cumulative average).
        /// Any other missing key is still refused. Off by default.
        /// </summary>
        public bool AllowMissingNumBatchesTracked { get; init; }
    }
}
