using System;
using System.IO;
using System.Runtime.InteropServices;
using TorchSharp;
using static TorchSharp.torch;

namespace TorchLinear
{
    /// <summary>
    /// What every checkpoint reader shares: opening only regular files, reading exactly the bytes a tensor needs
    /// straight into its memory, and the dtype tables. Internal: TorchLinear.Lora (InternalsVisibleTo) reads
    /// <c>adapter_config.json</c> through <see cref="OpenRegular"/>; it is no API of the package.
    /// </summary>
    internal static class CheckpointFile
    {
        /// <summary>
        /// Opens <paramref name="path"/> for reading if it is a regular file. A FIFO or a device would block or never end,
        /// so it is refused before it is opened (Linux: <c>statx</c>, which follows symbolic links, so a link to
        /// <c>/dev/zero</c> is refused as the device it names); the stream must also be seekable.
        /// </summary>
        /// <param name="path">The file to open.</param>
        /// <returns>A seekable read-only stream; the caller disposes it.</returns>
        /// <exception cref="FileNotFoundException">There is no such file.</exception>
        /// <exception cref="CheckpointFormatException">The path names a FIFO, a device, a socket or a directory.</exception>
        /// <exception cref="UnauthorizedAccessException">The file may not be read.</exception>
        internal static FileStream OpenRegular(string path)
        {
            ArgumentNullException.ThrowIfNull(path);
            if (!File.Exists(path))
                throw new FileNotFoundException($"No checkpoint at {path}.", path);
            if (FileType(path) is { } type && type != RegularFile)
                throw new CheckpointFormatException(path, $"it is not a regular file (a {Describe(type)}); checkpoints are read from regular files only.");
            var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 16, FileOptions.RandomAccess);
            if (!stream.CanSeek)
            {
                stream.Dispose();
                throw new CheckpointFormatException(path, "it is not a regular file (it cannot be seeked); checkpoints are read from regular files only.");
            }
            return stream;
        }

        /// <summary>What a file's first bytes say it is.</summary>
        internal enum Kind
        {
            /// <summary>An 8-byte little-endian header length that fits the file, then a JSON object's <c>{</c>.</summary>
            Safetensors,

            /// <summary>A zip archive (<c>PK\x03\x04</c>, or an empty archive's <c>PK\x05\x06</c>): torch.save's format.</summary>
            Zip,

            /// <summary>Neither.</summary>
            Unknown,
        }

        /// <summary>Tells a safetensors file from a torch.save zip archive by content, whatever the file is named.</summary>
        internal static Kind Sniff(string path)
        {
            using FileStream stream = OpenRegular(path);
            Span<byte> head = stackalloc byte[9];
            int read = stream.ReadAtLeast(head, head.Length, throwOnEndOfStream: false);
            if (read >= 4 && head[0] == (byte)'P' && head[1] == (byte)'K' && (head[2], head[3]) is (3, 4) or (5, 6))
                return Kind.Zip;
            if (read == 9 && head[8] == (byte)'{' && BitConverter.ToUInt64(head[..8]) <= (ulong)Math.Max(0, stream.Length - 8))
                return Kind.Safetensors;
            return Kind.Unknown;
        }

        /// <summary>
        /// The refusal for a file that is neither format, saying what its first bytes look like: the library reads
        /// safetensors files and torch.save zip archives, by content.
        /// </summary>
        internal static CheckpointFormatException Neither(string path, ReadOnlySpan<byte> head, long length)
        {
            string looks = head.Length == 0 ? "it is empty"
                : head[0] is (byte)'{' or (byte)'[' ? "it looks like JSON text"
                : head.Length >= 2 && head[0] == 0x1f && head[1] == 0x8b ? "it looks like a gzip stream (a .tar.gz or .gz? unpack it first)"
                : head.Length >= 6 && head[0] == 0x93 && head[1..6].SequenceEqual("NUMPY"u8) ? "it looks like a NumPy .npy file"
                : head.Length >= 4 && head[0] == 0x89 && head[1..4].SequenceEqual("HDF"u8) ? "it looks like an HDF5 file (Keras?)"
                : head.Length >= 2 && head[0] == 0x80 && head[1] <= 5 ? "it looks like a bare pickle"
                : $"it begins with the bytes {Convert.ToHexString(head[..Math.Min(8, head.Length)])}";
            return new CheckpointFormatException(path,
                $"it is neither a safetensors file (an 8-byte header length, then a JSON header) nor a torch.save zip archive (which begins with 'PK'): {looks} ({length} bytes).");
        }

        /// <summary>
        /// Creates a 1-D tensor of <paramref name="count"/> elements and fills it with exactly the bytes that follow in
        /// <paramref name="source"/>; fails if they run out.
        /// </summary>
        internal static Tensor ReadTensor(Stream source, ScalarType dtype, long count, string path, string key)
        {
            Tensor tensor = empty(count, dtype: dtype);
            try
            {
                long elementSize = TensorFacts.ElementSize(dtype);
                // Span lengths are ints: fill the tensor through views of at most 1 GiB each.
                long perChunk = Math.Max(1, (1L << 30) / elementSize);
                for (long start = 0; start < count; start += perChunk)
                {
                    long n = Math.Min(perChunk, count - start);
                    using Tensor chunk = tensor.narrow(0, start, n);
                    Span<byte> bytes = chunk.bytes;
                    int read = 0;
                    while (read < bytes.Length)
                    {
                        int got = source.Read(bytes[read..]);
                        if (got == 0)
                            throw new CheckpointFormatException(path, $"the data ends {bytes.Length - read} bytes before the tensor's {count * elementSize} bytes are complete.", key);
                        read += got;
                    }
                }
                return tensor;
            }
            catch
            {
                tensor.Dispose();
                throw;
            }
        }

        private const int RegularFile = 0x8000;

        private static string Describe(int type) => type switch
        {
            0x1000 => "FIFO",
            0x2000 => "character device",
            0x4000 => "directory",
            0x6000 => "block device",
            0xC000 => "socket",
            _ => $"file of type 0{Convert.ToString(type, 8)}",
        };

        /// <summary>The file-type bits of the file's mode (S_IFMT), or null where the system cannot say.</summary>
        private static int? FileType(string path)
        {
            if (!OperatingSystem.IsLinux())
                return null;
            try
            {
                // struct statx has the same layout on every Linux architecture; stx_mode is the u16 at byte 28.
                Span<byte> buffer = stackalloc byte[256];
                const int AtFdCwd = -100, AtStatxSyncAsStat = 0, StatxType = 1;
                unsafe
                {
                    fixed (byte* b = buffer)
                    {
                        if (statx(AtFdCwd, path, AtStatxSyncAsStat, StatxType, b) != 0)
                            return null;
                    }
                }
                return BitConverter.ToUInt16(buffer[28..30]) & 0xF000;
            }
            catch (Exception error) when (error is EntryPointNotFoundException or DllNotFoundException)
            {
                return null;
            }
        }

        [DllImport("libc", SetLastError = true)]
        private static extern unsafe int statx(int dirfd, [MarshalAs(UnmanagedType.LPUTF8Str)] string path, int flags, uint mask, byte* buffer);
    }
}
