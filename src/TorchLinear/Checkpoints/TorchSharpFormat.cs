using System;
using System.IO;
using System.Text;

namespace TorchLinear
{
    /// <summary>
    /// Recognises a state_dict written by TorchSharp's <c>Module.save</c>, so that a user who hands one to a PyTorch
    /// reader is told what it is. The format, from TorchSharp's <c>Module.save_state_dict</c> and <c>Tensor.Save</c>:
    /// an entry count (LEB128), then per entry a name (.NET <c>BinaryWriter</c> string), a dtype code, a rank and each
    /// dimension (LEB128), and the raw bytes. Only the structure is walked; nothing is allocated for the data.
    /// </summary>
    internal static class TorchSharpFormat
    {
        private const int MaxRank = 64;

        /// <summary>Walks <paramref name="stream"/> from its start; leaves it at its start again.</summary>
        internal static bool IsStateDict(Stream stream)
        {
            try
            {
                stream.Position = 0;
                if (stream.Length == 0)
                    return false;
                using var reader = new BinaryReader(stream, Encoding.UTF8, leaveOpen: true);
                long count = Leb128(reader);
                if (count < 0 || count > stream.Length)
                    return false;
                for (long i = 0; i < count; i++)
                {
                    int nameLength = reader.Read7BitEncodedInt();
                    if (nameLength < 0 || nameLength > stream.Length - stream.Position)
                        return false;
                    stream.Seek(nameLength, SeekOrigin.Current);
                    int size = ElementSize(Leb128(reader));
                    long rank = Leb128(reader);
                    if (size == 0 || rank < 0 || rank > MaxRank)
                        return false;
                    long bytes = size;
                    for (long d = 0; d < rank; d++)
                    {
                        long dimension = Leb128(reader);
                        if (dimension < 0 || (dimension > 0 && bytes > (stream.Length - stream.Position) / dimension))
                            return false;
                        bytes *= dimension;
                    }
                    if (bytes > stream.Length - stream.Position)
                        return false;
                    stream.Seek(bytes, SeekOrigin.Current);
                }
                return stream.Position == stream.Length;
            }
            catch (Exception error) when (error is EndOfStreamException or FormatException or IOException)
            {
                return false;
            }
            finally
            {
                stream.Position = 0;
            }
        }

        private static long Leb128(BinaryReader reader)
        {
            long result = 0;
            for (int shift = 0; shift < 63; shift += 7)
            {
                byte b = reader.ReadByte();
                result |= (long)(b & 0x7f) << shift;
                if ((b & 0x80) == 0)
                    return result;
            }
            return -1;
        }

        /// <summary>Bytes per element of a TorchSharp <c>ScalarType</c> code (libtorch's), 0 for an unknown code.</summary>
        private static int ElementSize(long code) =>
            code is >= sbyte.MinValue and <= sbyte.MaxValue && Enum.IsDefined(typeof(TorchSharp.torch.ScalarType), (sbyte)code)
                ? TensorFacts.ElementSize((TorchSharp.torch.ScalarType)(sbyte)code)
                : 0;
    }
}
