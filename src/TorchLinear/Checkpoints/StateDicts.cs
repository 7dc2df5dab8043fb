using System;
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
        /// <paramref name="strict"/>), and tensors whose shape or dtype differs from the module's, one line each, in the
        /// module's order. Empty when the state_dict can be loaded as is (without <see cref="StateDictLoadOptions"/>).
        /// </summary>
        public static IReadOnlyList<string> Problems(nn.Module module, IReadOnlyDictionary<string, Tensor> source, bool strict = true, IList<string>? skip = null)
        {
            ArgumentNullException.ThrowIfNull(module);
            ArgumentNullException.ThrowIfNull(source);
            using var scope = NewDisposeScope();
            return StateDictFit.Of(module, source, strict, skip, options: null).Lines;
        }

        /// <summary>
        /// Loads <paramref name="source"/> into <paramref name="module"/> after checking every key, shape and dtype
        /// (see <see cref="Problems"/>), with <paramref name="options"/> applied first if given.
        /// </summary>
        /// <param name="module">The module to load into.</param>
        /// <param name="source">The state_dict; its tensors stay the caller's.</param>
        /// <param name="strict">Whether every key must match, as in <c>load_state_dict</c>.</param>
        /// <param name="options">Prefixes to strip or add, dtype conversion, missing <c>num_batches_tracked</c>; null: none.</param>
        /// <returns>The keys that were missing (only possible when not strict).</returns>
        /// <exception cref="StateDictMismatchException">Something does not fit; the message says what (and which option
        /// would load it, where one would); the properties list every key. Nothing was changed. An
        /// <see cref="InvalidOperationException"/>, the type TorchSharp's own <c>load_state_dict</c> throws for a missing or
        /// unexpected key.</exception>
        /// <exception cref="InvalidOperationException">Two keys become one under the options' prefixes; nothing was changed.</exception>
        public static IList<string> LoadChecked(nn.Module module, Dictionary<string, Tensor> source, bool strict = true, StateDictLoadOptions? options = null)
        {
            ArgumentNullException.ThrowIfNull(module);
            ArgumentNullException.ThrowIfNull(source);
            using var scope = NewDisposeScope();
            return Load(module, source, strict, options, from: null);
        }

        /// <summary>
        /// Reads a checkpoint written by PyTorch — a <c>torch.save(state_dict)</c> file (zip format) or a safetensors
        /// file, told apart by their content — with <see cref="ReadPyTorchFile"/>, checks it against
        /// the module, with <paramref name="options"/> applied first if given, and only then loads it. The tensors read
        /// from the file are disposed afterwards.
        /// </summary>
        /// <param name="module">The module to load into.</param>
        /// <param name="path">The checkpoint file.</param>
        /// <param name="strict">Whether every key must match, as in <c>load_state_dict</c>.</param>
        /// <param name="options">Prefixes to strip or add, dtype conversion, missing <c>num_batches_tracked</c>; null: none.</param>
        /// <returns>The keys that were missing (only possible when not strict).</returns>
        /// <exception cref="StateDictMismatchException">The file's tensors do not fit the module; the message names the
        /// file and says what does not fit (and which option would load it, where one would); the properties list every
        /// key. Nothing was changed.</exception>
        /// <exception cref="InvalidOperationException">Two keys become one under the options' prefixes; nothing was changed.</exception>
        /// <exception cref="CheckpointFormatException">The file cannot be read as a PyTorch checkpoint; the message names
        /// the file, and says so when it is a file written by TorchSharp's own <c>Module.save</c>.</exception>
        /// <exception cref="FileNotFoundException">There is no such file.</exception>
        public static IList<string> LoadPyTorchFile(nn.Module module, string path, bool strict = true, StateDictLoadOptions? options = null)
        {
            ArgumentNullException.ThrowIfNull(module);
            ArgumentNullException.ThrowIfNull(path);
            using var scope = NewDisposeScope();
            Dictionary<string, Tensor> source = ReadPyTorchFile(path);
            return Load(module, source, strict, options, from: path);
        }

        /// <summary>Checks, then loads what the options make of <paramref name="source"/>; inside the caller's dispose scope
        /// (converted and filled tensors are temporaries).</summary>
        private static IList<string> Load(nn.Module module, Dictionary<string, Tensor> source, bool strict, StateDictLoadOptions? options, string? from)
        {
            var fit = StateDictFit.Of(module, Renamed(module, source, options, from), strict, skip: null, options);
            if (fit.Refused)
                throw fit.Refusal(module, from);
            // Checked: nothing is missing or unexpected when strict, shapes and dtypes agree, so TorchSharp's copy_ can
            // neither broadcast nor convert.
            return module.load_state_dict(fit.ToLoad, strict).missing_keys;
        }

        /// <summary>The state_dict with the options' prefixes stripped and added.</summary>
        private static IReadOnlyDictionary<string, Tensor> Renamed(nn.Module module, Dictionary<string, Tensor> source, StateDictLoadOptions? options, string? from)
        {
            string strip = options?.StripPrefix ?? "", add = options?.AddPrefix ?? "";
            if (strip.Length == 0 && add.Length == 0)
                return source;
            var renamed = new Dictionary<string, Tensor>(source.Count);
            var original = new Dictionary<string, string>(source.Count);
            foreach (var (key, tensor) in source)
            {
                string name = add + (strip.Length > 0 && key.StartsWith(strip, StringComparison.Ordinal) ? key[strip.Length..] : key);
                if (!original.TryAdd(name, key))
                    throw new InvalidOperationException(
                        $"{module}: refused to load {What(from)}, nothing was changed: its keys '{StateDictFit.Display(original[name])}' and " +
                        $"'{StateDictFit.Display(key)}' both become '{StateDictFit.Display(name)}' with {Describe(options!)}.");
                renamed[name] = tensor;
            }
            return renamed;
        }

        private static string Describe(StateDictLoadOptions options) =>
            string.Join(" and ", new[] { ("StripPrefix", options.StripPrefix), ("AddPrefix", options.AddPrefix) }
                .Where(o => !string.IsNullOrEmpty(o.Item2)).Select(o => $"{o.Item1} = \"{o.Item2}\""));

        internal static string What(string? from) => from is null ? "the state_dict" : $"'{from}'";

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
        /// Throws a <see cref="StateDictMismatchException"/> saying what <see cref="Problems"/> finds (with no options);
        /// <paramref name="from"/> names the file the tensors came from, if any.
        /// </summary>
        internal static void ThrowIfProblems(nn.Module module, IReadOnlyDictionary<string, Tensor> source, bool strict, IList<string>? skip, string? from)
        {
            using var scope = NewDisposeScope();
            var fit = StateDictFit.Of(module, source, strict, skip, options: null);
            if (fit.Refused)
                throw fit.Refusal(module, from);
        }
    }
}
