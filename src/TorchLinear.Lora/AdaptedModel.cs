using System;
using System.Collections.Generic;
using System.Linq;
using System.Reflection;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Lora
{
    /// <summary>How an adapter runs inside the layer it adapts.</summary>
    internal enum HostKind
    {
        /// <summary>A <see cref="CustomLinear"/>: its <see cref="CustomLinear.Adapter"/> slot, run by its own forward.</summary>
        Slot,

        /// <summary>A Linear replaced, in its fields and its parent's registry, by a <see cref="LoraWrapper"/>.</summary>
        Wrapper,

        /// <summary>A sealed <c>nn.Linear</c> kept as it is: a forward hook, which TorchSharp runs only through <c>call(x)</c>.</summary>
        Hook,
    }

    /// <summary>One adapted layer of a model: where it is, what hosts the adapter, and how to take it out again.</summary>
    internal sealed class AdaptedLayer
    {
        internal required string Path { get; init; }
        internal required LoraLayer Layer { get; init; }
        internal required HostKind Kind { get; init; }

        /// <summary>The module whose weight the adapter updates (the CustomLinear, the wrapper, or the Linear).</summary>
        internal required nn.Module Host { get; init; }

        /// <summary>Takes the adapter out and leaves the original layer where it was.</summary>
        internal required Action Detach { get; init; }

        internal Parameter Weight => Host switch
        {
            CustomLinear custom => custom.weight,
            LoraWrapper wrapper => wrapper.weight,
            Linear linear => linear.weight,
            _ => throw new InvalidOperationException($"{Path}: {Host.GetType().Name} holds no adapter weight."),
        };

        internal Parameter? Bias => Host switch
        {
            CustomLinear custom => custom.bias,
            LoraWrapper wrapper => wrapper.bias,
            Linear linear => linear.bias,
            _ => null,
        };
    }

    /// <summary>A <c>modules_to_save</c> module and the values it had before the adapter (PEFT's ModulesToSaveWrapper keeps its original module).</summary>
    internal sealed class SavedModule
    {
        internal required string Path { get; init; }
        internal required nn.Module Module { get; init; }

        /// <summary>A copy of each of the module's state_dict entries, by its name in the module.</summary>
        internal required List<(string Name, Tensor Original)> Originals { get; init; }

        /// <summary>Puts the original values back (and returns copies of what was there, when asked).</summary>
        internal List<(string Name, Tensor Value)>? Restore(bool keepCurrent)
        {
            var state = Module.state_dict();
            var current = keepCurrent ? new List<(string, Tensor)>() : null;
            using var noGrad = no_grad();
            foreach (var (name, original) in Originals)
            {
                Tensor live = state[name];
                current?.Add((name, Copy(live)));
                live.copy_(original);
            }
            return current;
        }

        internal void Put(List<(string Name, Tensor Value)> values)
        {
            var state = Module.state_dict();
            using var noGrad = no_grad();
            foreach (var (name, value) in values)
            {
                state[name].copy_(value);
                value.Dispose();
            }
        }

        /// <summary>A copy of a tensor's values that no dispose scope frees, leaving no temporary behind.</summary>
        internal static Tensor Copy(Tensor tensor)
        {
            using (NewDisposeScope())
                return tensor.detach().clone().DetachFromDisposeScope();
        }
    }

    /// <summary>
    /// The bookkeeping of one model's adapters: the config they were made with, the adapted layers, the
    /// <c>modules_to_save</c> originals, the dtypes of the file they came from, and the check that every active adapter
    /// ran in a model call. Every <see cref="LoraLayer"/> of the model holds it, so it lives and dies with the model's
    /// modules: disposing the model (or unloading) frees the originals it keeps.
    /// </summary>
    internal sealed class AdaptedModel
    {
        private object? _preHook, _postHook;
        private bool _released;
        private bool _allowAllUnused;
        private readonly HashSet<int> _allowedUnused = new();

        internal AdaptedModel(nn.Module root, LoraConfig config)
        {
            Root = root;
            Config = config;
        }

        internal nn.Module Root { get; }

        /// <summary>A copy of the config the adapters were made with.</summary>
        internal LoraConfig Config { get; }

        internal List<AdaptedLayer> Layers { get; } = new();

        internal List<SavedModule> Saved { get; } = new();

        /// <summary>The dtype each tensor had in the file it was loaded from, so that saving writes the same bytes back.</summary>
        internal Dictionary<string, ScalarType> FileDtypes { get; set; } = new();

        internal void Add(AdaptedLayer layer)
        {
            layer.Layer.Model = this;
            layer.Layer.RunIndex = Layers.Count;
            layer.Layer.Owner = layer.Path;
            Layers.Add(layer);
        }

        // ---- Did every active adapter run? ------------------------------------------------------------------------

        /// <summary>One model call on this thread: which adapters ran in it.</summary>
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

        /// <summary>The model call ends: every active adapter must have run in it.</summary>
        internal void Exit()
        {
            if (Unlink() is not { } frame)
                return;
            var missing = new List<string>();
            for (int i = 0; i < Layers.Count && i < frame.Ran.Length; i++)
            {
                if (!frame.Ran[i] && Layers[i].Layer.Active && !_allowAllUnused && !_allowedUnused.Contains(i))
                    missing.Add(Layers[i].Path);
            }
            if (missing.Count > 0)
                throw NotRun(missing);
        }

        /// <summary>Called by an adapter each time it adds its term.</summary>
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

        private InvalidOperationException NotRun(List<string> missing)
        {
            string types = string.Join(", ", missing.Select(path => Layers.First(l => l.Path == path)).Select(l => l.Kind).Distinct().Select(k => k switch
            {
                HostKind.Hook => "a sealed nn.Linear runs its adapter only when invoked with call(x), not forward(x)",
                _ => "the layer itself was not called",
            }));
            return new InvalidOperationException(
                $"LoRA adapters did not run in this call of {Root.GetType().Name}, so its output lacks their updates: {string.Join(", ", missing)} " +
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
                _allowedUnused.Add(Layers.FindIndex(l => l.Path == path));
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

        /// <summary>Frees what this model's adapters keep (once): the modules_to_save originals and the root's hooks.</summary>
        internal void Release()
        {
            if (_released)
                return;
            _released = true;
            Remove(_preHook);
            Remove(_postHook);
            _preHook = _postHook = null;
            foreach (var saved in Saved)
            {
                foreach (var (_, original) in saved.Originals)
                    original.Dispose();
            }
            Saved.Clear();
        }
    }
}
