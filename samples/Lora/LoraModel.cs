// LoraModel: LoRA adapters for a whole TorchSharp model, in Hugging Face PEFT's way and file format.
// Part of the LoRA sample: copy LoraModel.cs and LoraConfig.cs (they depend on TorchLinear, TorchSharp and
// TorchSharp.PyBridge only).
//
// How adapters get into a model whose forward cannot be changed. Real ports hold their layers in C# fields of concrete
// types (private Linear q_proj;), and TorchSharp's Linear is sealed, so nothing can stand in for it. Instead each target
// layer keeps its type and gets two children, lora_A and lora_B (so its state_dict has PEFT's keys
// "<path>.lora_A.weight" and "<path>.lora_B.weight"), and a forward hook that adds lora_B(lora_A(dropout(x))) · scaling
// to its output. TorchSharp runs forward hooks only when a module is invoked with call(x) (as Sequential does), not
// with forward(x): a port whose forward calls its children with forward(x) must merge the adapter into the weights
// (load_adapter(..., merge: true)), and the rule for ports that take unmerged adapters is: call children with call(x).
using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Runtime.CompilerServices;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.PyBridge;
using static TorchSharp.torch;

namespace TorchLinear.Samples
{
    /// <summary>
    /// PEFT's LoRA for a whole TorchSharp model: put adapters into every <c>nn.Linear</c> or <see cref="CustomLinear"/>
    /// that a <see cref="LoraConfig"/> targets, load and save adapters in PEFT's files (<c>adapter_config.json</c> and
    /// <c>adapter_model.safetensors</c>, or <c>adapter_model.bin</c>), and merge them away.
    /// </summary>
    /// <remarks>
    /// <code>
    /// var adapted = LoraModel.load_adapter(model, "my-peft-adapter");     // a folder written by PEFT's save_pretrained
    /// using (LoraModel.disable_adapters(model)) { /* the base model */ }
    /// LoraModel.merge_and_unload(model);                                  // W + Δ; the model's types never changed
    /// </code>
    /// </remarks>
    public static class LoraModel
    {
        private const string Prefix = "base_model.model.";

        /// <summary>What an adapted layer carries beside its weight.</summary>
        private sealed class Adapter
        {
            public required string Path { get; init; }
            public required LoraProjection A { get; init; }
            public required LoraProjection B { get; init; }
            public required double Scaling { get; init; }
            public required double Dropout { get; init; }
            public required Action RemoveHook { get; init; }
            public bool Enabled { get; set; } = true;
            public Tensor? UnmergedWeight { get; set; }
            public bool Merged => UnmergedWeight is not null;
        }

        /// <summary>A bias-free linear map with one parameter named <c>weight</c>: PEFT's lora_A / lora_B.</summary>
        private sealed class LoraProjection : nn.Module<Tensor, Tensor>
        {
            private readonly Parameter weight;

            /// <summary>Holds a copy of <paramref name="initial"/>.</summary>
            public LoraProjection(Tensor initial) : base("LoraProjection")
            {
                // Made in a dispose scope and detached from it: the copy and its detach() wrapper are accounted for, and
                // new Parameter(t) takes over t's handle there.
                using (NewDisposeScope())
                    weight = (Parameter)new Parameter(initial.detach().clone()).DetachFromDisposeScope();
                RegisterComponents();
            }

            public Parameter Weight => weight;

            public override Tensor forward(Tensor input) => LinearFunctional.linear(input, weight);
        }

        private static readonly ConditionalWeakTable<nn.Module, Adapter> Adapters = new();
        private static readonly ConditionalWeakTable<nn.Module, LoraConfig> Configs = new();
        // The dtype each tensor had in the file it was loaded from, so that saving writes the same bytes back.
        private static readonly ConditionalWeakTable<nn.Module, Dictionary<string, ScalarType>> FileDtypes = new();
        // The modules_to_save parameters as they were before the adapter: PEFT keeps the original modules, which
        // disable_adapters and unload bring back (biases trained with bias = all / lora_only are the base layers' own, and
        // stay trained, as in PEFT).
        private static readonly ConditionalWeakTable<nn.Module, List<(Parameter Parameter, Tensor Original)>> Originals = new();

        /// <summary>
        /// Puts a fresh adapter (A kaiming-uniform, B zero: the model computes what it did) into every Linear or
        /// CustomLinear whose path <paramref name="config"/> targets.
        /// </summary>
        /// <returns>The adapted module paths, in the model's order.</returns>
        /// <exception cref="ArgumentException">The config matches no module, matches one that is neither Linear nor
        /// CustomLinear, or a matched layer already has an adapter.</exception>
        public static IReadOnlyList<string> inject(nn.Module model, LoraConfig config)
        {
            ArgumentNullException.ThrowIfNull(model);
            ArgumentNullException.ThrowIfNull(config);
            var targets = Targets(model, config);
            foreach (var (path, layer) in targets)
            {
                var weight = WeightOf(layer);
                int r = config.RankFor(path);
                using var a = empty(r, weight.size(1), dtype: weight.dtype, device: weight.device);
                nn.init.kaiming_uniform_(a, a: Math.Sqrt(5));
                using var b = zeros(weight.size(0), r, dtype: weight.dtype, device: weight.device);
                Attach(path, layer, config, a, b);
            }
            Configs.AddOrUpdate(model, config);
            KeepOriginals(model, config);
            return targets.Select(t => t.Path).ToList();
        }

        /// <summary>
        /// Reads a PEFT adapter folder — <c>adapter_config.json</c> and <c>adapter_model.safetensors</c> (or, without it,
        /// <c>adapter_model.bin</c>) — injects adapters as the config says, and loads the tensors (converted to each
        /// layer's dtype, as PEFT does). Keys that are not adapter keys (a classifier head PEFT saved, the biases of
        /// <c>bias</c> = all / lora_only) load into the model's parameter of that path. Everything is checked before
        /// anything changes; a refusal lists every problem.
        /// </summary>
        /// <param name="model">The base model, with its pretrained weights.</param>
        /// <param name="directory">The adapter folder.</param>
        /// <param name="merge">Fold the adapters into the weights at once (for ports whose forward calls children with
        /// forward(x), which runs no hooks, and for inference).</param>
        /// <returns>The adapted module paths.</returns>
        /// <exception cref="InvalidOperationException">The file's keys, shapes or dtypes do not fit the model; nothing changed.</exception>
        /// <exception cref="NotSupportedException">The config or the file uses a PEFT feature this sample does not implement.</exception>
        public static IReadOnlyList<string> load_adapter(nn.Module model, string directory, bool merge = false)
        {
            ArgumentNullException.ThrowIfNull(model);
            ArgumentNullException.ThrowIfNull(directory);
            var config = LoraConfig.load(Path.Combine(directory, "adapter_config.json"));
            string file = Path.Combine(directory, "adapter_model.safetensors");
            if (!File.Exists(file))
                file = Path.Combine(directory, "adapter_model.bin");
            if (!File.Exists(file))
                throw new FileNotFoundException($"{directory} has neither adapter_model.safetensors nor adapter_model.bin.", file);

            var tensors = StateDicts.ReadPyTorchFile(file);
            try
            {
                var targets = Targets(model, config);
                var plan = Plan(model, config, targets, tensors, file);
                foreach (var (path, layer) in targets)
                {
                    var weight = WeightOf(layer);
                    using var a = tensors[$"{Prefix}{path}.lora_A.weight"].to(weight.dtype);
                    using var b = tensors[$"{Prefix}{path}.lora_B.weight"].to(weight.dtype);
                    Attach(path, layer, config, a, b);
                }
                Configs.AddOrUpdate(model, config);
                KeepOriginals(model, config);
                using (no_grad())
                {
                    foreach (var (key, parameter) in plan)
                        parameter.copy_(tensors[key]);
                }
                FileDtypes.AddOrUpdate(model, tensors.ToDictionary(kv => kv.Key, kv => kv.Value.dtype));
                if (merge)
                    LoraModel.merge(model);
                return targets.Select(t => t.Path).ToList();
            }
            finally
            {
                foreach (var tensor in tensors.Values)
                    tensor.Dispose();
            }
        }

        /// <summary>
        /// Writes the adapter as PEFT does: <c>adapter_config.json</c> and <c>adapter_model.safetensors</c> with the keys
        /// <c>base_model.model.&lt;path&gt;.lora_A.weight</c> / <c>.lora_B.weight</c>, the biases the config's <c>bias</c>
        /// mode trains, and every <c>modules_to_save</c> module's full state under its plain names. Tensors loaded from a
        /// file are written in the dtype they had there.
        /// </summary>
        /// <exception cref="InvalidOperationException">The model has no adapters.</exception>
        public static void save_adapter(nn.Module model, string directory)
        {
            ArgumentNullException.ThrowIfNull(model);
            ArgumentNullException.ThrowIfNull(directory);
            if (!Configs.TryGetValue(model, out LoraConfig? config))
                throw new InvalidOperationException("The model has no adapters: inject or load one first.");
            var layers = AdaptedLayers(model);
            var dtypes = FileDtypes.TryGetValue(model, out var known) ? known : new Dictionary<string, ScalarType>();
            var state = new Dictionary<string, Tensor>();
            using var scope = NewDisposeScope();
            Tensor Saved(string key, Tensor tensor) =>
                (dtypes.TryGetValue(key, out ScalarType dtype) && dtype != tensor.dtype ? tensor.detach().to(dtype) : tensor.detach()).contiguous();
            foreach (var (path, layer, adapter) in layers)
            {
                state[$"{Prefix}{path}.lora_A.weight"] = Saved($"{Prefix}{path}.lora_A.weight", adapter.A.Weight);
                state[$"{Prefix}{path}.lora_B.weight"] = Saved($"{Prefix}{path}.lora_B.weight", adapter.B.Weight);
            }
            var parameters = model.named_parameters().ToDictionary(p => p.name, p => p.parameter);
            foreach (var (name, parameter) in parameters)
            {
                if (name.Contains(".lora_A.", StringComparison.Ordinal) || name.Contains(".lora_B.", StringComparison.Ordinal))
                    continue;
                bool bias = name.EndsWith(".bias", StringComparison.Ordinal) || name == "bias";
                bool adaptedBias = bias && layers.Any(l => name == l.Path + ".bias");
                bool saved = config.modules_to_save?.Any(m => name.StartsWith(m + ".", StringComparison.Ordinal)) == true;
                if (saved || (config.bias == "all" && bias) || (config.bias == "lora_only" && adaptedBias))
                    state[Prefix + name] = Saved(Prefix + name, WeightBeforeMerge(model, name, parameter));
            }
            Directory.CreateDirectory(directory);
            config.save(Path.Combine(directory, "adapter_config.json"));
            Safetensors.SaveStateDict(Path.Combine(directory, "adapter_model.safetensors"), state);
        }

        /// <summary>
        /// Folds every adapter into its layer's weight (<c>W += B A · scaling</c>). Like PEFT's <c>safe_merge</c>, every
        /// update is checked before any weight is written: nothing is merged if one merged weight would hold NaN or
        /// infinity. The adapters stay (and no longer run in the forward) until <see cref="unmerge"/>,
        /// <see cref="merge_and_unload"/> or <see cref="unload"/>; each weight before merging is kept for an exact unmerge.
        /// </summary>
        /// <exception cref="InvalidOperationException">A merged weight would hold NaN or infinity; nothing was written.</exception>
        public static void merge(nn.Module model)
        {
            ArgumentNullException.ThrowIfNull(model);
            Merge(model, keepUnmerged: true);
        }

        /// <summary>Takes merged adapters out of the weights again, restoring each weight bit for bit (PEFT's unmerge_adapter).</summary>
        public static void unmerge(nn.Module model)
        {
            ArgumentNullException.ThrowIfNull(model);
            using (no_grad())
            {
                foreach (var (_, layer, adapter) in AdaptedLayers(model).Where(l => l.Adapter.Merged))
                {
                    WeightOf(layer).copy_(adapter.UnmergedWeight!);
                    adapter.UnmergedWeight!.Dispose();
                    adapter.UnmergedWeight = null;
                }
            }
        }

        /// <summary>Every adapter folded into its weight and removed: the model is a plain model again, of its own types.</summary>
        /// <exception cref="InvalidOperationException">An update holds NaN or infinity; nothing was changed.</exception>
        public static void merge_and_unload(nn.Module model)
        {
            ArgumentNullException.ThrowIfNull(model);
            // Nothing to unmerge later: no copy of the weights is kept.
            Merge(model, keepUnmerged: false);
            Remove(model, restore: false);
        }

        /// <summary>
        /// Every adapter removed without merging: the adapted weights are the base model's again (a merged one is restored
        /// bit for bit) and <c>modules_to_save</c> modules hold their original weights, as PEFT's <c>unload</c> leaves them.
        /// </summary>
        public static void unload(nn.Module model)
        {
            ArgumentNullException.ThrowIfNull(model);
            if (Originals.TryGetValue(model, out var originals))
            {
                using (no_grad())
                {
                    foreach (var (parameter, original) in originals)
                        parameter.copy_(original);
                }
            }
            Remove(model, restore: true);
        }

        /// <summary>
        /// Runs without the adapters until the returned scope is disposed, as PEFT's <c>disable_adapter()</c>: no low-rank
        /// updates, and <c>modules_to_save</c> modules with their original weights. Biases trained with <c>bias</c> = all or
        /// lora_only are the base layers' own and stay trained (PEFT warns of the same). Merged adapters stay merged.
        /// </summary>
        public static IDisposable disable_adapters(nn.Module model)
        {
            ArgumentNullException.ThrowIfNull(model);
            var layers = AdaptedLayers(model).Where(l => l.Adapter.Enabled).Select(l => l.Adapter).ToList();
            foreach (var adapter in layers)
                adapter.Enabled = false;
            var swapped = new List<(Parameter Parameter, Tensor Trained)>();
            if (Originals.TryGetValue(model, out var originals))
            {
                using (no_grad())
                {
                    foreach (var (parameter, original) in originals)
                    {
                        swapped.Add((parameter, Copy(parameter)));
                        parameter.copy_(original);
                    }
                }
            }
            return new Restore(() =>
            {
                foreach (var adapter in layers)
                    adapter.Enabled = true;
                using (no_grad())
                {
                    foreach (var (parameter, trained) in swapped)
                    {
                        parameter.copy_(trained);
                        trained.Dispose();
                    }
                }
            });
        }

        /// <summary>
        /// Freezes everything but the adapters, as PEFT and loralib do; <paramref name="bias"/> <c>all</c> also trains every
        /// bias, <c>lora_only</c> the biases of adapted layers; <c>modules_to_save</c> modules train in full.
        /// </summary>
        public static void mark_only_lora_as_trainable(nn.Module model, string bias = "none")
        {
            ArgumentNullException.ThrowIfNull(model);
            if (bias is not ("none" or "all" or "lora_only"))
                throw new ArgumentException($"bias must be \"none\", \"all\" or \"lora_only\", but was \"{bias}\".", nameof(bias));
            var adapted = AdaptedLayers(model).Select(l => l.Path).ToHashSet();
            Configs.TryGetValue(model, out LoraConfig? config);
            foreach (var (name, parameter) in model.named_parameters())
            {
                bool lora = name.Contains(".lora_A.", StringComparison.Ordinal) || name.Contains(".lora_B.", StringComparison.Ordinal);
                bool isBias = name.EndsWith("bias", StringComparison.Ordinal);
                bool saved = config?.modules_to_save?.Any(m => name.StartsWith(m + ".", StringComparison.Ordinal)) == true;
                bool train = lora || saved || (bias == "all" && isBias)
                             || (bias == "lora_only" && isBias && adapted.Contains(name[..name.LastIndexOf('.')]));
                parameter.requires_grad_(train);
            }
        }

        // ---- The pieces -------------------------------------------------------------------------------------------

        private static List<(string Path, nn.Module Layer)> Targets(nn.Module model, LoraConfig config)
        {
            var targets = new List<(string, nn.Module)>();
            var refused = new List<string>();
            foreach (var (path, module) in model.named_modules())
            {
                if (module is LoraProjection || path.EndsWith(".lora_A", StringComparison.Ordinal) || path.EndsWith(".lora_B", StringComparison.Ordinal))
                    continue;
                if (!config.Targets(path))
                    continue;
                if (module is not (Linear or CustomLinear))
                {
                    // A regex or a suffix may name containers too (self_attn when q_proj is meant): only layers matter;
                    // "all-linear" means the linear layers only.
                    bool allLinear = string.Equals(config.target_modules_regex, "all-linear", StringComparison.OrdinalIgnoreCase);
                    if (!allLinear && !module.named_children().Any())
                        refused.Add($"{path} is a {module.GetType().Name}, neither nn.Linear nor CustomLinear");
                    continue;
                }
                if (Adapters.TryGetValue(module, out _))
                    refused.Add($"{path} already has an adapter (unload it first)");
                targets.Add((path, module));
            }
            if (refused.Count > 0)
                throw new ArgumentException($"LoraModel: cannot adapt {string.Join("; ", refused)}.");
            if (targets.Count == 0)
            {
                string what = config.target_modules_regex ?? $"[{string.Join(", ", config.target_modules ?? Array.Empty<string>())}]";
                throw new ArgumentException($"LoraModel: target_modules {what} matches no nn.Linear or CustomLinear in the model (its modules: {string.Join(", ", model.named_modules().Select(m => m.name).Take(20))}...).");
            }
            return targets;
        }

        /// <summary>
        /// Checks every tensor of an adapter file against the model before anything changes, and returns the non-adapter
        /// tensors paired with the parameters they load into.
        /// </summary>
        private static List<(string Key, Parameter Parameter)> Plan(nn.Module model, LoraConfig config, List<(string Path, nn.Module Layer)> targets,
                                                                    Dictionary<string, Tensor> tensors, string file)
        {
            var problems = new List<string>();
            var parameters = model.named_parameters().ToDictionary(p => p.name, p => p.parameter);
            var targetByPath = targets.ToDictionary(t => t.Path, t => t.Layer);
            var plan = new List<(string, Parameter)>();
            foreach (var (key, tensor) in tensors.OrderBy(kv => kv.Key, StringComparer.Ordinal))
            {
                if (!key.StartsWith(Prefix, StringComparison.Ordinal))
                {
                    problems.Add($"'{key}' does not start with '{Prefix}' (not a PEFT key)");
                    continue;
                }
                string name = key[Prefix.Length..];
                if (name.Contains("lora_embedding_", StringComparison.Ordinal))
                    throw new NotSupportedException($"{file}: '{key}' is a LoRA on an embedding, which this sample does not implement.");
                if (name.Contains(".modules_to_save.", StringComparison.Ordinal) || name.Contains(".original_module.", StringComparison.Ordinal))
                {
                    problems.Add($"'{key}' puts LoRA or weights inside a saved module's wrapper (a broken adapter: modules_to_save modules are saved under their plain names)");
                    continue;
                }
                bool isA = name.EndsWith(".lora_A.weight", StringComparison.Ordinal), isB = name.EndsWith(".lora_B.weight", StringComparison.Ordinal);
                if (isA || isB)
                {
                    string path = name[..^".lora_A.weight".Length];
                    if (!targetByPath.TryGetValue(path, out var layer))
                    {
                        problems.Add($"'{key}' is an adapter for {path}, which the config's target_modules does not select in this model");
                        continue;
                    }
                    var weight = WeightOf(layer);
                    int r = config.RankFor(path);
                    long[] expected = isA ? new[] { (long)r, weight.size(1) } : new[] { weight.size(0), (long)r };
                    if (!tensor.shape.SequenceEqual(expected))
                        problems.Add($"'{key}' has shape [{string.Join(", ", tensor.shape)}], {path} needs [{string.Join(", ", expected)}] (r = {r})");
                    if (!is_floating_point(tensor.dtype))
                        problems.Add($"'{key}' is {tensor.dtype}, not a floating-point tensor");
                    continue;
                }
                if (!parameters.TryGetValue(name, out Parameter? parameter))
                {
                    // A module listed in modules_to_save that the model lacks is skipped, as published configs list such.
                    if (config.modules_to_save?.Any(m => name.StartsWith(m + ".", StringComparison.Ordinal)) == true)
                        continue;
                    problems.Add($"'{key}' names no parameter of the model ('{name}')");
                    continue;
                }
                if (!tensor.shape.SequenceEqual(parameter.shape))
                    problems.Add($"'{key}' has shape [{string.Join(", ", tensor.shape)}], the model's {name} [{string.Join(", ", parameter.shape)}]");
                else if (!is_floating_point(tensor.dtype) || tensor.dtype != parameter.dtype && !is_floating_point(parameter.dtype))
                    problems.Add($"'{key}' is {tensor.dtype}, the model's {name} is {parameter.dtype}");
                else
                    plan.Add((key, parameter));
            }
            foreach (var (path, _) in targets)
            {
                foreach (string part in new[] { "lora_A", "lora_B" })
                {
                    if (!tensors.ContainsKey($"{Prefix}{path}.{part}.weight"))
                        problems.Add($"missing '{Prefix}{path}.{part}.weight' for the targeted {path}");
                }
            }
            if (problems.Count > 0)
                throw new InvalidOperationException($"LoraModel.load_adapter: refused {file}, nothing was changed: {string.Join("; ", problems)}.");
            return plan;
        }

        private static void Attach(string path, nn.Module layer, LoraConfig config, Tensor a, Tensor b)
        {
            var loraA = new LoraProjection(a);
            var loraB = new LoraProjection(b);
            layer.register_module("lora_A", loraA);
            layer.register_module("lora_B", loraB);
            var hookable = (nn.Module<Tensor, Tensor>)layer;
            Adapter? adapter = null;
            var remover = hookable.register_forward_hook((module, input, output) =>
            {
                if (adapter is null || !adapter.Enabled || adapter.Merged)
                    return null!;  // the output as it is
                using var scope = NewDisposeScope();
                Tensor x = module.training && adapter.Dropout > 0 ? nn.functional.dropout(input, adapter.Dropout, training: true) : input;
                // PEFT: result = result + lora_B(lora_A(dropout(x))) * scaling, here in place: the layer's fresh output is
                // not saved by its backward, and full-size temporaries are most of what the hook costs.
                if (x.dim() == 2 && output.dim() == 2)
                {
                    // A batch of rows: two GEMMs, the second accumulating into the output with the scaling as its alpha.
                    output.addmm_(x.mm(adapter.A.Weight.t()), adapter.B.Weight.t(), 1, (float)adapter.Scaling);
                    return null!;
                }
                output.add_(adapter.B.forward(adapter.A.forward(x)).mul_(adapter.Scaling));
                return null!;
            });
            adapter = new Adapter
            {
                Path = path, A = loraA, B = loraB, Scaling = config.ScalingFor(path), Dropout = config.lora_dropout, RemoveHook = remover.remove,
            };
            Adapters.AddOrUpdate(layer, adapter);
        }

        /// <summary>Keeps a copy of every modules_to_save parameter the model has, before anything is loaded into it.</summary>
        private static void KeepOriginals(nn.Module model, LoraConfig config)
        {
            var kept = new List<(Parameter, Tensor)>();
            foreach (var (name, parameter) in model.named_parameters())
            {
                if (config.modules_to_save?.Any(m => name.StartsWith(m + ".", StringComparison.Ordinal)) == true)
                    kept.Add((parameter, Copy(parameter)));
            }
            Originals.AddOrUpdate(model, kept);
        }

        private static void Remove(nn.Module model, bool restore)
        {
            foreach (var (_, layer, adapter) in AdaptedLayers(model))
            {
                if (restore && adapter.Merged)
                {
                    using (no_grad())
                        WeightOf(layer).copy_(adapter.UnmergedWeight!);
                }
                adapter.UnmergedWeight?.Dispose();
                adapter.UnmergedWeight = null;
                adapter.RemoveHook();
                layer.register_module("lora_A", null!);
                layer.register_module("lora_B", null!);
                adapter.A.Dispose();
                adapter.B.Dispose();
                Adapters.Remove(layer);
            }
            Configs.Remove(model);
            FileDtypes.Remove(model);
            if (Originals.TryGetValue(model, out var originals))
            {
                foreach (var (_, original) in originals)
                    original.Dispose();
                Originals.Remove(model);
            }
        }

        private static List<(string Path, nn.Module Layer, Adapter Adapter)> AdaptedLayers(nn.Module model) =>
            model.named_modules().Prepend(("", model))
                .Select(m => (m.Item1, m.Item2, Adapters.TryGetValue(m.Item2, out Adapter? a) ? a : null))
                .Where(t => t.Item3 is not null)
                .Select(t => (t.Item1, t.Item2, t.Item3!))
                .ToList();

        private static void Merge(nn.Module model, bool keepUnmerged)
        {
            var pending = AdaptedLayers(model).Where(l => !l.Adapter.Merged).ToList();
            foreach (var (path, layer, adapter) in pending)
            {
                if (!MergesFinite(WeightOf(layer), adapter))
                    throw new InvalidOperationException($"LoraModel.merge: merging the update of {path} would put NaN or infinity into its weight; no weight was changed.");
            }
            using (no_grad())
            {
                foreach (var (_, layer, adapter) in pending)
                {
                    var weight = WeightOf(layer);
                    if (keepUnmerged)
                        adapter.UnmergedWeight = Copy(weight);
                    // W + scaling · (B A), fused: the r-wide product and the sum in one pass over W.
                    weight.addmm_(adapter.B.Weight, adapter.A.Weight, 1, (float)adapter.Scaling);
                }
            }
        }

        /// <summary>
        /// Whether W + scaling · B A stays finite. Cheap where it can be: when A, B and W are finite and
        /// |W| + r · max|B| · max|A| · |scaling| is below the dtype's largest value, it does; otherwise the merged weight is
        /// computed on the side and checked, as PEFT's safe_merge does.
        /// </summary>
        private static bool MergesFinite(Tensor weight, Adapter adapter)
        {
            using var scope = NewDisposeScope();
            Tensor a = adapter.A.Weight, b = adapter.B.Weight;
            if (!isfinite(a).all().item<bool>() || !isfinite(b).all().item<bool>())
                return false;
            // Largest magnitudes through max and min, which reduce without allocating a |W| as large as W.
            static double Largest(Tensor t) => Math.Max(Math.Abs(t.max().to(ScalarType.Float64).item<double>()), Math.Abs(t.min().to(ScalarType.Float64).item<double>()));
            double bound = Largest(weight.detach()) + a.size(0) * Largest(a.detach()) * Largest(b.detach()) * Math.Abs(adapter.Scaling);
            if (double.IsFinite(bound) && bound < finfo(weight.dtype).max)
                return true;
            return isfinite(weight.detach().addmm(b, a, 1, (float)adapter.Scaling)).all().item<bool>();
        }

        /// <summary>A merged layer's weight is saved as it was before merging, as LoraLinear's state_dict does.</summary>
        private static Tensor WeightBeforeMerge(nn.Module model, string name, Tensor parameter)
        {
            foreach (var (path, _, adapter) in AdaptedLayers(model))
            {
                if (adapter.Merged && name == path + ".weight")
                    return adapter.UnmergedWeight!;
            }
            return parameter;
        }

        /// <summary>A copy of a tensor's values that no dispose scope frees, leaving no temporary behind.</summary>
        private static Tensor Copy(Tensor tensor)
        {
            using (NewDisposeScope())
                return tensor.detach().clone().DetachFromDisposeScope();
        }

        private static Parameter WeightOf(nn.Module layer) => layer switch
        {
            Linear linear => linear.weight,
            CustomLinear custom => custom.weight,
            _ => throw new ArgumentException($"{layer.GetType().Name} is neither nn.Linear nor CustomLinear."),
        };

        private sealed class Restore : IDisposable
        {
            private Action? _action;

            public Restore(Action action) => _action = action;

            public void Dispose()
            {
                _action?.Invoke();
                _action = null;
            }
        }
    }
}
