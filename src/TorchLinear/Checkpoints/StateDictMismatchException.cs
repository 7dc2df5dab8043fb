using System;
using System.Collections.Generic;
using static TorchSharp.torch;

namespace TorchLinear
{
    /// <summary>
    /// A state_dict that does not fit a module was refused, and nothing was changed. An
    /// <see cref="InvalidOperationException"/>, the type TorchSharp's own <c>load_state_dict</c> throws for a missing or
    /// unexpected key, so that one <c>catch</c> serves both.
    /// </summary>
    /// <remarks>
    /// The message stays short whatever the number of keys: it says first what it recognises (a prefix such as
    /// DataParallel's <c>module.</c> on every key, a checkpoint older than BatchNorm's <c>num_batches_tracked</c>) and the
    /// <see cref="StateDictLoadOptions"/> that loads it, then how many keys of each kind do not fit with the first few of
    /// each, and one line of advice for dtypes. The complete lists are this exception's properties.
    /// </remarks>
    public sealed class StateDictMismatchException : InvalidOperationException
    {
        internal StateDictMismatchException(string message, string? path, IReadOnlyList<string> missingKeys, IReadOnlyList<string> unexpectedKeys,
            IReadOnlyList<ShapeMismatch> shapeMismatches, IReadOnlyList<DtypeMismatch> dtypeMismatches)
            : base(message)
        {
            Path = path;
            MissingKeys = missingKeys;
            UnexpectedKeys = unexpectedKeys;
            ShapeMismatches = shapeMismatches;
            DtypeMismatches = dtypeMismatches;
        }

        /// <summary>The file the state_dict was read from, or null when it was given as a dictionary.</summary>
        public string? Path { get; }

        /// <summary>Every key of the module that the state_dict lacks (empty when the load was not strict), in the
        /// module's order.</summary>
        public IReadOnlyList<string> MissingKeys { get; }

        /// <summary>Every key of the state_dict that the module lacks (empty when the load was not strict), as named after
        /// the <see cref="StateDictLoadOptions"/> prefixes were applied.</summary>
        public IReadOnlyList<string> UnexpectedKeys { get; }

        /// <summary>Every key present in both whose tensors differ in shape.</summary>
        public IReadOnlyList<ShapeMismatch> ShapeMismatches { get; }

        /// <summary>Every key present in both whose tensors differ in dtype and were not converted.</summary>
        public IReadOnlyList<DtypeMismatch> DtypeMismatches { get; }
    }

    /// <summary>A key whose tensor in the state_dict has another shape than the module's.</summary>
    /// <param name="Key">The key, as the module names it.</param>
    /// <param name="LoadedShape">The shape in the state_dict.</param>
    /// <param name="ModuleShape">The shape in the module.</param>
    public sealed record ShapeMismatch(string Key, IReadOnlyList<long> LoadedShape, IReadOnlyList<long> ModuleShape);

    /// <summary>A key whose tensor in the state_dict has another dtype than the module's, and was not converted.</summary>
    /// <param name="Key">The key, as the module names it.</param>
    /// <param name="LoadedDtype">The dtype in the state_dict.</param>
    /// <param name="ModuleDtype">The dtype in the module.</param>
    /// <param name="Reason">Why <see cref="StateDictLoadOptions.CastDtypes"/> did not convert it; null when it was off.</param>
    public sealed record DtypeMismatch(string Key, ScalarType LoadedDtype, ScalarType ModuleDtype, string? Reason = null);
}
