using System;
using System.Collections.Generic;
using System.Globalization;
using System.IO;
using System.Linq;
using TorchSharp;
using TorchSharp.Modules;
using static TorchLinear.Lora.LoraModel;
using static TorchSharp.torch;

namespace TorchLinear.Lora
{
    /// <summary>
    /// A model with LoRA adapters, as PEFT's <c>PeftModel</c> (with its <c>LoraModel</c> tuner) holds one: the adapters and
    /// their configs (<see cref="peft_config"/>), the active set (<see cref="active_adapters"/>), and an instance method
    /// for every operation, named as PEFT names it — <see cref="set_adapter"/>, <see cref="add_adapter"/>,
    /// <see cref="load_adapter"/>, <see cref="delete_adapter"/>, <see cref="merge_adapter"/>, <see cref="unmerge_adapter"/>,
    /// <see cref="merge_and_unload"/>, <see cref="unload"/>, <see cref="disable_adapter"/>, <see cref="add_weighted_adapter"/>,
    /// <see cref="save_pretrained"/>, <see cref="get_nb_trainable_parameters"/> — and .NET names for what PEFT has not
    /// (<see cref="MixedBatch"/>, PEFT's <c>adapter_names=</c> argument of forward).
    /// </summary>
    /// <remarks>
    /// <para>Made by <see cref="LoraModel.get_peft_model"/> (a fresh adapter, as PEFT's <c>get_peft_model</c>) or
    /// <see cref="from_pretrained"/> (a PEFT folder, as PEFT's <c>PeftModel.from_pretrained</c>); <see cref="Of"/> gives the
    /// object of a model adapted through the static <see cref="LoraModel"/> calls, which are a thin layer over this one
    /// (<c>LoraModel.set_adapter(model, "x")</c> is <c>PeftModel.Of(model).set_adapter("x")</c>).</para>
    /// <para>Unlike PEFT's, this object is not a module that wraps the model: the model stays the user's own object, of its
    /// own type, and runs its adapters when called (docs/lora.md says how each layer takes them). The object is found from
    /// the model in constant time (a table keyed by the model), never by scanning its modules. Once every adapter is taken
    /// out (<see cref="unload"/>, <see cref="merge_and_unload"/>, deleting the last one), operations say the model has no
    /// adapters, until another is put in.</para>
    /// </remarks>
    public sealed class PeftModel
    {
        private AdaptedModel _state;

        private PeftModel(nn.Module model, AdaptedModel state)
        {
            Model = model;
            _state = state;
        }

        /// <summary>The adapted model itself (PEFT's <c>get_base_model()</c>): the user's own module, with the adapters in its layers.</summary>
        public nn.Module Model { get; }

        /// <summary>The model the adapters are in (PEFT's <c>get_base_model</c>); the same as <see cref="Model"/>.</summary>
        public nn.Module get_base_model() => Model;

        /// <summary>The object of a model that has adapters (put in by <see cref="LoraModel"/>'s calls or this class's).</summary>
        /// <exception cref="InvalidOperationException">The model has no adapters, or they were put into another model that holds it or that it holds.</exception>
        public static PeftModel Of(nn.Module model)
        {
            ArgumentNullException.ThrowIfNull(model);
            return For(model, nameof(Of));
        }

        internal static PeftModel For(nn.Module model, string caller)
        {
            ArgumentNullException.ThrowIfNull(model);
            var state = StateOf(model, caller);
            return state.Handle ??= new PeftModel(model, state);
        }

        /// <summary>
        /// The model's adapters, live: refused by name once none is left (PEFT would fail later, on a missing attribute),
        /// and, for an operation on them (<paramref name="operation"/>: all but the queries, <see cref="save_pretrained"/> and
        /// <see cref="unload"/>), while
        /// an adapted layer's own <c>Adapter</c> slot no longer holds the library's delegate (<see cref="CheckSlots"/>).
        /// </summary>
        private AdaptedModel Live(string caller, bool operation = true)
        {
            if (_state.Released)
                _state = StateOf(Model, caller);
            if (operation)
                CheckSlots(_state, caller);
            return _state;
        }

        /// <summary>
        /// PEFT's <c>PeftModel.from_pretrained</c>: loads the adapter folder into <paramref name="model"/>, as
        /// <see cref="LoraModel.load_adapter"/> does, and returns the model's object.
        /// </summary>
        /// <param name="model">The base model, with its pretrained weights.</param>
        /// <param name="model_id">The adapter folder (PEFT's <c>model_id</c>: here a local directory).</param>
        /// <param name="adapter_name">The name the adapter gets.</param>
        /// <param name="is_trainable">Let it train, as after <see cref="LoraModel.get_peft_model"/>; false (PEFT's default): frozen, for inference.</param>
        /// <param name="merge">Fold it into the weights at once (see <see cref="LoraModel.load_adapter"/>).</param>
        /// <exception cref="InvalidOperationException">The folder does not fit the model (every problem is named); nothing changed.</exception>
        public static PeftModel from_pretrained(nn.Module model, string model_id, string adapter_name = DefaultAdapter, bool is_trainable = false, bool merge = false)
        {
            LoraModel.load_adapter(model, model_id, adapter_name, merge, is_trainable);
            return For(model, nameof(from_pretrained));
        }

        /// <summary>PEFT's <c>add_adapter</c>: a fresh adapter of <paramref name="peft_config"/>, added inactive and frozen (as <see cref="LoraModel.Inject"/> adds a model's second adapter).</summary>
        /// <returns>The adapted module paths.</returns>
        public IReadOnlyList<string> add_adapter(string adapter_name, LoraConfig peft_config)
        {
            Live(nameof(add_adapter));
            return LoraModel.Inject(Model, peft_config, adapter_name);
        }

        /// <summary>PEFT's <c>load_adapter</c>: another adapter from a PEFT folder, added inactive (see <see cref="LoraModel.load_adapter"/>).</summary>
        /// <returns>The adapted module paths.</returns>
        public IReadOnlyList<string> load_adapter(string model_id, string adapter_name, bool is_trainable = false)
        {
            Live(nameof(load_adapter));
            return LoraModel.load_adapter(Model, model_id, adapter_name, is_trainable: is_trainable);
        }

        /// <summary>The active adapters, in order (PEFT's <c>active_adapters</c>).</summary>
        public IReadOnlyList<string> active_adapters => Live(nameof(active_adapters), operation: false).Active.ToList();

        /// <summary>Every adapter and a copy of its config, in the order they were added (PEFT's <c>peft_config</c>).</summary>
        public IReadOnlyDictionary<string, LoraConfig> peft_config
        {
            get
            {
                var configs = new Dictionary<string, LoraConfig>(StringComparer.Ordinal);
                foreach (var entry in Live(nameof(peft_config), operation: false).Adapters)
                    configs[entry.Name] = entry.Config.Clone();
                return configs;
            }
        }

        /// <summary>PEFT's <c>get_nb_trainable_parameters</c>: the number of elements in trainable parameters of the model, and in all of them.</summary>
        public (long trainable, long all) get_nb_trainable_parameters() => LoraModel.get_nb_trainable_parameters(Model);

        /// <summary>PEFT's <c>print_trainable_parameters</c> (see <see cref="LoraModel.print_trainable_parameters"/>).</summary>
        public void print_trainable_parameters() => LoraModel.print_trainable_parameters(Model);

        /// <summary>
        /// For a port that invokes the model with <c>forward(x)</c>: runs <paramref name="forward"/> once (under no_grad) and
        /// throws if an active adapter did not run in it, as a <c>call(x)</c> of the model does.
        /// </summary>
        /// <exception cref="InvalidOperationException">An adapter did not run; the message names the layers and the ways out.</exception>
        public void CheckAdaptersRun(Action forward)
        {
            ArgumentNullException.ThrowIfNull(forward);
            var state = Live("CheckAdaptersRun");
            using var noGrad = no_grad();
            state.RunChecked(forward);
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
        /// <param name="directory">The folder.</param>
        /// <param name="selected_adapters">The adapters to write; all by default.</param>
        /// <exception cref="InvalidOperationException">The model has no adapters.</exception>
        /// <exception cref="ArgumentException">A selected adapter is not one of the model's.</exception>
        public void save_pretrained(string directory, IReadOnlyList<string>? selected_adapters = null)
        {
            var model = Model;
            ArgumentNullException.ThrowIfNull(directory);
            // Saving reads the adapters' own tensors, which a lost slot leaves intact: the way to keep trained adapters
            // before unload, when the library's delegate cannot be put back.
            var state = Live("save_pretrained", operation: false);
            var names = selected_adapters ?? state.Adapters.Select(a => a.Name).ToList();
            CheckKnown(state, names, "save_pretrained");
            foreach (string name in names)
                PeftFolder.Save(state, state.Entry(name)!, model, name == DefaultAdapter ? directory : Path.Combine(directory, name));
        }

        /// <summary>
        /// Makes <paramref name="adapter_names"/> the active adapters (PEFT's <c>set_adapter</c>; several add up, in this
        /// order): their <c>modules_to_save</c> values go into the model (the first active adapter's, for a module several
        /// save), the adapters made to train (inject, or loaded with is_trainable) require grad, every other adapter is
        /// frozen. Merged adapters are unmerged first, bit for bit, as PEFT does.
        /// </summary>
        /// <exception cref="ArgumentException">No name is given, or one is not an adapter of the model; nothing changed.</exception>
        /// <exception cref="InvalidOperationException">The model has no adapters, or a <see cref="MixedBatch"/> or
        /// <see cref="disable_adapter"/> scope of it is open (whose end puts back the merged adapters and saved modules it
        /// saw at its start); nothing changed.</exception>
        public void set_adapter(params string[] adapter_names)
        {
            var model = Model;
            ArgumentNullException.ThrowIfNull(adapter_names);
            var state = Live("set_adapter");
            if (adapter_names.Length == 0)
                throw new ArgumentException($"LoraModel.set_adapter: name at least one adapter (the model's: {string.Join(", ", state.Adapters.Select(a => a.Name))}); disable_adapter runs the base model.", nameof(adapter_names));
            CheckNoScope(state, "set_adapter");
            CheckKnown(state, adapter_names, "set_adapter");
            UnmergeAll(state);
            state.Active.Clear();
            state.Active.AddRange(adapter_names.Distinct(StringComparer.Ordinal));
            Refresh(model, state, freezeBase: false);
        }

        /// <summary>
        /// Takes one adapter out of every layer and frees it (PEFT's <c>delete_adapter</c>). If it was active, the other
        /// active adapters stay so; if none is left active, the first remaining adapter by name becomes active, as in
        /// PEFT. Deleting the last adapter gives back the plain model, as <see cref="unload"/> does.
        /// </summary>
        /// <exception cref="ArgumentException">The model has no adapter of that name; nothing changed.</exception>
        /// <exception cref="InvalidOperationException">The model has no adapters, or the adapter is merged (unmerge_adapter first, as PEFT asks).</exception>
        public void delete_adapter(string adapter_name)
        {
            var model = Model;
            ArgumentNullException.ThrowIfNull(adapter_name);
            var state = Live("delete_adapter");
            CheckNoScope(state, "delete_adapter");
            CheckKnown(state, new[] { adapter_name }, "delete_adapter");
            var merged = state.Layers.Where(l => l.Find(adapter_name) is { merged: true }).Select(l => l.Path).ToList();
            if (merged.Count > 0)
                throw new InvalidOperationException($"LoraModel.delete_adapter: '{adapter_name}' is merged into {string.Join(", ", merged)}: call unmerge_adapter first; nothing changed.");
            if (state.Adapters.Count == 1)
            {
                unload();
                return;
            }
            foreach (var saved in state.Saved.Where(s => s.Adapters.Contains(adapter_name)).ToList())
            {
                if (saved.Current == adapter_name)
                    saved.Switch(null);
                saved.Drop(adapter_name);
            }
            foreach (var layer in state.Layers.ToList())
            {
                if (layer.Find(adapter_name) is { } adapter)
                    layer.Remove(adapter);
                if (layer.Adapters.Count == 0)
                    RemoveLayer(state, layer);
            }
            foreach (var saved in state.Saved.Where(s => s.Adapters.Count == 0).ToList())
            {
                saved.DisposeCopies();
                state.Saved.Remove(saved);
            }
            state.RemoveEntry(state.Entry(adapter_name)!);
            if (state.Active.Remove(adapter_name) && state.Active.Count == 0)
                state.Active.Add(state.Adapters.Select(a => a.Name).OrderBy(n => n, StringComparer.Ordinal).First());
            Refresh(model, state, freezeBase: false);
        }

        /// <summary>
        /// Runs the model's calls within the returned scope with one adapter per row (PEFT's <c>adapter_names</c>
        /// argument): row i of every adapted layer's input gets the update of <c>adapter_names[i]</c>, or none for
        /// <see cref="BaseModel"/> (<c>"__base__"</c>) and in layers that adapter does not adapt — for each row what that row
        /// alone gives with its adapter active, within a few ULP (a GEMM's rows depend in their last bits on the batch),
        /// computed per layer in one pass per adapter or, for few adapters of small rank, in one stacked pair of products
        /// (see docs/lora.md). Not a loop over rows. For inference: as in PEFT, not with merged or DoRA adapters.
        /// </summary>
        /// <param name="adapter_names">One adapter name (or <c>"__base__"</c>) per row of the batch, in order.</param>
        /// <exception cref="ArgumentException">A name is neither an adapter of the model nor <c>"__base__"</c>, or a named
        /// adapter is DoRA, or saves modules (<c>modules_to_save</c>); the message names them.</exception>
        /// <exception cref="InvalidOperationException">The model has no adapters, adapters are merged, or the model is in
        /// training mode (as PEFT; a call of the model in training mode within the scope is refused too).</exception>
        public IDisposable MixedBatch(IReadOnlyList<string> adapter_names)
        {
            var model = Model;
            ArgumentNullException.ThrowIfNull(adapter_names);
            var state = Live("MixedBatch");
            if (model.training)
                throw new InvalidOperationException("LoraModel.MixedBatch: the model is in training mode, and a mixed-adapter batch is for inference (as PEFT: \"Cannot pass adapter_names when the model is in training mode\"): call eval() first.");
            var named = adapter_names.Where(n => n != BaseModel).Distinct(StringComparer.Ordinal).ToList();
            var unknown = named.Where(n => state.Entry(n) is null).ToList();
            if (unknown.Count > 0)
                throw new ArgumentException($"LoraModel.MixedBatch: {string.Join(", ", unknown.Select(n => $"'{n}'"))} {(unknown.Count == 1 ? "is" : "are")} not an adapter of this model (its adapters: {string.Join(", ", state.Adapters.Select(a => a.Name))}; \"{BaseModel}\" for no adapter).", nameof(adapter_names));
            var merged = state.Layers.Where(l => l.Merged.Count > 0).Select(l => l.Path).ToList();
            if (merged.Count > 0)
                throw new InvalidOperationException($"LoraModel.MixedBatch: adapters are merged into {string.Join(", ", merged.Take(5))}: a mixed batch needs them unmerged (call unmerge_adapter first), as in PEFT.");
            var dora = named.Where(n => state.Entry(n)!.Config.use_dora).ToList();
            if (dora.Count > 0)
                throw new ArgumentException($"LoraModel.MixedBatch: {string.Join(", ", dora)} {(dora.Count == 1 ? "is a DoRA adapter" : "are DoRA adapters")}, which a mixed batch does not run (as in PEFT).", nameof(adapter_names));
            var saving = named.Where(n => state.Saved.Any(s => s.Adapters.Contains(n))).ToList();
            if (saving.Count > 0)
                throw new ArgumentException($"LoraModel.MixedBatch: {string.Join(", ", saving)} {(saving.Count == 1 ? "saves" : "save")} modules (modules_to_save), which a mixed batch here does not switch per row.", nameof(adapter_names));
            var previous = state.Mixed;
            var batch = new MixedBatch(adapter_names);
            state.Mixed = batch;
            state.OpenMixed();
            return new Restore(() =>
            {
                state.CloseMixed();
                state.Mixed = previous;
                batch.Dispose();
            });
        }

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
        public void add_weighted_adapter(IReadOnlyList<string> adapters, IReadOnlyList<double> weights, string adapter_name, string combination_type = CombinationType.Svd, int? svd_rank = null)
        {
            var model = Model;
            ArgumentNullException.ThrowIfNull(adapters);
            ArgumentNullException.ThrowIfNull(weights);
            ArgumentNullException.ThrowIfNull(combination_type);
            var state = Live("add_weighted_adapter");
            CheckNoScope(state, "add_weighted_adapter");
            CheckNewName(model, adapter_name, "add_weighted_adapter");
            if (adapters.Count == 0)
                throw new ArgumentException("LoraModel.add_weighted_adapter: name at least one adapter to combine.", nameof(adapters));
            CheckKnown(state, adapters, "add_weighted_adapter");
            if (weights.Count != adapters.Count)
                throw new ArgumentException($"LoraModel.add_weighted_adapter: {adapters.Count} adapters but {weights.Count} weights.", nameof(weights));
            if (weights.Any(w => !double.IsFinite(w)))
                throw new ArgumentException($"LoraModel.add_weighted_adapter: every weight must be finite, but they are {string.Join(", ", weights.Select(w => w.ToString(CultureInfo.InvariantCulture)))}.", nameof(weights));
            var entries = adapters.Select(a => state.Entry(a)!).ToList();
            var dora = entries.Where(e => e.Config.use_dora).Select(e => e.Name).ToList();
            if (dora.Count > 0)
                throw new ArgumentException($"LoraModel.add_weighted_adapter: {string.Join(", ", dora)} {(dora.Count == 1 ? "is a DoRA adapter" : "are DoRA adapters")}: a weighted combination would lose the magnitudes.", nameof(adapters));
            var shared = state.Saved.Where(s => adapters.Count(s.Adapters.Contains) > 1).Select(s => s.Path).ToList();
            if (shared.Count > 0)
                throw new ArgumentException($"LoraModel.add_weighted_adapter: several of the adapters save {string.Join(", ", shared)} (modules_to_save), which cannot be combined (as in PEFT).", nameof(adapters));
            string combination = adapters.Count == 1 ? "linear" : combination_type;
            if (combination is not ("linear" or "cat" or "svd"))
                throw new NotSupportedException($"LoraModel.add_weighted_adapter: combination_type '{combination_type}' is not implemented here (linear, cat and svd are).");
            var ranks = entries.Select(e => e.Config.rank_pattern.Count == 0 ? e.Config.r : Math.Max(e.Config.r, e.Config.rank_pattern.Values.Max())).ToList();
            int rank = combination switch
            {
                "linear" => ranks.Distinct().Count() == 1 ? ranks[0] : throw new ArgumentException($"LoraModel.add_weighted_adapter: combination_type linear needs adapters of one rank, but theirs are {string.Join(", ", ranks)}.", nameof(adapters)),
                "cat" => ranks.Sum(),
                _ => svd_rank ?? ranks.Max(),
            };
            if (rank < 1)
                throw new ArgumentOutOfRangeException(nameof(svd_rank), svd_rank, "LoraModel.add_weighted_adapter: svd_rank must be 1 or more.");
            var regexes = entries.Select(e => e.Config.TargetModulesRegex).ToList();
            if (regexes.Any(r => r is null) && regexes.Any(r => r is not null))
                throw new ArgumentException("LoraModel.add_weighted_adapter: the adapters' target_modules are a mix of names and a regular expression, which cannot be joined (as in PEFT).", nameof(adapters));
            var config = entries[0].Config.Clone();
            config.r = rank;
            config.lora_alpha = rank;
            config.rank_pattern = new Dictionary<string, int>();
            config.alpha_pattern = new Dictionary<string, double>();
            if (regexes[0] is not null)
                config.TargetModulesRegex = string.Join("|", regexes.Select(r => $"({r})"));
            else
                config.target_modules = entries.SelectMany(e => e.Config.target_modules ?? Array.Empty<string>()).Distinct(StringComparer.Ordinal).ToList();

            CheckOneBias(state, config, adapter_name, "add_weighted_adapter");
            var targets = Targets(model, config, state, "LoraModel.add_weighted_adapter", error => new ArgumentException($"LoraModel.add_weighted_adapter: {error.Key}: {error.Rule}."));
            SetFanInFanOutAsPeft(config, targets);
            if (combination == "svd")
            {
                var refused = targets.Select(t => t.Type.SvdRefusal(t.Path, t.Module)).OfType<string>().ToList();
                if (refused.Count > 0)
                    throw new NotSupportedException($"LoraModel.add_weighted_adapter: {string.Join("; ", refused)}; nothing changed.");
            }
            var built = new List<IAdapter>();
            try
            {
                using var noGrad = no_grad();
                foreach (var target in targets)
                {
                    var weight = target.Weight;
                    IAdapter adapter = target.Type.Create(target.Module, rank, rank, config, draw: false);
                    adapter.Name = adapter_name;
                    built.Add(adapter);
                    var parts = adapters.Select((name, i) => (Adapter: target.Existing?.Find(name), Weight: weights[i])).Where(p => p.Adapter is not null).Select(p => (p.Adapter!, p.Weight)).ToList();
                    Combine(target.Type, adapter, parts, combination, rank, target.Path);
                    if (!adapter.UpdateFinite(weight))
                        throw new ArgumentException($"LoraModel.add_weighted_adapter: the combination {UpdateProblem(target, adapter, weight.dtype)}; nothing changed.", nameof(weights));
                }
            }
            catch
            {
                foreach (var adapter in built)
                    adapter.Dispose();
                throw;
            }
            Install(model, state, new AdapterEntry { Name = adapter_name, Config = config, Trainable = false }, targets, built);
        }

        /// <summary>
        /// Folds adapters into their layers' weights (<c>W += Δ</c>; DoRA's rescaled <c>W + Δ</c>): the active ones, or
        /// <paramref name="adapter_names"/> (PEFT's <c>merge_adapter</c>). Like PEFT's <c>safe_merge</c>, every update is
        /// checked before any weight is written: nothing is merged if one merged weight would hold NaN or infinity. Merged
        /// adapters no longer run in the forward until <see cref="unmerge_adapter"/>; each weight before merging is kept for an
        /// exact unmerge.
        /// </summary>
        /// <exception cref="InvalidOperationException">The model has no adapters, a merged weight would not be finite, or a merge
        /// would leave an active adapter of a layer with a DoRA adapter running unmerged, or go in beside one merged before
        /// there (such a layer merges all its active adapters together, in their order); nothing was written.</exception>
        /// <exception cref="ArgumentException">A name is not an adapter of the model.</exception>
        public void merge_adapter(IReadOnlyList<string>? adapter_names = null)
        {
            var state = Live("merge_adapter");
            CheckNoScope(state, "merge_adapter");
            var names = adapter_names ?? state.Active;
            CheckKnown(state, names, "merge_adapter");
            MergeAll(state, "merge_adapter", names);
        }

        /// <summary>Takes every merged adapter out of the weights again, last merged first, restoring each weight bit for bit (PEFT's <c>unmerge_adapter</c>).</summary>
        /// <exception cref="InvalidOperationException">The model has no adapters.</exception>
        public void unmerge_adapter()
        {
            var state = Live("unmerge_adapter");
            CheckNoScope(state, "unmerge_adapter");
            UnmergeAll(state);
        }

        /// <summary>
        /// The active adapters (or <paramref name="adapter_names"/>) folded into the weights, and every adapter taken out:
        /// the model is a plain model again, of its own types and in its own fields, with their updates in its weights and
        /// its <c>modules_to_save</c> modules as the active adapter trained them (PEFT's <c>merge_and_unload</c>).
        /// </summary>
        /// <exception cref="InvalidOperationException">The model has no adapters, an update would not be finite, or, in a layer
        /// with a DoRA adapter, an adapter to fold is not active or one was merged before; nothing was changed.</exception>
        /// <exception cref="ArgumentException">A name is not an adapter of the model.</exception>
        public void merge_and_unload(IReadOnlyList<string>? adapter_names = null)
        {
            var state = Live("merge_and_unload");
            CheckNoScope(state, "merge_and_unload");
            var names = adapter_names ?? state.Active.ToList();
            CheckKnown(state, names, "merge_and_unload");
            MergeAll(state, "merge_and_unload", names, keep: false);
            foreach (var layer in state.Layers)
            {
                foreach (var adapter in layer.Adapters)
                    adapter.ForgetUnmerged();
                layer.Merged.Clear();
            }
            RemoveAll(state);
        }

        /// <summary>
        /// Every adapter taken out without merging: the adapted weights are the base model's again (merged ones are
        /// restored bit for bit), and the <c>modules_to_save</c> modules hold the values they had before any adapter.
        /// (PEFT's <c>unload</c> keeps the trained <c>modules_to_save</c> copies; this gives back the base model, as its
        /// documentation promises. <see cref="merge_and_unload"/> keeps them.)
        /// </summary>
        /// <exception cref="InvalidOperationException">The model has no adapters.</exception>
        public void unload()
        {
            // The way out of a slot some other code emptied or refilled: its adapters go, the slot stays as that code set it.
            var state = Live("unload", operation: false);
            CheckNoScope(state, "unload");
            UnmergeAll(state);
            foreach (var saved in state.Saved)
                saved.Switch(null);
            RemoveAll(state);
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
        public IDisposable disable_adapter()
        {
            var state = Live("disable_adapter");
            var merged = state.Layers.Select(l => (Layer: l, Order: l.Merged.Reverse().Select(a => a.Name).ToList())).Where(m => m.Order.Count > 0).ToList();
            UnmergeAll(state);
            bool wasDisabled = state.Disabled;
            state.Disabled = true;
            state.DisableScopes++;
            var currents = state.Saved.Select(s => (Saved: s, s.Current)).ToList();
            foreach (var saved in state.Saved)
                saved.Switch(null);
            // As PEFT's enable_adapters(False): no adapter tensor requires grad while disabled; each gets its flag back after.
            var flags = state.Layers.SelectMany(l => l.Adapters).SelectMany(a => a.Parameters()).Select(p => (Parameter: p, p.requires_grad)).ToList();
            foreach (var (parameter, _) in flags)
                parameter.requires_grad_(false);
            return new Restore(() =>
            {
                state.DisableScopes--;
                if (state.Released)
                    return;   // the model was disposed within the scope: its adapters are gone
                foreach (var (parameter, requiresGrad) in flags)
                    parameter.requires_grad_(requiresGrad);
                foreach (var (saved, current) in currents)
                    saved.Switch(current);
                state.Disabled = wasDisabled;
                // The weights are as they were when merged first: the same updates give the same bits again.
                foreach (var (layer, order) in merged)
                {
                    // As merge_adapter merged them: DoRA's norms from the weight before the first of them.
                    using Tensor? normBase = order.Count > 1 && order.Any(n => layer.Find(n)!.Rescaled is not null) ? layer.Weight.detach().clone() : null;
                    foreach (string name in order)
                    {
                        var adapter = layer.Find(name)!;
                        adapter.MergeChecked(layer.Weight, normBase: normBase);
                        layer.Merged.Push(adapter);
                    }
                }
            });
        }

        /// <summary>
        /// Freezes everything but the active adapters, as PEFT and loralib do (and makes those train from now on);
        /// <c>modules_to_save</c> modules train in full; <paramref name="bias"/> (by default each adapter's config's)
        /// <c>all</c> also trains every bias, <c>lora_only</c> the biases of the adapted layers.
        /// </summary>
        /// <exception cref="ArgumentException"><paramref name="bias"/> is not <c>none</c>, <c>all</c> or <c>lora_only</c>.</exception>
        /// <exception cref="InvalidOperationException">The model has no adapters.</exception>
        public void mark_only_lora_as_trainable(string? bias = null)
        {
            var model = Model;
            var state = Live("mark_only_lora_as_trainable");
            if (bias is not (null or "none" or "all" or "lora_only"))
                throw new ArgumentException($"bias must be \"none\", \"all\" or \"lora_only\", but was \"{bias}\".", nameof(bias));
            foreach (string name in state.Active)
                state.Entry(name)!.Trainable = true;
            MarkTrainable(model, state, bias);
        }

        /// <summary>
        /// The opt-out for a model whose forward legitimately skips some adapted layers (a head chosen per task, an
        /// early exit): their adapters may not run in a model call. With no path, every adapted layer may be skipped,
        /// and the model's check is off.
        /// </summary>
        /// <exception cref="ArgumentException">A path is not an adapted layer of the model.</exception>
        public void AllowUnusedAdapters(params string[] paths)
        {
            ArgumentNullException.ThrowIfNull(paths);
            Live("AllowUnusedAdapters", operation: false).AllowUnused(paths);
        }
    }
}
