using System;
using System.IO;

namespace TorchLinear
{
    /// <summary>
    /// A checkpoint file that cannot be read as what it claims to be: damaged, truncated, of another format, or
    /// hostile. The message names the file and, where known, the key and the byte offset at fault and the rule the file
    /// breaks; the exception an underlying reader threw, if any, is the <see cref="Exception.InnerException"/>.
    /// Nothing was loaded when it is thrown.
    /// </summary>
    public sealed class CheckpointFormatException : IOException
    {
        /// <summary>Creates the exception for the file at <paramref name="path"/>.</summary>
        /// <param name="path">The file that could not be read.</param>
        /// <param name="rule">What is wrong, as a rule the file breaks.</param>
        /// <param name="key">The tensor or archive entry at fault, if known.</param>
        /// <param name="offset">The byte offset at fault in the file (or in the entry named by <paramref name="key"/>), if known.</param>
        /// <param name="inner">The underlying exception, if any.</param>
        public CheckpointFormatException(string path, string rule, string? key = null, long? offset = null, Exception? inner = null)
            : base(Compose(path, rule, key, offset), inner)
        {
            Path = path;
            Rule = rule;
            Key = key;
            Offset = offset;
        }

        /// <summary>The file that could not be read.</summary>
        public string Path { get; }

        /// <summary>What is wrong, as a rule the file breaks.</summary>
        public string Rule { get; }

        /// <summary>The tensor or archive entry at fault, if known.</summary>
        public string? Key { get; }

        /// <summary>The byte offset at fault, if known.</summary>
        public long? Offset { get; }

        private static string Compose(string path, string rule, string? key, long? offset) =>
            $"Cannot read checkpoint '{path}'{(key is null ? "" : $", '{key}'")}{(offset is null ? "" : $" at byte {offset}")}: {rule}";
    }
}
