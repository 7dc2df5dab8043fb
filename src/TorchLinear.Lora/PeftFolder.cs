using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using TorchSharp;
using TorchSharp.PyBridge;
using static TorchSharp.torch;

namespace TorchLinear.Lora
{
    /// <summary>
    /// PEFT's adapter folder (PEFT's <c>utils/save_and_load.py</c>): <c>adapter_config.json</c>, and the tensors in
    /// <c>adapter_model.safetensors</c> (or <c>adapter_model.bin</c>, a <c>torch.save</c> file) under the keys
    /// <c>base_model.model.&lt;path&gt;.lora_A.weight</c> / <c>.lora_B.weight</c>, <c>.lora_magnitude_vector</c> (DoRA, no
    /// <c>.weight</c>), <c>.lora_embedding_A</c> / <c>.lora_embedding_B</c> (no adapter name in any of them), the trained
    /// biases — an adapted layer's as <c>&lt;path&gt;.base_layer.bias</c> (PEFT's layer holds the Linear as
    /// <c>base_layer</c>; older folders' plain <c>&lt;path&gt;.bias</c> is read too), any other under its plain name — and
    /// every <c>modules_to_save</c> module's state under their plain names.
    /// </summary>
    internal static class PeftFolder
    {
        internal const string Prefix = "base_model.model.";
        internal const string ConfigFile = "adapter_config.json";
        internal const string SafetensorsFile = "adapter_model.safetensors";
        internal const string BinFile = "adapter_model.bin";

        internal static string Key(string path, string part) => $"{Prefix}{path}.{part}";

        internal static string LoraKey(string path, string part) => $"{Prefix}{path}.{part}.weight";

        /// <summary>The file key of one adapter tensor of the layer at <paramref name="path"/>: the prefix, the path, the part's suffix (its layer type's).</summary>
        internal static string Key(string path, FilePart part) => $"{Prefix}{path}{part.Suffix}";

        /// <summary>One tensor of the file that is not an adapter weight: where it goes.</summary>
        /// <param name="Key">Its key in the file.</param>
        /// <param name="Name">Its name in the model's state_dict.</param>
        /// <param name="Destination">The model's tensor of that name.</param>
        /// <param name="SavedModule">The modules_to_save module it belongs to (the path), or null for a base tensor (a bias).</param>
        /// <param name="NameInModule">Its name within that module.</param>
        internal sealed record Step(string Key, string Name, Tensor Destination, string? SavedModule, string NameInModule);

        /// <summary>The folder's tensor file: the safetensors one, or without it the .bin one.</summary>
        internal static string AdapterFile(string directory)
        {
            string file = Path.Combine(directory, SafetensorsFile);
            if (!File.Exists(file))
                file = Path.Combine(directory, BinFile);
            if (!File.Exists(file))
                throw new FileNotFoundException($"{directory} has neither {SafetensorsFile} nor {BinFile}.", file);
            return file;
        }

        /// <summary>
        /// Checks every tensor of an adapter file against the targets and the model before anything changes, and returns
        /// the tensors that are not adapter weights with where they go.
        /// </summary>
        /// <exception cref="InvalidOperationException">Anything does not fit; the message lists every problem.</exception>
        internal static List<Step> Plan(nn.Module model, LoraConfig config, List<LoraModel.Target> targets, Dictionary<string, Tensor> tensors, string file,
                                        AdaptedModel? state)
        {
            var problems = new List<string>();
            var own = model.state_dict();
            var targetByPath = targets.ToDictionary(t => t.Path);
            var plan = new List<Step>();
            var keyOf = new Dictionary<string, string>(StringComparer.Ordinal);
            var copies = new List<(string Key, string Saved, string Wrapper, string Inner)>();
            foreach (var (key, tensor) in tensors.OrderBy(kv => kv.Key, StringComparer.Ordinal))
            {
                if (!key.StartsWith(Prefix, StringComparison.Ordinal))
                {
                    problems.Add($"'{key}' does not start with '{Prefix}' (not a PEFT key)");
                    continue;
                }
                string name = key[Prefix.Length..];
                if (WrapperCopy(config, name) is { } copy)
                {
                    copies.Add((key, copy.Saved, copy.Wrapper, copy.Inner));
                    continue;
                }
                if (name.Contains(".modules_to_save.", StringComparison.Ordinal) || name.Contains(".original_module.", StringComparison.Ordinal))
                {
                    problems.Add($"'{key}' puts LoRA or weights inside a saved module's wrapper (a broken adapter: modules_to_save modules are saved under their plain names)");
                    continue;
                }
                if (LoraLayerTypes.PartOf(name) is var (path, part))
                {
                    if (!targetByPath.TryGetValue(path, out var target))
                    {
                        problems.Add($"'{key}' is an adapter tensor for {path}, which the config's target_modules does not select in this model");
                        continue;
                    }
                    var filePart = target.Type.FileParts.FirstOrDefault(p => p.Part == part);
                    if (filePart is null || !key.EndsWith(filePart.Suffix, StringComparison.Ordinal))
                    {
                        string owners = string.Join(" or ", LoraLayerTypes.All.Where(t => t.FileParts.Any(p => p.Part == part)).Select(t => t.Name));
                        problems.Add($"'{key}' is an adapter tensor of {owners} ({part}), but {path} is {(target.Type.Name.StartsWith("nn.", StringComparison.Ordinal) ? "an " : "a ")}{target.Type.Name}");
                        continue;
                    }
                    if (filePart.DoraOnly && !config.use_dora)
                    {
                        problems.Add($"'{key}' is a DoRA magnitude, but the config's use_dora is false");
                        continue;
                    }
                    long[] expected = target.Type.PartShape(target.Module, part, target.Rank);
                    if (!tensor.shape.SequenceEqual(expected))
                        problems.Add($"'{key}' has shape [{string.Join(", ", tensor.shape)}], {path} needs [{string.Join(", ", expected)}] (r = {target.Rank})");
                    else if (!is_floating_point(tensor.dtype))
                        problems.Add($"'{key}' is {tensor.dtype}, not a floating-point tensor");
                    else if (!Finite(tensor))
                        problems.Add($"'{key}' holds NaN or infinity");
                    continue;
                }
                if (name.Contains(".lora_", StringComparison.Ordinal) || name.StartsWith("lora_", StringComparison.Ordinal))
                {
                    problems.Add($"'{key}' is an adapter tensor TorchLinear.Lora does not read (a bias on lora_B, or another PEFT feature)");
                    continue;
                }
                // PEFT's layer holds the adapted Linear as base_layer: its bias is saved as <path>.base_layer.bias. Older
                // folders (PEFT before its base_layer, this library before reading it) hold the plain <path>.bias.
                if (BaseLayerName(name) is { } plain)
                    name = plain;
                if (!own.TryGetValue(name, out Tensor? destination))
                {
                    problems.Add($"'{key}' names no parameter or buffer of the model ('{name}')");
                    continue;
                }
                if (!keyOf.TryAdd(name, key))
                {
                    problems.Add($"'{keyOf[name]}' and '{key}' are both {name} (a bias is saved once: under base_layer for an adapted layer, as PEFT saves it)");
                    continue;
                }
                if (!tensor.shape.SequenceEqual(destination.shape))
                    problems.Add($"'{key}' has shape [{string.Join(", ", tensor.shape)}], the model's {name} [{string.Join(", ", destination.shape)}]");
                else if (is_floating_point(destination.dtype) ? !is_floating_point(tensor.dtype) : tensor.dtype != destination.dtype)
                    problems.Add($"'{key}' is {tensor.dtype}, the model's {name} is {destination.dtype}");
                else if (is_floating_point(tensor.dtype) && !Finite(tensor))
                    problems.Add($"'{key}' holds NaN or infinity");
                else
                {
                    string? saved = SavedModuleOf(config, name);
                    plan.Add(new Step(key, name, destination, saved, saved is null ? name : name[(saved.Length + 1)..]));
                }
            }
            // PEFT's bias = "all" keeps every key that contains "bias", its modules_to_save wrapper's too: the trained copy
            // (which PEFT's loading drops) and the original (which it loads into the original module). Both are taken
            // when they say what the rest of the folder and the model say; otherwise refused, as neither is loaded here.
            foreach (var (key, saved, wrapper, inner) in copies)
            {
                using var scope = NewDisposeScope();
                if (wrapper == "modules_to_save")
                {
                    var plain = new[] { inner, inner.Contains('.') ? inner[(inner.IndexOf('.') + 1)..] : null }
                        .Select(n => n is null ? null : $"{Prefix}{saved}.{n}").FirstOrDefault(k => k is not null && tensors.ContainsKey(k));
                    if (plain is null)
                        problems.Add($"'{key}' is a copy in {saved}'s modules_to_save wrapper (PEFT's bias = \"all\" saves it), but the file has no '{Prefix}{saved}.{inner}' beside it");
                    else if (!SameBits(tensors[key], tensors[plain]))
                        problems.Add($"'{key}' is PEFT's copy of '{plain}' in {saved}'s modules_to_save wrapper, but holds other values");
                    continue;
                }
                var original = state?.Saved.FirstOrDefault(m => m.Path == saved)?.Originals.FirstOrDefault(o => o.Name == inner).Value
                    ?? (own.TryGetValue($"{saved}.{inner}", out var current) ? current : null);
                if (original is null)
                    problems.Add($"'{key}' is the original of {saved}.{inner} (PEFT's bias = \"all\" saves it), which the model lacks");
                else if (!is_floating_point(tensors[key].dtype) || !tensors[key].shape.SequenceEqual(original.shape) || !SameBits(tensors[key].to(original.dtype), original))
                    problems.Add($"'{key}' is the original of {saved}.{inner}, which PEFT loads into the module's original, but it differs from this model's {saved}.{inner} (a folder made on other base weights)");
            }
            foreach (var target in targets)
            {
                foreach (var part in target.Type.FileParts.Where(p => !p.DoraOnly || config.use_dora))
                {
                    string key = Key(target.Path, part);
                    if (!tensors.ContainsKey(key))
                        problems.Add($"missing '{key}' for the targeted {target.Path}" + (part.DoraOnly ? " (use_dora is true: a DoRA adapter holds each layer's magnitude)" : ""));
                }
            }
            if (problems.Count > 0)
                throw new InvalidOperationException($"LoraModel.load_adapter: refused {file}, nothing was changed: {string.Join("; ", problems)}.");
            return plan;
        }

        /// <summary>
        /// A key of PEFT's modules_to_save wrapper that its bias = "all" saves (every key with "bias" in it):
        /// <c>&lt;module&gt;.modules_to_save.&lt;name&gt;</c> or <c>&lt;module&gt;.original_module.&lt;name&gt;</c>, for a
        /// module the config saves; null for any other name.
        /// </summary>
        private static (string Saved, string Wrapper, string Inner)? WrapperCopy(LoraConfig config, string name)
        {
            if (config.bias != LoraBias.All || !name.Contains("bias", StringComparison.Ordinal))
                return null;
            foreach (string wrapper in new[] { "modules_to_save", "original_module" })
            {
                int at = name.IndexOf($".{wrapper}.", StringComparison.Ordinal);
                if (at > 0 && ModuleMatching.IsModuleToSave(config, name[..at]))
                    return (name[..at], wrapper, name[(at + wrapper.Length + 2)..]);
            }
            return null;
        }

        private static bool SameBits(Tensor a, Tensor b) =>
            a.dtype == b.dtype && a.shape.SequenceEqual(b.shape) && Equivalence.Compare(a, b).BitExact;

        /// <summary>
        /// The model's name for a bias saved under a layer's <c>base_layer</c> (<c>q_proj.base_layer.bias</c> →
        /// <c>q_proj.bias</c>), or null for any other name. Only a bias: a folder never carries a base layer's weight, and
        /// one that does is refused as naming nothing, never loaded over the pretrained weight. Any layer's: a folder saved
        /// from a model where another adapter wrapped the layer holds its bias under base_layer too.
        /// </summary>
        private static string? BaseLayerName(string name)
        {
            const string Part = ".base_layer.bias";
            return name.EndsWith(Part, StringComparison.Ordinal) && name.Length > Part.Length ? name[..^Part.Length] + ".bias" : null;
        }

        /// <summary>The key PEFT saves a model tensor under: an adapted layer's own tensors are its <c>base_layer</c>'s.</summary>
        internal static string SavedKey(string name, ISet<string> adaptedPaths)
        {
            int dot = name.LastIndexOf('.');
            return dot > 0 && adaptedPaths.Contains(name[..dot]) ? $"{Prefix}{name[..dot]}.base_layer.{name[(dot + 1)..]}" : Prefix + name;
        }

        /// <summary>The outermost modules_to_save module that holds the state_dict entry <paramref name="name"/>, or null.</summary>
        private static string? SavedModuleOf(LoraConfig config, string name)
        {
            for (int end = name.IndexOf('.'); end >= 0; end = name.IndexOf('.', end + 1))
            {
                if (ModuleMatching.IsModuleToSave(config, name[..end]))
                    return name[..end];
            }
            return null;
        }

        private static bool Finite(Tensor tensor)
        {
            using var scope = NewDisposeScope();
            return tensor.numel() == 0 || isfinite(tensor).all().item<bool>();
        }

        /// <summary>Writes one adapter of the model into <paramref name="directory"/>, as PEFT's <c>save_pretrained</c> lays it out.</summary>
        internal static void Save(AdaptedModel state, AdapterEntry entry, nn.Module model, string directory)
        {
            var config = entry.Config;
            var dtypes = entry.FileDtypes;
            using var scope = NewDisposeScope();
            var tensors = new Dictionary<string, Tensor>();
            // A tensor goes back in the dtype it had in its file (a bias read from an older folder under its plain key).
            void Put(string key, Tensor tensor, string? oldKey = null) =>
                tensors[key] = ((dtypes.TryGetValue(key, out ScalarType dtype) || (oldKey is not null && dtypes.TryGetValue(oldKey, out dtype))) && dtype != tensor.dtype
                    ? tensor.detach().to(dtype) : tensor.detach()).contiguous();
            var adapterParameters = new HashSet<IntPtr>();
            foreach (var layer in state.Layers)
            {
                foreach (var adapter in layer.Adapters)
                {
                    foreach (var parameter in adapter.Parameters())
                        adapterParameters.Add(parameter.Handle);
                }
                if (layer.Find(entry.Name) is { } own)
                {
                    foreach (var (part, value) in own.Tensors())
                        Put(Key(layer.Path, layer.Type.FileParts.First(p => p.Part == part)), value);
                }
            }
            var adaptedBiases = new HashSet<string>(state.Layers.Where(l => l.Find(entry.Name) is not null).Select(l => l.Path + ".bias"), StringComparer.Ordinal);
            // Under base_layer: the layers this adapter adapts, which PEFT's from_pretrained wraps when it loads the folder
            // into a fresh base model (a layer only another adapter wraps keeps its plain key, which that model has).
            var adaptedPaths = new HashSet<string>(state.Layers.Where(l => l.Find(entry.Name) is not null).Select(l => l.Path), StringComparer.Ordinal);
            foreach (var (name, parameter) in model.named_parameters())
            {
                if (adapterParameters.Contains(parameter.Handle))
                    continue;
                bool isBias = name == "bias" || name.EndsWith(".bias", StringComparison.Ordinal);
                // PEFT's keys: an adapted layer's bias is its base_layer's (PEFT, loading with strict=False, drops the plain
                // key of an adapted layer without a word); any other bias keeps its own name. PEFT's bias = "lora_only"
                // saves none of the biases it trains (its key is <path>.bias, which its layer lacks); these are saved.
                if ((config.bias == LoraBias.All && isBias) || (config.bias == LoraBias.LoraOnly && adaptedBiases.Contains(name)))
                    Put(SavedKey(name, adaptedPaths), parameter, Prefix + name);
            }
            foreach (var saved in state.Saved.Where(s => s.Adapters.Contains(entry.Name)))
            {
                foreach (var (name, tensor) in saved.ValuesOf(entry.Name))
                    Put($"{Prefix}{saved.Path}.{name}", tensor);
            }
            Directory.CreateDirectory(directory);
            config.save_pretrained(Path.Combine(directory, ConfigFile));
            Safetensors.SaveStateDict(Path.Combine(directory, SafetensorsFile), tensors);
        }
    }
}
