using System;
using System.Collections;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using static TorchSharp.torch;

namespace TorchLinear
{
    /// <summary>
    /// Loading state_dicts without surprises: every key, shape and dtype is checked before anything is copied,
    /// so a refused load leaves the module exactly as it was. TorchSharp's own <c>load_state_dict</c> copies with
    /// <c>copy_</c>, which broadcasts (a <c>(1)</c> tensor fills a <c>(2)</c> bias) and converts dtypes; and
    /// TorchSharp.PyBridge's <c>load_py</c> reads each tensor's bytes straight into the target.
    /// </summary>
    public static class StateDicts
    {
        /// <summary>
        /// Lists what does not fit: keys missing from <paramref name="source"/> or unexpected in it (when
        /// <paramref name="strict"/>), and tensors whose shape or dtype differs from the module's. Empty when the
        /// state_dict can be loaded as is.
        /// </summary>
        public static IReadOnlyList<string> Problems(nn.Module module, IReadOnlyDictionary<string, Tensor> source, bool strict = true, IList<string>? skip = null)
        {
            ArgumentNullException.ThrowIfNull(module);
            ArgumentNullException.ThrowIfNull(source);
            skip ??= Array.Empty<string>();
            var problems = new List<string>();
            var own = module.state_dict();
            foreach (var (name, tensor) in own)
            {
                if (skip.Contains(name))
                    continue;
                if (!source.TryGetValue(name, out Tensor? loaded) || loaded is null)
                {
                    if (strict)
                        problems.Add($"missing key '{name}' (expected {tensor.dtype} of shape {TensorFacts.Shape(tensor)})");
                    continue;
                }
                if (!TensorFacts.SameShape(loaded, tensor))
                    problems.Add($"'{name}' has shape {TensorFacts.Shape(loaded)}, this module's has shape {TensorFacts.Shape(tensor)}");
                if (loaded.dtype != tensor.dtype)
                    problems.Add($"'{name}' is {loaded.dtype}, this module's is {tensor.dtype} (convert the tensor, or the module with .to({loaded.dtype}), first)");
            }
            if (strict)
            {
                foreach (string key in source.Keys)
                {
                    if (!skip.Contains(key) && !own.ContainsKey(key))
                        problems.Add($"unexpected key '{key}'");
                }
            }
            return problems;
        }

        /// <summary>
        /// Loads <paramref name="source"/> into <paramref name="module"/> after checking it with <see cref="Problems"/>.
        /// </summary>
        /// <returns>The keys that were missing (only possible when not strict).</returns>
        /// <exception cref="InvalidOperationException">Something does not fit; the message lists every problem. Nothing
        /// was changed. (The type TorchSharp's own <c>load_state_dict</c> throws for a missing or unexpected key.)</exception>
        public static IList<string> LoadChecked(nn.Module module, Dictionary<string, Tensor> source, bool strict = true)
        {
            ArgumentNullException.ThrowIfNull(module);
            ArgumentNullException.ThrowIfNull(source);
            ThrowIfProblems(module, source, strict, null, from: null);
            return module.load_state_dict(source, strict).missing_keys;
        }

        /// <summary>
        /// Reads a checkpoint written by PyTorch — a <c>torch.save(state_dict)</c> file (zip format) or a safetensors
        /// file, told apart by their content — with <see cref="ReadPyTorchFile"/>, checks it against
        /// the module, and only then loads it. The tensors read from the file are disposed afterwards.
        /// </summary>
        /// <returns>The keys that were missing (only possible when not strict).</returns>
        /// <exception cref="InvalidOperationException">The file's tensors do not fit the module; nothing was changed.</exception>
        /// <exception cref="CheckpointFormatException">The file cannot be read as a PyTorch checkpoint; the message names
        /// the file, and says so when it is a file written by TorchSharp's own <c>Module.save</c>.</exception>
        /// <exception cref="FileNotFoundException">There is no such file.</exception>
        public static IList<string> LoadPyTorchFile(nn.Module module, string path, bool strict = true)
        {
            ArgumentNullException.ThrowIfNull(module);
            ArgumentNullException.ThrowIfNull(path);
            using var scope = NewDisposeScope();
            Dictionary<string, Tensor> source = ReadPyTorchFile(path);
            ThrowIfProblems(module, source, strict, null, from: path);
            return module.load_state_dict(source, strict).missing_keys;
        }

        /// <summary>
        /// Reads every tensor of a <c>torch.save(state_dict)</c> or safetensors file into a dictionary; the caller owns
        /// (and disposes) the tensors. Which of the two a file is, its first bytes decide, not its name; a file that is
        /// neither (or a file TorchSharp's <c>Module.save</c> wrote, or torch.save's legacy format) is refused saying what it is.
        /// </summary>
        /// <remarks>
        /// Files from strangers are expected: the readers validate before they trust. Safetensors files must follow the
        /// format's rules as its reference implementation enforces them; <c>torch.save</c> archives are read by exact entry
        /// names with every CRC checked, and their pickle is unpickled as <c>torch.load(weights_only=True)</c> does, never
        /// calling what it names. Tensors that share a storage, views and non-contiguous tensors load as PyTorch loads
        /// them. Time is linear in the file's size and memory is the tensors plus a bounded amount. The file is closed on
        /// every path. See docs/checkpoints.md.
        /// </remarks>
        /// <exception cref="CheckpointFormatException">The file is not a valid checkpoint; the message names the file, and
        /// where known the key, the byte offset and the rule broken.</exception>
        /// <exception cref="FileNotFoundException">There is no such file.</exception>
        /// <exception cref="UnauthorizedAccessException">The file may not be read.</exception>
        public static Dictionary<string, Tensor> ReadPyTorchFile(string path)
        {
            ArgumentNullException.ThrowIfNull(path);
            if (!File.Exists(path))
                throw new FileNotFoundException($"No checkpoint at {path}.", path);
            try
            {
                // The content decides, not the name: a safetensors file called .bin, a torch.save archive called
                // .safetensors. A file that fits neither goes to the reader its name suggests, for the precise refusal.
                return CheckpointFile.Sniff(path) switch
                {
                    CheckpointFile.Kind.Safetensors => SafetensorsFile.Read(path),
                    CheckpointFile.Kind.Zip => TorchSaveFile.Read(path),
                    _ when path.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase) && new FileInfo(path).Length >= 8 => SafetensorsFile.Read(path),
                    _ => TorchSaveFile.Read(path),
                };
            }
            catch (Exception error) when (error is not (CheckpointFormatException or FileNotFoundException or UnauthorizedAccessException or OutOfMemoryException))
            {
                throw new CheckpointFormatException(path, $"it could not be read ({error.GetType().Name}: {error.Message}).", inner: error);
            }
        }

        /// <summary>
        /// Throws an <see cref="InvalidOperationException"/> listing every problem <see cref="Problems"/> finds;
        /// <paramref name="from"/> names the file the tensors came from, if any.
        /// </summary>
        internal static void ThrowIfProblems(nn.Module module, IReadOnlyDictionary<string, Tensor> source, bool strict, IList<string>? skip, string? from)
        {
            var problems = Problems(module, source, strict, skip);
            if (problems.Count > 0)
            {
                string what = from is null ? "the state_dict" : $"'{from}'";
                throw new InvalidOperationException($"{module}: refused to load {what}, nothing was changed: {string.Join("; ", problems)}.");
            }
        }
    }
}
