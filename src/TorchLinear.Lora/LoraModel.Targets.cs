using System;
using System.Collections.Generic;
using System.Globalization;
using System.Linq;
using System.Reflection;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Lora
{
    public static partial class LoraModel
    {
        /// <summary>A layer the config targets, with the rank and alpha it gets and how it hosts its adapters.</summary>
        internal sealed class Target
        {
            internal required string Path { get; init; }

            /// <summary>The model's own layer: a Linear, CustomLinear or Embedding.</summary>
            internal required nn.Module Module { get; init; }

            /// <summary>What the layer is (<see cref="LoraLayerTypes"/>).</summary>
            internal required ILoraLayerType Type { get; init; }
            internal required nn.Module Parent { get; init; }
            internal required string Name { get; init; }
            internal required int Rank { get; init; }
            internal required double Alpha { get; init; }
            internal required HostKind Kind { get; init; }

            /// <summary>The layer's adapters so far, when another adapter already adapts it.</summary>
            internal AdaptedLayer? Existing { get; init; }

            /// <summary>For <see cref="HostKind.Wrapper"/>: the parent's fields that hold the layer.</summary>
            internal List<FieldInfo> Fields { get; init; } = new();

            internal Parameter Weight => Type.Weight(Module);
        }

        /// <summary>
        /// What PEFT 0.18.1's <c>dispatch_default</c> does to the config, for each layer it adapts for the first time, in the
        /// model's order: a transformers <c>Conv1D</c> sets <c>fan_in_fan_out</c> to true (PEFT warns "fan_in_fan_out is set
        /// to False but the target module is `Conv1D`. Setting fan_in_fan_out to True."), an <c>nn.Linear</c> (here
        /// <c>nn.Linear</c> or <see cref="CustomLinear"/>) sets it to false (PEFT warns likewise); embeddings and
        /// convolutions leave it. So the config the model keeps, and saves, says what PEFT's says; with both kinds targeted
        /// the last one in the model's order decides, as in PEFT. The adapters themselves never read the flag: each layer
        /// type knows its layout.
        /// </summary>
        internal static void SetFanInFanOutAsPeft(LoraConfig config, IEnumerable<Target> targets)
        {
            foreach (var target in targets)
            {
                if (target.Existing is null && target.Type.SetsFanInFanOut is { } value)
                    config.fan_in_fan_out = value;
            }
        }

        /// <summary>A refusal found while targeting, as (config key, rule).</summary>
        internal readonly record struct Refusal(string Key, string Rule);

        /// <summary>
        /// Finds every layer the config targets and decides how it hosts its adapter; refuses (through
        /// <paramref name="refuse"/>, for the config's key) what cannot be adapted. A layer another adapter of
        /// <paramref name="state"/> adapts already is found under its own path, as the model's original layer.
        /// </summary>
        internal static List<Target> Targets(nn.Module model, LoraConfig config, AdaptedModel? state, string caller, Func<Refusal, Exception> refuse)
        {
            var targets = new List<Target>();
            var refused = new List<string>();
            var modules = model.named_modules().ToList();
            var adapted = state?.Layers.ToDictionary(l => l.Path, StringComparer.Ordinal) ?? new Dictionary<string, AdaptedLayer>();
            // TorchSharp's named_modules lists a module registered under two names twice (PyTorch's lists it once).
            var firstPath = new Dictionary<nn.Module, string>(ReferenceEqualityComparer.Instance);
            foreach (var (path, found) in modules)
            {
                // The adapters' own modules (lora_A.default, lora_layer, ...) are not the model's.
                if (adapted.Keys.Any(p => path.StartsWith(p + ".", StringComparison.Ordinal)))
                    continue;
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
                adapted.TryGetValue(path, out var existing);
                nn.Module module = existing?.Module ?? found;
                bool allLinear = config.TargetModulesRegex is { } regex && ModuleMatching.IsAllLinear(regex);
                var type = LoraLayerTypes.Of(module);
                if (type is not null && !type.IsLinear && allLinear)
                    continue;  // PEFT's all-linear: linear layers only
                if (type is null)
                {
                    // A regex or a suffix may name containers too (self_attn when q_proj is meant): only layers matter;
                    // "all-linear" means the linear layers only.
                    if (!allLinear && !module.named_children().Any())
                        refused.Add($"{path} is a {module.GetType().Name}, {LoraLayerTypes.Neither}");
                    continue;
                }
                if (firstPath.TryGetValue(module, out string? first))
                {
                    refused.Add($"{path} is the module {first} is, registered under two names (TorchSharp lists it under both; an adapter would go into it twice)");
                    continue;
                }
                firstPath[module] = path;
                var (parent, name) = ParentOf(model, path);
                Parameter weight = type.Weight(module);
                if (weight.dtype is not (ScalarType.Float32 or ScalarType.Float64 or ScalarType.Float16 or ScalarType.BFloat16))
                {
                    refused.Add($"{path} is {weight.dtype}; adapters are made for Float32, Float64, Float16 and BFloat16 layers");
                    continue;
                }
                if (type.Refusal(path, module, config, existing is not null) is { } refusal)
                {
                    refused.Add(refusal);
                    continue;
                }
                if (existing is null)
                {
                    foreach (string child in LoraLayerTypes.ReservedChildren)
                    {
                        if (module.named_children().Any(m => m.name == child))
                            refused.Add($"{path} already has a child named {child}");
                    }
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
                var fields = existing is null && type.WrapperType is { } wrapper ? WrappableFields(parent, module, wrapper) : null;
                var kind = existing?.Kind ?? (type.WrapperType is null ? HostKind.Slot : fields is not null ? HostKind.Wrapper : HostKind.Hook);
                targets.Add(new Target
                {
                    Path = path, Module = module, Type = type, Parent = parent, Name = name, Rank = rank, Alpha = alpha, Kind = kind, Fields = fields ?? new(), Existing = existing,
                });
            }
            if (refused.Count > 0)
                throw new ArgumentException($"{caller}: cannot adapt {string.Join("; ", refused)}.");
            if (targets.Count == 0)
            {
                string what = config.TargetModulesRegex ?? $"[{string.Join(", ", config.target_modules ?? Array.Empty<string>())}]";
                throw new ArgumentException($"{caller}: target_modules {what} matches no {LoraLayerTypes.AnyOf} in the model (its modules: {string.Join(", ", modules.Select(m => m.name).Take(20))}{(modules.Count > 20 ? ", ..." : "")}).");
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
        /// The parent's fields that hold <paramref name="layer"/>, when every one of them (and the parent's registry) can
        /// hold the wrapper instead; null when the layer must keep its type (a field of the sealed <c>Linear</c> or
        /// <c>Embedding</c> type, a Sequential, a ModuleList or ModuleDict of them, or a layer no field holds).
        /// </summary>
        private static List<FieldInfo>? WrappableFields(nn.Module parent, nn.Module layer, Type wrapper)
        {
            Type type = parent.GetType();
            if (parent is Sequential || IsContainer(type))
                return ContainerAccepts(type, wrapper) && parent is not Sequential ? new List<FieldInfo>() : null;
            var fields = new List<FieldInfo>();
            for (Type? t = type; t is not null && t.Assembly != typeof(nn.Module).Assembly; t = t.BaseType)
            {
                foreach (var field in t.GetFields(BindingFlags.Instance | BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.DeclaredOnly))
                {
                    if (ReferenceEquals(field.GetValue(parent), layer))
                    {
                        if (!field.FieldType.IsAssignableFrom(wrapper))
                            return null;
                        fields.Add(field);
                    }
                }
            }
            return fields.Count > 0 ? fields : null;
        }

        private static bool IsContainer(Type type) =>
            type.IsGenericType && (type.GetGenericTypeDefinition() == typeof(ModuleList<>) || type.GetGenericTypeDefinition() == typeof(ModuleDict<>));

        private static bool ContainerAccepts(Type type, Type wrapper) =>
            IsContainer(type) && type.GetGenericArguments()[0].IsAssignableFrom(wrapper);

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

        /// <summary>Makes the target's layer a host of adapters, as its kind says, and says how to take it out again.</summary>
        private static AdaptedLayer Attach(Target target)
        {
            var layer = new AdaptedLayer(target.Path, target.Module, target.Type) { Kind = target.Kind };
            switch (target.Kind)
            {
                case HostKind.Slot:
                {
                    layer.Host = target.Module;
                    layer.Detach = target.Type.AttachInPlace(target.Module, layer)
                        ?? throw new InvalidOperationException($"{target.Path}: {target.Type.Name} has no adapter slot of its own.");
                    break;
                }
                case HostKind.Wrapper:
                {
                    nn.Module wrapper = target.Type.Wrap(target.Module, layer);
                    layer.Host = wrapper;
                    foreach (var field in target.Fields)
                        field.SetValue(target.Parent, wrapper);
                    ReplaceChild(target.Parent, target.Name, wrapper);
                    layer.Detach = () =>
                    {
                        nn.Module original = ((IAdapterWrapper)wrapper).Unwrap();
                        foreach (var field in target.Fields)
                            field.SetValue(target.Parent, original);
                        ReplaceChild(target.Parent, target.Name, original);
                    };
                    break;
                }
                default:
                {
                    var host = (nn.Module<Tensor, Tensor>)target.Module;
                    layer.Host = host;
                    var remover = host.register_forward_hook((module, input, output) =>
                    {
                        layer.Apply(output, input, module.training);
                        return null!;  // the output, updated in place
                    });
                    layer.Detach = () => remover.remove();
                    break;
                }
            }
            layer.Register();
            return layer;
        }
    }
}
