using System;
using System.Collections.Generic;
using System.Linq;
using System.Text;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear
{
    /// <summary>
    /// How a state_dict fits a module, found before anything is copied: the keys missing and unexpected, the shapes and
    /// dtypes that differ, and what the <see cref="StateDictLoadOptions"/> made of it (converted tensors, filled
    /// <c>num_batches_tracked</c>). The refusal's message is composed here, in one place.
    /// </summary>
    internal sealed class StateDictFit
    {
        /// <summary>How many keys of each kind a message shows; the exception's properties hold them all.</summary>
        internal const int Sample = 5;

        /// <summary>Longer keys are shortened in messages (a file from a stranger may hold a key of any length).</summary>
        private const int LongestKeyShown = 120;

        private const string Tracked = "num_batches_tracked";

        private readonly List<(string Key, Tensor Expected)> _missing = new();
        private readonly List<string> _unexpected = new();
        private readonly List<ShapeMismatch> _shapes = new();
        private readonly List<DtypeMismatch> _dtypes = new();
        private readonly Dictionary<string, Tensor> _replaced = new();
        private readonly Dictionary<string, nn.Module> _modules;
        private readonly IReadOnlyDictionary<string, Tensor> _source;

        private StateDictFit(nn.Module module, IReadOnlyDictionary<string, Tensor> source)
        {
            _source = source;
            _modules = new Dictionary<string, nn.Module>(StringComparer.Ordinal) { [""] = module };
            foreach (var (name, child) in module.named_modules())
                _modules[name] = child;
        }

        /// <summary>One line per problem, in the module's order, unexpected keys last (<see cref="StateDicts.Problems"/>).</summary>
        internal List<string> Lines { get; } = new();

        internal bool Refused => Lines.Count > 0;

        /// <summary>The state_dict to hand to <c>load_state_dict</c>: the source with converted and filled tensors.</summary>
        internal Dictionary<string, Tensor> ToLoad
        {
            get
            {
                var load = new Dictionary<string, Tensor>(_source.Count + _replaced.Count);
                foreach (var (key, tensor) in _source)
                    load[key] = tensor;
                foreach (var (key, tensor) in _replaced)
                    load[key] = tensor;
                return load;
            }
        }

        internal static StateDictFit Of(nn.Module module, IReadOnlyDictionary<string, Tensor> source, bool strict, IList<string>? skip, StateDictLoadOptions? options)
        {
            skip ??= Array.Empty<string>();
            var fit = new StateDictFit(module, source);
            var own = module.state_dict();
            foreach (var (name, tensor) in own)
            {
                if (skip.Contains(name))
                    continue;
                if (!source.TryGetValue(name, out Tensor? loaded) || loaded is null)
                {
                    if (options?.AllowMissingNumBatchesTracked == true && fit.IsTrackedCount(name))
                    {
                        // PyTorch's _NormBase._load_from_state_dict puts torch.tensor(0, dtype=torch.long) there.
                        fit._replaced[name] = zeros_like(tensor);
                        continue;
                    }
                    if (strict)
                    {
                        fit._missing.Add((name, tensor));
                        fit.Lines.Add($"missing key '{Display(name)}' (expected {tensor.dtype} of shape {TensorFacts.Shape(tensor)})");
                    }
                    continue;
                }
                bool sameShape = TensorFacts.SameShape(loaded, tensor);
                if (!sameShape)
                {
                    var mismatch = new ShapeMismatch(name, loaded.shape, tensor.shape);
                    fit._shapes.Add(mismatch);
                    fit.Lines.Add(Line(mismatch));
                }
                if (loaded.dtype != tensor.dtype)
                {
                    string? reason = null;
                    // A tensor of the wrong shape is refused anyway: no conversion is tried for it.
                    if (options?.CastDtypes == true && sameShape)
                    {
                        reason = Cast(loaded, tensor.dtype, out Tensor? converted);
                        if (reason is null)
                        {
                            fit._replaced[name] = converted!;
                            continue;
                        }
                    }
                    var mismatch = new DtypeMismatch(name, loaded.dtype, tensor.dtype, reason);
                    fit._dtypes.Add(mismatch);
                    fit.Lines.Add(Line(mismatch));
                }
            }
            if (strict)
            {
                foreach (string key in source.Keys)
                {
                    if (!skip.Contains(key) && !own.ContainsKey(key))
                    {
                        fit._unexpected.Add(key);
                        fit.Lines.Add($"unexpected key '{Display(key)}'");
                    }
                }
            }
            return fit;
        }

        private static string Line(ShapeMismatch m) =>
            $"'{Display(m.Key)}' has shape [{string.Join(", ", m.LoadedShape)}], this module's has shape [{string.Join(", ", m.ModuleShape)}]";

        private static string Line(DtypeMismatch m) =>
            $"'{Display(m.Key)}' is {m.LoadedDtype}, this module's is {m.ModuleDtype}" + (m.Reason is null ? "" : $" (not converted: {m.Reason})");

        /// <summary>A key as a message shows it: whole up to <see cref="LongestKeyShown"/> characters, shortened in the middle beyond.</summary>
        internal static string Display(string key) =>
            key.Length <= LongestKeyShown ? key : $"{key[..(LongestKeyShown / 2)]}...({key.Length - LongestKeyShown + 20} characters)...{key[^(LongestKeyShown / 2 - 20)..]}";

        // ---- Conversions (StateDictLoadOptions.CastDtypes) ---------------------------------------------------------

        private enum Kind { Floating, Complex, Integer, Other }

        private static Kind KindOf(ScalarType dtype) => dtype switch
        {
            ScalarType.Float16 or ScalarType.BFloat16 or ScalarType.Float32 or ScalarType.Float64 => Kind.Floating,
            ScalarType.ComplexFloat32 or ScalarType.ComplexFloat64 => Kind.Complex,
            ScalarType.Byte or ScalarType.Int8 or ScalarType.Int16 or ScalarType.Int32 or ScalarType.Int64 => Kind.Integer,
            _ => Kind.Other,
        };

        private static bool Convertible(ScalarType from, ScalarType to) => KindOf(from) == KindOf(to) && KindOf(from) != Kind.Other;

        /// <summary>
        /// Converts as <c>copy_</c> does (round to nearest; integers as they are), or says why not: between kinds, or a
        /// value that would not survive (a finite value overflowing to infinity, an integer out of range).
        /// </summary>
        private static string? Cast(Tensor loaded, ScalarType target, out Tensor? converted)
        {
            converted = null;
            if (!Convertible(loaded.dtype, target))
                return $"{loaded.dtype} to {target} is a conversion between kinds, which CastDtypes does not make";
            var result = loaded.to(target);
            long lost;
            if (KindOf(target) == Kind.Integer)
                // Compared as int64, which holds every value of every integer dtype: a round trip through the target
                // would miss a wrap that comes back (int8 -1 -> uint8 255 -> int8 -1).
                lost = result.to(ScalarType.Int64).ne(loaded.to(ScalarType.Int64)).sum().item<long>();
            else
                lost = loaded.isfinite().logical_and(result.isfinite().logical_not()).sum().item<long>();
            if (lost > 0)
            {
                return KindOf(target) == Kind.Integer
                    ? $"{lost} of its values do not fit in {target}"
                    : $"{lost} of its finite values overflow to infinity in {target}";
            }
            converted = result;
            return null;
        }

        // ---- num_batches_tracked -----------------------------------------------------------------------------------

        /// <summary>Whether <paramref name="key"/> is the num_batches_tracked buffer of a BatchNorm (or InstanceNorm)
        /// module that tracks running statistics.</summary>
        private bool IsTrackedCount(string key)
        {
            string owner;
            if (key == Tracked)
                owner = "";
            else if (key.EndsWith("." + Tracked, StringComparison.Ordinal))
                owner = key[..^(Tracked.Length + 1)];
            else
                return false;
            return _modules.TryGetValue(owner, out var module) && module is NormBase norm && norm.track_running_stats;
        }

        // ---- The refusal -------------------------------------------------------------------------------------------

        internal StateDictMismatchException Refusal(nn.Module module, string? from)
        {
            var hints = new List<string>();
            var missing = _missing.Select(m => m.Key).ToList();
            var missingSet = new HashSet<string>(missing, StringComparer.Ordinal);
            var unexpectedSet = new HashSet<string>(_unexpected, StringComparer.Ordinal);
            var leftMissing = missing;

            string? strip = CommonPrefix(_unexpected, missingSet);
            string? add = strip is null ? CommonPrefix(missing, unexpectedSet) : null;
            if (strip is not null)
            {
                var covered = new HashSet<string>(_unexpected.Select(u => u[strip.Length..]), StringComparer.Ordinal);
                leftMissing = missing.Where(m => !covered.Contains(m)).ToList();
                string who = strip switch
                {
                    "module." => " (as nn.DataParallel and DistributedDataParallel save it)",
                    "_orig_mod." => " (as a model compiled with torch.compile saves it)",
                    _ => "",
                };
                hints.Add($"every unexpected key is '{Display(strip)}' followed by a missing key: the file holds the model under '{Display(strip)}'{who}; " +
                          $"load it with new StateDictLoadOptions {{ StripPrefix = \"{Display(strip)}\" }}" +
                          (leftMissing.Count > 0 ? $", after which {leftMissing.Count} key{S(leftMissing.Count)} would still be missing" : ""));
            }
            else if (add is not null)
            {
                var covered = new HashSet<string>(missing.Select(m => m[add.Length..]), StringComparer.Ordinal);
                int left = _unexpected.Count(u => !covered.Contains(u));
                leftMissing = new List<string>();
                hints.Add($"every missing key is '{Display(add)}' followed by an unexpected key: this module holds the saved model under '{Display(add)}'; " +
                          $"load it with new StateDictLoadOptions {{ AddPrefix = \"{Display(add)}\" }}" +
                          (left > 0 ? $", after which {left} key{S(left)} would still be unexpected" : ""));
            }
            if (leftMissing.Count > 0 && leftMissing.All(IsTrackedCount))
            {
                hints.Add($"{(strip is null ? "the missing keys are" : "those would be")} all the num_batches_tracked of BatchNorm modules ({leftMissing.Count}), " +
                          "which checkpoints saved before PyTorch 0.4.1 lack: harmless (the count matters only when training with momentum = null), and " +
                          "PyTorch itself loads such a file setting them to 0; so does new StateDictLoadOptions { AllowMissingNumBatchesTracked = true }");
            }

            var kinds = new List<(string Summary, string Label, string Sample, int Count)>();
            if (_missing.Count > 0)
                kinds.Add(($"{_missing.Count} key{S(_missing.Count)} missing", "missing ", SampleOf(_missing.Select(m => $"'{Display(m.Key)}' ({m.Expected.dtype} {TensorFacts.Shape(m.Expected)})").ToList()), _missing.Count));
            if (_unexpected.Count > 0)
                kinds.Add(($"{_unexpected.Count} key{S(_unexpected.Count)} unexpected", "unexpected ", SampleOf(_unexpected.Select(u => $"'{Display(u)}'").ToList()), _unexpected.Count));
            if (_shapes.Count > 0)
                kinds.Add(($"{_shapes.Count} key{S(_shapes.Count)} of another shape", "shapes ",
                    SampleOf(_shapes.Select(m => $"'{Display(m.Key)}' [{string.Join(", ", m.LoadedShape)}] (this module's [{string.Join(", ", m.ModuleShape)}])").ToList()), _shapes.Count));
            if (_dtypes.Count > 0)
                kinds.Add(($"{_dtypes.Count} key{S(_dtypes.Count)} of another dtype", "dtypes ",
                    SampleOf(_dtypes.Select(m => $"'{Display(m.Key)}' {m.LoadedDtype} (this module's {m.ModuleDtype}{(m.Reason is null ? "" : $"; not converted: {m.Reason}")})").ToList()), _dtypes.Count));

            var message = new StringBuilder($"{module}: refused to load {StateDicts.What(from)}, nothing was changed: ");
            bool whole = hints.Count == 0 && kinds.Count == 1 && kinds[0].Count <= Sample;
            if (whole)
            {
                // A short list of one kind is its own summary.
                message.Append(string.Join("; ", Lines)).Append('.');
            }
            else
            {
                foreach (string hint in hints)
                    message.Append(message[^2] == '.' ? char.ToUpperInvariant(hint[0]) + hint[1..] : hint).Append(". ");
                // The labels are needed only to tell two kinds' samples apart.
                message.Append(string.Join(", ", kinds.Select(k => k.Summary))).Append(": ")
                    .Append(string.Join("; ", kinds.Select(k => (kinds.Count > 1 ? k.Label : "") + k.Sample))).Append('.');
            }
            string? advice = DtypeAdvice();
            if (advice is not null)
                message.Append(' ').Append(advice);
            if (kinds.Any(k => k.Count > Sample))
                message.Append(" Every key is listed in the exception's MissingKeys, UnexpectedKeys, ShapeMismatches and DtypeMismatches.");
            return new StateDictMismatchException(message.ToString(), from, missing, _unexpected.ToList(), _shapes.ToList(), _dtypes.ToList());
        }

        /// <summary>One line for every dtype mismatch, never advice TorchSharp refuses (Module.to takes floating-point and
        /// complex dtypes only).</summary>
        private string? DtypeAdvice()
        {
            var unconverted = _dtypes.Where(d => d.Reason is null).ToList();
            if (unconverted.Count == 0)
                return null;
            var convertible = unconverted.Where(d => Convertible(d.LoadedDtype, d.ModuleDtype)).ToList();
            var across = unconverted.Where(d => !Convertible(d.LoadedDtype, d.ModuleDtype)).ToList();
            var advice = new StringBuilder();
            if (convertible.Count > 0)
            {
                advice.Append(convertible.Count == unconverted.Count ? "To convert them" : $"To convert the {convertible.Count} within one kind")
                    .Append(" as PyTorch's load_state_dict does, load with new StateDictLoadOptions { CastDtypes = true } (floating-point to floating-point, " +
                            "integer to integer; a value that would not survive is refused)");
                var loadedDtypes = convertible.Select(d => d.LoadedDtype).Distinct().ToList();
                if (across.Count == 0 && loadedDtypes.Count == 1 && KindOf(loadedDtypes[0]) is Kind.Floating or Kind.Complex
                    && convertible.All(d => KindOf(d.ModuleDtype) is Kind.Floating or Kind.Complex))
                    advice.Append($", or convert the module to the file's dtype first with module.to(ScalarType.{loadedDtypes[0]})");
                advice.Append('.');
            }
            if (across.Count > 0)
            {
                advice.Append(advice.Length > 0 ? " " : "")
                    .Append($"{across.Count} {(across.Count == 1 ? "is" : "are")} of another kind ({SampleOf(across.Select(d => $"'{Display(d.Key)}' {d.LoadedDtype} into {d.ModuleDtype}").ToList())}), " +
                            "which no option converts: convert such a tensor yourself if that is what it means.");
            }
            return advice.ToString();
        }

        /// <summary>
        /// The prefix <c>p</c> for which every key of <paramref name="prefixed"/> is <c>p + k</c> with <c>k</c> in
        /// <paramref name="plain"/>, if there is one. Candidates are the first key's suffixes that are plain keys (only
        /// at the plain keys' lengths, so a long key from a stranger costs no more than the module's keys), those ending
        /// at a '.' first, then the shortest; each is checked against every key once.
        /// </summary>
        private static string? CommonPrefix(List<string> prefixed, HashSet<string> plain)
        {
            if (prefixed.Count == 0 || plain.Count == 0)
                return null;
            string first = prefixed[0];
            var candidates = new List<string>();
            foreach (int length in plain.Select(k => k.Length).Distinct().Where(l => l > 0 && l < first.Length).OrderByDescending(l => l))
            {
                if (plain.Contains(first[^length..]))
                    candidates.Add(first[..^length]);
                if (candidates.Count == 8)
                    break;
            }
            return candidates.OrderBy(p => p.EndsWith('.') ? 0 : 1).ThenBy(p => p.Length)
                .FirstOrDefault(p => prefixed.All(k => k.Length > p.Length && k.StartsWith(p, StringComparison.Ordinal) && plain.Contains(k[p.Length..])));
        }

        private static string SampleOf(List<string> items) =>
            string.Join(", ", items.Take(Sample)) + (items.Count > Sample ? $", ... ({items.Count - Sample} more)" : "");

        private static string S(int count) => count == 1 ? "" : "s";
    }
}
