using System;
using System.Collections.Generic;
using System.Globalization;
using System.IO;
using System.Linq;
using System.Reflection;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Lora
{
    /// <summary>
    /// PEFT's LoRA for a whole TorchSharp model (PEFT's <c>tuners/lora/model.py</c>): put adapters into every
    /// <c>nn.Linear</c> or <see cref="CustomLinear"/> that a <see cref="LoraConfig"/> targets, load and save adapters in
    /// PEFT's files, merge them away, and say by name when an adapter cannot run.
    /// </summary>
    /// <remarks>
    /// <para>How each layer takes its adapter — the rule for ports: a <see cref="CustomLinear"/> runs it inside its own
    /// forward (its <see cref="CustomLinear.Adapter"/> slot; its type never changes); a Linear held in a field (or a
    /// <c>ModuleList</c>/<c>ModuleDict</c> slot) typed <c>nn.Module&lt;Tensor, Tensor&gt;</c> is replaced by a
    /// <see cref="LoraWrapper"/> that runs it in its forward; a Linear in a field of TorchSharp's sealed <c>Linear</c> type
    /// (or in a <c>Sequential</c>) keeps its type and gets a forward hook, which TorchSharp runs only when the layer is
    /// invoked with <c>call(x)</c>. In every case the adapted layer gets the children <c>lora_A</c> and <c>lora_B</c>
    /// (PEFT's keys <c>&lt;path&gt;.lora_A.weight</c>, <c>&lt;path&gt;.lora_B.weight</c>) and <c>lora_layer</c> (the
    /// adapter's state, no keys).</para>
    /// <para>Nothing silent: every <c>call(x)</c> of the model checks that each active, unmerged adapter ran, and throws an
    /// <see cref="InvalidOperationException"/> naming the layers whose adapters did not (a sealed Linear invoked with
    /// <c>forward(x)</c>) and the ways out. A port that invokes the model itself with <c>forward(x)</c> is checked by
    /// <see cref="check_adapters_run(nn.Module{Tensor, Tensor}, Tensor)"/>; docs/lora.md says which case no check can see.</para>
    /// <code>
    /// var adapted = LoraModel.load_adapter(model, "my-peft-adapter");     // a folder written by PEFT's save_pretrained
    /// using (LoraModel.disable_adapters(model)) { /* the base model */ }
    /// LoraModel.merge_and_unload(model);                                  // W + Δ; the model's types are its own again
    /// </code>
    /// </remarks>
    public static class LoraModel
    {
        // ---- Putting adapters in --------------------------------------------------------------------------------------

        /// <summary>
        /// Puts a fresh adapter (initialised as <see cref="LoraConfig.init_lora_weights"/> says; by default A
        /// kaiming-uniform and B zero, so the model computes what it did) into every Linear or CustomLinear whose path
        /// <paramref name="config"/> targets, and freezes the model but for the adapters, the <c>modules_to_save</c>
        /// modules and the biases <c>bias</c> names, as PEFT's <c>get_peft_model</c> does.
        /// </summary>
        /// <returns>The adapted module paths, in the model's order.</returns>
        /// <exception cref="ArgumentException">The config is not usable (a key and its rule are named), matches no layer,
        /// names a module of another kind, a rank or alpha gives a scaling that is not finite in a layer's dtype, or the
        /// model already has an adapter.</exception>
        public static IReadOnlyList<string> inject(nn.Module model, LoraConfig config)
        {
            ArgumentNullException.ThrowIfNull(model);
            ArgumentNullException.ThrowIfNull(config);
            config.ThrowIfInvalid("LoraModel.inject");
            var kept = config.Clone();
            ThrowIfAdapted(model);
            var targets = Targets(model, kept, "LoraModel.inject", error => new ArgumentException($"LoraModel.inject: {error.Key}: {error.Rule}."));
            var state = new AdaptedModel(model, kept);
            foreach (var target in targets)
            {
                var weight = target.Weight;
                var layer = LoraLayer.ForInject(weight.size(1), weight.size(0), target.Rank, target.Alpha, kept.lora_dropout, kept.use_rslora,
                                                weight.dtype, weight.device, kept.init_lora_weights);
                state.Add(Attach(model, target, layer));
            }
            KeepOriginals(model, state);
            state.InstallRootHooks();
            MarkTrainable(model, state, kept.bias);
            return state.Layers.Select(l => l.Path).ToList();
        }

        /// <summary>
        /// Reads a PEFT adapter folder — <c>adapter_config.json</c> and <c>adapter_model.safetensors</c> (or, without it,
        /// <c>adapter_model.bin</c>) — as PEFT's <c>PeftModel.from_pretrained</c> does: injects adapters as the config says,
        /// loads the tensors (converted to each layer's dtype), and loads the keys that are not adapter keys (a
        /// <c>modules_to_save</c> head, the biases of <c>bias</c> = all / lora_only) into the model's tensors of that path.
        /// Everything is checked before anything changes; a refusal lists every problem and leaves the model bitwise as it
        /// was.
        /// </summary>
        /// <param name="model">The base model, with its pretrained weights.</param>
        /// <param name="directory">The adapter folder.</param>
        /// <param name="merge">Fold the adapters into the weights at once (for inference, and for ports whose layers
        /// cannot run an adapter: see the class remarks).</param>
        /// <param name="is_trainable">Leave the adapters, <c>modules_to_save</c> and the biases <c>bias</c> names trainable,
        /// as after <see cref="inject"/>. False (PEFT's default): every parameter of the model is frozen, for inference.</param>
        /// <returns>The adapted module paths.</returns>
        /// <exception cref="InvalidOperationException">The file's keys, shapes, dtypes or values do not fit the model, or a
        /// merge would not be finite; nothing changed.</exception>
        /// <exception cref="CheckpointFormatException">A file of the folder cannot be read as what it should be; the message
        /// names the file, the key and the rule.</exception>
        /// <exception cref="NotSupportedException">The config uses a PEFT feature this library does not implement.</exception>
        /// <exception cref="ArgumentException">The config matches no layer of this model, or the model already has an adapter.</exception>
        /// <exception cref="FileNotFoundException">The folder lacks a file.</exception>
        public static IReadOnlyList<string> load_adapter(nn.Module model, string directory, bool merge = false, bool is_trainable = false)
        {
            ArgumentNullException.ThrowIfNull(model);
            ArgumentNullException.ThrowIfNull(directory);
            ThrowIfAdapted(model);
            string configFile = Path.Combine(directory, PeftFolder.ConfigFile);
            var config = LoraConfig.load(configFile);
            var targets = Targets(model, config, $"LoraModel.load_adapter: {configFile}", error => new CheckpointFormatException(configFile, error.Rule, error.Key));
            string file = PeftFolder.AdapterFile(directory);
            var tensors = StateDicts.ReadPyTorchFile(file);
            var built = new List<LoraLayer>();
            try
            {
                var plan = PeftFolder.Plan(model, config, targets, tensors, file);
                foreach (var target in targets)
                {
                    var weight = target.Weight;
                    var layer = LoraLayer.ForLoading(weight.size(1), weight.size(0), target.Rank, target.Alpha, config.lora_dropout, config.use_rslora,
                                                     weight.dtype, weight.device);
                    layer.Owner = target.Path;
                    built.Add(layer);
                    using (no_grad())
                    {
                        layer.lora_A.weight.copy_(tensors[PeftFolder.LoraKey(target.Path, "lora_A")]);
                        layer.lora_B.weight.copy_(tensors[PeftFolder.LoraKey(target.Path, "lora_B")]);
                    }
                }
                if (merge)
                {
                    var failing = targets.Zip(built).Where(t => !t.Second.MergesFinite(t.First.Weight)).Select(t => t.First.Path).ToList();
                    if (failing.Count > 0)
                        throw new InvalidOperationException($"LoraModel.load_adapter: refused {file}, nothing was changed: merging it would put NaN or infinity into the weights of {string.Join(", ", failing)}.");
                }

                // Everything is checked: from here on the model changes.
                var state = new AdaptedModel(model, config);
                for (int i = 0; i < targets.Count; i++)
                    state.Add(Attach(model, targets[i], built[i]));
                built.Clear();
                KeepOriginals(model, state);
                using (no_grad())
                {
                    foreach (var (key, target) in plan)
                        target.copy_(tensors[key]);
                }
                state.FileDtypes = tensors.ToDictionary(kv => kv.Key, kv => kv.Value.dtype);
                if (merge)
                {
                    foreach (var layer in state.Layers)
                        layer.Layer.MergeChecked(layer.Weight);
                }
                state.InstallRootHooks();
                if (is_trainable)
                    MarkTrainable(model, state, config.bias);
                else
                    foreach (var parameter in model.parameters())
                        parameter.requires_grad_(false);
                return state.Layers.Select(l => l.Path).ToList();
            }
            finally
            {
                foreach (var layer in built)
                    layer.Dispose();
                foreach (var tensor in tensors.Values)
                    tensor.Dispose();
            }
        }

        /// <summary>
        /// Writes the adapter as PEFT's <c>save_pretrained</c> does: <c>adapter_config.json</c> and
        /// <c>adapter_model.safetensors</c> with the keys <c>base_model.model.&lt;path&gt;.lora_A.weight</c> /
        /// <c>.lora_B.weight</c>, the biases the config's <c>bias</c> mode trains, and every <c>modules_to_save</c>
        /// module's state under its plain names. Tensors loaded from a file are written in the dtype they had there.
        /// </summary>
        /// <exception cref="InvalidOperationException">The model has no adapters.</exception>
        public static void save_adapter(nn.Module model, string directory)
        {
            ArgumentNullException.ThrowIfNull(model);
            ArgumentNullException.ThrowIfNull(directory);
            PeftFolder.Save(StateOf(model, nameof(save_adapter)), model, directory);
        }

        // ---- Merging, disabling, taking adapters out -------------------------------------------------------------------

        /// <summary>
        /// Folds every adapter into its layer's weight (<c>W += Δ</c>). Like PEFT's <c>safe_merge</c>, every update is
        /// checked before any weight is written: nothing is merged if one merged weight would hold NaN or infinity. The
        /// adapters stay (and no longer run in the forward) until <see cref="unmerge"/>, <see cref="merge_and_unload"/> or
        /// <see cref="unload"/>; each weight before merging is kept for an exact unmerge.
        /// </summary>
        /// <exception cref="InvalidOperationException">The model has no adapters, or a merged weight would not be finite; nothing was written.</exception>
        public static void merge(nn.Module model)
        {
            ArgumentNullException.ThrowIfNull(model);
            MergeAll(StateOf(model, nameof(merge)), nameof(merge));
        }

        /// <summary>Takes merged adapters out of the weights again, restoring each weight bit for bit (PEFT's <c>unmerge_adapter</c>).</summary>
        /// <exception cref="InvalidOperationException">The model has no adapters.</exception>
        public static void unmerge(nn.Module model)
        {
            ArgumentNullException.ThrowIfNull(model);
            foreach (var layer in StateOf(model, nameof(unmerge)).Layers)
                layer.Layer.unmerge(layer.Weight);
        }

        /// <summary>
        /// Every adapter folded into its weight and taken out: the model is a plain model again, of its own types and in
        /// its own fields, with W + Δ in its weights and its <c>modules_to_save</c> modules as trained.
        /// </summary>
        /// <exception cref="InvalidOperationException">The model has no adapters, or an update would not be finite; nothing was changed.</exception>
        public static void merge_and_unload(nn.Module model)
        {
            ArgumentNullException.ThrowIfNull(model);
            var state = StateOf(model, nameof(merge_and_unload));
            MergeAll(state, nameof(merge_and_unload), keep: false);
            foreach (var layer in state.Layers)
                layer.Layer.ForgetUnmerged();
            Remove(state);
        }

        /// <summary>
        /// Every adapter taken out without merging: the adapted weights are the base model's again (a merged one is
        /// restored bit for bit), and the <c>modules_to_save</c> modules hold the values they had before the adapter. (PEFT's
        /// <c>unload</c> keeps the trained <c>modules_to_save</c> copies; this gives back the base model, as its
        /// documentation promises. <see cref="merge_and_unload"/> keeps them.)
        /// </summary>
        /// <exception cref="InvalidOperationException">The model has no adapters.</exception>
        public static void unload(nn.Module model)
        {
            ArgumentNullException.ThrowIfNull(model);
            var state = StateOf(model, nameof(unload));
            foreach (var layer in state.Layers)
                layer.Layer.unmerge(layer.Weight);
            foreach (var saved in state.Saved)
                saved.Restore(keepCurrent: false);
            Remove(state);
        }

        /// <summary>
        /// Runs without the adapters until the returned scope is disposed, as PEFT's <c>disable_adapter()</c>: no low-rank
        /// updates — merged adapters are taken out of the weights for the while, bit for bit, and put back after — and
        /// <c>modules_to_save</c> modules with their original values. Biases trained with <c>bias</c> = all or lora_only are
        /// the base layers' own and stay trained (PEFT warns of the same).
        /// </summary>
        /// <exception cref="InvalidOperationException">The model has no adapters.</exception>
        public static IDisposable disable_adapters(nn.Module model)
        {
            ArgumentNullException.ThrowIfNull(model);
            var state = StateOf(model, nameof(disable_adapters));
            var merged = state.Layers.Where(l => l.Layer.merged).ToList();
            foreach (var layer in merged)
                layer.Layer.unmerge(layer.Weight);
            var disabled = state.Layers.Where(l => !l.Layer.Disabled).ToList();
            foreach (var layer in disabled)
                layer.Layer.Disabled = true;
            var trained = state.Saved.Select(saved => (saved, values: saved.Restore(keepCurrent: true)!)).ToList();
            return new Restore(() =>
            {
                foreach (var (saved, values) in trained)
                    saved.Put(values);
                foreach (var layer in disabled)
                    layer.Layer.Disabled = false;
                // The weights are as they were when merged first: the same update gives the same bits again.
                foreach (var layer in merged)
                    layer.Layer.MergeChecked(layer.Weight);
            });
        }

        // ---- Training ---------------------------------------------------------------------------------------------------

        /// <summary>
        /// Freezes everything but the adapters, as PEFT and loralib do; <c>modules_to_save</c> modules train in full;
        /// <paramref name="bias"/> (by default the config's) <c>all</c> also trains every bias, <c>lora_only</c> the
        /// biases of the adapted layers.
        /// </summary>
        /// <exception cref="ArgumentException"><paramref name="bias"/> is not <c>none</c>, <c>all</c> or <c>lora_only</c>.</exception>
        /// <exception cref="InvalidOperationException">The model has no adapters.</exception>
        public static void mark_only_lora_as_trainable(nn.Module model, string? bias = null)
        {
            ArgumentNullException.ThrowIfNull(model);
            var state = StateOf(model, nameof(mark_only_lora_as_trainable));
            bias ??= state.Config.bias;
            if (bias is not ("none" or "all" or "lora_only"))
                throw new ArgumentException($"bias must be \"none\", \"all\" or \"lora_only\", but was \"{bias}\".", nameof(bias));
            MarkTrainable(model, state, bias);
        }

        /// <summary>PEFT's <c>get_nb_trainable_parameters</c>: the number of elements in trainable parameters, and in all of them.</summary>
        public static (long trainable, long all) get_nb_trainable_parameters(nn.Module model)
        {
            ArgumentNullException.ThrowIfNull(model);
            long trainable = 0, all = 0;
            foreach (var parameter in model.parameters())
            {
                long count = parameter.numel();
                all += count;
                if (parameter.requires_grad)
                    trainable += count;
            }
            return (trainable, all);
        }

        /// <summary>
        /// Prints PEFT's line, <c>trainable params: 2,048 || all params: 1,050,624 || trainable%: 0.1949</c>. (PEFT's count
        /// also holds the copy of each <c>modules_to_save</c> module it keeps as a parameter; here the originals are not
        /// parameters.)
        /// </summary>
        public static void print_trainable_parameters(nn.Module model)
        {
            var (trainable, all) = get_nb_trainable_parameters(model);
            double percent = all == 0 ? 0 : 100.0 * trainable / all;
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"trainable params: {trainable:N0} || all params: {all:N0} || trainable%: {percent:F4}"));
        }

        // ---- Adapters that must run -------------------------------------------------------------------------------------

        /// <summary>
        /// For a port that invokes the model with <c>forward(x)</c> (which runs no hooks, so the model's own check does not
        /// run): runs one forward on <paramref name="example"/> (without gradients) and throws if an active adapter did not
        /// run in it, as a <c>call(x)</c> of the model does.
        /// </summary>
        /// <exception cref="InvalidOperationException">The model has no adapters, or an adapter did not run; the message
        /// names the layers and the ways out.</exception>
        public static void check_adapters_run(nn.Module<Tensor, Tensor> model, Tensor example)
        {
            ArgumentNullException.ThrowIfNull(model);
            ArgumentNullException.ThrowIfNull(example);
            check_adapters_run(model, () =>
            {
                using var scope = NewDisposeScope();
                model.forward(example);
            });
        }

        /// <summary>
        /// As <see cref="check_adapters_run(nn.Module{Tensor, Tensor}, Tensor)"/>, for a model whose forward takes other
        /// arguments: <paramref name="forward"/> runs it once (under no_grad here).
        /// </summary>
        public static void check_adapters_run(nn.Module model, Action forward)
        {
            ArgumentNullException.ThrowIfNull(model);
            ArgumentNullException.ThrowIfNull(forward);
            var state = StateOf(model, nameof(check_adapters_run));
            using var noGrad = no_grad();
            state.RunChecked(forward);
        }

        /// <summary>
        /// The opt-out for a model whose forward legitimately skips some adapted layers (a head chosen per task, an
        /// early exit): their adapters may not run in a model call. With no path, every adapted layer may be skipped,
        /// and the model's check is off.
        /// </summary>
        /// <exception cref="ArgumentException">A path is not an adapted layer of the model.</exception>
        public static void allow_unused_adapters(nn.Module model, params string[] paths)
        {
            ArgumentNullException.ThrowIfNull(model);
            ArgumentNullException.ThrowIfNull(paths);
            StateOf(model, nameof(allow_unused_adapters)).AllowUnused(paths);
        }

        // ---- The pieces ---------------------------------------------------------------------------------------------------

        /// <summary>A layer the config targets, with the rank and alpha it gets and how it will host its adapter.</summary>
        internal sealed class Target
        {
            internal required string Path { get; init; }
            internal required nn.Module Module { get; init; }
            internal required nn.Module Parent { get; init; }
            internal required string Name { get; init; }
            internal required int Rank { get; init; }
            internal required double Alpha { get; init; }
            internal required HostKind Kind { get; init; }

            /// <summary>For <see cref="HostKind.Wrapper"/>: the parent's fields that hold the layer.</summary>
            internal List<FieldInfo> Fields { get; init; } = new();

            internal Parameter Weight => Module switch
            {
                CustomLinear custom => custom.weight,
                Linear linear => linear.weight,
                _ => throw new InvalidOperationException(),
            };
        }

        /// <summary>A refusal found while targeting, as (config key, rule).</summary>
        internal readonly record struct Refusal(string Key, string Rule);

        /// <summary>
        /// Finds every layer the config targets and decides how it hosts its adapter; refuses (through
        /// <paramref name="refuse"/>, for the config's key) what cannot be adapted.
        /// </summary>
        internal static List<Target> Targets(nn.Module model, LoraConfig config, string caller, Func<Refusal, Exception> refuse)
        {
            var targets = new List<Target>();
            var refused = new List<string>();
            var modules = model.named_modules().ToList();
            foreach (var (path, module) in modules)
            {
                bool targeted;
                try
                {
                    targeted = config.Targets(path);
                }
                catch (PatternException error)
                {
                    throw refuse(new Refusal(error.Field, error.Rule));
                }
                if (!targeted)
                    continue;
                if (module is not (Linear or CustomLinear))
                {
                    // A regex or a suffix may name containers too (self_attn when q_proj is meant): only layers matter;
                    // "all-linear" means the linear layers only.
                    bool allLinear = config.target_modules_regex is { } regex && ModuleMatching.IsAllLinear(regex);
                    if (!allLinear && !module.named_children().Any())
                        refused.Add($"{path} is a {module.GetType().Name}, neither nn.Linear nor CustomLinear");
                    continue;
                }
                var (parent, name) = ParentOf(model, path);
                Parameter weight = module is CustomLinear c ? c.weight : ((Linear)module).weight;
                if (weight.dtype is not (ScalarType.Float32 or ScalarType.Float64 or ScalarType.Float16 or ScalarType.BFloat16))
                {
                    refused.Add($"{path} is {weight.dtype}; adapters are made for Float32, Float64, Float16 and BFloat16 layers");
                    continue;
                }
                if (weight.dim() != 2)
                {
                    refused.Add($"{path} has a weight of shape [{string.Join(", ", weight.shape)}], not (out_features, in_features)");
                    continue;
                }
                if (module is CustomLinear { Adapter: not null })
                    refused.Add($"{path} already has an adapter in its Adapter slot");
                foreach (string child in new[] { "lora_A", "lora_B", "lora_layer" })
                {
                    if (module.named_children().Any(m => m.name == child))
                        refused.Add($"{path} already has a child named {child}");
                }
                int rank;
                double alpha;
                try
                {
                    rank = config.RankFor(path);
                    alpha = config.AlphaFor(path);
                }
                catch (PatternException error)
                {
                    throw refuse(new Refusal(error.Field, error.Rule));
                }
                double scaling = LoraConfig.Scaling(alpha, rank, config.use_rslora);
                if (!double.IsFinite(LoraLayer.ScalingIn(scaling, weight.dtype)))
                {
                    // |scaling| ≤ |alpha| (r ≥ 1): it is alpha that is too large for the dtype.
                    throw refuse(new Refusal(config.AlphaKey(path), $"{path}: scaling = {scaling.ToString(CultureInfo.InvariantCulture)} (alpha {alpha.ToString(CultureInfo.InvariantCulture)}, r {rank}) is not finite in the layer's dtype {weight.dtype}"));
                }
                var fields = module is Linear linear ? WrappableFields(parent, linear) : null;
                var kind = module is CustomLinear ? HostKind.Slot : fields is not null ? HostKind.Wrapper : HostKind.Hook;
                targets.Add(new Target
                {
                    Path = path, Module = module, Parent = parent, Name = name, Rank = rank, Alpha = alpha, Kind = kind, Fields = fields ?? new(),
                });
            }
            if (refused.Count > 0)
                throw new ArgumentException($"{caller}: cannot adapt {string.Join("; ", refused)}.");
            if (targets.Count == 0)
            {
                string what = config.target_modules_regex ?? $"[{string.Join(", ", config.target_modules ?? Array.Empty<string>())}]";
                throw new ArgumentException($"{caller}: target_modules {what} matches no nn.Linear or CustomLinear in the model (its modules: {string.Join(", ", modules.Select(m => m.name).Take(20))}{(modules.Count > 20 ? ", ..." : "")}).");
            }
            return targets;
        }

        /// <summary>The module that holds the module at <paramref name="path"/>, and its name there.</summary>
        private static (nn.Module Parent, string Name) ParentOf(nn.Module model, string path)
        {
            int dot = path.LastIndexOf('.');
            nn.Module parent = model;
            if (dot >= 0)
            {
                foreach (string part in path[..dot].Split('.'))
                    parent = parent.named_children().First(c => c.name == part).module;
            }
            return (parent, path[(dot + 1)..]);
        }

        /// <summary>
        /// The parent's fields that hold <paramref name="linear"/>, when every one of them (and the parent's registry) can
        /// hold a <see cref="LoraWrapper"/> instead; null when the layer must keep its type (a field of the sealed
        /// <c>Linear</c> type, a Sequential, a ModuleList or ModuleDict of Linear, or a layer no field holds).
        /// </summary>
        private static List<FieldInfo>? WrappableFields(nn.Module parent, Linear linear)
        {
            Type type = parent.GetType();
            if (parent is Sequential || IsContainer(type))
                return ContainerAccepts(type) && parent is not Sequential ? new List<FieldInfo>() : null;
            var fields = new List<FieldInfo>();
            for (Type? t = type; t is not null && t.Assembly != typeof(nn.Module).Assembly; t = t.BaseType)
            {
                foreach (var field in t.GetFields(BindingFlags.Instance | BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.DeclaredOnly))
                {
                    if (ReferenceEquals(field.GetValue(parent), linear))
                    {
                        if (!field.FieldType.IsAssignableFrom(typeof(LoraWrapper)))
                            return null;
                        fields.Add(field);
                    }
                }
            }
            return fields.Count > 0 ? fields : null;
        }

        private static bool IsContainer(Type type) =>
            type.IsGenericType && (type.GetGenericTypeDefinition() == typeof(ModuleList<>) || type.GetGenericTypeDefinition() == typeof(ModuleDict<>));

        private static bool ContainerAccepts(Type type) =>
            IsContainer(type) && type.GetGenericArguments()[0].IsAssignableFrom(typeof(LoraWrapper));

        private static readonly FieldInfo Submodules = typeof(nn.Module).GetField("_internal_submodules", BindingFlags.Instance | BindingFlags.NonPublic)
            ?? throw new MissingFieldException("TorchSharp's nn.Module has no _internal_submodules field: this TorchSharp version is not one TorchLinear.Lora supports.");

        /// <summary>Replaces the registered child <paramref name="name"/> of <paramref name="parent"/> in place, keeping its position.</summary>
        private static void ReplaceChild(nn.Module parent, string name, nn.Module module)
        {
            var registry = (TorchSharp.Utils.OrderedDict<string, nn.Module>)Submodules.GetValue(parent)!;
            registry[name] = module;
            Type type = parent.GetType();
            if (IsContainer(type))
            {
                // The container's own list or dictionary holds it too.
                if (type.GetGenericTypeDefinition() == typeof(ModuleList<>))
                    type.GetProperty("Item", new[] { typeof(int) })!.SetValue(parent, module, new object[] { int.Parse(name, CultureInfo.InvariantCulture) });
                else
                    type.GetProperty("Item", new[] { typeof(string) })!.SetValue(parent, module, new object[] { name });
            }
        }

        /// <summary>Puts <paramref name="layer"/> into the target, as its kind says, and says how to take it out.</summary>
        private static AdaptedLayer Attach(nn.Module model, Target target, LoraLayer layer)
        {
            switch (target.Kind)
            {
                case HostKind.Slot:
                {
                    var custom = (CustomLinear)target.Module;
                    Register(custom, layer);
                    custom.Adapter = (input, output) => layer.add_to(output, input, custom.training);
                    return new AdaptedLayer
                    {
                        Path = target.Path, Layer = layer, Kind = HostKind.Slot, Host = custom,
                        Detach = () =>
                        {
                            custom.Adapter = null;
                            Unregister(custom);
                        },
                    };
                }
                case HostKind.Wrapper:
                {
                    var linear = (Linear)target.Module;
                    var wrapper = new LoraWrapper(linear, layer);
                    foreach (var field in target.Fields)
                        field.SetValue(target.Parent, wrapper);
                    ReplaceChild(target.Parent, target.Name, wrapper);
                    return new AdaptedLayer
                    {
                        Path = target.Path, Layer = layer, Kind = HostKind.Wrapper, Host = wrapper,
                        Detach = () =>
                        {
                            var original = wrapper.Unwrap();
                            foreach (var field in target.Fields)
                                field.SetValue(target.Parent, original);
                            ReplaceChild(target.Parent, target.Name, original);
                        },
                    };
                }
                default:
                {
                    var linear = (Linear)target.Module;
                    Register(linear, layer);
                    var remover = linear.register_forward_hook((module, input, output) =>
                    {
                        layer.add_to(output, input, module.training);
                        return null!;  // the output, updated in place
                    });
                    return new AdaptedLayer
                    {
                        Path = target.Path, Layer = layer, Kind = HostKind.Hook, Host = linear,
                        Detach = () =>
                        {
                            remover.remove();
                            Unregister(linear);
                        },
                    };
                }
            }
        }

        private static void Register(nn.Module host, LoraLayer layer)
        {
            host.register_module("lora_A", layer.lora_A);
            host.register_module("lora_B", layer.lora_B);
            host.register_module("lora_layer", layer);
        }

        private static void Unregister(nn.Module host)
        {
            host.register_module("lora_A", null!);
            host.register_module("lora_B", null!);
            host.register_module("lora_layer", null!);
        }

        /// <summary>Keeps a copy of every modules_to_save module's state before anything is loaded into it.</summary>
        private static void KeepOriginals(nn.Module model, AdaptedModel state)
        {
            var config = state.Config;
            foreach (var (path, module) in model.named_modules())
            {
                if (!ModuleMatching.is_module_to_save(config, path))
                    continue;
                // A saved module inside another saved module is saved with that one.
                if (state.Saved.Any(s => path.StartsWith(s.Path + ".", StringComparison.Ordinal)))
                    continue;
                state.Saved.Add(new SavedModule
                {
                    Path = path,
                    Module = module,
                    Originals = module.state_dict().Select(kv => (kv.Key, SavedModule.Copy(kv.Value))).ToList(),
                });
            }
        }

        /// <summary>
        /// PEFT's <c>_mark_only_adapters_as_trainable</c> with its <c>modules_to_save</c>: the adapters and the saved
        /// modules train, and the biases <paramref name="bias"/> names; every other parameter is frozen.
        /// </summary>
        private static void MarkTrainable(nn.Module model, AdaptedModel state, string bias)
        {
            var adapters = new HashSet<IntPtr>(state.Layers.SelectMany(l => new[] { l.Layer.lora_A.weight.Handle, l.Layer.lora_B.weight.Handle }));
            var adaptedBiases = new HashSet<string>(state.Layers.Select(l => l.Path + ".bias"), StringComparer.Ordinal);
            foreach (var (name, parameter) in model.named_parameters())
            {
                bool isBias = name == "bias" || name.EndsWith(".bias", StringComparison.Ordinal);
                bool saved = state.Saved.Any(s => name.StartsWith(s.Path + ".", StringComparison.Ordinal));
                bool train = adapters.Contains(parameter.Handle) || saved
                             || (bias == "all" && isBias)
                             || (bias == "lora_only" && adaptedBiases.Contains(name));
                parameter.requires_grad_(train);
            }
        }

        private static void MergeAll(AdaptedModel state, string caller, bool keep = true)
        {
            var pending = state.Layers.Where(l => !l.Layer.merged).ToList();
            var failing = pending.Where(l => !l.Layer.MergesFinite(l.Weight)).Select(l => l.Path).ToList();
            if (failing.Count > 0)
                throw new InvalidOperationException($"LoraModel.{caller}: merging the update of {string.Join(", ", failing)} would put NaN or infinity into its weight; no weight was changed.");
            foreach (var layer in pending)
                layer.Layer.MergeChecked(layer.Weight, keep);
        }

        /// <summary>Takes every adapter out of the model and frees it; the layers are the model's own again.</summary>
        private static void Remove(AdaptedModel state)
        {
            foreach (var layer in state.Layers)
                layer.Detach();
            state.Release();
            foreach (var layer in state.Layers)
            {
                layer.Layer.Model = null;
                layer.Layer.Dispose();
            }
            state.Layers.Clear();
        }

        /// <summary>Refuses a model that already has an adapter: several named adapters are not implemented yet.</summary>
        private static void ThrowIfAdapted(nn.Module model)
        {
            var existing = model.named_modules().Where(m => m.module is LoraLayer)
                .Select(m => m.name.EndsWith(".lora_layer", StringComparison.Ordinal) ? m.name[..^".lora_layer".Length] : m.name).ToList();
            if (existing.Count > 0)
                throw new ArgumentException($"LoraModel: the model already has an adapter (on {string.Join(", ", existing.Take(5))}{(existing.Count > 5 ? ", ..." : "")}); one adapter per model is supported: unload or merge_and_unload it first.", nameof(model));
        }

        /// <summary>The bookkeeping of the adapters in <paramref name="model"/>, which must be the model they were put into.</summary>
        internal static AdaptedModel StateOf(nn.Module model, string caller)
        {
            foreach (var module in model.modules())
            {
                if (module is LoraLayer { Model: { } state })
                {
                    if (!ReferenceEquals(state.Root, model))
                        throw new InvalidOperationException($"LoraModel.{caller}: the adapters were put into a {state.Root.GetType().Name}, not into this {model.GetType().Name}: pass the model they were put into.");
                    return state;
                }
            }
            throw new InvalidOperationException($"LoraModel.{caller}: the model has no adapters: inject or load one first.");
        }

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
