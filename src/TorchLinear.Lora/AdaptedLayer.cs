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
        /// <summary>A <see cref="CustomLinear"/> or <see cref="Conv1D"/>: its <c>Adapter</c> slot, run by its own forward.</summary>
        Slot,

        /// <summary>A layer of any registered type (Linear, Embedding, Conv1d, Conv2d) replaced, in its fields and its parent's registry, by its type's wrapper, which runs them.</summary>
        Wrapper,

        /// <summary>A layer of any registered type kept as it is (held in a field of its sealed type, such as <c>nn.Linear</c>, <c>nn.Embedding</c>, <c>nn.Conv1d</c> or <c>nn.Conv2d</c>, or in a <c>Sequential</c>): a forward hook, which TorchSharp runs only through <c>call(x)</c>.</summary>
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
        /// <summary>The attribute that holds the adapters themselves (no state_dict keys) and, through it, the model's bookkeeping.</summary>
        internal const string StateAttribute = "lora_layer";

        private readonly List<IAdapter> _adapters = new();
        private readonly AdapterModules _units = new();
        private readonly List<(string Name, nn.Module Container)> _attributes = new();
        private bool _registered;

        internal AdaptedLayer(string path, nn.Module module, ILoraLayerType type)
        {
            Path = path;
            Module = module;
            Type = type;
            foreach (var attribute in type.Attributes)
                _attributes.Add((attribute.Name, attribute.HoldsParameters ? new AdapterParameters() : new AdapterModules()));
        }

        internal string Path { get; }

        /// <summary>The model's own layer (the CustomLinear, Conv1D, Linear, Embedding or convolution), whatever hosts it.</summary>
        internal nn.Module Module { get; }

        /// <summary>What the layer is: its weight, bias, PEFT's attributes and keys.</summary>
        internal ILoraLayerType Type { get; }

        internal HostKind Kind { get; set; }

        /// <summary>The module the adapters' state is registered under (the layer, or its wrapper).</summary>
        internal nn.Module Host { get; set; } = null!;

        /// <summary>For a layer hosting its adapters in its own <c>Adapter</c> slot (<see cref="HostKind.Slot"/>): the delegate the library put there.</summary>
        internal Delegate? Attached { get; set; }

        /// <summary>
        /// Whether this layer's own <c>Adapter</c> slot no longer holds <see cref="Attached"/>: code outside the library
        /// emptied or refilled it, so the layer's forward runs without these adapters.
        /// </summary>
        internal bool SlotLost => Kind == HostKind.Slot && !ReferenceEquals(Type.Slot(Module), Attached);

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

        internal Parameter Weight => Type.Weight(Module);

        internal Parameter? Bias => Type.Bias(Module);

        /// <summary>Registers the adapters' containers under the host, PEFT's attribute names; once.</summary>
        internal void Register()
        {
            if (_registered)
                return;
            foreach (var (name, container) in _attributes)
                Host.register_module(name, container);
            Host.register_module(StateAttribute, _units);
            _registered = true;
        }

        /// <summary>Takes the containers off the host again (the adapters are the caller's to dispose).</summary>
        internal void Unregister()
        {
            foreach (var (name, _) in _attributes)
                Host.register_module(name, null!);
            Host.register_module(StateAttribute, null!);
            _registered = false;
        }

        internal void Add(IAdapter adapter)
        {
            adapter.Owner = Path;
            _adapters.Add(adapter);
            foreach (var (attribute, module, parameter) in adapter.Registrations())
            {
                var container = _attributes.First(a => a.Name == attribute).Container;
                if (container is AdapterParameters parameters)
                    parameters.Add(adapter.Name, parameter!);
                else
                    ((AdapterModules)container).Add(adapter.Name, module!);
            }
            _units.Add(adapter.Name, (nn.Module)adapter);
        }

        /// <summary>Takes one adapter out of the layer and frees it.</summary>
        internal void Remove(IAdapter adapter)
        {
            _adapters.Remove(adapter);
            foreach (var (attribute, _, _) in adapter.Registrations())
            {
                var container = _attributes.First(a => a.Name == attribute).Container;
                if (container is AdapterParameters parameters)
                    parameters.Remove(adapter.Name);
                else
                    ((AdapterModules)container).Remove(adapter.Name);
            }
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
        /// once (<see cref="MixedBatch.Order"/>), each adapter's own <c>AddTo</c> adding its term to its group's
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
            // As PEFT's _check_forward_args at every forward: a merged adapter is in the weight for every row.
            if (Merged.Count > 0)
                throw new InvalidOperationException($"{Path}: {string.Join(", ", Merged.Select(a => $"'{a.Name}'"))} {(Merged.Count == 1 ? "is" : "are")} merged into this layer's weight, so every row of a mixed-adapter batch would get {(Merged.Count == 1 ? "its" : "their")} update (as PEFT: \"Cannot pass adapter_names when there are merged adapters\"): call unmerge_adapter first.");
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
            if (!Type.Stacks || (output.dtype != ScalarType.Float32 && output.dtype != ScalarType.Float64))
                return false;
            if (here.Any(g => !g.Adapter.Stackable))
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
            foreach (var (adapter, _) in here)
                adapter.CheckRunsIn(output);
            int total = here.Sum(g => g.Adapter.r);
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
            Tensor a = cat(here.Select(g => g.Adapter.Factors.A).ToList(), 0);
            Tensor b = cat(here.Select(g => g.Adapter.Factors.B).ToList(), 1);
            LoraLayer.AddLowRank(output, input, a, b, scales);
        }

        private void AddTerm(IAdapter adapter, Tensor output, Tensor input, bool training) =>
            adapter.AddTerm(output, input, training, Weight, Bias);
    }

    /// <summary>
    /// Modules by adapter name under one attribute of an adapted layer, as PEFT's <c>ModuleDict</c>s hold them
    /// (<c>lora_A</c>, <c>lora_B</c>, <c>lora_magnitude_vector</c>): the state_dict keys are
    /// <c>&lt;attribute&gt;.&lt;adapter&gt;.weight</c>. Unlike TorchSharp's ModuleDict, an entry added or removed later is
    /// registered or unregistered at once.
    /// </summary>
    internal sealed class AdapterModules : nn.Module
    {
        internal AdapterModules() : base("ModuleDict")
        {
        }

        internal void Add(string name, nn.Module module) => register_module(name, module);

        internal void Remove(string name) => register_module(name, null!);

        /// <summary>For an adapted layer's <c>lora_layer</c> container: the model's bookkeeping, released when it is disposed.</summary>
        internal AdaptedModel? Model { get; set; }

        protected override void RegisterComponents()
        {
        }

        protected override void Dispose(bool disposing)
        {
            if (disposing)
                Model?.Release();
            base.Dispose(disposing);
        }
    }

    /// <summary>Parameters by adapter name (PEFT's <c>ParameterDict</c>s <c>lora_embedding_A</c> / <c>_B</c>): keys <c>&lt;attribute&gt;.&lt;adapter&gt;</c>.</summary>
    internal sealed class AdapterParameters : nn.Module
    {
        internal AdapterParameters() : base("ParameterDict")
        {
        }

        internal void Add(string name, Parameter parameter) => register_parameter(name, parameter);

        internal void Remove(string name) => ConditionallyRegisterParameter(name, (Parameter?)null);

        protected override void RegisterComponents()
        {
        }
    }
}
