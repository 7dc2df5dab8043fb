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
}
