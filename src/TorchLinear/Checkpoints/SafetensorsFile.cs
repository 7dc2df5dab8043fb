using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Text;
using System.Text.Json;
using static TorchSharp.torch;

namespace TorchLinear
{
    /// <summary>
    /// A strict reader of the safetensors format, enforcing the rules of its reference implementation
    /// (huggingface/safetensors, <c>SafeTensors::read_metadata</c> and <c>Metadata::validate</c>): an 8-byte
    /// little-endian header length of at most 100,000,000 within the file; a UTF-8 JSON object header (trailing
    /// whitespace allowed); for every tensor a known dtype, a shape of non-negative integers and <c>data_offsets</c> of two
    /// integers whose difference is numel × itemsize; the tensors, in offset order, tile the data area from 0 to its end
    /// with no gap and no overlap. Stricter than the reference in one point: a key may appear only once.
    /// Everything is validated before a tensor is allocated; memory is the tensors plus the header.
    /// </summary>
    internal static class SafetensorsFile
    {
        private const long MaxHeaderSize = 100_000_000;

        private sealed record Entry(string Key, ScalarType DType, long[] Shape, long Begin, long End);

        internal static Dictionary<string, Tensor> Read(string path)
        {
            using FileStream stream = CheckpointFile.OpenRegular(path);
            long length = stream.Length;
            if (length < 8)
                throw new CheckpointFormatException(path, $"a safetensors file starts with an 8-byte header length, but the file has {length} bytes.");
            Span<byte> prefix = stackalloc byte[8];
            stream.ReadExactly(prefix);
            ulong declared = BitConverter.ToUInt64(prefix);
            if (declared > MaxHeaderSize)
                throw new CheckpointFormatException(path, $"the header length {declared} exceeds the format's limit of {MaxHeaderSize} bytes.", offset: 0);
            if ((long)declared > length - 8)
                throw new CheckpointFormatException(path, $"the header length {declared} runs past the end of the {length}-byte file.", offset: 0);
            int headerLength = (int)declared;
            byte[] header = new byte[headerLength];
            stream.ReadExactly(header);

            List<Entry> entries = ParseHeader(path, header);
            long dataLength = length - 8 - headerLength;
            Validate(path, entries, dataLength);

            var tensors = new Dictionary<string, Tensor>(StringComparer.Ordinal);
            try
            {
                // Validated: the entries tile the data area in offset order, so one forward pass reads them all.
                foreach (Entry entry in entries)
                {
                    long count = entry.Shape.Aggregate(1L, (p, s) => p * s);
                    using Tensor flat = CheckpointFile.ReadTensor(stream, entry.DType, count, path, entry.Key);
                    tensors.Add(entry.Key, flat.reshape(entry.Shape));
                }
                return tensors;
            }
            catch
            {
                foreach (Tensor tensor in tensors.Values)
                    tensor.Dispose();
                throw;
            }
        }

        private static List<Entry> ParseHeader(string path, byte[] header)
        {
            string text;
            try
            {
                text = new UTF8Encoding(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true).GetString(header);
            }
            catch (DecoderFallbackException error)
            {
                throw new CheckpointFormatException(path, "the header is not valid UTF-8.", offset: 8 + error.Index, inner: error);
            }
            if (!text.StartsWith('{'))
                throw new CheckpointFormatException(path, "the header must be a JSON object starting with '{'.", offset: 8);

            var entries = new List<Entry>();
            var seen = new HashSet<string>(StringComparer.Ordinal);
            try
            {
                var reader = new Utf8JsonReader(header, new JsonReaderOptions { CommentHandling = JsonCommentHandling.Disallow, MaxDepth = 8 });
                using var document = JsonDocument.ParseValue(ref reader);
                // Only whitespace may follow the object (writers pad the header to an 8-byte boundary with spaces; the
                // reference implementation's JSON parser accepts any JSON whitespace there).
                for (long i = reader.BytesConsumed; i < header.Length; i++)
                {
                    if (header[i] is not ((byte)' ' or (byte)'\t' or (byte)'\n' or (byte)'\r'))
                        throw new CheckpointFormatException(path, "the header has bytes other than whitespace after its JSON object.", offset: 8 + i);
                }
                foreach (JsonProperty property in document.RootElement.EnumerateObject())
                {
                    if (!seen.Add(property.Name))
                        throw new CheckpointFormatException(path, "the key appears twice in the header.", property.Name);
                    if (property.Name == "__metadata__")
                    {
                        if (property.Value.ValueKind != JsonValueKind.Object || property.Value.EnumerateObject().Any(p => p.Value.ValueKind != JsonValueKind.String))
                            throw new CheckpointFormatException(path, "__metadata__ must map strings to strings.", property.Name);
                        continue;
                    }
                    entries.Add(ParseEntry(path, property));
                }
            }
            catch (JsonException error)
            {
                throw new CheckpointFormatException(path, $"the header is not valid JSON: {error.Message}", offset: 8 + (error.BytePositionInLine ?? 0), inner: error);
            }
            catch (InvalidOperationException error)
            {
                throw new CheckpointFormatException(path, $"the header is not a JSON object of tensors: {error.Message}", inner: error);
            }
            return entries;
        }

        private static Entry ParseEntry(string path, JsonProperty property)
        {
            string key = property.Name;
            JsonElement info = property.Value;
            if (info.ValueKind != JsonValueKind.Object)
                throw new CheckpointFormatException(path, "a tensor's entry must be an object with dtype, shape and data_offsets.", key);
            var names = info.EnumerateObject().Select(p => p.Name).ToList();
            if (names.Count != names.Distinct(StringComparer.Ordinal).Count())
                throw new CheckpointFormatException(path, "the tensor's entry repeats a field.", key);
            if (!info.TryGetProperty("dtype", out JsonElement dtypeElement) || dtypeElement.ValueKind != JsonValueKind.String)
                throw new CheckpointFormatException(path, "the tensor has no dtype string.", key);
            string dtypeName = dtypeElement.GetString()!;
            ScalarType dtype = DType(dtypeName)
                ?? throw new CheckpointFormatException(path, $"dtype '{dtypeName}' is not one TorchSharp holds (BOOL, U8, I8, I16, I32, I64, F16, BF16, F32, F64, C64).", key);
            long[] shape = Integers(path, key, info, "shape", count: null);
            if (shape.Any(s => s < 0))
                throw new CheckpointFormatException(path, $"the shape [{string.Join(", ", shape)}] has a negative size.", key);
            long[] offsets = Integers(path, key, info, "data_offsets", count: 2);
            return new Entry(key, dtype, shape, offsets[0], offsets[1]);
        }

        private static long[] Integers(string path, string key, JsonElement info, string field, int? count)
        {
            if (!info.TryGetProperty(field, out JsonElement array) || array.ValueKind != JsonValueKind.Array)
                throw new CheckpointFormatException(path, $"the tensor has no {field} array.", key);
            var values = new List<long>();
            foreach (JsonElement item in array.EnumerateArray())
            {
                if (item.ValueKind != JsonValueKind.Number || !item.TryGetInt64(out long value))
                    throw new CheckpointFormatException(path, $"{field} must hold integers, but holds {item.GetRawText()}.", key);
                values.Add(value);
            }
            if (count is { } expected && values.Count != expected)
                throw new CheckpointFormatException(path, $"{field} must hold {expected} integers, but holds {values.Count}.", key);
            return values.ToArray();
        }

        private static void Validate(string path, List<Entry> entries, long dataLength)
        {
            entries.Sort((a, b) => a.Begin != b.Begin ? a.Begin.CompareTo(b.Begin) : a.End.CompareTo(b.End));
            long expectedBegin = 0;
            foreach (Entry entry in entries)
            {
                if (entry.Begin != expectedBegin || entry.End < entry.Begin)
                    throw new CheckpointFormatException(path,
                        $"data_offsets [{entry.Begin}, {entry.End}] do not continue where the previous tensor ends ({expectedBegin}): tensors must tile the data without gaps or overlaps.", entry.Key);
                long? size = TensorFacts.ByteCount(entry.Shape, entry.DType);
                if (size is null || entry.End - entry.Begin != size)
                    throw new CheckpointFormatException(path,
                        $"data_offsets [{entry.Begin}, {entry.End}] span {entry.End - entry.Begin} bytes, but a {entry.DType} tensor of shape [{string.Join(", ", entry.Shape)}] needs {(size is null ? "more than a long can count" : size.ToString())}.", entry.Key);
                expectedBegin = entry.End;
            }
            if (expectedBegin != dataLength)
                throw new CheckpointFormatException(path,
                    $"the tensors cover {expectedBegin} bytes of data, but the file has {dataLength} bytes after the header: the header length or the offsets are wrong.");
        }

        private static ScalarType? DType(string name) => name switch
        {
            "BOOL" => ScalarType.Bool,
            "U8" => ScalarType.Byte,
            "I8" => ScalarType.Int8,
            "I16" => ScalarType.Int16,
            "I32" => ScalarType.Int32,
            "I64" => ScalarType.Int64,
            "F16" => ScalarType.Float16,
            "BF16" => ScalarType.BFloat16,
            "F32" => ScalarType.Float32,
            "F64" => ScalarType.Float64,
            "C64" => ScalarType.ComplexFloat32,
            _ => null,
        };
    }
}
