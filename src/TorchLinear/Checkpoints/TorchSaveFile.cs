using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Text;
using static TorchSharp.torch;

namespace TorchLinear
{
    /// <summary>
    /// Reads the state_dict of a <c>torch.save</c> file (PyTorch's zip format, 1.6 and later) as
    /// <c>torch.load(weights_only=True)</c> would: the archive is checked (<see cref="TorchZipArchive"/>), the pickle
    /// unpickled without calling anything it names (<see cref="TorchPickle"/>), each storage read once, exactly as large
    /// as the pickle declares it and CRC-checked, and every tensor built as the view of its storage that PyTorch builds
    /// (offset, sizes, strides), so tensors that share a storage, views and non-contiguous tensors load as they were saved.
    /// </summary>
    internal static class TorchSaveFile
    {
        // torch.save stores data.pkl uncompressed; a deflated one may be larger than the file, but not without bound.
        private const long MaxPickleBytes = 64L << 20;
        // Deflate cannot shrink data by more than about 1032:1; a declared size beyond that is a lie.
        private const long MaxDeflateRatio = 1032;

        internal static Dictionary<string, Tensor> Read(string path)
        {
            using FileStream stream = CheckpointFile.OpenRegular(path);
            if (TorchSharpFormat.IsStateDict(stream))
                throw new CheckpointFormatException(path,
                    $"it is a file written by TorchSharp's Module.save, not a PyTorch checkpoint: load it with module.load(\"{path}\").");
            RefuseLegacyFormat(stream, path);
            RefuseNonArchive(stream, path);
            TorchZipArchive archive = TorchZipArchive.Open(stream, path);

            TorchZipArchive.Entry pickle = archive.Find("data.pkl")
                ?? throw new CheckpointFormatException(path, $"the archive has no {archive.Prefix}data.pkl: it is not a torch.save file.");
            if (archive.Find("byteorder") is { } byteorder)
            {
                string order = Encoding.ASCII.GetString(archive.ReadAll(byteorder, 16));
                if (order != "little")
                    throw new CheckpointFormatException(path, $"the archive was written on a '{order}'-endian machine; only little-endian files are read.", byteorder.Name);
            }
            long limit = Math.Min(MaxPickleBytes, Math.Max(stream.Length, DeflateLimit(pickle)));
            object? root = TorchPickle.Load(archive.ReadAll(pickle, limit), path, pickle.Name);

            if (root is not TorchPickle.Dict dict)
                throw new CheckpointFormatException(path, $"the file holds {TorchPickle.TypeName(root)}, not a state_dict (a dict of tensors).", pickle.Name);
            var views = new List<(string Key, TorchPickle.TensorView View)>();
            foreach (var (key, value) in dict.Items)
            {
                if (key is not string name)
                    throw new CheckpointFormatException(path, $"a state_dict key is {TorchPickle.TypeName(key)}, not a string.", pickle.Name);
                if (value is not TorchPickle.TensorView view)
                    throw new CheckpointFormatException(path,
                        $"the entry holds {TorchPickle.TypeName(value)}, not a tensor: the file is not a plain state_dict (a training checkpoint, perhaps). Save model.state_dict() alone in PyTorch.", name);
                views.Add((name, view));
            }

            var storages = new Dictionary<string, Tensor>(StringComparer.Ordinal);
            var result = new Dictionary<string, Tensor>(StringComparer.Ordinal);
            try
            {
                foreach (var (name, view) in views)
                {
                    Tensor storage = Storage(archive, path, view.Storage, storages);
                    CheckView(path, name, view);
                    result.Add(name, storage.as_strided(view.Size, view.Stride, view.Offset));
                }
                return result;
            }
            catch
            {
                foreach (Tensor tensor in result.Values)
                    tensor.Dispose();
                throw;
            }
            finally
            {
                // The views keep their storages alive; the handles used to make them are not needed any more.
                foreach (Tensor storage in storages.Values)
                    storage.Dispose();
            }
        }

        private static Tensor Storage(TorchZipArchive archive, string path, TorchPickle.Storage storage, Dictionary<string, Tensor> storages)
        {
            if (storages.TryGetValue(storage.Key, out Tensor? loaded))
            {
                if (loaded.dtype != storage.DType || loaded.numel() != storage.Numel)
                    throw new CheckpointFormatException(path, $"storage '{storage.Key}' is declared twice, as {loaded.dtype}[{loaded.numel()}] and as {storage.DType}[{storage.Numel}].");
                return loaded;
            }
            TorchZipArchive.Entry entry = archive.Find("data/" + storage.Key)
                ?? throw new CheckpointFormatException(path, $"the pickle refers to storage '{storage.Key}', but the archive has no {archive.Prefix}data/{storage.Key}.");
            long? bytes = TensorFacts.ByteCount(new[] { storage.Numel }, storage.DType);
            if (bytes is null || entry.Size != bytes)
                throw new CheckpointFormatException(path,
                    $"the entry holds {entry.Size} bytes, but the pickle declares a {storage.DType} storage of {storage.Numel} elements ({bytes?.ToString() ?? "too many"} bytes).", entry.Name);
            if (entry.Method != 0 && entry.Size > DeflateLimit(entry))
                throw new CheckpointFormatException(path, $"the entry declares {entry.Size} bytes inflated from {entry.CompressedSize}: more than deflate can produce.", entry.Name);

            using Stream data = archive.OpenData(entry);
            Tensor tensor;
            try
            {
                tensor = CheckpointFile.ReadTensor(data, storage.DType, storage.Numel, path, entry.Name);
            }
            catch (InvalidDataException error)
            {
                throw new CheckpointFormatException(path, "the entry's deflate stream is damaged.", entry.Name, inner: error);
            }
            try
            {
                archive.CheckCrc(entry, data);
            }
            catch
            {
                tensor.Dispose();
                throw;
            }
            storages.Add(storage.Key, tensor);
            return tensor;
        }

        /// <summary>The view must stay inside its storage: offset + Σ (size − 1) · stride &lt; numel, all of them non-negative.</summary>
        private static void CheckView(string path, string name, TorchPickle.TensorView view)
        {
            long numel = view.Storage.Numel;
            if (view.Offset < 0 || view.Size.Any(s => s < 0) || view.Stride.Any(s => s < 0))
                throw new CheckpointFormatException(path, $"the tensor has a negative offset, size or stride (offset {view.Offset}, size [{string.Join(", ", view.Size)}], stride [{string.Join(", ", view.Stride)}]).", name);
            if (view.Size.Any(s => s == 0))
            {
                if (view.Offset > numel)
                    throw new CheckpointFormatException(path, $"the tensor's offset {view.Offset} lies beyond its storage of {numel} elements.", name);
                return;
            }
            long last = view.Offset;
            for (int i = 0; i < view.Size.Length; i++)
            {
                long step = view.Size[i] - 1;
                if (step != 0 && view.Stride[i] > (long.MaxValue - last) / step)
                    throw new CheckpointFormatException(path, "the tensor's sizes and strides overflow.", name);
                last += step * view.Stride[i];
            }
            if (last >= numel)
                throw new CheckpointFormatException(path,
                    $"the tensor (offset {view.Offset}, size [{string.Join(", ", view.Size)}], stride [{string.Join(", ", view.Stride)}]) reaches element {last} of a storage of {numel}.", name);
        }

        private static long DeflateLimit(TorchZipArchive.Entry entry) =>
            entry.Method == 0 ? entry.Size : (entry.CompressedSize > long.MaxValue / MaxDeflateRatio ? long.MaxValue : entry.CompressedSize * MaxDeflateRatio + 64);

        /// <summary>torch.save's format before PyTorch 1.6 was a bare pickle stream starting with a magic number.</summary>
        /// <summary>A zip archive begins with a local header, or (empty) with the end record: anything else is another kind of file.</summary>
        private static void RefuseNonArchive(FileStream stream, string path)
        {
            Span<byte> head = stackalloc byte[8];
            int read = stream.ReadAtLeast(head, head.Length, throwOnEndOfStream: false);
            stream.Position = 0;
            if (!(read >= 4 && head[0] == (byte)'P' && head[1] == (byte)'K'))
                throw CheckpointFile.Neither(path, head[..read], stream.Length);
        }

        private static void RefuseLegacyFormat(FileStream stream, string path)
        {
            Span<byte> start = stackalloc byte[4];
            int read = stream.ReadAtLeast(start, 4, throwOnEndOfStream: false);
            stream.Position = 0;
            if (read == 4 && start[0] == 0x80 && start[1] == 0x02 && start[2] == 0x8a && start[3] == 0x0a)
                throw new CheckpointFormatException(path, "it is in torch.save's legacy format (before PyTorch 1.6), which is not read: load it in PyTorch and save it again.");
        }
    }
}
