using System;
using System.Buffers.Binary;
using System.Collections.Generic;
using System.IO;
using System.IO.Compression;
using System.IO.Hashing;
using System.Text;

namespace TorchLinear
{
    /// <summary>
    /// The zip container of a <c>torch.save</c> file, read by its own rules rather than trusted: the end record (and its
    /// ZIP64 form) and every central-directory entry must lie inside the file; names are unique and every one sits under
    /// a single archive folder; each entry's local header must repeat its central entry's name, method and (unless a data
    /// descriptor follows) CRC-32 and sizes; entries' data must not overlap; and an entry's bytes are CRC-checked when read.
    /// Stored and deflated entries are read; nothing is inflated past its declared size.
    /// </summary>
    internal sealed class TorchZipArchive
    {
        private const uint EndSignature = 0x06054b50, Zip64EndSignature = 0x06064b50, Zip64LocatorSignature = 0x07064b50;
        private const uint CentralSignature = 0x02014b50, LocalSignature = 0x04034b50;
        private const int MaxEntries = 1_000_000;

        internal sealed record Entry(string Name, ushort Method, ushort Flags, uint Crc32, long CompressedSize, long Size, long DataOffset);

        private readonly Stream _stream;
        private readonly string _path;
        private readonly Dictionary<string, Entry> _entries;

        private TorchZipArchive(Stream stream, string path, Dictionary<string, Entry> entries, string prefix)
        {
            _stream = stream;
            _path = path;
            _entries = entries;
            Prefix = prefix;
        }

        /// <summary>The one folder every entry sits under, with its trailing slash (<c>archive/</c> for torch.save's default).</summary>
        internal string Prefix { get; }

        /// <summary>The entry <c>Prefix + name</c>, matched exactly, or null.</summary>
        internal Entry? Find(string name) => _entries.TryGetValue(Prefix + name, out Entry? entry) ? entry : null;

        internal static TorchZipArchive Open(Stream stream, string path)
        {
            long length = stream.Length;
            var (count, directoryOffset, directorySize) = FindDirectory(stream, path, length);
            if (count > MaxEntries)
                throw new CheckpointFormatException(path, $"the zip directory claims {count} entries, more than {MaxEntries}.");
            if (directoryOffset < 0 || directorySize < 0 || directoryOffset > length || directorySize > length - directoryOffset)
                throw new CheckpointFormatException(path, $"the zip directory ({directorySize} bytes at {directoryOffset}) lies outside the {length}-byte file.");
            if (count * 46 > directorySize)
                throw new CheckpointFormatException(path, $"the zip directory claims {count} entries but has room for fewer ({directorySize} bytes).");

            byte[] directory = new byte[directorySize];
            stream.Position = directoryOffset;
            stream.ReadExactly(directory);

            var entries = new Dictionary<string, Entry>(StringComparer.Ordinal);
            var spans = new List<(long Start, long End, string Name)>();
            string? prefix = null;
            int at = 0;
            for (long i = 0; i < count; i++)
            {
                if (at + 46 > directory.Length || BinaryPrimitives.ReadUInt32LittleEndian(directory.AsSpan(at)) != CentralSignature)
                    throw new CheckpointFormatException(path, "a zip directory entry is missing or damaged.", offset: directoryOffset + at);
                var span = directory.AsSpan(at);
                ushort flags = BinaryPrimitives.ReadUInt16LittleEndian(span[8..]);
                ushort method = BinaryPrimitives.ReadUInt16LittleEndian(span[10..]);
                uint crc = BinaryPrimitives.ReadUInt32LittleEndian(span[16..]);
                long compressed = BinaryPrimitives.ReadUInt32LittleEndian(span[20..]);
                long size = BinaryPrimitives.ReadUInt32LittleEndian(span[24..]);
                int nameLength = BinaryPrimitives.ReadUInt16LittleEndian(span[28..]);
                int extraLength = BinaryPrimitives.ReadUInt16LittleEndian(span[30..]);
                int commentLength = BinaryPrimitives.ReadUInt16LittleEndian(span[32..]);
                long localOffset = BinaryPrimitives.ReadUInt32LittleEndian(span[42..]);
                if (at + 46L + nameLength + extraLength + commentLength > directory.Length)
                    throw new CheckpointFormatException(path, "a zip directory entry runs past the directory's end.", offset: directoryOffset + at);
                string name = Name(path, span.Slice(46, nameLength), directoryOffset + at);
                ReadZip64Extra(span.Slice(46 + nameLength, extraLength), ref size, ref compressed, ref localOffset);
                at += 46 + nameLength + extraLength + commentLength;

                if ((flags & 1) != 0)
                    throw new CheckpointFormatException(path, "the entry is encrypted.", name);
                if (method is not (0 or 8))
                    throw new CheckpointFormatException(path, $"the entry uses compression method {method}; only stored (0) and deflate (8) are read.", name);
                if (method == 0 && compressed != size)
                    throw new CheckpointFormatException(path, $"a stored entry's sizes differ ({compressed} compressed, {size} uncompressed).", name);
                int slash = name.IndexOf('/');
                string entryPrefix = slash < 0 ? "" : name[..(slash + 1)];
                if (slash <= 0 || name.EndsWith('/') || name.Contains("//", StringComparison.Ordinal) || name.Contains('\\'))
                    throw new CheckpointFormatException(path, "entry names must be files under one archive folder.", name);
                prefix ??= entryPrefix;
                if (entryPrefix != prefix)
                    throw new CheckpointFormatException(path, $"the entry is not under the archive's folder '{prefix}': a torch.save archive has one.", name);

                long dataOffset = LocalData(stream, path, length, name, localOffset, method, flags, crc, compressed, size);
                if (!entries.TryAdd(name, new Entry(name, method, flags, crc, compressed, size, dataOffset)))
                    throw new CheckpointFormatException(path, "the archive holds two entries of this name.", name);
                spans.Add((localOffset, dataOffset + compressed, name));
            }
            if (prefix is null)
                throw new CheckpointFormatException(path, "the zip archive is empty.");

            spans.Sort((a, b) => a.Start.CompareTo(b.Start));
            for (int i = 1; i < spans.Count; i++)
            {
                if (spans[i].Start < spans[i - 1].End)
                    throw new CheckpointFormatException(path, $"the entry overlaps '{spans[i - 1].Name}'.", spans[i].Name, spans[i].Start);
            }
            if (spans[^1].End > directoryOffset)
                throw new CheckpointFormatException(path, "the entry's data runs into the zip directory.", spans[^1].Name);
            return new TorchZipArchive(stream, path, entries, prefix);
        }

        /// <summary>
        /// Reads an entry whole into memory, refusing one whose declared size exceeds <paramref name="limit"/>, and
        /// checks its size and CRC-32 as it reads.
        /// </summary>
        internal byte[] ReadAll(Entry entry, long limit)
        {
            if (entry.Size > limit)
                throw new CheckpointFormatException(_path, $"the entry declares {entry.Size} bytes, more than the {limit} allowed for it.", entry.Name);
            byte[] bytes = new byte[entry.Size];
            using Stream data = OpenData(entry);
            try
            {
                // The stream counts and CRC-checks what it gives: a short entry, a longer one and damaged bytes all show there.
                data.ReadAtLeast(bytes, bytes.Length, throwOnEndOfStream: false);
                CheckCrc(entry, data);
            }
            catch (InvalidDataException error)
            {
                throw new CheckpointFormatException(_path, "the entry's deflate stream is damaged.", entry.Name, inner: error);
            }
            return bytes;
        }

        /// <summary>Opens an entry's uncompressed bytes as a stream; the caller reads exactly <see cref="Entry.Size"/> of them and then calls <see cref="CheckCrc(Entry, Stream)"/>.</summary>
        internal Stream OpenData(Entry entry)
        {
            _stream.Position = entry.DataOffset;
            var raw = new BoundedStream(_stream, entry.CompressedSize);
            Stream data = entry.Method == 8 ? new DeflateStream(raw, CompressionMode.Decompress, leaveOpen: false) : raw;
            return new CrcStream(data);
        }

        internal void CheckCrc(Entry entry, Stream data)
        {
            var crc = (CrcStream)data;
            if (crc.Count != entry.Size)
                throw new CheckpointFormatException(_path, $"the entry holds {crc.Count} bytes where its header declares {entry.Size}.", entry.Name);
            // Nothing may follow the declared bytes in a deflated entry.
            if (entry.Method == 8 && crc.ReadByte() != -1)
                throw new CheckpointFormatException(_path, $"the entry inflates to more than the {entry.Size} bytes its header declares.", entry.Name);
            if (crc.Value != entry.Crc32)
                throw new CheckpointFormatException(_path, $"the entry's CRC-32 is {crc.Value:x8}, its header says {entry.Crc32:x8}: the data is damaged.", entry.Name);
        }

        private static (long Count, long Offset, long Size) FindDirectory(Stream stream, string path, long length)
        {
            if (length < 22)
                throw new CheckpointFormatException(path, $"a torch.save file is a zip archive, but {length} bytes cannot hold one.");
            int tailLength = (int)Math.Min(length, 22 + 65535);
            byte[] tail = new byte[tailLength];
            stream.Position = length - tailLength;
            stream.ReadExactly(tail);
            for (int at = tailLength - 22; at >= 0; at--)
            {
                if (BinaryPrimitives.ReadUInt32LittleEndian(tail.AsSpan(at)) != EndSignature)
                    continue;
                int commentLength = BinaryPrimitives.ReadUInt16LittleEndian(tail.AsSpan(at + 20));
                if (at + 22 + commentLength != tailLength)
                    continue;  // a signature inside the comment or the data, not the record
                long endOffset = length - tailLength + at;
                var record = tail.AsSpan(at);
                if (BinaryPrimitives.ReadUInt16LittleEndian(record[4..]) != 0 || BinaryPrimitives.ReadUInt16LittleEndian(record[6..]) != 0)
                    throw new CheckpointFormatException(path, "multi-disk zip archives are not read.", offset: endOffset);
                long count = BinaryPrimitives.ReadUInt16LittleEndian(record[10..]);
                long size = BinaryPrimitives.ReadUInt32LittleEndian(record[12..]);
                long offset = BinaryPrimitives.ReadUInt32LittleEndian(record[16..]);
                if (count == 0xFFFF || size == 0xFFFFFFFF || offset == 0xFFFFFFFF)
                    return Zip64Directory(stream, path, endOffset);
                return (count, offset, size);
            }
            throw new CheckpointFormatException(path, "no zip end-of-directory record: the file is not a torch.save archive (zip), or it is truncated.");
        }

        private static (long Count, long Offset, long Size) Zip64Directory(Stream stream, string path, long endOffset)
        {
            if (endOffset < 20)
                throw new CheckpointFormatException(path, "the ZIP64 locator is missing.", offset: endOffset);
            Span<byte> locator = stackalloc byte[20];
            stream.Position = endOffset - 20;
            stream.ReadExactly(locator);
            if (BinaryPrimitives.ReadUInt32LittleEndian(locator) != Zip64LocatorSignature)
                throw new CheckpointFormatException(path, "the ZIP64 locator is missing or damaged.", offset: endOffset - 20);
            long recordOffset = (long)BinaryPrimitives.ReadUInt64LittleEndian(locator[8..]);
            if (recordOffset < 0 || recordOffset > endOffset - 20 - 56)
                throw new CheckpointFormatException(path, "the ZIP64 end record lies outside the file.", offset: endOffset - 20);
            Span<byte> record = stackalloc byte[56];
            stream.Position = recordOffset;
            stream.ReadExactly(record);
            if (BinaryPrimitives.ReadUInt32LittleEndian(record) != Zip64EndSignature)
                throw new CheckpointFormatException(path, "the ZIP64 end record is missing or damaged.", offset: recordOffset);
            long count = (long)BinaryPrimitives.ReadUInt64LittleEndian(record[32..]);
            long size = (long)BinaryPrimitives.ReadUInt64LittleEndian(record[40..]);
            long offset = (long)BinaryPrimitives.ReadUInt64LittleEndian(record[48..]);
            if (count < 0 || size < 0 || offset < 0 || offset > recordOffset || size > recordOffset - offset)
                throw new CheckpointFormatException(path, "the ZIP64 end record points outside the file.", offset: recordOffset);
            return (count, offset, size);
        }

        private static void ReadZip64Extra(ReadOnlySpan<byte> extra, ref long size, ref long compressed, ref long localOffset)
        {
            while (extra.Length >= 4)
            {
                ushort id = BinaryPrimitives.ReadUInt16LittleEndian(extra);
                int length = BinaryPrimitives.ReadUInt16LittleEndian(extra[2..]);
                if (length > extra.Length - 4)
                    return;
                if (id == 1)
                {
                    var field = extra.Slice(4, length);
                    // The ZIP64 field holds, in this order, only the values whose 32-bit fields are all ones.
                    if (size == 0xFFFFFFFF && field.Length >= 8) { size = (long)BinaryPrimitives.ReadUInt64LittleEndian(field); field = field[8..]; }
                    if (compressed == 0xFFFFFFFF && field.Length >= 8) { compressed = (long)BinaryPrimitives.ReadUInt64LittleEndian(field); field = field[8..]; }
                    if (localOffset == 0xFFFFFFFF && field.Length >= 8) { localOffset = (long)BinaryPrimitives.ReadUInt64LittleEndian(field); }
                    return;
                }
                extra = extra[(4 + length)..];
            }
        }

        /// <summary>Checks an entry's local header against its central entry and returns where its data starts.</summary>
        private static long LocalData(Stream stream, string path, long length, string name, long localOffset, ushort method, ushort flags, uint crc, long compressed, long size)
        {
            if (localOffset < 0 || localOffset > length - 30)
                throw new CheckpointFormatException(path, $"the entry's local header offset {localOffset} lies outside the file.", name);
            Span<byte> header = stackalloc byte[30];
            stream.Position = localOffset;
            stream.ReadExactly(header);
            if (BinaryPrimitives.ReadUInt32LittleEndian(header) != LocalSignature)
                throw new CheckpointFormatException(path, "the entry's local header is missing or damaged.", name, localOffset);
            ushort localMethod = BinaryPrimitives.ReadUInt16LittleEndian(header[8..]);
            ushort localFlags = BinaryPrimitives.ReadUInt16LittleEndian(header[6..]);
            int nameLength = BinaryPrimitives.ReadUInt16LittleEndian(header[26..]);
            int extraLength = BinaryPrimitives.ReadUInt16LittleEndian(header[28..]);
            if (localOffset + 30L + nameLength + extraLength > length)
                throw new CheckpointFormatException(path, "the entry's local header runs past the end of the file.", name, localOffset);
            byte[] localName = new byte[nameLength];
            stream.ReadExactly(localName);
            if (!localName.AsSpan().SequenceEqual(Encoding.UTF8.GetBytes(name)))
                throw new CheckpointFormatException(path, $"the local header names '{Encoding.UTF8.GetString(localName)}', the directory '{name}': the archive is damaged or doctored.", name, localOffset);
            if (localMethod != method || (localFlags & 8) != (flags & 8))
                throw new CheckpointFormatException(path, "the local header's compression method or flags differ from the directory's.", name, localOffset);
            if ((flags & 8) == 0)
            {
                // Without a data descriptor, the local header carries CRC and sizes itself (ZIP64 ones in its extra field).
                uint localCrc = BinaryPrimitives.ReadUInt32LittleEndian(header[14..]);
                long localCompressed = BinaryPrimitives.ReadUInt32LittleEndian(header[18..]);
                long localSize = BinaryPrimitives.ReadUInt32LittleEndian(header[22..]);
                byte[] extra = new byte[extraLength];
                stream.ReadExactly(extra);
                long unusedOffset = 0;
                ReadZip64Extra(extra, ref localSize, ref localCompressed, ref unusedOffset);
                if (localCrc != crc || localCompressed != compressed || localSize != size)
                    throw new CheckpointFormatException(path, "the local header's CRC-32 or sizes differ from the directory's.", name, localOffset);
            }
            long dataOffset = localOffset + 30 + nameLength + extraLength;
            if (compressed > length - dataOffset)
                throw new CheckpointFormatException(path, $"the entry's {compressed} bytes run past the end of the file.", name, dataOffset);
            return dataOffset;
        }

        private static string Name(string path, ReadOnlySpan<byte> bytes, long offset)
        {
            try
            {
                return new UTF8Encoding(false, throwOnInvalidBytes: true).GetString(bytes);
            }
            catch (DecoderFallbackException error)
            {
                throw new CheckpointFormatException(path, "an entry name is not valid UTF-8.", offset: offset, inner: error);
            }
        }

        /// <summary>A stream that is only read forward, once: everything but reading is refused.</summary>
        private abstract class ForwardReadStream : Stream
        {
            public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));
            public abstract override int Read(Span<byte> buffer);
            public override bool CanRead => true;
            public override bool CanSeek => false;
            public override bool CanWrite => false;
            public override long Length => throw new NotSupportedException();
            public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }
            public override void Flush() { }
            public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
            public override void SetLength(long value) => throw new NotSupportedException();
            public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();
        }

        /// <summary>At most <c>length</c> bytes of the underlying stream from its current position.</summary>
        private sealed class BoundedStream : ForwardReadStream
        {
            private readonly Stream _inner;
            private long _left;

            internal BoundedStream(Stream inner, long length)
            {
                _inner = inner;
                _left = length;
            }

            public override int Read(Span<byte> buffer)
            {
                if (_left <= 0)
                    return 0;
                int got = _inner.Read(buffer[..(int)Math.Min(buffer.Length, _left)]);
                _left -= got;
                return got;
            }
        }

        /// <summary>Counts and CRC-32s the bytes read through it.</summary>
        private sealed class CrcStream : ForwardReadStream
        {
            private readonly Stream _inner;
            private readonly System.IO.Hashing.Crc32 _crc = new();

            internal CrcStream(Stream inner) => _inner = inner;

            internal long Count { get; private set; }

            internal uint Value => _crc.GetCurrentHashAsUInt32();

            public override int Read(Span<byte> buffer)
            {
                int got = _inner.Read(buffer);
                _crc.Append(buffer[..got]);
                Count += got;
                return got;
            }

            protected override void Dispose(bool disposing)
            {
                if (disposing)
                    _inner.Dispose();
                base.Dispose(disposing);
            }
        }
    }
}
