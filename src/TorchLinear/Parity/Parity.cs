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

        /// <summary>
        /// The rounding rule: a compared tensor (a call's output, a call's input for "inputs match", a gradient) that fails
        /// the tolerances is still not a divergence when max |port − PyTorch| ≤ <c>NoiseFactor</c> × PyTorch's own
        /// rounding error of that tensor (recorded by the float64 reference run: <see cref="ParityRecording.Noise"/>); its
        /// row is <see cref="ParityStatus.WithinRounding"/>. By the triangle inequality this admits a port whose own
        /// rounding error is at most <c>NoiseFactor − 1</c> times PyTorch's. 0 turns the rule off (tolerances alone), as
        /// does a recording without a rounding reference. The default is calibrated on real models (docs/parity.md).
        /// </summary>
        public double NoiseFactor { get; init; } = DefaultNoiseFactor;

        /// <summary>The default of <see cref="NoiseFactor"/> (derived in docs/parity.md).</summary>
        public const double DefaultNoiseFactor = 4;

        /// <summary>
        /// Port module path → recorded module path, for modules the port names differently (TorchVision.NET's BasicBlock
        /// calls its ReLU <c>relu1</c> where torchvision's is <c>relu</c>): exact module paths, the root is "". Calls keep
        /// their <c>#k</c> suffix (the port's <c>layer1.0.relu1#1</c> is compared with <c>layer1.0.relu#1</c>). The modes
        /// check uses it too; state_dict keys are not mapped (use <see cref="ConvertState"/>'s names). A report suggests
        /// pairings in <see cref="ParityReport.SuggestedNameMap"/>.
        /// </summary>
        public IReadOnlyDictionary<string, string> NameMap { get; init; } = new Dictionary<string, string>();
    }

    /// <summary>
    /// Replays a run of a PyTorch module, recorded by <c>tools/pytorch/record_parity.py</c>, on its TorchSharp port, and
    /// reports module by module where the port departs from PyTorch.
    /// </summary>
    /// <remarks>
    /// <para>The port's submodules are observed with TorchSharp forward hooks, under the same paths as in PyTorch (the
    /// state_dict's). TorchSharp runs hooks only when a module is invoked with <c>call(...)</c> — as PyTorch runs them
    /// only through <c>module(x)</c>, not <c>module.forward(x)</c> — so a port that should be checked calls its children
    /// with <c>call</c>; a recorded call never seen in .NET is reported as such. Every module of TorchSharp's generic
    /// kinds is observed (<c>nn.Module&lt;T, TResult&gt;</c> up to six arguments; tensors inside tuples, arrays, lists
    /// and dictionaries are flattened in order, see <see cref="CallCapture"/>).</para>
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
        /// <exception cref="InvalidOperationException">The port's modules are in another mode than the recording's, or the
        /// recorded state_dict does not fit the port; the message lists every problem.</exception>
        /// <exception cref="ArgumentException">The port's forward does not take tensors, or the recording has another number of inputs.</exception>
        public static ParityReport Replay(nn.Module module, string recordingPath, ParityOptions? options = null)
        {
            using ParityRecording recording = ParityRecording.Load(recordingPath);
            return Replay(module, recording, options);
        }

        /// <summary>
        /// Checks that the port's modules are in the recording's modes (training or eval), loads the recorded state_dict
        /// into <paramref name="module"/> (every key, shape and dtype checked first), feeds it the recorded inputs,
        /// captures every submodule's inputs and outputs under its path, runs backward with the recorded upstream gradient
        /// (<c>torch.autograd.grad</c>: no <c>.grad</c> is touched), and compares everything. The module's weights are left
        /// as the recording's.
        /// </summary>
        /// <exception cref="InvalidOperationException">The port's modules are in another mode than the recording's (nothing
        /// is loaded or compared), or the recorded state_dict does not fit the port; the message lists every problem.</exception>
        /// <exception cref="ArgumentException">The port's forward does not take tensors (<c>nn.Module&lt;Tensor, ..., TResult&gt;</c>),
        /// or the recording has another number of inputs.</exception>
        public static ParityReport Replay(nn.Module module, ParityRecording recording, ParityOptions? options = null)
        {
            ArgumentNullException.ThrowIfNull(module);
            ArgumentNullException.ThrowIfNull(recording);
            options ??= new ParityOptions();
            if (options.Rtol.HasValue != options.Atol.HasValue)
                throw new ArgumentException("ParityOptions: give both Rtol and Atol, or neither.", nameof(options));
            if (!(options.NoiseFactor >= 0) || double.IsInfinity(options.NoiseFactor))
                throw new ArgumentException($"ParityOptions.NoiseFactor must be a finite number >= 0 (0 turns the rounding rule off), not {options.NoiseFactor}.", nameof(options));
            Type? kind = CallCapture.GenericKind(module.GetType());
            Type[] arguments = kind?.GetGenericArguments() ?? Array.Empty<Type>();
            if (kind is null || arguments[..^1].Any(t => t != typeof(Tensor)))
                throw new ArgumentException($"Parity.Replay drives modules whose forward takes tensors (nn.Module<Tensor, TResult>, nn.Module<Tensor, Tensor, TResult>, ...); {module.GetType().Name} is not one.", nameof(module));
            if (recording.InputCount != arguments.Length - 1)
                throw new ArgumentException($"The recording '{recording.Path}' has {recording.InputCount} inputs; {module.GetType().Name}'s forward takes {arguments.Length - 1} tensor{(arguments.Length == 2 ? "" : "s")}.", nameof(recording));

            CheckModes(module, recording.Training, options, recording.Path);
            using var scope = NewDisposeScope();
            LoadState(module, recording, options);

            var leaves = new List<Tensor>();
            for (int i = 0; i < recording.InputCount; i++)
            {
                Tensor recordedInput = recording.Get($"input/{i}") ?? throw new ArgumentException($"The recording '{recording.Path}' has no input/{i}.", nameof(recording));
                bool differentiable = is_floating_point(recordedInput.dtype) || is_complex(recordedInput.dtype);
                leaves.Add(recordedInput.detach().clone().requires_grad_(differentiable && options.Backward));
            }
            using var capture = new CallCapture(module);
            object? result;
            using (enable_grad())
            {
                try
                {
                    result = kind.GetMethod("call")!.Invoke(module, leaves.Cast<object>().ToArray());
                }
                catch (System.Reflection.TargetInvocationException error) when (error.InnerException is not null)
                {
                    System.Runtime.ExceptionServices.ExceptionDispatchInfo.Capture(error.InnerException).Throw();
                    throw;
                }
            }
            capture.Stop();
            var outputs = CallCapture.Flatten(result);
            var recorded = new RecordedRun(recording.CallOrder, recording.CallStartOrder, recording.ModuleTypes, recording.CallInputs,
                                           recording.CallOutputs, recording.NoiseOf);
            var (rows, suggestions) = CompareCalls(recorded, capture.Calls, module, options);
            var gradients = new List<ParityRow>();
            if (options.Backward && recording.OutputIndex < outputs.Count)
                gradients = Gradients(module, recording, options, leaves, outputs[recording.OutputIndex]);
            else if (options.Backward && recording.Get("grad_output") is not null)
                throw new ArgumentException($"The recording '{recording.Path}' took the root's output tensor {recording.OutputIndex} for its gradient; the port returned {outputs.Count} tensors.", nameof(recording));
            var backward = BackwardOrder(gradients, recorded);
            string? rounding = recording.HasRoundingReference ? null
                : recording.FormatVersion == 1 ? "a version 1 recording has no rounding reference"
                : recording.NoiseUnavailable is { } why ? $"the recorder could not run the model in float64 ({why})"
                : "the recording has no float64 reference (recorded with reference64=False)";
            return new ParityReport(recording.Path, recording.TorchVersion, recording.ModuleType, rows, gradients, backward, suggestions,
                                    rounding, options.NoiseFactor);
        }

        /// <summary>What a recording holds about one forward: the calls, in finish and start order, and how to read them.</summary>
        internal sealed record RecordedRun(IReadOnlyList<string> CallOrder, IReadOnlyList<string>? StartOrder, IReadOnlyDictionary<string, string> ModuleTypes,
                                           Func<string, List<Tensor>> InputsOf, Func<string, List<Tensor>> OutputsOf, Func<string, double?> NoiseOf);

        /// <summary>
        /// Refuses a port whose modules' <c>training</c> flags differ from the recorded ones (by path, through
        /// <see cref="ParityOptions.NameMap"/>), before anything is loaded or compared. Without recorded flags (version 1) it checks nothing.
        /// </summary>
        internal static void CheckModes(nn.Module port, IReadOnlyDictionary<string, bool>? recorded, ParityOptions options, string path)
        {
            if (recorded is null)
                return;
            var trainingHere = new List<(string Path, nn.Module Module)>();
            var evalHere = new List<(string Path, nn.Module Module)>();
            foreach (var (portPath, module) in new[] { ("", port) }.Concat(port.named_modules()))
            {
                string recordedPath = MapPath(portPath, options);
                if (!recorded.TryGetValue(recordedPath, out bool training) || training == module.training)
                    continue;
                (module.training ? trainingHere : evalHere).Add((Display(portPath), module));
            }
            if (trainingHere.Count == 0 && evalHere.Count == 0)
                return;
            var parts = new List<string>();
            static string List(List<(string Path, nn.Module Module)> modules)
            {
                // The modules whose result depends on the mode first: they are why it matters.
                var modal = modules.Where(m => IsModal(m.Module)).ToList();
                var others = modules.Where(m => !IsModal(m.Module)).Select(m => m.Path).ToList();
                if (modal.Count == 0)
                    return string.Join(", ", others);
                string text = $"{modal.Count} that compute differently by mode: {string.Join(", ", modal.Select(m => $"{m.Path} ({CallCapture.TypeName(m.Module.GetType())})"))}";
                return others.Count == 0 ? text : $"{text}; {others.Count} other{(others.Count == 1 ? "" : "s")}: {string.Join(", ", others)}";
            }
            if (trainingHere.Count > 0)
                parts.Add($"the recording was made with {trainingHere.Count} module{(trainingHere.Count == 1 ? "" : "s")} in eval mode that the port has in training mode (call port.eval()): {List(trainingHere)}");
            if (evalHere.Count > 0)
                parts.Add($"the recording was made with {evalHere.Count} module{(evalHere.Count == 1 ? "" : "s")} in training mode that the port has in eval mode (call port.train(), or train those modules): {List(evalHere)}");
            throw new InvalidOperationException(
                $"Parity.Replay: {string.Join(". And ", parts)}. A module in another mode computes something else (BatchNorm's batch statistics, Dropout); nothing was loaded or compared ('{path}').");
        }

        /// <summary>Whether a module computes differently in training mode (normalisation with batch statistics, dropout).</summary>
        private static bool IsModal(nn.Module module)
        {
            string type = CallCapture.TypeName(module.GetType());
            return type.Contains("BatchNorm", StringComparison.Ordinal) || type.Contains("InstanceNorm", StringComparison.Ordinal)
                || type.Contains("Dropout", StringComparison.Ordinal) || type == "MultiheadAttention";
        }

        /// <summary>A port's module path as the recording names it (<see cref="ParityOptions.NameMap"/>).</summary>
        private static string MapPath(string portPath, ParityOptions options) =>
            options.NameMap.TryGetValue(portPath, out string? recorded) ? recorded : portPath;

        /// <summary>A port's call key as the recording names it: the module path mapped, the <c>#k</c> suffix kept.</summary>
        private static string MapKey(CapturedCall call, ParityOptions options)
        {
            string path = MapPath(call.Path, options);
            return call.Index == 0 ? path : $"{path}#{call.Index}";
        }

        /// <summary>
        /// One row per recorded call, in the recorded order, then one per call seen only in .NET: the port's captured
        /// outputs against the recorded ones, with whether the inputs matched; and the suggested pairings of calls only in
        /// .NET with recorded calls the port has no module for (port path → recorded path).
        /// </summary>
        internal static (List<ParityRow> Rows, Dictionary<string, string> Suggestions) CompareCalls(RecordedRun recorded, IReadOnlyList<CapturedCall> calls,
                                                                                                      nn.Module port, ParityOptions options)
        {
            var byKey = new Dictionary<string, CapturedCall>();
            foreach (var call in calls)
                byKey.TryAdd(MapKey(call, options), call);
            var recordedKeys = new HashSet<string>(recorded.CallOrder);
            // The port's modules, by the path the recording would name them.
            var portModules = new Dictionary<string, (string PortPath, nn.Module Module)>();
            foreach (var (portPath, module) in new[] { ("", port) }.Concat(port.named_modules()))
                portModules.TryAdd(MapPath(portPath, options), (portPath, module));
            var onlyHere = calls.Where(c => !recordedKeys.Contains(MapKey(c, options))).ToList();
            var suggestions = SuggestPairings(recorded, onlyHere, portModules, options);

            var rows = new List<ParityRow>();
            foreach (string key in recorded.CallOrder)
            {
                string type = recorded.ModuleTypes.GetValueOrDefault(key, "?");
                string path = Strip(key);
                if (!byKey.TryGetValue(key, out var seen))
                {
                    if (portModules.TryGetValue(path, out var here))
                    {
                        int times = calls.Count(c => MapPath(c.Path, options) == path);
                        string portName = here.PortPath == path ? Display(path) : $"{Display(path)} (the port's {Display(here.PortPath)})";
                        string detail = times > 0
                            ? $"{Display(key)} was called in PyTorch but not seen in .NET: the port called {portName} only {times} time{(times == 1 ? "" : "s")}; this call is computed without a module in the port? (or the other calls go through forward(x) instead of call(x))"
                            : CallCapture.GenericKind(here.Module.GetType()) is null
                                ? $"{Display(key)} was called in PyTorch but not seen in .NET: the port's {portName} ({CallCapture.TypeName(here.Module.GetType())}) is not an nn.Module<...> whose calls can be watched."
                                : $"{Display(key)} was called in PyTorch but not seen in .NET: the port has the module {portName} ({CallCapture.TypeName(here.Module.GetType())}) but never invoked it through call(x) — call it with call(x), not forward(x) — or the port computes this step without calling it.";
                        rows.Add(new ParityRow(Display(key), type, ParityStatus.NotCalledInDotNet, null, 0, 0, 0, detail));
                    }
                    else
                    {
                        string? pairing = suggestions.FirstOrDefault(kv => kv.Value == path).Key;
                        string detail = pairing is not null
                            ? $"{Display(key)} was called in PyTorch; the port has no module at {Display(path)}: named differently? The port's {Display(pairing)} has the same type and output shapes (ParityOptions.NameMap[\"{pairing}\"] = \"{path}\", see SuggestedNameMap)."
                            : $"{Display(key)} was called in PyTorch; the port has no module at {Display(path)}: computed without a module in the port? (or named differently: ParityOptions.NameMap)";
                        rows.Add(new ParityRow(Display(key), type, ParityStatus.NoModuleInPort, null, 0, 0, 0, detail));
                    }
                    continue;
                }
                var tolerance = Tolerances(options, path);
                bool? inputsMatch = InputsMatch(key, recorded.InputsOf(key), seen.Inputs, tolerance, options, recorded.NoiseOf);
                var expected = recorded.OutputsOf(key);
                rows.Add(expected.Count == 0
                    ? new ParityRow(Display(key), type, ParityStatus.NoTensorOutput, inputsMatch, 0, 0, 0, "the recorded call returned no tensor")
                    : OutputsRow(Display(key), type, key, seen.Outputs, expected, tolerance, options, recorded.NoiseOf, inputsMatch));
            }
            foreach (var call in onlyHere)
            {
                string mapped = MapKey(call, options);
                string detail = suggestions.TryGetValue(call.Path, out string? pairing)
                    ? $"{Display(call.Key)} was called in .NET but not in the recorded run: named differently? PyTorch's {Display(pairing)} has the same type and output shapes (ParityOptions.NameMap[\"{call.Path}\"] = \"{pairing}\", see SuggestedNameMap)."
                    : $"{Display(mapped)} was called in .NET but not in the recorded run.";
                rows.Add(new ParityRow(Display(mapped), call.ModuleType, ParityStatus.OnlyInDotNet, null, 0, 0, 0, detail));
            }
            return (rows, suggestions);
        }

        /// <summary>
        /// Pairs modules called only in .NET with recorded modules the port has no module for: the same class name, the same
        /// parent path, the same output shapes of their first calls, in call order. Port path → recorded path.
        /// </summary>
        private static Dictionary<string, string> SuggestPairings(RecordedRun recorded, List<CapturedCall> onlyHere,
                                                                  Dictionary<string, (string PortPath, nn.Module Module)> portModules, ParityOptions options)
        {
            var suggestions = new Dictionary<string, string>();
            var taken = new HashSet<string>();
            // Recorded modules without a module in the port, each with its first call, in recorded order.
            var orphans = recorded.CallOrder.Where(k => !portModules.ContainsKey(Strip(k))).GroupBy(Strip).Select(g => (Path: g.Key, First: g.First())).ToList();
            foreach (var call in onlyHere.Where(c => c.Index == 0))
            {
                string parent = Parent(MapPath(call.Path, options));
                foreach (var (path, first) in orphans)
                {
                    if (taken.Contains(path) || Parent(path) != parent || recorded.ModuleTypes.GetValueOrDefault(first) != call.ModuleType)
                        continue;
                    var shapes = recorded.OutputsOf(first);
                    if (shapes.Count != call.Outputs.Count || shapes.Zip(call.Outputs).Any(p => !TensorFacts.SameShape(p.First, p.Second)))
                        continue;
                    suggestions[call.Path] = path;
                    taken.Add(path);
                    break;
                }
            }
            return suggestions;
        }

        private static string Parent(string path)
        {
            int dot = path.LastIndexOf('.');
            return dot < 0 ? (path.Length == 0 ? "\0root" : "") : path[..dot];
        }

        private static void LoadState(nn.Module root, ParityRecording recording, ParityOptions options)
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

        private static List<ParityRow> Gradients(nn.Module root, ParityRecording recording, ParityOptions options, List<Tensor> leaves, Tensor output)
        {
            var rows = new List<ParityRow>();
            Tensor? gradOutput = recording.Get("grad_output");
            if (gradOutput is null)
                return rows;
            var parameters = root.named_parameters().Where(p => p.parameter.requires_grad).ToList();
            var inputs = Enumerable.Range(0, leaves.Count).Where(i => leaves[i].requires_grad).ToList();
            var wrt = inputs.Select(i => leaves[i]).ToList();
            wrt.AddRange(parameters.Select(p => (Tensor)p.parameter));
            if (wrt.Count == 0)
                return rows;
            IList<Tensor> grads;
            using (enable_grad())
                grads = autograd.grad(new[] { output }, wrt, new[] { gradOutput }, allow_unused: true);
            var global = Tolerances(options, null);
            int at = 0;
            foreach (int i in inputs)
                rows.Add(GradientRow($"input {i}", grads[at++], recording.Get($"grad/input/{i}"), global, options, recording.NoiseOf($"grad/input/{i}")));
            foreach (var (name, _) in parameters)
            {
                Tensor? expected = recording.Get($"grad/param/{name}");
                if (expected is not null && options.ConvertState is not null)
                    expected = options.ConvertState(name, expected);
                rows.Add(GradientRow(name, grads[at++], expected, Tolerances(options, ModulePath(name)), options, recording.NoiseOf($"grad/param/{name}")));
            }
            // Gradients PyTorch computed for parameters the port does not differentiate: a buffer where PyTorch has a
            // parameter (a frozen BatchNorm), or requires_grad turned off.
            var differentiated = new HashSet<string>(parameters.Select(p => p.name));
            // A tied parameter is listed by TorchSharp 0.107 under every name it was assigned to (as PyTorch's state_dict
            // lists it; ParityV2Tests measures it), so each recorded name has its row above.
            foreach (string name in recording.GradientNames.Where(n => !differentiated.Contains(n)))
                rows.Add(new ParityRow(name, "gradient", ParityStatus.Diverged, null, 0, 0, 0,
                    $"PyTorch computed a gradient of {name}; the port has no parameter {name} that requires grad (a buffer, or requires_grad off: frozen?)."));
            return rows;
        }

        /// <summary>
        /// The gradient rows in the order backward computes them: a parameter's place is its owning module's first call
        /// (the nearest called ancestor when the owner itself was never called), latest call first; within one module in
        /// state_dict order; the inputs' gradients last. Each parameter row gets its module.
        /// </summary>
        internal static List<ParityRow> BackwardOrder(List<ParityRow> gradients, RecordedRun recorded)
        {
            var order = recorded.StartOrder ?? recorded.CallOrder;
            var firstCall = new Dictionary<string, int>();
            for (int i = 0; i < order.Count; i++)
                firstCall.TryAdd(Strip(order[i]), i);
            var ranked = new List<(ParityRow Row, int Place, int Index)>();
            for (int i = 0; i < gradients.Count; i++)
            {
                ParityRow row = gradients[i];
                if (row.Path.StartsWith("input ", StringComparison.Ordinal))
                {
                    ranked.Add((row, int.MinValue, i));
                    continue;
                }
                string owner = ModulePath(row.Path);
                while (!firstCall.ContainsKey(owner) && owner.Length > 0)
                    owner = ModulePath(owner);
                int place = firstCall.GetValueOrDefault(owner, -1);
                gradients[i] = row = row with { Module = Display(owner) };
                ranked.Add((row, place, i));
            }
            return ranked.OrderByDescending(r => r.Place).ThenBy(r => r.Index).Select(r => r.Row).ToList();
        }

        private static ParityRow GradientRow(string name, Tensor? actual, Tensor? expected, (double? Rtol, double? Atol) tolerance, ParityOptions options, double? noise)
        {
            bool actualMissing = actual is null || actual.IsInvalid;
            if (actualMissing && expected is null)
                return new ParityRow(name, "gradient", ParityStatus.BitExact, null, 0, 0, 0, null);  // unused on both sides
            if (actualMissing)
                return new ParityRow(name, "gradient", ParityStatus.Diverged, null, 0, 0, 0, $"{name} has a gradient in PyTorch but the port's output does not depend on it.");
            if (expected is null)
                return new ParityRow(name, "gradient", ParityStatus.NotRecorded, null, 0, 0, 0, $"{name} has no recorded gradient: PyTorch's output did not depend on it, or PyTorch did not differentiate it (requires_grad off there: the port trains a parameter PyTorch froze?).");
            var (status, scan, failure, bound) = Compare(actual!, expected, tolerance, options, noise);
            return Row(name, "gradient", status, scan, failure, bound, null);
        }

        private static ParityRow Row(string path, string type, ParityStatus status, TensorScan.Result scan, string? failure, double? bound, bool? inputsMatch) =>
            new ParityRow(path, type, status, inputsMatch, scan.MaxAbs, scan.MaxRel, scan.MaxUlp,
                          status == ParityStatus.WithinRounding ? $"{failure}{Environment.NewLine}Within rounding: max |diff| {scan.MaxAbs:G3} <= NoiseFactor × PyTorch's own rounding error = {bound:G3}." : failure)
            { NoiseBound = bound };

        /// <summary>
        /// Compares one tensor: the status, the measurements, AssertClose's message (also for a row let through by the
        /// rounding rule) and the rounding bound, NoiseFactor × PyTorch's own error (null when unknown or the rule is off).
        /// </summary>
        private static (ParityStatus Status, TensorScan.Result Scan, string? Failure, double? Bound) Compare(Tensor actual, Tensor expected, (double? Rtol, double? Atol) tolerance,
                                                                                                          ParityOptions options, double? noise)
        {
            double? bound = options.NoiseFactor > 0 && noise is { } n ? options.NoiseFactor * n : null;
            if (!TensorFacts.SameShape(actual, expected))
                return (ParityStatus.ShapeMismatch, default, $"the port's tensor has shape [{string.Join(", ", actual.shape)}], PyTorch's [{string.Join(", ", expected.shape)}].", bound);
            if (actual.dtype != expected.dtype)
                return (ParityStatus.DtypeMismatch, default, $"the port's tensor is {actual.dtype}, PyTorch's {expected.dtype}.", bound);
            string? failure = Equivalence.CheckClose(actual, expected, tolerance.Rtol, tolerance.Atol, options.EqualNan, check_device: false, check_dtype: true, out var scan);
            ParityStatus status = failure is null
                ? scan.BitsDiffering == 0 ? ParityStatus.BitExact : ParityStatus.Close
                : bound is { } b && scan.MaxAbs <= b ? ParityStatus.WithinRounding : ParityStatus.Diverged;
            return (status, scan, failure, bound);
        }

        /// <summary>A call's outputs against the recorded ones: the worst status over them, the largest measurements.</summary>
        private static ParityRow OutputsRow(string path, string type, string key, IReadOnlyList<Tensor> actual, List<Tensor> expected, (double? Rtol, double? Atol) tolerance,
                                            ParityOptions options, Func<string, double?> noiseOf, bool? inputsMatch)
        {
            if (actual.Count != expected.Count)
                return new ParityRow(path, type, ParityStatus.ShapeMismatch, inputsMatch, 0, 0, 0,
                    $"{path}: the port's call returned {actual.Count} tensor{(actual.Count == 1 ? "" : "s")}, PyTorch's {expected.Count}.");
            ParityRow? worst = null;
            double maxAbs = 0, maxRel = 0;
            long maxUlp = 0;
            for (int k = 0; k < expected.Count; k++)
            {
                var (status, scan, failure, bound) = Compare(actual[k], expected[k], tolerance, options, noiseOf(ParityRecording.OutputKey(key, k)));
                string where = expected.Count == 1 ? path : $"{path} output {k}";
                var row = Row(path, type, status, scan, failure is null ? null : $"{where}: {failure}", bound, inputsMatch);
                maxAbs = Math.Max(maxAbs, scan.MaxAbs);
                maxRel = Math.Max(maxRel, scan.MaxRel);
                maxUlp = Math.Max(maxUlp, scan.MaxUlp);
                if (worst is null || Severity(row.Status) > Severity(worst.Status))
                    worst = row;
            }
            return worst! with { MaxAbs = maxAbs, MaxRel = maxRel, MaxUlp = maxUlp };
        }

        private static int Severity(ParityStatus status) => status switch
        {
            ParityStatus.BitExact => 0,
            ParityStatus.Close => 1,
            ParityStatus.WithinRounding => 2,
            _ => 3,
        };

        /// <summary>
        /// Whether the port's inputs to a call were close to PyTorch's (or within rounding): null when PyTorch's call had
        /// another number of tensor inputs.
        /// </summary>
        private static bool? InputsMatch(string key, List<Tensor> recorded, IReadOnlyList<Tensor> actual, (double? Rtol, double? Atol) tolerance,
                                         ParityOptions options, Func<string, double?> noiseOf)
        {
            if (recorded.Count != actual.Count || recorded.Count == 0)
                return null;
            for (int j = 0; j < recorded.Count; j++)
            {
                var (status, _, _, _) = Compare(actual[j], recorded[j], tolerance, options, noiseOf($"call/{key}/input/{j}"));
                if (Severity(status) > Severity(ParityStatus.WithinRounding))
                    return false;
            }
            return true;
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
