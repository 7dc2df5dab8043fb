using System;
using System.Collections;
using System.Collections.Generic;
using System.Linq;
using System.Reflection;
using System.Runtime.CompilerServices;
using TorchSharp;
using static TorchSharp.torch;

namespace TorchLinear
{
    /// <summary>
    /// One module call seen by a <see cref="CallCapture"/>: the call key, the module, and copies of its tensor inputs
    /// (taken before the module ran) and tensor outputs (taken as it returned), flattened in order.
    /// </summary>
    public sealed class CapturedCall
    {
        internal CapturedCall(string key, string path, int index, nn.Module module, IReadOnlyList<Tensor> inputs)
        {
            Key = key;
            Path = path;
            Index = index;
            Module = module;
            ModuleType = CallCapture.TypeName(module.GetType());
            Inputs = inputs;
        }

        /// <summary>The call key: the module path (root ""), with <c>#k</c> for the k-th call again (<c>act#1</c>).</summary>
        public string Key { get; }

        /// <summary>The module path, without the <c>#k</c> suffix.</summary>
        public string Path { get; }

        /// <summary>Which call of the module this is, from 0.</summary>
        public int Index { get; }

        /// <summary>The module called.</summary>
        public nn.Module Module { get; }

        /// <summary>The module's class name (without a generic arity suffix).</summary>
        public string ModuleType { get; }

        /// <summary>Copies of the tensors the module was given, taken before it ran (an in-place module cannot change
        /// them), flattened as <see cref="CallCapture.Flatten"/> does.</summary>
        public IReadOnlyList<Tensor> Inputs { get; }

        /// <summary>Copies of the tensors the module returned, flattened as <see cref="CallCapture.Flatten"/> does;
        /// empty until the call finished.</summary>
        public IReadOnlyList<Tensor> Outputs { get; internal set; } = Array.Empty<Tensor>();

        /// <summary>Whether the call returned (false while it runs, or when its forward threw).</summary>
        public bool Finished { get; internal set; }

        internal void Dispose()
        {
            foreach (Tensor t in Inputs)
                t.Dispose();
            foreach (Tensor t in Outputs)
                t.Dispose();
        }
    }

    /// <summary>
    /// Watches a port's forward: every call of a module of TorchSharp's generic kinds (<c>nn.Module&lt;T, TResult&gt;</c>,
    /// <c>nn.Module&lt;T1, T2, TResult&gt;</c>, ... up to six arguments) under the module's path (as PyTorch's
    /// <c>named_modules</c>; the root is ""; a module called again is <c>path#1</c>, <c>path#2</c>, ...), with copies of
    /// its tensor inputs and outputs. Tensors are collected from the arguments in order, and from tuples
    /// (<c>ValueTuple</c>, <c>Tuple</c>), arrays, lists and dictionaries (their values) depth first, as the recorder
    /// flattens PyTorch's; anything else is skipped. Inputs are copied in a forward pre-hook, so an in-place module
    /// (<c>ReLU(inplace: true)</c>) cannot change what was recorded as its input; outputs in the forward hook.
    /// TorchSharp runs these hooks only through <c>call(...)</c>, never through <c>forward(...)</c>.
    /// </summary>
    /// <remarks>
    /// Every copy is owned by the capture (outside any dispose scope) and freed by <see cref="Clear"/> or
    /// <see cref="Dispose"/>. Modules that are not of a generic kind (a bare <c>nn.Module</c>, <c>ModuleList</c>) cannot
    /// be watched; they are listed in <see cref="Unwatched"/>.
    /// </remarks>
    public sealed class CallCapture : IDisposable
    {
        private readonly List<Action> _removers = new();
        private readonly Dictionary<string, int> _counts = new();
        private readonly Dictionary<string, Stack<CapturedCall>> _running = new();
        private readonly List<CapturedCall> _calls = new();
        private readonly List<string> _startOrder = new();

        private static readonly Type[] Kinds =
        {
            typeof(nn.Module<,>), typeof(nn.Module<,,>), typeof(nn.Module<,,,>), typeof(nn.Module<,,,,>),
            typeof(nn.Module<,,,,,>), typeof(nn.Module<,,,,,,>),
        };

        /// <summary>Installs hooks on <paramref name="root"/> and every module under it (each module once, under its first path).</summary>
        public CallCapture(nn.Module root)
        {
            ArgumentNullException.ThrowIfNull(root);
            var paths = new Dictionary<nn.Module, string>(ReferenceEqualityComparer.Instance) { [root] = "" };
            foreach (var (name, child) in root.named_modules())
                paths.TryAdd(child, name);
            var unwatched = new List<string>();
            foreach (var (module, path) in paths)
            {
                Type? kind = GenericKind(module.GetType());
                if (kind is null)
                {
                    unwatched.Add(path);
                    continue;
                }
                Type[] arguments = kind.GetGenericArguments();
                MethodInfo install = typeof(CallCapture).GetMethod($"Install{arguments.Length - 1}", BindingFlags.NonPublic | BindingFlags.Instance)!
                                                        .MakeGenericMethod(arguments);
                install.Invoke(this, new object[] { module, path });
            }
            Unwatched = unwatched;
        }

        /// <summary>The calls seen since the last <see cref="Clear"/>, in the order they finished (children before parents).</summary>
        public IReadOnlyList<CapturedCall> Calls => _calls;

        /// <summary>The keys of the calls seen since the last <see cref="Clear"/>, in the order they started (parents before children).</summary>
        public IReadOnlyList<string> StartOrder => _startOrder;

        /// <summary>Paths of the modules that could not be watched (not of a generic <c>nn.Module&lt;...&gt;</c> kind).</summary>
        public IReadOnlyList<string> Unwatched { get; }

        /// <summary>The generic <c>nn.Module&lt;...&gt;</c> base of a module type, or null.</summary>
        internal static Type? GenericKind(Type type)
        {
            for (Type? t = type; t is not null; t = t.BaseType)
            {
                if (t.IsGenericType && Array.IndexOf(Kinds, t.GetGenericTypeDefinition()) >= 0)
                    return t;
            }
            return null;
        }

        /// <summary>A class name without its generic arity suffix (<c>Foo`1</c> → <c>Foo</c>).</summary>
        internal static string TypeName(Type type)
        {
            int tick = type.Name.IndexOf('`');
            return tick < 0 ? type.Name : type.Name[..tick];
        }

        /// <summary>
        /// The tensors in a value, in order: a tensor itself; the items of a tuple (<c>ValueTuple</c>, <c>Tuple</c>), an
        /// array or a list, and the values of a dictionary, depth first; nothing for anything else (null, numbers, strings).
        /// The tensors are the value's own, not copies.
        /// </summary>
        public static List<Tensor> Flatten(object? value)
        {
            var into = new List<Tensor>();
            FlattenInto(value, into, 0);
            return into;
        }

        private static void FlattenInto(object? value, List<Tensor> into, int depth)
        {
            if (depth > 32)
                return;
            switch (value)
            {
                case null:
                case string:
                    return;
                case Tensor tensor:
                    into.Add(tensor);
                    return;
                case ITuple tuple:
                    for (int i = 0; i < tuple.Length; i++)
                        FlattenInto(tuple[i], into, depth + 1);
                    return;
                case IDictionary dictionary:
                    foreach (DictionaryEntry entry in dictionary)
                        FlattenInto(entry.Value, into, depth + 1);
                    return;
                case IEnumerable items when value.GetType().IsArray || value is IList || IsGenericEnumerableOfValues(value.GetType()):
                    foreach (object? item in items)
                        FlattenInto(item, into, depth + 1);
                    return;
            }
        }

        /// <summary>A read-only list or dictionary (IReadOnlyList, IReadOnlyDictionary's values) not caught above.</summary>
        private static bool IsGenericEnumerableOfValues(Type type) =>
            type.GetInterfaces().Any(i => i.IsGenericType && i.GetGenericTypeDefinition() == typeof(IReadOnlyList<>));

        private static List<Tensor> Copies(object? value)
        {
            var copies = new List<Tensor>();
            foreach (Tensor tensor in Flatten(value))
            {
                if (tensor.IsInvalid)
                    continue;
                using var view = tensor.detach();
                copies.Add(view.clone().DetachFromDisposeScope());
            }
            return copies;
        }

        private void Started(nn.Module module, string path, object? inputs)
        {
            int k = _counts.GetValueOrDefault(path);
            _counts[path] = k + 1;
            string key = k == 0 ? path : $"{path}#{k}";
            var call = new CapturedCall(key, path, k, module, Copies(inputs));
            if (!_running.TryGetValue(path, out var stack))
                _running[path] = stack = new Stack<CapturedCall>();
            stack.Push(call);
            _startOrder.Add(key);
        }

        private void Finished(string path, object? result)
        {
            if (!_running.TryGetValue(path, out var stack) || stack.Count == 0)
                return;  // started before the capture was cleared
            CapturedCall call = stack.Pop();
            call.Outputs = Copies(result);
            call.Finished = true;
            _calls.Add(call);
        }

        // One installer per arity, made concrete with MakeGenericMethod: TorchSharp's hook delegates are typed by the
        // module's own generic arguments. A pre-hook that returns its input (arity 1) or null (more) changes nothing;
        // a post-hook that returns the result changes nothing (TorchSharp replaces the result with any non-null value).

        private void Install1<T, TResult>(nn.Module<T, TResult> module, string path)
        {
            var pre = module.register_forward_pre_hook((m, x) => { Started(m, path, x); return x; });
            var post = module.register_forward_hook((m, x, result) => { Finished(path, result); return result; });
            _removers.Add(pre.remove);
            _removers.Add(post.remove);
        }

        private void Install2<T1, T2, TResult>(nn.Module<T1, T2, TResult> module, string path)
        {
            var pre = module.register_forward_pre_hook((m, x1, x2) => { Started(m, path, (x1, x2)); return null; });
            var post = module.register_forward_hook((m, x1, x2, result) => { Finished(path, result); return result; });
            _removers.Add(pre.remove);
            _removers.Add(post.remove);
        }

        private void Install3<T1, T2, T3, TResult>(nn.Module<T1, T2, T3, TResult> module, string path)
        {
            var pre = module.register_forward_pre_hook((m, x1, x2, x3) => { Started(m, path, (x1, x2, x3)); return null; });
            var post = module.register_forward_hook((m, x1, x2, x3, result) => { Finished(path, result); return result; });
            _removers.Add(pre.remove);
            _removers.Add(post.remove);
        }

        private void Install4<T1, T2, T3, T4, TResult>(nn.Module<T1, T2, T3, T4, TResult> module, string path)
        {
            var pre = module.register_forward_pre_hook((m, x1, x2, x3, x4) => { Started(m, path, (x1, x2, x3, x4)); return null; });
            var post = module.register_forward_hook((m, x1, x2, x3, x4, result) => { Finished(path, result); return result; });
            _removers.Add(pre.remove);
            _removers.Add(post.remove);
        }

        private void Install5<T1, T2, T3, T4, T5, TResult>(nn.Module<T1, T2, T3, T4, T5, TResult> module, string path)
        {
            var pre = module.register_forward_pre_hook((m, x1, x2, x3, x4, x5) => { Started(m, path, (x1, x2, x3, x4, x5)); return null; });
            var post = module.register_forward_hook((m, x1, x2, x3, x4, x5, result) => { Finished(path, result); return result; });
            _removers.Add(pre.remove);
            _removers.Add(post.remove);
        }

        private void Install6<T1, T2, T3, T4, T5, T6, TResult>(nn.Module<T1, T2, T3, T4, T5, T6, TResult> module, string path)
        {
            var pre = module.register_forward_pre_hook((m, x1, x2, x3, x4, x5, x6) => { Started(m, path, (x1, x2, x3, x4, x5, x6)); return null; });
            var post = module.register_forward_hook((m, x1, x2, x3, x4, x5, x6, result) => { Finished(path, result); return result; });
            _removers.Add(pre.remove);
            _removers.Add(post.remove);
        }

        /// <summary>Forgets (and frees) the calls seen so far: the next call of a module is its first again.</summary>
        public void Clear()
        {
            foreach (var call in _calls)
                call.Dispose();
            foreach (var stack in _running.Values)
            {
                foreach (var call in stack)
                    call.Dispose();
            }
            _calls.Clear();
            _running.Clear();
            _startOrder.Clear();
            _counts.Clear();
        }

        /// <summary>Takes the hooks out; the calls seen stay until <see cref="Clear"/> or <see cref="Dispose"/>.</summary>
        public void Stop()
        {
            foreach (var remove in _removers)
                remove();
            _removers.Clear();
        }

        /// <summary>Takes the hooks out and frees every copy.</summary>
        public void Dispose()
        {
            Stop();
            Clear();
        }
    }
}
