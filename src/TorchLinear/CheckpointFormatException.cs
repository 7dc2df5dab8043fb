using System;
using System.IO;

namespace TorchLinear
{
    /// <summary>
    /// A checkpoint file that cannot be read as what it claims to be. The message names the file; the exception that
    /// the underlying reader threw, if any, is the <see cref="Exception.InnerException"/>.
    /// </summary>
    public sealed class CheckpointFormatException : IOException
    {
        /// <summary>Creates the exception for the file at <paramref name="path"/>.</summary>
        /// <param name="path">The file that could not be read.</param>
        /// <param name="message">What is wrong with it; names the file.</param>
        /// <param name="inner">The reader's own exception, if any.</param>
        public CheckpointFormatException(string path, string message, Exception? inner = null)
            : base(message, inner)
        {
            Path = path;
        }

        /// <summary>The file that could not be read.</summary>
        public string Path { get; }
    }
}
