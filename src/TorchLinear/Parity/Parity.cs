using System;
using System.Collections.Generic;
using System.Linq;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear
{
    /// <summary>How <see cref="Parity.Replay(nn.Module, string, ParityOptions?)"/> compares.</summary>
    public sealed record ParityOptions
    {
        /// <summary>Relative tolerance for every comparison; with <see cref="Atol"/>, or neither (then assert_close's
        /// defaults by dtype, <see cref="Equivalence.DefaultTolerances"/>).</summary>
        public double? Rtol { get; init; }

        /// <summary>Absolute tolerance for every comparison; with <see cref="Rtol"/>, or neither.</summary>
        public double? Atol { get; init; }

        /// <summary>Per module path (as in the report, e.g. <c>blocks.0.attn</c>), tolerances that replace the global ones.</summary>
        public IReadOnlyDictionary<string, (double Rtol, double Atol)> ModuleTolerances { get; init; } = new Dictionary<string, (double, double)>();

        /// <summary>Whether NaNs compare equal to NaNs.</summary>
        public bool EqualNan { get; init; }

        /// <summary>Whether to run backward and compare the gradients of the inputs and parameters (default true).</summary>
        public bool Backward { get; init; } = true;

        /// <summary>
        /// How a recorded state_dict entry becomes the port's, for ports that store a tensor differently (a GPT-2
        /// <c>Conv1D</c> weight ported to a Linear is transposed, say): <c>(key, tensor) => tensor'</c>. The same function
        /// maps the recorded gradient of that parameter, so it must be linear in the tensor (transposes, reshapes).
        /// </summary>
        public Func<string, Tensor, Tensor>? ConvertState { get; init; }
    }

    /// <summary>
    /// Replays a run of a PyTorch module, recorded by <c>tools/pytorch/record_parity.py</c>, on its TorchSharp port, and
    /// reports module by module where the port departs from PyTorch.
    /// </summary>
    /// <remarks>
    /// <para>The port's submodules are observed with TorchSharp forward hooks, under the same paths as in PyTorch (the
    /// state_dict's). TorchSharp runs hooks only when a module is invoked with <c>call(x)</c> — as PyTorch runs them
    /// only through <c>module(x)</c>, not <c>module.forward(x)</c> — so a port that should be checked calls its children
    /// with <c>call</c>; a recorded call never seen in .NET is reported as such. Modules whose forward takes one tensor
    /// (<c>nn.Module&lt;Tensor, Tensor&gt;</c>) are observed.</para>
    /// <code>
    /// # Python, once:    record(model.eval(), x, "model.parity.pt")          (tools/pytorch/record_parity.py)
    /// // .NET:           var report = Parity.Replay(port, "model.parity.pt");
    /// //                 Console.WriteLine(report); report.AssertAllClose();
    /// </code>
    /// </remarks>
    public static partial class Parity
    {
        /// <summary>Loads the recording at <paramref name="recordingPath"/> and replays it; see <see cref="Replay(nn.Module, ParityRecording, ParityOptions?)"/>.</summary>
        /// <exception cref="CheckpointFormatException">The file is not a valid parity recording.</exception>
        /// <exception cref="System.IO.FileNotFoundException">There is no such file.</exception>
        /// <exception cref="InvalidOperationException">The recorded state_dict does not fit the port; the message lists every problem.</exception>
        /// <exception cref="ArgumentException">The port is not a module of one tensor input, or the recording has another number of inputs.</exception>
        public static ParityReport Replay(nn.Module module, string recordingPath, ParityOptions? options = null)
        {
            using ParityRecording recording = ParityRecording.Load(recordingPath);
            return Replay(module, recording, options);
        }

        /// <summary>
        /// Loads the recorded state_dict into <paramref name="module"/> (every key, shape and dtype checked first), feeds
        /// it the recorded input, captures every submodule's input and output under its path, runs backward with the
        /// recorded upstream gradient (<c>torch.autograd.grad</c>: no <c>.grad</c> is touched), and compares everything.
        /// The module's weights are left as the recording's.
        /// </summary>
        /// <exception cref="InvalidOperationException">The recorded state_dict does not fit the port; the message lists every problem.</exception>
        /// <exception cref="ArgumentException">The port is not a module of one tensor input, or the recording has another number of inputs.</exception>
        public static ParityReport Replay(nn.Module module, ParityRecording recording, ParityOptions? options = null)
        {
            ArgumentNullException.ThrowIfNull(module);
            ArgumentNullException.ThrowIfNull(recording);
            options ??= new ParityOptions();
            if (options.Rtol.HasValue != options.Atol.HasValue)
                throw new ArgumentException("ParityOptions: give both Rtol and Atol, or neither.", nameof(options));
            if (module is not nn.Module<Tensor, Tensor> root)
                throw new ArgumentException($"Parity.Replay drives modules of one tensor input (nn.Module<Tensor, Tensor>); {module.GetType().Name} is not one.", nameof(module));
            if (recording.InputCount != 1)
                throw new ArgumentException($"The recording has {recording.InputCount} inputs; Parity.Replay drives modules of one.", nameof(recording));

            using var scope = NewDisposeScope();
            LoadState(root, recording, options);

            using var capture = new CallCapture(root);
            Tensor recordedInput = recording.Get("input/0") ?? throw new ArgumentException("The recording has no input/0.", nameof(recording));
            bool differentiable = is_floating_point(recordedInput.dtype) || is_complex(recordedInput.dtype);
            Tensor leaf = recordedInput.detach().clone().requires_grad_(differentiable && options.Backward);
            Tensor output;
            using (enable_grad())
                output = root.call(leaf);
            capture.Stop();
            var rows = CompareCalls(recording.CallOrder, recording.ModuleTypes, recording.CallInputs, key => recording.Get($"call/{key}/output"), capture.Calls, options);
            var gradients = options.Backward ? Gradients(root, recording, options, leaf, output) : new List<ParityRow>();
            return new ParityReport(recording.Path, recording.TorchVersion, recording.ModuleType, rows, gradients);
        }

        /// <summary>
        /// One row per recorded call, in the recorded order, then one per call seen only in .NET: the port's captured
        /// output against the recorded one, with whether the inputs matched.
        /// </summary>
        internal static List<ParityRow> CompareCalls(IReadOnlyList<string> callOrder, IReadOnlyDictionary<string, string> moduleTypes,
                                                     Func<string, List<Tensor>> inputsOf, Func<string, Tensor?> outputOf,
                                                     IReadOnlyList<(string Key, string ModuleType, Tensor Input, Tensor Output)> calls, ParityOptions options)
        {
            var byKey = calls.ToDictionary(c => c.Key);
            var recorded = new HashSet<string>(callOrder);
            var rows = new List<ParityRow>();
            foreach (string key in callOrder)
            {
                string type = moduleTypes.GetValueOrDefault(key, "?");
                Tensor? expected = outputOf(key);
                if (!byKey.TryGetValue(key, out var seen))
                {
                    rows.Add(new ParityRow(Display(key), type, ParityStatus.NotCalledInDotNet, null, 0, 0, 0,
                        $"{Display(key)} was called in PyTorch but not seen in .NET: call it with call(x), not forward(x)."));
                    continue;
                }
                var tolerance = Tolerances(options, Strip(key));
                bool? inputsMatch = InputsMatch(inputsOf(key), seen.Input, tolerance, options.EqualNan);
                rows.Add(expected is null
                    ? new ParityRow(Display(key), type, ParityStatus.NoTensorOutput, inputsMatch, 0, 0, 0, "the recorded call returned no tensor")
                    : Row(Display(key), type, seen.Output, expected, tolerance, options.EqualNan, inputsMatch));
            }
            foreach (var call in calls.Where(c => !recorded.Contains(c.Key)))
                rows.Add(new ParityRow(Display(call.Key), call.ModuleType, ParityStatus.OnlyInDotNet, null, 0, 0, 0,
                    $"{Display(call.Key)} was called in .NET but not in the recorded run."));
            return rows;
        }

        private static void LoadState(nn.Module<Tensor, Tensor> root, ParityRecording recording, ParityOptions options)
        {
            var state = new Dictionary<string, Tensor>();
            foreach (var (key, tensor) in recording.StateDict())
                state[key] = options.ConvertState is null ? tensor : options.ConvertState(key, tensor);
            var problems = StateDicts.Problems(root, state);
            if (problems.Count > 0)
                throw new InvalidOperationException(
                    $"Parity.Replay: the state_dict recorded in '{recording.Path}' does not fit the port {root.GetType().Name}, nothing was changed: {string.Join("; ", problems)}. " +
                    "Name the port's submodules and parameters as the PyTorch model does, or convert entries with ParityOptions.ConvertState.");
            // Checked above: TorchSharp's copy_ cannot broadcast or convert anything now.
            root.load_state_dict(state);
        }

        private static List<ParityRow> Gradients(nn.Module<Tensor, Tensor> root, ParityRecording recording, ParityOptions options, Tensor leaf, Tensor output)
        {
            var rows = new List<ParityRow>();
            Tensor? gradOutput = recording.Get("grad_output");
            if (gradOutput is null)
                return rows;
            var parameters = root.named_parameters().Where(p => p.parameter.requires_grad).ToList();
            var wrt = new List<Tensor>();
            if (leaf.requires_grad)
                wrt.Add(leaf);
            wrt.AddRange(parameters.Select(p => (Tensor)p.parameter));
            if (wrt.Count == 0)
                return rows;
            IList<Tensor> grads;
            using (enable_grad())
                grads = autograd.grad(new[] { output }, wrt, new[] { gradOutput }, allow_unused: true);
            var global = Tolerances(options, null);
            int at = 0;
            if (leaf.requires_grad)
            {
                rows.Add(GradientRow("input 0", grads[at++], recording.Get("grad/input/0"), global, options.EqualNan));
            }
            foreach (var (name, _) in parameters)
            {
                Tensor? expected = recording.Get($"grad/param/{name}");
                if (expected is not null && options.ConvertState is not null)
                    expected = options.ConvertState(name, expected);
                rows.Add(GradientRow(name, grads[at++], expected, Tolerances(options, ModulePath(name)), options.EqualNan));
            }
            return rows;
        }

        private static ParityRow GradientRow(string name, Tensor? actual, Tensor? expected, (double? Rtol, double? Atol) tolerance, bool equalNan)
        {
            bool actualMissing = actual is null || actual.IsInvalid;
            if (actualMissing && expected is null)
                return new ParityRow(name, "gradient", ParityStatus.BitExact, null, 0, 0, 0, null);  // unused on both sides
            if (actualMissing)
                return new ParityRow(name, "gradient", ParityStatus.Diverged, null, 0, 0, 0, $"{name} has a gradient in PyTorch but the port's output does not depend on it.");
            if (expected is null)
                return new ParityRow(name, "gradient", ParityStatus.NotRecorded, null, 0, 0, 0, $"{name} has no recorded gradient (PyTorch's output did not depend on it).");
            return Row(name, "gradient", actual!, expected, tolerance, equalNan, null);
        }

        private static ParityRow Row(string path, string type, Tensor actual, Tensor expected, (double? Rtol, double? Atol) tolerance, bool equalNan, bool? inputsMatch)
        {
            if (!TensorFacts.SameShape(actual, expected))
                return new ParityRow(path, type, ParityStatus.ShapeMismatch, inputsMatch, 0, 0, 0,
                    $"{path}: the port's output has shape [{string.Join(", ", actual.shape)}], PyTorch's [{string.Join(", ", expected.shape)}].");
            if (actual.dtype != expected.dtype)
                return new ParityRow(path, type, ParityStatus.DtypeMismatch, inputsMatch, 0, 0, 0,
                    $"{path}: the port's output is {actual.dtype}, PyTorch's {expected.dtype}.");
            string? failure = Equivalence.CheckClose(actual, expected, tolerance.Rtol, tolerance.Atol, equalNan, check_device: false, check_dtype: true, out var scan);
            ParityStatus status = failure is not null ? ParityStatus.Diverged : scan.BitsDiffering == 0 ? ParityStatus.BitExact : ParityStatus.Close;
            return new ParityRow(path, type, status, inputsMatch, scan.MaxAbs, scan.MaxRel, scan.MaxUlp, failure);
        }

        /// <summary>Whether the port's input to a call was close to PyTorch's (null when PyTorch's call had another number of tensor inputs).</summary>
        private static bool? InputsMatch(List<Tensor> recorded, Tensor actual, (double? Rtol, double? Atol) tolerance, bool equalNan)
        {
            if (recorded.Count != 1)
                return null;
            Tensor expected = recorded[0];
            if (!TensorFacts.SameShape(actual, expected) || actual.dtype != expected.dtype)
                return false;
            return Equivalence.CheckClose(actual, expected, tolerance.Rtol, tolerance.Atol, equalNan, check_device: false, check_dtype: true, out _) is null;
        }

        private static (double? Rtol, double? Atol) Tolerances(ParityOptions options, string? path)
        {
            if (path is not null && options.ModuleTolerances.TryGetValue(path, out var specific))
                return (specific.Rtol, specific.Atol);
            return (options.Rtol, options.Atol);
        }

        /// <summary>The module path of a parameter: <c>blocks.0.attn.q_proj.weight</c> → <c>blocks.0.attn.q_proj</c>.</summary>
        private static string ModulePath(string parameter)
        {
            int dot = parameter.LastIndexOf('.');
            return dot < 0 ? "" : parameter[..dot];
        }

        /// <summary>A call key without its repetition suffix (<c>act#1</c> → <c>act</c>).</summary>
        private static string Strip(string key)
        {
            int hash = key.IndexOf('#');
            return hash < 0 ? key : key[..hash];
        }

        private static string Display(string key) => key.Length == 0 || key.StartsWith('#') ? "(model)" + key : key;
    }
}
