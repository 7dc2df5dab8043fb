using System;
using System.Collections.Generic;
using System.Linq;
using System.Reflection;
using System.Threading;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Lora
{
    /// <summary>How an adapted layer runs its adapters.</summary>
    internal enum HostKind
    {
        /// <summary>A <see cref="CustomLinear"/>: its <see cref="CustomLinear.Adapter"/> slot, run by its own forward.</summary>
        Slot,

        /// <summary>A Linear or Embedding replaced, in its fields and its parent's registry, by a wrapper that runs them.</summary>
        Wrapper,

        /// <summary>A sealed <c>nn.Linear</c> or <c>nn.Embedding</c> kept as it is: a forward hook, which TorchSharp runs only through <c>call(x)</c>.</summary>
        Hook,
    }

    /// <summary>
    /// One adapted layer of a model (PEFT's <c>lora.Linear</c> or <c>lora.Embedding</c>): its adapters by name, registered
    /// under PEFT's attributes of the layer (<c>lora_A.&lt;name&gt;</c>, <c>lora_B.&lt;name&gt;</c>,
    /// <c>lora_magnitude_vector.&lt;name&gt;</c>, or <c>lora_embedding_A.&lt;name&gt;</c> and <c>lora_embedding_B.&lt;name&gt;</c>),
    /// and the forward term of the model's active adapters — or, in a mixed batch, of each row's own adapter.
    /// </summary>
    internal sealed class AdaptedLayer
    {
        private readonly List<IAdapter> _adapters = new();
        private readonly AdapterModules _units = new();
        private readonly AdapterModules? _a, _b, _magnitudes;
        private readonly AdapterParameters? _embeddingA, _embeddingB;
        private bool _registered;

        internal AdaptedLayer(string path, nn.Module module, bool embedding)
        {
            Path = path;
            Module = module;
            IsEmbedding = embedding;
            if (embedding)
            {
                _embeddingA = new AdapterParameters();
                _embeddingB = new AdapterParameters();
            }
            else
            {
                _a = new AdapterModules();
                _b = new AdapterModules();
                _magnitudes = new AdapterModules();
            }
        }

        internal string Path { get; }

        /// <summary>The model's own layer (the CustomLinear, Linear or Embedding), whatever hosts it.</summary>
        internal nn.Module Module { get; }

        internal bool IsEmbedding { get; }

        internal HostKind Kind { get; set; }

        /// <summary>The module the adapters' state is registered under (the layer, or its wrapper).</summary>
        internal nn.Module Host { get; set; } = null!;

        /// <summary>Takes the host out and leaves the original layer where it was.</summary>
        internal Action Detach { get; set; } = () => { };

        /// <summary>The model's bookkeeping; the layer's <c>lora_layer</c> container holds it, so that it is found from the model's modules and released with them.</summary>
        internal AdaptedModel Model
        {
            get => _units.Model!;
            set => _units.Model = value;
        }

        internal int RunIndex { get; set; }

        internal IReadOnlyList<IAdapter> Adapters => _adapters;

        /// <summary>The adapters merged into the weight, in the order they were merged (unmerged last first).</summary>
        internal Stack<IAdapter> Merged { get; } = new();

        internal IAdapter? Find(string name) => _adapters.FirstOrDefault(a => a.Name == name);

        internal Parameter Weight => Module switch
        {
            CustomLinear custom => custom.weight,
            Linear linear => linear.weight,
            Embedding embedding => embedding.weight!,
            _ => throw new InvalidOperationException($"{Path}: {Module.GetType().Name} holds no adapter weight."),
        };

        internal Parameter? Bias => Module switch
        {
            CustomLinear custom => custom.bias,
            Linear linear => linear.bias,
            _ => null,
        };

        /// <summary>Registers the adapters' containers under the host, PEFT's attribute names; once.</summary>
        internal void Register()
        {
            if (_registered)
                return;
            if (IsEmbedding)
            {
                Host.register_module("lora_embedding_A", _embeddingA!);
                Host.register_module("lora_embedding_B", _embeddingB!);
            }
            else
            {
                Host.register_module("lora_A", _a!);
                Host.register_module("lora_B", _b!);
                Host.register_module("lora_magnitude_vector", _magnitudes!);
            }
            Host.register_module("lora_layer", _units);
            _registered = true;
        }

        /// <summary>Takes the containers off the host again (the adapters are the caller's to dispose).</summary>
        internal void Unregister()
        {
            foreach (string name in IsEmbedding ? new[] { "lora_embedding_A", "lora_embedding_B", "lora_layer" } : new[] { "lora_A", "lora_B", "lora_magnitude_vector", "lora_layer" })
                Host.register_module(name, null!);
            _registered = false;
        }

        internal void Add(IAdapter adapter)
        {
            adapter.Owner = Path;
            _adapters.Add(adapter);
            switch (adapter)
            {
                case LoraLayer layer:
                    _a!.Add(adapter.Name, layer.lora_A);
                    _b!.Add(adapter.Name, layer.lora_B);
                    if (layer.lora_magnitude_vector is { } magnitude)
                        _magnitudes!.Add(adapter.Name, magnitude);
                    break;
                case LoraEmbeddingLayer embedding:
                    _embeddingA!.Add(adapter.Name, embedding.lora_embedding_A);
                    _embeddingB!.Add(adapter.Name, embedding.lora_embedding_B);
                    break;
            }
            _units.Add(adapter.Name, (nn.Module)adapter);
        }

        /// <summary>Takes one adapter out of the layer and frees it.</summary>
        internal void Remove(IAdapter adapter)
        {
            _adapters.Remove(adapter);
            _a?.Remove(adapter.Name);
            _b?.Remove(adapter.Name);
            _magnitudes?.Remove(adapter.Name);
            _embeddingA?.Remove(adapter.Name);
            _embeddingB?.Remove(adapter.Name);
            _units.Remove(adapter.Name);
            adapter.Dispose();
        }

        /// <summary>Whether the model's call must run this layer's forward: an active adapter is here and not merged.</summary>
        internal bool MustRun => !Model.Disabled && Model.Active.Any(name => Find(name) is { merged: false });

        /// <summary>
        /// The adapters' term for one forward of the layer: <paramref name="output"/> is the base layer's, updated in
        /// place and returned. Each active, unmerged adapter present here adds its update, in the order of
        /// <see cref="AdaptedModel.Active"/>; in a mixed batch, each row gets its own adapter's.
        /// </summary>
        internal Tensor Apply(Tensor output, Tensor input, bool training)
        {
            var model = Model;
            model.Ran(RunIndex);
            if (model.Disabled)
                return output;
            if (model.Mixed is { } batch)
                return ApplyMixed(output, input, batch, training);
            foreach (string name in model.Active)
            {
                if (Find(name) is { } adapter)
                    AddTerm(adapter, output, input, training);   // a merged adapter adds nothing
            }
            return output;
        }

        /// <summary>
        /// A batch whose rows use different adapters (PEFT's <c>adapter_names</c>): stacked (<see cref="Stacks"/>,
        /// <see cref="AddStacked"/>), or grouped by adapter as PEFT groups them — the rows put in the batch's group order
        /// once (<see cref="MixedBatch.Order"/>), each adapter's own <c>add_to</c> adding its term to its group's
        /// contiguous rows, and the rows put back in place. <c>"__base__"</c> rows, and rows whose adapter does not adapt
        /// this layer, keep the base output. Never a pass per row.
        /// </summary>
        private Tensor ApplyMixed(Tensor output, Tensor input, MixedBatch batch, bool training)
        {
            if (input.dim() == 0 || input.size(0) != batch.Rows.Length)
                throw new ArgumentException($"{Path}: the mixed batch names an adapter for each of {batch.Rows.Length} rows, but the layer's input has {(input.dim() == 0 ? "no rows (a 0-d tensor)" : $"{input.size(0)} rows (shape [{string.Join(", ", input.shape)}])")}.");
            var here = new List<(IAdapter Adapter, int Group)>();
            for (int group = 0; group < batch.Names.Count; group++)
            {
                if (batch.Names[group] != LoraModel.BaseModel && Find(batch.Names[group]) is { } adapter)
                    here.Add((adapter, group));
            }
            // PEFT refuses adapter_names whenever the model is in training mode (its dropout, among others, would apply per adapter).
            if (training || Model.Root.training)
                throw new InvalidOperationException($"{Path}: a mixed-adapter batch is for inference, and the model is in training mode (as PEFT: \"Cannot pass adapter_names when the model is in training mode\"): call eval() first.");
            if (here.Count == 0)
                return output;
            if (batch.Names.Count == 1)
            {
                AddTerm(here[0].Adapter, output, input, training);
                return output;
            }
            using var scope = NewDisposeScope();
            if (Stacks(here, input, output))
            {
                AddStacked(output, input, batch, here);
                return output;
            }
            Tensor order = batch.Order(output.device);
            Tensor sortedInput = input.index_select(0, order);
            Tensor sortedOutput = output.index_select(0, order);
            // The inputs are only read: one split for all groups. The outputs are written in place, which autograd allows
            // for a single view (narrow), not for one of several views from one call (split).
            Tensor[] inputs = sortedInput.split(batch.Counts);
            foreach (var (adapter, group) in here)
                AddTerm(adapter, sortedOutput.narrow(0, batch.Starts[group], batch.Counts[group]), inputs[group], training);
            output.index_copy_(0, order, sortedOutput);
            return output;
        }

        /// <summary>
        /// Whether the batch's adapters here are cheaper as one stacked pair of products (<see cref="AddStacked"/>) than one
        /// pair per adapter: float32 or float64 Linear adapters whose stacked products — every row times every adapter's
        /// rank, R (in + out) per row — cost at most a quarter of the base layer's (in · out per row). Many adapters, or
        /// large ranks, on a layer go one adapter at a time, as in PEFT, where each adapter's per-call cost is small
        /// against the layer's products anyway.
        /// </summary>
        private bool Stacks(List<(IAdapter Adapter, int Group)> here, Tensor input, Tensor output)
        {
            if (IsEmbedding || (output.dtype != ScalarType.Float32 && output.dtype != ScalarType.Float64))
                return false;
            long total = here.Sum(g => (long)g.Adapter.r);
            long inFeatures = input.size(-1), outFeatures = output.size(-1);
            return total * (inFeatures + outFeatures) * 4 <= inFeatures * outFeatures;
        }

        /// <summary>
        /// Every adapter of the batch in one pair of products: their A stacked (R = the sum of their ranks), <c>h = x Aᵀ</c>
        /// once, each row's h times its own adapter's scaling in its adapter's columns and 0 in the others, and
        /// <c>h Bᵀ</c>, B stacked likewise, added to the output: for each row the layer's own formula,
        /// <c>((x Aᵀ) · scaling) Bᵀ</c>, with zeros in the other adapters' places.
        /// </summary>
        private void AddStacked(Tensor output, Tensor input, MixedBatch batch, List<(IAdapter Adapter, int Group)> here)
        {
            var layers = here.Select(g => (LoraLayer)g.Adapter).ToList();
            foreach (var layer in layers)
                layer.CheckRunsIn(output);
            int total = layers.Sum(l => l.r);
            var offsetOf = new int[batch.Names.Count];
            var rankOf = new int[batch.Names.Count];
            var scalingOf = new double[batch.Names.Count];
            int offset = 0;
            foreach (var (adapter, group) in here)
            {
                offsetOf[group] = offset;
                rankOf[group] = adapter.r;
                scalingOf[group] = adapter.scaling;
                offset += adapter.r;
            }
            // The scaling is rounded to the layer's dtype, as the layer's own scalar multiply rounds it (float32, float64).
            var mask = new double[batch.Rows.Length * total];
            for (int row = 0; row < batch.Rows.Length; row++)
            {
                int group = batch.GroupOf[row];
                double scaling = LoraLayer.ScalingIn(scalingOf[group], output.dtype);
                for (int k = 0; k < rankOf[group]; k++)
                    mask[row * total + offsetOf[group] + k] = scaling;
            }
            var maskShape = Enumerable.Repeat(1L, Math.Max(2, (int)input.dim())).ToArray();
            maskShape[0] = batch.Rows.Length;
            maskShape[^1] = total;
            Tensor scales = tensor(mask, dtype: ScalarType.Float64).to(output.dtype, output.device).view(maskShape);
            Tensor a = cat(layers.Select(l => (Tensor)l.lora_A.weight).ToList(), 0);
            Tensor b = cat(layers.Select(l => (Tensor)l.lora_B.weight).ToList(), 1);
            Tensor h = nn.functional.linear(input, a).mul_(scales);
            if (output.dtype == ScalarType.Float32 && h.dim() == 2 && output.dim() == 2)
                output.addmm_(h, b.t(), 1, 1);
            else
                output.add_(h.matmul(b.t()));
        }

        private void AddTerm(IAdapter adapter, Tensor output, Tensor input, bool training)
        {
            switch (adapter)
            {
                case LoraLayer layer:
                    layer.add_to(output, input, training, Weight, Bias);
                    break;
                case LoraEmbeddingLayer embedding:
                    embedding.add_to(output, input);
                    break;
            }
        }
    }

    /// <summary>
    /// The rows of one <see cref="LoraModel.mixed_batch"/> scope, grouped by adapter: the groups in the order their adapters
    /// first appear, each a contiguous range of <see cref="Order"/> (row indices, each group's rows in batch order).
    /// </summary>
    internal sealed class MixedBatch : IDisposable
    {
        private readonly long[] _order;
        private Tensor? _orderTensor;

        internal MixedBatch(IReadOnlyList<string> rows)
        {
            Rows = rows.ToArray();
            var groupOf = new Dictionary<string, int>(StringComparer.Ordinal);
            var names = new List<string>();
            var counts = new List<long>();
            GroupOf = new int[Rows.Length];
            for (int row = 0; row < Rows.Length; row++)
            {
                if (!groupOf.TryGetValue(Rows[row], out int group))
                {
                    group = names.Count;
                    groupOf[Rows[row]] = group;
                    names.Add(Rows[row]);
                    counts.Add(0);
                }
                GroupOf[row] = group;
                counts[group]++;
            }
            Names = names;
            Counts = counts.ToArray();
            Starts = new long[Counts.Length];
            for (int group = 1; group < Counts.Length; group++)
                Starts[group] = Starts[group - 1] + Counts[group - 1];
            // Each group's rows in batch order, the groups one after the other.
            _order = new long[Rows.Length];
            var next = (long[])Starts.Clone();
            for (int row = 0; row < Rows.Length; row++)
                _order[next[GroupOf[row]]++] = row;
        }

        /// <summary>The adapter name (or <c>"__base__"</c>) of each row.</summary>
        internal string[] Rows { get; }

        /// <summary>The groups' names (adapters, or <c>"__base__"</c>), in the order they first appear among the rows.</summary>
        internal IReadOnlyList<string> Names { get; }

        /// <summary>The group of each row.</summary>
        internal int[] GroupOf { get; }

        /// <summary>Where each group's rows start in <see cref="Order"/>.</summary>
        internal long[] Starts { get; }

        /// <summary>How many rows each group has.</summary>
        internal long[] Counts { get; }

        /// <summary>The row indices grouped by adapter, on <paramref name="device"/> (kept for the scope on the CPU; the caller's scope owns a copy elsewhere).</summary>
        internal Tensor Order(Device device)
        {
            if (_orderTensor is null)
            {
                _orderTensor = tensor(_order);
                _orderTensor.DetachFromDisposeScope();
            }
            return device.type == DeviceType.CPU ? _orderTensor : _orderTensor.to(device);
        }

        public void Dispose()
        {
            _orderTensor?.Dispose();
            _orderTensor = null;
        }
    }

    /// <summary>
    /// A <c>modules_to_save</c> module: the values it had before any adapter (PEFT's ModulesToSaveWrapper keeps the original
    /// module), and each adapter's own values. The module itself holds the values of <see cref="Current"/> (the first
    /// active adapter that saves it), or the originals.
    /// </summary>
    internal sealed class SavedModule
    {
        internal required string Path { get; init; }
        internal required nn.Module Module { get; init; }

        /// <summary>A copy of each of the module's state_dict entries before any adapter, by its name in the module.</summary>
        internal required List<(string Name, Tensor Value)> Originals { get; init; }

        /// <summary>The values of each adapter that saves this module and is not <see cref="Current"/>.</summary>
        internal Dictionary<string, List<(string Name, Tensor Value)>> ByAdapter { get; } = new(StringComparer.Ordinal);

        /// <summary>The adapter whose values the module holds, or null for the originals.</summary>
        internal string? Current { get; set; }

        /// <summary>The adapters that save this module.</summary>
        internal HashSet<string> Adapters { get; } = new(StringComparer.Ordinal);

        /// <summary>Puts <paramref name="owner"/>'s values (null: the originals) into the module, keeping what was there as the current owner's.</summary>
        internal void Switch(string? owner)
        {
            if (owner == Current)
                return;
            var state = Module.state_dict();
            if (Current is not null)
                ByAdapter[Current] = state.Select(kv => (kv.Key, Copy(kv.Value))).ToList();
            var values = owner is null ? Originals : ByAdapter[owner];
            using (no_grad())
            {
                foreach (var (name, value) in values)
                    state[name].copy_(value);
            }
            if (owner is not null)
            {
                foreach (var (_, value) in ByAdapter[owner])
                    value.Dispose();
                ByAdapter.Remove(owner);
            }
            Current = owner;
        }

        /// <summary>The values <paramref name="adapter"/> has for this module: live when it is current, kept otherwise.</summary>
        internal IEnumerable<(string Name, Tensor Value)> ValuesOf(string adapter) =>
            adapter == Current ? Module.state_dict().Select(kv => (kv.Key, kv.Value)) : ByAdapter[adapter];

        /// <summary>Forgets an adapter's values (the module keeps them if it was current, until switched).</summary>
        internal void Drop(string adapter)
        {
            Adapters.Remove(adapter);
            if (ByAdapter.Remove(adapter, out var values))
            {
                foreach (var (_, value) in values)
                    value.Dispose();
            }
        }

        internal void DisposeCopies()
        {
            foreach (var (_, value) in Originals)
                value.Dispose();
            foreach (var values in ByAdapter.Values)
            {
                foreach (var (_, value) in values)
                    value.Dispose();
            }
            ByAdapter.Clear();
        }

        /// <summary>A copy of a tensor's values that no dispose scope frees, leaving no temporary behind.</summary>
        internal static Tensor Copy(Tensor tensor)
        {
            using (NewDisposeScope())
                return tensor.detach().clone().DetachFromDisposeScope();
        }
    }

    /// <summary>One adapter of a model: its name, a copy of its config, and whether it trains when active.</summary>
    internal sealed class AdapterEntry
    {
        internal required string Name { get; init; }
        internal required LoraConfig Config { get; init; }

        /// <summary>Made to train (inject, or load_adapter with is_trainable): its parameters require grad while active.</summary>
        internal bool Trainable { get; set; }

        /// <summary>The dtype each tensor had in the file it was loaded from, so that saving writes the same bytes back.</summary>
        internal Dictionary<string, ScalarType> FileDtypes { get; set; } = new();
    }

    /// <summary>
    /// The bookkeeping of one model's adapters: each adapter's config, the active ones, the adapted layers, the
    /// <c>modules_to_save</c> values, and the check that every active adapter ran in a model call. Every adapted layer's
    /// containers are the model's modules, so disposing the model frees the adapters; <see cref="Release"/> frees the rest.
    /// </summary>
    internal sealed class AdaptedModel
    {
        private object? _preHook, _postHook;
        private bool _released;
        private bool _allowAllUnused;
        private readonly HashSet<string> _allowedUnused = new(StringComparer.Ordinal);
        private readonly ThreadLocal<MixedBatch?> _mixed = new();
        private readonly List<AdapterEntry> _adapters = new();

        internal AdaptedModel(nn.Module root) => Root = root;

        internal nn.Module Root { get; }

        /// <summary>The adapters, in the order they were added.</summary>
        internal IReadOnlyList<AdapterEntry> Adapters => _adapters;

        internal AdapterEntry? Entry(string name) => _adapters.FirstOrDefault(a => a.Name == name);

        internal void AddEntry(AdapterEntry entry) => _adapters.Add(entry);

        internal void RemoveEntry(AdapterEntry entry) => _adapters.Remove(entry);

        /// <summary>The active adapters, in order (PEFT's active_adapters): their updates add up in every adapted layer.</summary>
        internal List<string> Active { get; } = new();

        /// <summary>While true, no adapter adds anything (disable_adapters).</summary>
        internal bool Disabled { get; set; }

        /// <summary>The adapter of each row of the mixed batch running on this thread, or null.</summary>
        internal MixedBatch? Mixed
        {
            get => _mixed.Value;
            set => _mixed.Value = value;
        }

        internal List<AdaptedLayer> Layers { get; } = new();

        internal List<SavedModule> Saved { get; } = new();

        internal AdaptedLayer? LayerAt(string path) => Layers.FirstOrDefault(l => l.Path == path);

        internal void Add(AdaptedLayer layer)
        {
            layer.Model = this;
            layer.RunIndex = Layers.Count;
            Layers.Add(layer);
        }

        // ---- Did every active adapter run? ------------------------------------------------------------------------

        /// <summary>One model call on this thread: which adapted layers ran in it.</summary>
        private sealed class Frame
        {
            internal required AdaptedModel Owner { get; init; }
            internal required bool[] Ran { get; init; }
            internal Frame? Outer { get; set; }
        }

        [ThreadStatic]
        private static Frame? t_top;

        /// <summary>A model call begins (the root's forward pre-hook, or an explicit check).</summary>
        internal void Enter()
        {
            // A frame of this model still open on this thread is one whose forward threw: drop it. (A model that calls
            // itself is checked in its innermost call only: never a false alarm.)
            Unlink();
            t_top = new Frame { Owner = this, Ran = new bool[Layers.Count], Outer = t_top };
        }

        /// <summary>The model call ends: every layer with an active, unmerged adapter must have run in it.</summary>
        internal void Exit()
        {
            if (Unlink() is not { } frame)
                return;
            var missing = new List<AdaptedLayer>();
            for (int i = 0; i < Layers.Count && i < frame.Ran.Length; i++)
            {
                if (!frame.Ran[i] && Layers[i].MustRun && !_allowAllUnused && !_allowedUnused.Contains(Layers[i].Path))
                    missing.Add(Layers[i]);
            }
            if (missing.Count > 0)
                throw NotRun(missing);
        }

        /// <summary>Called by an adapted layer each time its forward runs.</summary>
        internal void Ran(int index)
        {
            for (Frame? frame = t_top; frame is not null; frame = frame.Outer)
            {
                if (frame.Owner == this)
                {
                    if (index < frame.Ran.Length)
                        frame.Ran[index] = true;
                    return;
                }
            }
        }

        private Frame? Unlink()
        {
            Frame? found = null, previous = null;
            for (Frame? frame = t_top; frame is not null; frame = frame.Outer)
            {
                if (frame.Owner == this)
                {
                    found = frame;
                    if (previous is null)
                        t_top = frame.Outer;
                    else
                        previous.Outer = frame.Outer;
                    break;
                }
                previous = frame;
            }
            return found;
        }

        private InvalidOperationException NotRun(List<AdaptedLayer> missing)
        {
            string types = string.Join(", ", missing.Select(l => l.Kind).Distinct().Select(k => k switch
            {
                HostKind.Hook => "a sealed nn.Linear or nn.Embedding runs its adapter only when invoked with call(x), not forward(x)",
                _ => "the layer itself was not called",
            }));
            return new InvalidOperationException(
                $"LoRA adapters did not run in this call of {Root.GetType().Name}, so its output lacks their updates: {string.Join(", ", missing.Select(l => l.Path))} " +
                $"({types}). Ways out: invoke these layers with call(x); hold them in a field typed nn.Module<Tensor, Tensor> or as CustomLinear, " +
                "where the adapter runs inside the layer's forward; load the adapter merged (LoraModel.load_adapter(model, dir, merge: true)); " +
                "or, if this forward legitimately skips these layers, say so with LoraModel.allow_unused_adapters(model, paths).");
        }

        /// <summary>Lets the named adapted layers (or, with none named, all) not run in a model call.</summary>
        internal void AllowUnused(IReadOnlyList<string> paths)
        {
            if (paths.Count == 0)
            {
                _allowAllUnused = true;
                return;
            }
            var unknown = paths.Where(p => Layers.All(l => l.Path != p)).ToList();
            if (unknown.Count > 0)
                throw new ArgumentException($"LoraModel.allow_unused_adapters: {string.Join(", ", unknown)} {(unknown.Count == 1 ? "is" : "are")} not an adapted layer of this model (its adapted layers: {string.Join(", ", Layers.Select(l => l.Path))}).", nameof(paths));
            foreach (string path in paths)
                _allowedUnused.Add(path);
        }

        /// <summary>Runs <paramref name="forward"/> as one model call and checks it as a call through <c>call(x)</c> is checked.</summary>
        internal void RunChecked(Action forward)
        {
            Enter();
            try
            {
                forward();
            }
            catch
            {
                Unlink();
                throw;
            }
            Exit();
        }

        /// <summary>
        /// Hooks the root's forward so that every <c>call(x)</c> of the model is checked. TorchSharp's hookable modules
        /// are generic in their forward's signature; the module-level hooks (<c>Action&lt;Module&gt;</c>) exist for every
        /// signature and are found by reflection. A root that is not hookable is checked only by <c>check_adapters_run</c>.
        /// </summary>
        internal void InstallRootHooks()
        {
            if (_preHook is not null)
                return;
            _preHook = Register(Root, "register_forward_pre_hook", _ => Enter());
            _postHook = Register(Root, "register_forward_hook", _ => Exit());
        }

        private static object? Register(nn.Module root, string name, Action<nn.Module> hook)
        {
            MethodInfo? method = root.GetType().GetMethods(BindingFlags.Public | BindingFlags.Instance)
                .FirstOrDefault(m => m.Name == name && m.GetParameters() is { Length: 1 } p && p[0].ParameterType == typeof(Action<nn.Module>));
            return method?.Invoke(root, new object[] { hook });
        }

        private static void Remove(object? remover) => remover?.GetType().GetMethod("remove")?.Invoke(remover, null);

        /// <summary>Frees what the model's adapters keep (once): the modules_to_save copies and the root's hooks.</summary>
        internal void Release()
        {
            if (_released)
                return;
            _released = true;
            Remove(_preHook);
            Remove(_postHook);
            _preHook = _postHook = null;
            foreach (var saved in Saved)
                saved.DisposeCopies();
            Saved.Clear();
            _mixed.Dispose();
        }
    }
}
