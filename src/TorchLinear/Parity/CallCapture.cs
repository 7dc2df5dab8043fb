using System;
using System.Collections.Generic;
using TorchSharp;
using static TorchSharp.torch;

namespace TorchLinear
{
    /// <summary>
    /// Watches a port's forward: every call of a module of one tensor in and out, under the module's path (as PyTorch's
    /// <c>named_modules</c>; the root is ""; a module called again is <c>path#1</c>, <c>path#2</c>, ...), with a copy of
    /// its input and output. TorchSharp runs the hooks this installs only through <c>call(x)</c>.
    /// </summary>
    internal sealed class CallCapture : IDisposable
    {
        private readonly List<Action> _removers = new();
        private readonly Dictionary<string, int> _counts = new();

        internal CallCapture(nn.Module<Tensor, Tensor> root)
        {
            // Every module once, under its first path, the root as "".
            var paths = new Dictionary<nn.Module, string>(ReferenceEqualityComparer.Instance) { [root] = "" };
            foreach (var (name, child) in root.named_modules())
                paths.TryAdd(child, name);
            foreach (var (module, path) in paths)
            {
                if (module is not nn.Module<Tensor, Tensor> hookable)
                    continue;
                var remover = hookable.register_forward_hook((m, input, output) =>
                {
                    int k = _counts.GetValueOrDefault(path);
                    _counts[path] = k + 1;
                    Calls.Add((k == 0 ? path : $"{path}#{k}", m.GetType().Name, input.detach().clone().DetachFromDisposeScope(), output.detach().clone().DetachFromDisposeScope()));
                    return null!;  // keep the output as it is
                });
                _removers.Add(remover.remove);
            }
        }

        /// <summary>The calls seen since the last <see cref="Clear"/>, in the order they finished.</summary>
        internal List<(string Key, string ModuleType, Tensor Input, Tensor Output)> Calls { get; } = new();

        /// <summary>Forgets (and frees) the calls seen so far: the next call of a module is its first again.</summary>
        internal void Clear()
        {
            foreach (var call in Calls)
            {
                call.Input.Dispose();
                call.Output.Dispose();
            }
            Calls.Clear();
            _counts.Clear();
        }

        /// <summary>Takes the hooks out; the calls seen stay until <see cref="Clear"/> or <see cref="Dispose"/>.</summary>
        internal void Stop()
        {
            foreach (var remove in _removers)
                remove();
            _removers.Clear();
        }

        public void Dispose()
        {
            Stop();
            Clear();
        }
    }
}
