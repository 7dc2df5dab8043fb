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

        /// <summary>The public object for this model's adapters, made on first asking.</summary>
        internal PeftModel? Handle { get; set; }

        /// <summary>Whether every adapter was taken out or the model disposed: the bookkeeping is no longer the model's.</summary>
        internal bool Released => _released;

        internal nn.Module Root { get; }

        /// <summary>The adapters, in the order they were added.</summary>
        internal IReadOnlyList<AdapterEntry> Adapters => _adapters;

        internal AdapterEntry? Entry(string name) => _adapters.FirstOrDefault(a => a.Name == name);

        internal void AddEntry(AdapterEntry entry) => _adapters.Add(entry);

        internal void RemoveEntry(AdapterEntry entry) => _adapters.Remove(entry);

        /// <summary>The active adapters, in order (PEFT's active_adapters): their updates add up in every adapted layer.</summary>
        internal List<string> Active { get; } = new();

        /// <summary>While true, no adapter adds anything (disable_adapter).</summary>
        internal bool Disabled { get; set; }

        /// <summary>How many disable_adapter scopes are open on this model (they may nest).</summary>
        internal int DisableScopes { get; set; }

        private int _mixedScopes;

        /// <summary>How many MixedBatch scopes are open on this model, on any thread.</summary>
        internal int MixedScopes => Volatile.Read(ref _mixedScopes);

        internal void OpenMixed() => Interlocked.Increment(ref _mixedScopes);

        internal void CloseMixed() => Interlocked.Decrement(ref _mixedScopes);

        /// <summary>The adapter of each row of the mixed batch running on this thread, or null (always null once released).</summary>
        internal MixedBatch? Mixed
        {
            get => _released ? null : _mixed.Value;
            set
            {
                if (!_released)
                    _mixed.Value = value;
            }
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
            string types = string.Join(", ", missing.Select(l => l.SlotLost ? (HostKind?)null : l.Kind).Distinct().Select(k => k switch
            {
                HostKind.Hook => "a layer kept as it is (a sealed nn.Linear, nn.Embedding, nn.Conv1d or nn.Conv2d field, or a layer in a Sequential) runs its adapter in a forward hook, only when invoked with call(x), not forward(x)",
                null => "a layer's own Adapter slot no longer holds the adapter TorchLinear.Lora put there: code outside the library set it",
                _ => "the layer itself was not called",
            }));
            return new InvalidOperationException(
                $"LoRA adapters did not run in this call of {Root.GetType().Name}, so its output lacks their updates: {string.Join(", ", missing.Select(l => l.Path))} " +
                $"({types}). Ways out: invoke these layers with call(x); hold them in a field typed nn.Module<Tensor, Tensor> or as CustomLinear, " +
                "where the adapter runs inside the layer's forward; load the adapter merged (LoraModel.load_adapter(model, dir, merge: true)); " +
                "or, if this forward legitimately skips these layers, say so with LoraModel.AllowUnusedAdapters(model, paths).");
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
                throw new ArgumentException($"LoraModel.AllowUnusedAdapters: {string.Join(", ", unknown)} {(unknown.Count == 1 ? "is" : "are")} not an adapted layer of this model (its adapted layers: {string.Join(", ", Layers.Select(l => l.Path))}).", nameof(paths));
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
