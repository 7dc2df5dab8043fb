using System;
using System.Collections.Generic;
using System.Globalization;
using System.IO;
using System.Linq;
using System.Runtime.CompilerServices;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Lora
{
    /// <summary>
    /// PEFT's LoRA for a whole TorchSharp model (PEFT's <c>tuners/lora/model.py</c>): put named adapters into every
    /// <c>nn.Linear</c>, <see cref="CustomLinear"/> or <c>nn.Embedding</c> that a <see cref="LoraConfig"/> targets, load and
    /// save them in PEFT's files, switch, combine and merge them, run a batch whose rows use different adapters, and say
    /// by name when an adapter cannot run.
    /// </summary>
    /// <remarks>
    /// <para>How each layer takes its adapters — the rule for ports: a <see cref="CustomLinear"/> runs them inside its own
    /// forward (its <see cref="AdaptableLayer.Adapter"/> slot; its type never changes); a Linear (or Embedding) held in a
    /// field (or a <c>ModuleList</c>/<c>ModuleDict</c> slot) typed <c>nn.Module&lt;Tensor, Tensor&gt;</c> is replaced by a
    /// <see cref="LoraWrapper"/> (<see cref="LoraEmbeddingWrapper"/>) that runs them in its forward; a Linear or Embedding
    /// in a field of TorchSharp's sealed type (or in a <c>Sequential</c>) keeps its type and gets a forward hook, which
    /// TorchSharp runs only when the layer is invoked with <c>call(x)</c>. The adapted layer's state_dict gets PEFT's keys:
    /// <c>&lt;path&gt;.lora_A.&lt;adapter&gt;.weight</c>, <c>.lora_B.&lt;adapter&gt;.weight</c>,
    /// <c>.lora_magnitude_vector.&lt;adapter&gt;.weight</c> (DoRA), or <c>.lora_embedding_A.&lt;adapter&gt;</c> and
    /// <c>.lora_embedding_B.&lt;adapter&gt;</c>.</para>
    /// <para>Nothing silent: every <c>call(x)</c> of the model checks that each layer with an active, unmerged adapter ran,
    /// and throws an <see cref="InvalidOperationException"/> naming the layers that did not (a sealed Linear invoked with
    /// <c>forward(x)</c>) and the ways out. A port that invokes the model itself with <c>forward(x)</c> is checked by
    /// <see cref="check_adapters_run(nn.Module{Tensor, Tensor}, Tensor)"/>; docs/lora.md says which case no check can see.
    /// Every operation that takes an adapter name refuses one the model does not have, naming the ones it has.</para>
    /// <code>
    /// LoraModel.load_adapter(model, "support-adapter");                          // "default", active
    /// LoraModel.load_adapter(model, "sales-adapter", adapter_name: "sales");     // added, not active
    /// LoraModel.set_adapter(model, "sales");
    /// using (LoraModel.MixedBatch(model, new[] { "default", "sales", "__base__" })) { var y = model.call(x); }
    /// </code>
    /// </remarks>
    public static partial class LoraModel
    {
        /// <summary>The name of an adapter that is not given one (PEFT's).</summary>
        public const string DefaultAdapter = "default";

        /// <summary>In <see cref="MixedBatch"/>, the name for a row that uses no adapter (PEFT's).</summary>
        public const string BaseModel = "__base__";

        // ---- Putting adapters in --------------------------------------------------------------------------------------

        /// <summary>
        /// Puts a fresh adapter named <paramref name="adapter_name"/> (initialised as <see cref="LoraConfig.init_lora_weights"/>
        /// says; by default A kaiming-uniform and B zero, so the model computes what it did; with <c>use_dora</c> the
        /// magnitude starts at the rows' norm) into every layer <paramref name="config"/> targets. The model's first
        /// adapter becomes active and the model is frozen but for it, its <c>modules_to_save</c> and the biases <c>bias</c>
        /// names, as PEFT's <c>get_peft_model</c> does; another is added inactive and frozen, as PEFT's <c>add_adapter</c>
        /// does, until <see cref="set_adapter"/>.
        /// </summary>
        /// <returns>The adapted module paths, in the model's order.</returns>
        /// <exception cref="ArgumentException">The config is not usable (a key and its rule are named), matches no layer,
        /// names a module of another kind, a rank or alpha gives a scaling (or, with drawn B, an update scaling · B A) that
        /// is not finite in a layer's dtype, the model has an adapter of that name already (or the name is not a usable
        /// one), or the adapter and one of the model's both have a <c>bias</c> other than <c>none</c> (PEFT's rule).</exception>
        public static IReadOnlyList<string> Inject(nn.Module model, LoraConfig config, string adapter_name = DefaultAdapter)
        {
            ArgumentNullException.ThrowIfNull(model);
            ArgumentNullException.ThrowIfNull(config);
            CheckNewName(model, adapter_name, nameof(Inject));
            config.ThrowIfInvalid("LoraModel.Inject");
            var kept = config.Clone();
            var state = TryStateOf(model, nameof(Inject));
            CheckNoScope(state, nameof(Inject));
            CheckSlots(state, nameof(Inject));
            CheckOneBias(state, kept, adapter_name, nameof(Inject));
            var targets = Targets(model, kept, state, "LoraModel.Inject", error => new ArgumentException($"LoraModel.Inject: {error.Key}: {error.Rule}."));
            SetFanInFanOutAsPeft(kept, targets);
            var adapters = new List<IAdapter>();
            try
            {
                foreach (var target in targets)
                {
                    var weight = target.Weight;
                    IAdapter adapter = target.Type.Create(target.Module, target.Rank, target.Alpha, kept, draw: true);
                    adapter.Name = adapter_name;
                    adapters.Add(adapter);
                    // A drawn B is not zero with init_lora_weights false: a large alpha can overflow scaling · B A.
                    if (!adapter.UpdateFinite(weight))
                        throw new ArgumentException($"LoraModel.Inject: {kept.AlphaKey(target.Path)}: {UpdateProblem(target, adapter, weight.dtype)}; nothing changed.", nameof(config));
                }
            }
            catch
            {
                foreach (var adapter in adapters)
                    adapter.Dispose();
                throw;
            }
            state ??= new AdaptedModel(model);
            var entry = new AdapterEntry { Name = adapter_name, Config = kept, Trainable = true };
            Install(model, state, entry, targets, adapters);
            return targets.Select(t => t.Path).ToList();
        }

        /// <summary>The old name of <c>Inject</c>, which it calls.</summary>
        [Obsolete("use LoraModel.Inject")]
        public static IReadOnlyList<string> inject(nn.Module model, LoraConfig config, string adapter_name = DefaultAdapter) =>
            Inject(model, config, adapter_name);

        /// <summary>
        /// PEFT's <c>get_peft_model</c>: puts a fresh adapter of <paramref name="peft_config"/> into <paramref name="model"/>, as
        /// <see cref="Inject"/> does, and returns the model's <see cref="PeftModel"/>, which holds its adapters and does
        /// every operation on them.
        /// </summary>
        /// <exception cref="ArgumentException">As <see cref="Inject"/>.</exception>
        public static PeftModel get_peft_model(nn.Module model, LoraConfig peft_config, string adapter_name = DefaultAdapter)
        {
            Inject(model, peft_config, adapter_name);
            return PeftModel.For(model, nameof(get_peft_model));
        }

        /// <summary>
        /// Reads a PEFT adapter folder — <c>adapter_config.json</c> and <c>adapter_model.safetensors</c> (or, without it,
        /// <c>adapter_model.bin</c>) — as PEFT's <c>PeftModel.from_pretrained</c> (a model's first adapter, made active) or
        /// <c>load_adapter</c> (another one, added inactive) does: puts adapters in as the config says, loads the tensors
        /// (converted to each layer's dtype), and loads the keys that are not adapter keys (a <c>modules_to_save</c> head,
        /// the biases of <c>bias</c> = all / lora_only: an adapted layer's under PEFT's <c>&lt;path&gt;.base_layer.bias</c> or,
        /// from older folders, <c>&lt;path&gt;.bias</c>). Everything is checked before anything changes — the keys, shapes,
        /// dtypes, values, and that each layer's update <c>scaling · B A</c> (for DoRA the rescaled weight) is finite in the
        /// layer's dtype; a refusal lists every problem and leaves the model bitwise as it was.
        /// </summary>
        /// <param name="model">The base model, with its pretrained weights.</param>
        /// <param name="directory">The adapter folder.</param>
        /// <param name="adapter_name">The name the adapter gets in the model.</param>
        /// <param name="merge">Fold the adapter into the weights at once (for inference, and for ports whose layers
        /// cannot run an adapter: see the class remarks); for a model's first adapter only.</param>
        /// <param name="is_trainable">Let the adapter, its <c>modules_to_save</c> and the biases <c>bias</c> names train
        /// while it is active, as after <see cref="Inject"/>. False (PEFT's default): frozen, for inference.</param>
        /// <returns>The adapted module paths.</returns>
        /// <exception cref="InvalidOperationException">The file's keys, shapes, dtypes or values do not fit the model, an
        /// update is not finite in its layer's dtype, or a merge would not be finite; nothing changed.</exception>
        /// <exception cref="CheckpointFormatException">A file of the folder cannot be read as what it should be; the message
        /// names the file, the key and the rule.</exception>
        /// <exception cref="NotSupportedException">The config uses a PEFT feature this library does not implement.</exception>
        /// <exception cref="ArgumentException">The config matches no layer of this model, the model has an adapter of that
        /// name, the adapter and one of the model's both have a <c>bias</c> other than <c>none</c> (PEFT's rule: one such
        /// adapter per model), or <paramref name="merge"/> is asked for a second adapter.</exception>
        /// <exception cref="FileNotFoundException">The folder lacks a file.</exception>
        public static IReadOnlyList<string> load_adapter(nn.Module model, string directory, string adapter_name = DefaultAdapter, bool merge = false, bool is_trainable = false)
        {
            ArgumentNullException.ThrowIfNull(model);
            ArgumentNullException.ThrowIfNull(directory);
            CheckNewName(model, adapter_name, nameof(load_adapter));
            var state = TryStateOf(model, nameof(load_adapter));
            CheckNoScope(state, nameof(load_adapter));
            CheckSlots(state, nameof(load_adapter));
            if (merge && state is not null)
                throw new ArgumentException($"LoraModel.load_adapter: merge: true is for a model's first adapter; this model has {string.Join(", ", state.Adapters.Select(a => a.Name))}: load '{adapter_name}' unmerged, then set_adapter and merge_adapter.", nameof(merge));
            string configFile = Path.Combine(directory, PeftFolder.ConfigFile);
            var config = LoraConfig.from_pretrained(configFile);
            CheckOneBias(state, config, adapter_name, nameof(load_adapter));
            var targets = Targets(model, config, state, $"LoraModel.load_adapter: {configFile}", error => new CheckpointFormatException(configFile, error.Rule, error.Key));
            SetFanInFanOutAsPeft(config, targets);
            string file = PeftFolder.AdapterFile(directory);
            var tensors = StateDicts.ReadPyTorchFile(file);
            var built = new List<IAdapter>();
            try
            {
                var plan = PeftFolder.Plan(model, config, targets, tensors, file, state);
                foreach (var target in targets)
                {
                    using var noGrad = no_grad();
                    var adapter = target.Type.Create(target.Module, target.Rank, target.Alpha, config, draw: false);
                    built.Add(adapter);
                    adapter.Name = adapter_name;
                    var parts = target.Type.FileParts.ToDictionary(p => p.Part);
                    foreach (var (part, value) in adapter.Tensors())
                        value.copy_(tensors[PeftFolder.Key(target.Path, parts[part])]);
                }
                var overflowing = targets.Zip(built).Where(t => !t.Second.UpdateFinite(t.First.Weight)).Select(t => UpdateProblem(t.First, t.Second, t.First.Weight.dtype)).ToList();
                if (overflowing.Count > 0)
                    throw new InvalidOperationException($"LoraModel.load_adapter: refused {file}, nothing was changed: {string.Join("; ", overflowing)}.");
                if (merge)
                {
                    var failing = targets.Zip(built).Where(t => !t.Second.MergesFinite(t.First.Weight)).Select(t => t.First.Path).ToList();
                    if (failing.Count > 0)
                        throw new InvalidOperationException($"LoraModel.load_adapter: refused {file}, nothing was changed: merging it would put NaN or infinity into the weights of {string.Join(", ", failing)}.");
                }

                // Everything is checked: from here on the model changes.
                state ??= new AdaptedModel(model);
                var entry = new AdapterEntry
                {
                    Name = adapter_name, Config = config, Trainable = is_trainable,
                    FileDtypes = tensors.ToDictionary(kv => kv.Key, kv => kv.Value.dtype),
                };
                Install(model, state, entry, targets, built, plan.Where(p => p.SavedModule is not null).Select(p => (p.SavedModule!, p.NameInModule, tensors[p.Key])).ToList());
                built.Clear();
                using (no_grad())
                {
                    foreach (var step in plan.Where(p => p.SavedModule is null))
                        step.Destination.copy_(tensors[step.Key]);
                }
                if (merge)
                    MergeAll(state, nameof(load_adapter), new[] { adapter_name });
                return targets.Select(t => t.Path).ToList();
            }
            finally
            {
                foreach (var adapter in built)
                    adapter.Dispose();
                foreach (var tensor in tensors.Values)
                    tensor.Dispose();
            }
        }

        /// <summary>
        /// Writes the model's adapters as PEFT's <c>save_pretrained</c> does: the <c>default</c> adapter into
        /// <paramref name="directory"/>, every other one into a sub-folder named after it, each with its
        /// <c>adapter_config.json</c> and <c>adapter_model.safetensors</c> holding PEFT's keys — no adapter name inside
        /// them: <c>base_model.model.&lt;path&gt;.lora_A.weight</c> / <c>.lora_B.weight</c>, <c>.lora_magnitude_vector</c>
        /// (DoRA), <c>.lora_embedding_A</c> / <c>_B</c>, the biases its <c>bias</c> mode trains (an adapted layer's as
        /// <c>&lt;path&gt;.base_layer.bias</c>, the key PEFT reads; any other under its own name), and its
        /// <c>modules_to_save</c> values under their plain names. Tensors loaded from a file are written in its dtypes.
        /// </summary>
        /// <param name="model">The adapted model.</param>
        /// <param name="directory">The folder.</param>
        /// <param name="selected_adapters">The adapters to write; all by default.</param>
        /// <exception cref="InvalidOperationException">The model has no adapters.</exception>
        /// <exception cref="ArgumentException">A selected adapter is not one of the model's.</exception>
        public static void save_pretrained(nn.Module model, string directory, IReadOnlyList<string>? selected_adapters = null)
        {
            PeftModel.For(model, nameof(save_pretrained)).save_pretrained(directory, selected_adapters);
        }

        /// <summary>The old name of <c>save_pretrained</c>, which it calls.</summary>
        [Obsolete("use LoraModel.save_pretrained")]
        public static void save_adapter(nn.Module model, string directory, IReadOnlyList<string>? selected_adapters = null) =>
            save_pretrained(model, directory, selected_adapters);

        // ---- Which adapters run ---------------------------------------------------------------------------------------

        /// <summary>
        /// Makes <paramref name="adapter_names"/> the active adapters (PEFT's <c>set_adapter</c>; several add up, in this
        /// order): their <c>modules_to_save</c> values go into the model (the first active adapter's, for a module several
        /// save), the adapters made to train (inject, or loaded with is_trainable) require grad, every other adapter is
        /// frozen. Merged adapters are unmerged first, bit for bit, as PEFT does.
        /// </summary>
        /// <exception cref="ArgumentException">No name is given, or one is not an adapter of the model; nothing changed.</exception>
        /// <exception cref="InvalidOperationException">The model has no adapters.</exception>
        public static void set_adapter(nn.Module model, params string[] adapter_names)
        {
            PeftModel.For(model, nameof(set_adapter)).set_adapter(adapter_names);
        }

        /// <summary>The active adapters, in order (PEFT's <c>active_adapters</c>).</summary>
        /// <exception cref="InvalidOperationException">The model has no adapters.</exception>
        public static IReadOnlyList<string> active_adapters(nn.Module model)
        {
            return PeftModel.For(model, nameof(active_adapters)).active_adapters;
        }

        /// <summary>Every adapter of the model and a copy of its config, in the order they were added (PEFT's <c>peft_config</c>).</summary>
        /// <exception cref="InvalidOperationException">The model has no adapters.</exception>
        public static IReadOnlyDictionary<string, LoraConfig> peft_config(nn.Module model)
        {
            return PeftModel.For(model, nameof(peft_config)).peft_config;
        }

        /// <summary>
        /// Takes one adapter out of every layer and frees it (PEFT's <c>delete_adapter</c>). If it was active, the other
        /// active adapters stay so; if none is left active, the first remaining adapter by name becomes active, as in
        /// PEFT. Deleting the last adapter gives back the plain model, as <see cref="unload"/> does.
        /// </summary>
        /// <exception cref="ArgumentException">The model has no adapter of that name; nothing changed.</exception>
        /// <exception cref="InvalidOperationException">The model has no adapters, or the adapter is merged (unmerge_adapter first, as PEFT asks).</exception>
        public static void delete_adapter(nn.Module model, string adapter_name)
        {
            PeftModel.For(model, nameof(delete_adapter)).delete_adapter(adapter_name);
        }

        /// <summary>
        /// Runs the model's calls within the returned scope with one adapter per row (PEFT's <c>adapter_names</c>
        /// argument): row i of every adapted layer's input gets the update of <c>adapter_names[i]</c>, or none for
        /// <see cref="BaseModel"/> (<c>"__base__"</c>) and in layers that adapter does not adapt — for each row what that row
        /// alone gives with its adapter active, within a few ULP (a GEMM's rows depend in their last bits on the batch),
        /// computed per layer in one pass per adapter or, for few adapters of small rank, in one stacked pair of products
        /// (see docs/lora.md). Not a loop over rows. For inference: as in PEFT, not with merged or DoRA adapters.
        /// </summary>
        /// <param name="model">The adapted model.</param>
        /// <param name="adapter_names">One adapter name (or <c>"__base__"</c>) per row of the batch, in order.</param>
        /// <exception cref="ArgumentException">A name is neither an adapter of the model nor <c>"__base__"</c>, or a named
        /// adapter is DoRA, or saves modules (<c>modules_to_save</c>); the message names them.</exception>
        /// <exception cref="InvalidOperationException">The model has no adapters, adapters are merged, or the model is in
        /// training mode (as PEFT; a call of the model in training mode within the scope is refused too).</exception>
        public static IDisposable MixedBatch(nn.Module model, IReadOnlyList<string> adapter_names)
        {
            return PeftModel.For(model, nameof(MixedBatch)).MixedBatch(adapter_names);
        }

        /// <summary>The old name of <c>MixedBatch</c>, which it calls.</summary>
        [Obsolete("use LoraModel.MixedBatch")]
        public static IDisposable mixed_batch(nn.Module model, IReadOnlyList<string> adapter_names) =>
            MixedBatch(model, adapter_names);

        /// <summary>
        /// A new adapter <paramref name="adapter_name"/> made of others, as PEFT's <c>add_weighted_adapter</c> makes it
        /// (added inactive and frozen; <see cref="set_adapter"/> runs it). <c>linear</c> (the adapters' ranks equal):
        /// A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ and B = Σ √|wᵢsᵢ|·Bᵢ, where sᵢ is adapter i's scaling — a combination of the factors,
        /// not of the updates, as in PEFT; <c>cat</c>: A = [w₁s₁A₁; w₂s₂A₂; ...] and B = [B₁ B₂ ...] (rank the sum of the
        /// ranks), exactly Σ wᵢ·ΔWᵢ; <c>svd</c>: the best rank-<paramref name="svd_rank"/> factors (by default the largest
        /// rank) of Σ wᵢsᵢ·ΔWᵢ — PEFT weighs each update, which already holds its scaling, by its scaling again, and so does
        /// this, so that adapters combined here and by PEFT agree. The new adapter has lora_alpha = r (scaling 1), the
        /// first adapter's settings, and the union of their targets.
        /// </summary>
        /// <exception cref="ArgumentException">An adapter is unknown, the new name is taken, the weights do not pair with the
        /// adapters or are not finite, the ranks differ for <c>linear</c>, an adapter is DoRA, several save the same module,
        /// or their target_modules are of different kinds; nothing changed.</exception>
        /// <exception cref="NotSupportedException">Another combination_type (ties, dare_*, magnitude_prune*), or svd of Conv1d adapters (PEFT 0.18.1 fails on them); nothing changed.</exception>
        public static void add_weighted_adapter(nn.Module model, IReadOnlyList<string> adapters, IReadOnlyList<double> weights, string adapter_name,
                                                string combination_type = CombinationType.Svd, int? svd_rank = null)
        {
            PeftModel.For(model, nameof(add_weighted_adapter)).add_weighted_adapter(adapters, weights, adapter_name, combination_type, svd_rank);
        }

        /// <summary>The shape that puts one weight per stacked factor: (-1, 1, ..., 1), one 1 per dimension of a factor.</summary>
        internal static long[] PerFactor(long dimensions)
        {
            var shape = Enumerable.Repeat(1L, (int)dimensions + 1).ToArray();
            shape[0] = -1;
            return shape;
        }

        /// <summary>Fills a new adapter with the combination of <paramref name="parts"/> (PEFT's formulas, see add_weighted_adapter).</summary>
        internal static void Combine(ILoraLayerType type, IAdapter target, List<(IAdapter Adapter, double Weight)> parts, string combination, int rank, string path)
        {
            using var scope = NewDisposeScope();
            static (Tensor A, Tensor B) Factors(IAdapter a) => a.Factors;
            var (targetA, targetB) = Factors(target);
            targetA.zero_();
            targetB.zero_();
            if (parts.Count == 0)
                return;
            ScalarType dtype = targetA.dtype;
            switch (combination)
            {
                case "cat":
                {
                    Tensor a = cat(parts.Select(p => Factors(p.Adapter).A * p.Weight * p.Adapter.scaling).ToList(), 0);
                    Tensor b = cat(parts.Select(p => Factors(p.Adapter).B).ToList(), 1);
                    targetA.narrow(0, 0, a.size(0)).copy_(a);
                    targetB.narrow(1, 0, b.size(1)).copy_(b);
                    break;
                }
                case "linear":
                {
                    // PEFT's task_arithmetic: the tensors stacked, times float32 weights, summed.
                    var weightsA = parts.Select(p => p.Weight * p.Adapter.scaling).Select(w => (float)(Math.Sqrt(Math.Abs(w)) * (w >= 0 ? 1 : -1))).ToArray();
                    var weightsB = parts.Select(p => (float)Math.Sqrt(Math.Abs(p.Weight * p.Adapter.scaling))).ToArray();
                    Tensor a = stack(parts.Select(p => Factors(p.Adapter).A).ToList()).mul(tensor(weightsA).to(targetA.device).view(PerFactor(targetA.dim()))).sum(0L).to(dtype);
                    Tensor b = stack(parts.Select(p => Factors(p.Adapter).B).ToList()).mul(tensor(weightsB).to(targetB.device).view(PerFactor(targetB.dim()))).sum(0L).to(dtype);
                    targetA.copy_(a);
                    targetB.copy_(b);
                    break;
                }
                default:
                {
                    if (dtype is not (ScalarType.Float32 or ScalarType.Float64))
                        throw new NotSupportedException($"LoraModel.add_weighted_adapter: {path} is {dtype}; the svd combination needs float32 or float64 layers.");
                    var weightsSvd = tensor(parts.Select(p => (float)(p.Weight * p.Adapter.scaling)).ToArray()).to(targetA.device);
                    Tensor deltas = stack(parts.Select(p => p.Adapter.get_delta_weight()).ToList());
                    Tensor delta = type.DeltaMatrix(deltas.mul(weightsSvd.to(deltas.dtype).view(PerFactor(deltas.dim() - 1))).sum(0L));
                    var (u, s, vh) = linalg.svd(delta, fullMatrices: true);
                    int k = (int)Math.Min(rank, s.size(0));
                    Tensor left = u.narrow(1, 0, k).matmul(diag(s.narrow(0, 0, k)));
                    // A layer type whose factors are not matrices (a convolution's kernels) gets them in its own shapes.
                    Tensor intoB = targetB.narrow(1, 0, k), intoA = targetA.narrow(0, 0, k);
                    intoB.copy_(left.reshape(intoB.shape));
                    intoA.copy_(vh.narrow(0, 0, k).reshape(intoA.shape));
                    break;
                }
            }
        }

        // ---- Merging, disabling, taking adapters out -------------------------------------------------------------------

        /// <summary>
        /// Folds adapters into their layers' weights (<c>W += Δ</c>; DoRA's rescaled <c>W + Δ</c>): the active ones, or
        /// <paramref name="adapter_names"/> (PEFT's <c>merge_adapter</c>). Like PEFT's <c>safe_merge</c>, every update is
        /// checked before any weight is written: nothing is merged if one merged weight would hold NaN or infinity. Merged
        /// adapters no longer run in the forward until <see cref="unmerge_adapter"/>; each weight before merging is kept for an
        /// exact unmerge.
        /// </summary>
        /// <exception cref="InvalidOperationException">The model has no adapters, a merged weight would not be finite, or a merge
        /// would leave an active adapter of a layer with a DoRA adapter running unmerged, or go in beside one merged before
        /// there; nothing was written.</exception>
        /// <exception cref="ArgumentException">A name is not an adapter of the model.</exception>
        public static void merge_adapter(nn.Module model, IReadOnlyList<string>? adapter_names = null)
        {
            PeftModel.For(model, nameof(merge_adapter)).merge_adapter(adapter_names);
        }

        /// <summary>The old name of <c>merge_adapter</c>, which it calls.</summary>
        [Obsolete("use LoraModel.merge_adapter")]
        public static void merge(nn.Module model, IReadOnlyList<string>? adapter_names = null) =>
            merge_adapter(model, adapter_names);

        /// <summary>Takes every merged adapter out of the weights again, last merged first, restoring each weight bit for bit (PEFT's <c>unmerge_adapter</c>).</summary>
        /// <exception cref="InvalidOperationException">The model has no adapters.</exception>
        public static void unmerge_adapter(nn.Module model)
        {
            PeftModel.For(model, nameof(unmerge_adapter)).unmerge_adapter();
        }

        /// <summary>The old name of <c>unmerge_adapter</c>, which it calls.</summary>
        [Obsolete("use LoraModel.unmerge_adapter")]
        public static void unmerge(nn.Module model) =>
            unmerge_adapter(model);

        /// <summary>
        /// The active adapters (or <paramref name="adapter_names"/>) folded into the weights, and every adapter taken out:
        /// the model is a plain model again, of its own types and in its own fields, with their updates in its weights and
        /// its <c>modules_to_save</c> modules as the active adapter trained them (PEFT's <c>merge_and_unload</c>).
        /// </summary>
        /// <exception cref="InvalidOperationException">The model has no adapters, an update would not be finite, or, in a layer
        /// with a DoRA adapter, an adapter to fold is not active or one was merged before; nothing was changed.</exception>
        /// <exception cref="ArgumentException">A name is not an adapter of the model.</exception>
        public static void merge_and_unload(nn.Module model, IReadOnlyList<string>? adapter_names = null)
        {
            PeftModel.For(model, nameof(merge_and_unload)).merge_and_unload(adapter_names);
        }

        /// <summary>
        /// Every adapter taken out without merging: the adapted weights are the base model's again (merged ones are
        /// restored bit for bit), and the <c>modules_to_save</c> modules hold the values they had before any adapter.
        /// (PEFT's <c>unload</c> keeps the trained <c>modules_to_save</c> copies; this gives back the base model, as its
        /// documentation promises. <see cref="merge_and_unload"/> keeps them.)
        /// </summary>
        /// <exception cref="InvalidOperationException">The model has no adapters.</exception>
        public static void unload(nn.Module model)
        {
            PeftModel.For(model, nameof(unload)).unload();
        }

        /// <summary>
        /// Runs without any adapter until the returned scope is disposed, as PEFT's <c>disable_adapter()</c>: no low-rank
        /// updates — merged adapters are taken out of the weights for the while, bit for bit, and put back after — and
        /// <c>modules_to_save</c> modules with their original values. No adapter tensor (A, B, DoRA's magnitude, an
        /// embedding's A and B) requires grad within the scope, as with PEFT's <c>enable_adapters(False)</c>, and each gets
        /// exactly its own flag back after (PEFT's re-enabling makes the active adapters trainable, even ones loaded for
        /// inference). Biases trained with <c>bias</c> = all or lora_only are
        /// the base layers' own and stay trained (PEFT warns of the same).
        /// </summary>
        /// <exception cref="InvalidOperationException">The model has no adapters.</exception>
        public static IDisposable disable_adapter(nn.Module model)
        {
            return PeftModel.For(model, nameof(disable_adapter)).disable_adapter();
        }

        /// <summary>The old name of <c>disable_adapter</c>, which it calls.</summary>
        [Obsolete("use LoraModel.disable_adapter")]
        public static IDisposable disable_adapters(nn.Module model) =>
            disable_adapter(model);

        // ---- Training ---------------------------------------------------------------------------------------------------

        /// <summary>
        /// Freezes everything but the active adapters, as PEFT and loralib do (and makes those train from now on);
        /// <c>modules_to_save</c> modules train in full; <paramref name="bias"/> (by default each adapter's config's)
        /// <c>all</c> also trains every bias, <c>lora_only</c> the biases of the adapted layers.
        /// </summary>
        /// <exception cref="ArgumentException"><paramref name="bias"/> is not <c>none</c>, <c>all</c> or <c>lora_only</c>.</exception>
        /// <exception cref="InvalidOperationException">The model has no adapters.</exception>
        public static void mark_only_lora_as_trainable(nn.Module model, string? bias = null)
        {
            PeftModel.For(model, nameof(mark_only_lora_as_trainable)).mark_only_lora_as_trainable(bias);
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
        public static void CheckAdaptersRun(nn.Module<Tensor, Tensor> model, Tensor example)
        {
            ArgumentNullException.ThrowIfNull(model);
            ArgumentNullException.ThrowIfNull(example);
            CheckAdaptersRun(model, () =>
            {
                using var scope = NewDisposeScope();
                model.forward(example);
            });
        }

        /// <summary>The old name of <c>CheckAdaptersRun</c>, which it calls.</summary>
        [Obsolete("use LoraModel.CheckAdaptersRun")]
        public static void check_adapters_run(nn.Module<Tensor, Tensor> model, Tensor example) =>
            CheckAdaptersRun(model, example);

        /// <summary>
        /// As <see cref="check_adapters_run(nn.Module{Tensor, Tensor}, Tensor)"/>, for a model whose forward takes other
        /// arguments: <paramref name="forward"/> runs it once (under no_grad here).
        /// </summary>
        public static void CheckAdaptersRun(nn.Module model, Action forward)
        {
            ArgumentNullException.ThrowIfNull(forward);
            PeftModel.For(model, nameof(CheckAdaptersRun)).CheckAdaptersRun(forward);
        }

        /// <summary>The old name of <c>CheckAdaptersRun</c>, which it calls.</summary>
        [Obsolete("use LoraModel.CheckAdaptersRun")]
        public static void check_adapters_run(nn.Module model, Action forward) =>
            CheckAdaptersRun(model, forward);

        /// <summary>
        /// The opt-out for a model whose forward legitimately skips some adapted layers (a head chosen per task, an
        /// early exit): their adapters may not run in a model call. With no path, every adapted layer may be skipped,
        /// and the model's check is off.
        /// </summary>
        /// <exception cref="ArgumentException">A path is not an adapted layer of the model.</exception>
        public static void AllowUnusedAdapters(nn.Module model, params string[] paths)
        {
            PeftModel.For(model, nameof(AllowUnusedAdapters)).AllowUnusedAdapters(paths);
        }

        /// <summary>The old name of <c>AllowUnusedAdapters</c>, which it calls.</summary>
        [Obsolete("use LoraModel.AllowUnusedAdapters")]
        public static void allow_unused_adapters(nn.Module model, params string[] paths) =>
            AllowUnusedAdapters(model, paths);

        // ---- The pieces ---------------------------------------------------------------------------------------------------

        /// <summary>
        /// Puts a new adapter's pieces into the model: each target's host (made when the layer has none yet), the entry,
        /// its <c>modules_to_save</c> values (from <paramref name="savedValues"/>, else the originals), the active set (a
        /// model's first adapter becomes active), then which parameters train. Nothing here can fail on the model's data.
        /// </summary>
        internal static void Install(nn.Module model, AdaptedModel state, AdapterEntry entry, List<Target> targets, List<IAdapter> adapters,
                                    List<(string Module, string Name, Tensor Value)>? savedValues = null)
        {
            for (int i = 0; i < targets.Count; i++)
            {
                var layer = targets[i].Existing;
                if (layer is null)
                {
                    layer = Attach(targets[i]);
                    state.Add(layer);
                }
                layer.Add(adapters[i]);
            }
            state.AddEntry(entry);
            Track(state);
            KeepOriginals(model, state, entry);
            if (savedValues is not null)
            {
                foreach (var group in savedValues.GroupBy(v => v.Module))
                {
                    var saved = state.Saved.FirstOrDefault(m => m.Path == group.Key)
                        ?? throw new InvalidOperationException($"LoraModel: {group.Key} holds tensors of the file as a modules_to_save module, but is not one of the model's.");
                    var values = saved.Originals.Select(o => (o.Name, Value: SavedModule.Copy(group.FirstOrDefault(g => g.Name == o.Name).Value ?? o.Value))).ToList();
                    if (saved.ByAdapter.TryGetValue(entry.Name, out var old))
                    {
                        foreach (var (_, value) in old)
                            value.Dispose();
                    }
                    saved.ByAdapter[entry.Name] = values;
                }
            }
            if (state.Active.Count == 0)
                state.Active.Add(entry.Name);
            state.InstallRootHooks();
            Refresh(model, state, freezeBase: true);
        }

        /// <summary>
        /// Finds every modules_to_save module of the adapter's config, keeping a copy of its values before any adapter (the
        /// first time) and giving the adapter its own copy of them to train (as PEFT's ModulesToSaveWrapper deep-copies the
        /// original module for each adapter).
        /// </summary>
        internal static void KeepOriginals(nn.Module model, AdaptedModel state, AdapterEntry entry)
        {
            foreach (var (path, module) in model.named_modules())
            {
                if (!ModuleMatching.IsModuleToSave(entry.Config, path))
                    continue;
                // A saved module inside another saved module is saved with that one.
                if (state.Saved.Any(s => path.StartsWith(s.Path + ".", StringComparison.Ordinal)))
                    continue;
                var saved = state.Saved.FirstOrDefault(s => s.Path == path);
                if (saved is null)
                {
                    saved = new SavedModule { Path = path, Module = module, Originals = module.state_dict().Select(kv => (kv.Key, SavedModule.Copy(kv.Value))).ToList() };
                    state.Saved.Add(saved);
                }
                saved.Adapters.Add(entry.Name);
                saved.ByAdapter[entry.Name] = saved.Originals.Select(o => (o.Name, SavedModule.Copy(o.Value))).ToList();
            }
        }

        /// <summary>
        /// After any change of the adapters or the active set: each saved module holds its owner's values, and which
        /// parameters train follows. <paramref name="freezeBase"/> (an adapter put in, as PEFT's <c>inject_adapter</c> calls
        /// <c>_mark_only_adapters_as_trainable</c>) freezes every other parameter of the model too; otherwise
        /// (<c>set_adapter</c>, <c>delete_adapter</c>, which in PEFT touch the adapters only) only the adapters' own
        /// parameters are set (<see cref="MarkTrainable"/>), and a base parameter the user unfroze stays unfrozen.
        /// </summary>
        internal static void Refresh(nn.Module model, AdaptedModel state, bool freezeBase)
        {
            if (!state.Disabled)
            {
                foreach (var saved in state.Saved)
                    saved.Switch(state.Active.FirstOrDefault(saved.Adapters.Contains));
            }
            MarkTrainable(model, state, null, freezeBase);
        }

        /// <summary>
        /// PEFT's <c>_mark_only_adapters_as_trainable</c> with its <c>modules_to_save</c> and <c>set_adapter</c>: the active
        /// adapters that were made to train, the saved modules they own, and the biases their <c>bias</c> mode (or
        /// <paramref name="bias"/>) names train. With <paramref name="freezeBase"/> every other parameter of the model is
        /// frozen; without, only the parameters the adapters own are set (<see cref="Managed"/>: every adapter's tensors,
        /// every <c>modules_to_save</c> module's parameters, the biases some adapter's <c>bias</c> mode names), the rest
        /// keep their flags.
        /// </summary>
        internal static void MarkTrainable(nn.Module model, AdaptedModel state, string? bias, bool freezeBase = true)
        {
            var training = state.Active.Select(n => state.Entry(n)!).Where(e => e.Trainable).ToList();
            var names = new HashSet<string>(training.Select(e => e.Name), StringComparer.Ordinal);
            var trainable = new HashSet<IntPtr>();
            foreach (var layer in state.Layers)
            {
                foreach (var adapter in layer.Adapters.Where(a => names.Contains(a.Name)))
                {
                    foreach (var parameter in adapter.Parameters())
                        trainable.Add(parameter.Handle);
                }
            }
            foreach (var saved in state.Saved.Where(s => s.Current is not null && names.Contains(s.Current)))
            {
                foreach (var parameter in saved.Module.parameters())
                    trainable.Add(parameter.Handle);
            }
            bool allBiases = training.Any(e => (bias ?? e.Config.bias) == LoraBias.All);
            var adaptedBiases = new HashSet<string>(StringComparer.Ordinal);
            foreach (var entry in training.Where(e => (bias ?? e.Config.bias) == LoraBias.LoraOnly))
            {
                foreach (var layer in state.Layers.Where(l => l.Find(entry.Name) is not null))
                    adaptedBiases.Add(layer.Path + ".bias");
            }
            var managed = freezeBase ? null : Managed(model, state);
            foreach (var (name, parameter) in model.named_parameters())
            {
                if (managed is not null && !managed.Contains(parameter.Handle))
                    continue;
                bool isBias = IsBias(name);
                bool train = trainable.Contains(parameter.Handle) || (allBiases && isBias) || adaptedBiases.Contains(name);
                parameter.requires_grad_(train);
            }
        }

        private static bool IsBias(string name) => name == "bias" || name.EndsWith(".bias", StringComparison.Ordinal);

        /// <summary>
        /// The parameters the model's adapters own, whose flags <c>set_adapter</c> and <c>delete_adapter</c> set: every
        /// adapter's tensors, every <c>modules_to_save</c> module's parameters, and the biases an adapter's <c>bias</c> mode
        /// names (every bias for <c>all</c>, the adapted layers' for <c>lora_only</c>).
        /// </summary>
        internal static HashSet<IntPtr> Managed(nn.Module model, AdaptedModel state)
        {
            var managed = new HashSet<IntPtr>();
            foreach (var layer in state.Layers)
            {
                foreach (var adapter in layer.Adapters)
                {
                    foreach (var parameter in adapter.Parameters())
                        managed.Add(parameter.Handle);
                }
            }
            foreach (var saved in state.Saved)
            {
                foreach (var parameter in saved.Module.parameters())
                    managed.Add(parameter.Handle);
            }
            bool allBiases = state.Adapters.Any(e => e.Config.bias == LoraBias.All);
            var adaptedBiases = new HashSet<string>(StringComparer.Ordinal);
            foreach (var entry in state.Adapters.Where(e => e.Config.bias == LoraBias.LoraOnly))
            {
                foreach (var layer in state.Layers.Where(l => l.Find(entry.Name) is not null))
                    adaptedBiases.Add(layer.Path + ".bias");
            }
            if (allBiases || adaptedBiases.Count > 0)
            {
                foreach (var (name, parameter) in model.named_parameters())
                {
                    if ((allBiases && IsBias(name)) || adaptedBiases.Contains(name))
                        managed.Add(parameter.Handle);
                }
            }
            return managed;
        }

        /// <summary>Merges the named adapters wherever they are unmerged, after checking every merged weight stays finite.</summary>
        internal static void MergeAll(AdaptedModel state, string caller, IReadOnlyList<string> names, bool keep = true)
        {
            var pending = new List<(AdaptedLayer Layer, IAdapter Adapter)>();
            foreach (var layer in state.Layers)
            {
                foreach (string name in names)
                {
                    if (layer.Find(name) is { merged: false } adapter)
                        pending.Add((layer, adapter));
                }
            }
            // An unmerged DoRA adapter rescales what the layer computed so far (the base and the adapters before it in the
            // active order) by m / ‖W₀ + ΔW‖, W₀ the weight without adapters. Merged in that order, each DoRA norm taken
            // from W₀ (huggingface/peft#3609; PEFT 0.18.1 takes it from the weight with the others merged, #3608), the
            // layer computes what its adapters computed unmerged. So a layer with a DoRA adapter merges only all of its
            // active adapters at once, in the active order, with nothing merged there before; anything else (a DoRA
            // adapter beside one merged earlier, or one left running unmerged beside a merged one) would compute
            // something else, and is refused. Without keep (merge_and_unload) what is not merged is dropped.
            var activeIndex = state.Active.Select((n, i) => (n, i)).ToDictionary(p => p.n, p => p.i, StringComparer.Ordinal);
            pending = pending.GroupBy(p => p.Layer)
                .SelectMany(g => g.OrderBy(p => activeIndex.TryGetValue(p.Adapter.Name, out int i) ? i : int.MaxValue))
                .ToList();
            var partialMerges = new List<string>();
            foreach (var group in pending.GroupBy(p => p.Layer))
            {
                var merging = group.Select(p => p.Adapter).ToList();
                var running = state.Active.Select(n => group.Key.Find(n)).Where(a => a is { merged: false } && !merging.Contains(a)).Select(a => a!).ToList();
                var involved = group.Key.Merged.Reverse().Concat(merging).Concat(keep ? running : Enumerable.Empty<IAdapter>()).ToList();
                if (involved.Count < 2 || involved.All(a => a.Rescaled is null))
                    continue;
                // With keep, every active adapter of the layer merges (none left running); without, the rest is dropped.
                bool wholeActiveSet = group.Key.Merged.Count == 0 && (!keep || running.Count == 0)
                    && merging.All(a => activeIndex.ContainsKey(a.Name));
                if (!wholeActiveSet)
                    partialMerges.Add($"{group.Key.Path} ({string.Join(", ", involved.Select(a => $"'{a.Name}'{(a.Rescaled is not null ? " DoRA" : "")}{(a.merged ? " merged" : merging.Contains(a) ? "" : " left unmerged")}"))})");
            }
            if (partialMerges.Count > 0)
                throw new InvalidOperationException($"LoraModel.{caller}: a merge into a layer where a DoRA adapter runs beside another adapter, not as all of the layer's active adapters at once: {string.Join("; ", partialMerges)}. An unmerged DoRA adapter rescales what the layer computed before it, so such a layer merges only active adapters, all of them with merge_adapter, in their order, with none merged before (merge_adapter() after unmerge_adapter; merge_and_unload of active adapters); otherwise the merged layer would compute something else than the unmerged adapters; no weight was changed.");
            // Each layer's updates are checked on the weight they will be added to: a second adapter's on the first's merge.
            var failing = new List<string>();
            foreach (var group in pending.GroupBy(p => p.Layer))
            {
                if (group.Count() == 1)
                {
                    if (!group.First().Adapter.MergesFinite(group.Key.Weight))
                        failing.Add(group.Key.Path);
                    continue;
                }
                using var scope = NewDisposeScope();
                using var noGrad = no_grad();
                Tensor side = group.Key.Weight.detach().clone();
                Tensor normBase = group.Key.Weight.detach();
                foreach (var (_, adapter) in group)
                    adapter.ApplyMerge(side, normBase);
                if (!isfinite(side).all().item<bool>())
                    failing.Add(group.Key.Path);
            }
            if (failing.Count > 0)
                throw new InvalidOperationException($"LoraModel.{caller}: merging the updates of {string.Join(", ", failing.Distinct())} would put NaN or infinity into its weight; no weight was changed.");
            foreach (var group in pending.GroupBy(p => p.Layer))
            {
                var layer = group.Key;
                // The weight before this merge, for DoRA's norms, where a DoRA adapter merges beside others.
                using Tensor? normBase = group.Count() > 1 && group.Any(p => p.Adapter.Rescaled is not null) ? layer.Weight.detach().clone() : null;
                foreach (var (_, adapter) in group)
                {
                    adapter.MergeChecked(layer.Weight, keep, normBase);
                    layer.Merged.Push(adapter);
                }
            }
        }

        internal static void UnmergeAll(AdaptedModel state)
        {
            foreach (var layer in state.Layers)
            {
                while (layer.Merged.Count > 0)
                    layer.Merged.Pop().unmerge(layer.Weight);
            }
        }

        /// <summary>Takes one adapted layer (whose adapters are gone) out of the model: the original layer is where it was.</summary>
        internal static void RemoveLayer(AdaptedModel state, AdaptedLayer layer)
        {
            layer.Unregister();
            layer.Detach();
            state.Layers.Remove(layer);
            for (int i = 0; i < state.Layers.Count; i++)
                state.Layers[i].RunIndex = i;
        }

        /// <summary>Takes every adapter out of the model and frees it; the layers are the model's own again.</summary>
        internal static void RemoveAll(AdaptedModel state)
        {
            foreach (var layer in state.Layers.ToList())
            {
                foreach (var adapter in layer.Adapters.ToList())
                    layer.Remove(adapter);
                layer.Unregister();
                layer.Detach();
            }
            state.Layers.Clear();
            state.Release();
        }

        /// <summary>
        /// Refuses an operation that merges, unmerges, adds or takes out adapters while a <see cref="MixedBatch"/> or
        /// <see cref="disable_adapter"/> scope of the model is open: a mixed batch runs unmerged adapters only (as PEFT
        /// checks at every forward), and the end of each scope restores what it saw at its start (the merged adapters, the
        /// adapter tensors' requires_grad, the batch of the thread), which such an operation would change under it.
        /// </summary>
        internal static void CheckNoScope(AdaptedModel? state, string caller)
        {
            if (state is null)
                return;
            if (state.MixedScopes > 0)
                throw new InvalidOperationException($"LoraModel.{caller}: a LoraModel.MixedBatch scope of this model is open, and its rows run unmerged adapters only: dispose the scope first; nothing changed.");
            if (state.DisableScopes > 0)
                throw new InvalidOperationException($"LoraModel.{caller}: a disable_adapter scope of this model is open, and its end puts back the merged adapters and each adapter tensor's requires_grad as they were: dispose the scope first; nothing changed.");
        }

        /// <summary>
        /// Refuses an operation on the model's adapters while an adapted <see cref="CustomLinear"/> or <see cref="Conv1D"/>
        /// whose own <c>Adapter</c> slot hosts them no longer holds the delegate the library put there (code outside it set
        /// the slot to null or to another delegate): the layer runs without its adapters while they are reported active,
        /// and anything done to them would not be what the model runs. The one check of every such operation (through
        /// <see cref="PeftModel"/>'s, and <see cref="Inject"/>'s and <see cref="load_adapter"/>'s own); <see cref="unload"/>
        /// is the way out and leaves such a slot as that code set it.
        /// </summary>
        internal static void CheckSlots(AdaptedModel? state, string caller)
        {
            if (state is null)
                return;
            var lost = state.Layers.Where(l => l.SlotLost).ToList();
            if (lost.Count == 0)
                return;
            string Describe(AdaptedLayer layer) =>
                $"{layer.Path} (a {layer.Type.Name} with adapters {string.Join(", ", layer.Adapters.Select(a => $"'{a.Name}'"))}; its slot holds {(layer.Type.Slot(layer.Module) is null ? "null" : "another delegate")})";
            throw new InvalidOperationException(
                $"LoraModel.{caller}: the Adapter slot of {string.Join("; ", lost.Select(Describe))} no longer holds the adapter TorchLinear.Lora put there: " +
                "code outside the library set it, so the layer runs without its adapters while they are reported active; nothing changed. " +
                "Put the library's delegate back into the slot, or call unload (which takes every adapter out and leaves such a slot as that code set it).");
        }

        internal static void CheckKnown(AdaptedModel state, IEnumerable<string> names, string caller)
        {
            var unknown = names.Where(n => n is null || state.Entry(n) is null).Select(n => n is null ? "null" : $"'{n}'").ToList();
            if (unknown.Count > 0)
                throw new ArgumentException($"LoraModel.{caller}: {string.Join(", ", unknown)} {(unknown.Count == 1 ? "is" : "are")} not an adapter of this model (its adapters: {string.Join(", ", state.Adapters.Select(a => a.Name))}); nothing changed.");
        }

        /// <summary>
        /// PEFT's <c>BaseTuner._check_new_adapter_config</c>: a model holds at most one adapter whose <c>bias</c> is not
        /// <c>none</c> (the biases are the base layers' own, one set for all adapters).
        /// </summary>
        internal static void CheckOneBias(AdaptedModel? state, LoraConfig config, string adapter_name, string caller)
        {
            if (state is null || config.bias == LoraBias.None)
                return;
            var others = state.Adapters.Where(a => a.Config.bias != LoraBias.None).ToList();
            if (others.Count > 0)
                throw new ArgumentException(
                    $"LoraModel.{caller}: '{adapter_name}' has bias \"{config.bias}\", and {string.Join(", ", others.Select(o => $"'{o.Name}' has bias \"{o.Config.bias}\""))} already: " +
                    "a model holds at most one adapter with a bias other than \"none\" (as PEFT: \"supports only 1 adapter with bias. When using multiple adapters, set bias to 'none' for all adapters.\"); nothing changed.", "config");
        }

        /// <summary>What is not finite in an adapter's update, naming the layer, its file keys, the scaling and the dtype.</summary>
        internal static string UpdateProblem(Target target, IAdapter adapter, ScalarType dtype)
        {
            string scale = string.Create(CultureInfo.InvariantCulture, $"(lora_alpha {adapter.lora_alpha}, r {adapter.r}, scaling {adapter.scaling})");
            var parts = target.Type.FileParts.ToDictionary(p => p.Part);
            if (adapter.Rescaled is { } rescaled && adapter.DeltaFinite())
                return $"{rescaled.Formula} of {target.Path} ('{PeftFolder.Key(target.Path, parts[rescaled.Part])}') is not finite in {dtype} {scale}";
            var factors = adapter.Tensors().Take(2).Select(t => $"'{PeftFolder.Key(target.Path, parts[t.Part])}'");
            return $"scaling · B A of {target.Path} ({string.Join(", ", factors)}) is not finite in {dtype} {scale}";
        }

        /// <summary>A new adapter's name must be usable in keys and folder names, and not the model's already.</summary>
        internal static void CheckNewName(nn.Module model, string adapter_name, string caller)
        {
            ArgumentNullException.ThrowIfNull(adapter_name);
            if (adapter_name.Length == 0 || adapter_name.IndexOfAny(new[] { '.', '/', '\\' }) >= 0 || adapter_name == BaseModel || adapter_name.Any(char.IsControl))
                throw new ArgumentException($"LoraModel.{caller}: '{adapter_name}' cannot name an adapter: a name is non-empty, without '.', '/' or '\\' (it is part of state_dict keys and of a folder name), and not \"{BaseModel}\".", nameof(adapter_name));
            if (TryStateOf(model, caller) is { } state && state.Entry(adapter_name) is not null)
                throw new ArgumentException($"LoraModel.{caller}: the model has an adapter named '{adapter_name}' already (its adapters: {string.Join(", ", state.Adapters.Select(a => a.Name))}): delete_adapter it first, or choose another adapter_name.", nameof(adapter_name));
        }

        /// <summary>The bookkeeping of the adapters in <paramref name="model"/>, which must be the model they were put into.</summary>
        internal static AdaptedModel StateOf(nn.Module model, string caller) =>
            TryStateOf(model, caller) ?? throw new InvalidOperationException($"LoraModel.{caller}: the model has no adapters: put one in first (Inject, get_peft_model, load_adapter or PeftModel.from_pretrained).");

        /// <summary>Each adapted model's bookkeeping, keyed by the root module the adapters were put into (weakly: it dies with the model).</summary>
        private static readonly ConditionalWeakTable<nn.Module, AdaptedModel> States = new();

        /// <summary>
        /// The bookkeeping of <paramref name="model"/>'s adapters, or null: found in constant time from the model. Only a
        /// model without adapters of its own is scanned, once, so that adapters put into a model that holds it (or that it
        /// holds) are refused by name rather than taken for none.
        /// </summary>
        internal static AdaptedModel? TryStateOf(nn.Module model, string caller)
        {
            if (States.TryGetValue(model, out var known))
            {
                if (!known.Released)
                    return known;
                States.Remove(model);
            }
            foreach (var module in model.modules())
            {
                if (module is AdapterModules { Model: { Released: false } state } && !ReferenceEquals(state.Root, model))
                    throw new InvalidOperationException($"LoraModel.{caller}: the adapters were put into a {state.Root.GetType().Name}, not into this {model.GetType().Name}: pass the model they were put into.");
            }
            return null;
        }

        /// <summary>Makes <paramref name="state"/> the bookkeeping <see cref="TryStateOf"/> finds for its root.</summary>
        internal static void Track(AdaptedModel state) => States.AddOrUpdate(state.Root, state);

        internal sealed class Restore : IDisposable
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
