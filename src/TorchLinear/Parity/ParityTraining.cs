using System;
using System.Collections.Generic;
using System.Globalization;
using System.Linq;
using System.Reflection;
using System.Text.Json;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear
{
    public static partial class Parity
    {
        /// <summary>Loads the recording at <paramref name="recordingPath"/> and replays it; see <see cref="ReplayTraining(nn.Module{Tensor, Tensor}, TrainingRecording, optim.Optimizer, Func{Tensor, Tensor, Tensor}, TrainingParityOptions?)"/>.</summary>
        /// <exception cref="CheckpointFormatException">The file is not a valid training recording.</exception>
        /// <exception cref="System.IO.FileNotFoundException">There is no such file.</exception>
        /// <exception cref="InvalidOperationException">The port or the optimizer does not fit the recording; the message lists every problem.</exception>
        public static TrainingParityReport ReplayTraining(nn.Module<Tensor, Tensor> port, string recordingPath, optim.Optimizer optimizer,
                                                          Func<Tensor, Tensor, Tensor> trainStep, TrainingParityOptions? options = null)
        {
            ArgumentNullException.ThrowIfNull(recordingPath);
            using TrainingRecording recording = TrainingRecording.Load(recordingPath);
            return ReplayTraining(port, recording, optimizer, trainStep, options);
        }

        /// <summary>
        /// Replays a PyTorch training run, recorded by <c>record_training</c> (<c>tools/pytorch/record_parity.py</c>), on the
        /// port: feeds <paramref name="trainStep"/> — the port's own complete training step (zero_grad, forward, loss,
        /// backward, clipping, <c>optimizer.step()</c>, <c>scheduler.step()</c>, in whatever order the port's code has
        /// them), which returns the loss — the recorded batches one by one, and after each step compares, in this order,
        /// the forward (every module call, as <see cref="Replay(nn.Module, ParityRecording, ParityOptions?)"/> does), the
        /// loss it returned, the gradients the optimizer saw (they stay in <c>.grad</c> after the step) and each
        /// parameter's update (the change the step made, against the change PyTorch's step made). The replay does not do
        /// the step for the port, so that a mistake in the port's training code is what gets found.
        /// </summary>
        /// <remarks>
        /// <para>By default every step starts from the recorded parameters and optimizer state of the step before
        /// (teacher forcing; the state is set through the fields of TorchSharp's optimizer states that PyTorch names alike:
        /// <c>step</c>, <c>exp_avg</c>, <c>exp_avg_sq</c>, <c>max_exp_avg_sq</c>, <c>momentum_buffer</c>, <c>square_avg</c>,
        /// <c>grad_avg</c>, ...), so that each step's row shows that step's own difference. Gradients are not touched: a step
        /// that does not zero them is what shows. The learning rate is the port's own: its scheduler runs as it would.</para>
        /// <para>For an update that diverges the replay says why where it can: the settings of the port's optimizer for that
        /// parameter's group that differ from the recorded group's (lr, betas, eps, weight_decay, amsgrad, momentum, ...),
        /// the optimizer's class (Adam is not AdamW), and an update that is the recorded one times a constant (a learning
        /// rate off by that factor: a scheduler stepped before the optimizer). For gradients: all of them off by one factor
        /// (clipping left out, or a loss reduced otherwise), or the previous step's gradients added (not zeroed).</para>
        /// <para>The port is observed through forward hooks, which TorchSharp runs only for modules invoked with
        /// <c>call(x)</c>: a forward divergence is named by module only in a port that calls its children so.</para>
        /// </remarks>
        /// <param name="port">The TorchSharp model, named as the PyTorch model (its state_dict keys).</param>
        /// <param name="recording">The recorded run.</param>
        /// <param name="optimizer">The optimizer <paramref name="trainStep"/> steps; it must hold exactly the port's parameters.</param>
        /// <param name="trainStep">The port's training step for one batch <c>(input, target)</c>, returning the loss.</param>
        /// <param name="options">Teacher forcing or free-running, and tolerances.</param>
        /// <exception cref="InvalidOperationException">The port's state or parameters do not fit the recording's (names,
        /// shapes, dtypes), or the optimizer does not hold exactly the port's parameters; every problem is listed and nothing
        /// ran.</exception>
        public static TrainingParityReport ReplayTraining(nn.Module<Tensor, Tensor> port, TrainingRecording recording, optim.Optimizer optimizer,
                                                          Func<Tensor, Tensor, Tensor> trainStep, TrainingParityOptions? options = null)
        {
            ArgumentNullException.ThrowIfNull(port);
            ArgumentNullException.ThrowIfNull(recording);
            ArgumentNullException.ThrowIfNull(optimizer);
            ArgumentNullException.ThrowIfNull(trainStep);
            options ??= new TrainingParityOptions();
            var parameters = port.named_parameters().ToList();
            var groups = Groups(optimizer);
            CheckFit(port, recording, parameters, groups);
            var initial = recording.StateDict();
            using (no_grad())
                port.load_state_dict(initial.ToDictionary(kv => kv.Key, kv => kv.Value));

            var forwardOptions = new ParityOptions { Rtol = options.Forward?.Rtol, Atol = options.Forward?.Atol, EqualNan = options.EqualNan, NoiseFactor = 0 };
            var groupOf = new Dictionary<string, ParamGroup>();
            foreach (var group in groups)
            {
                foreach (var p in group.Parameters)
                    groupOf[parameters.First(q => q.parameter.Handle == p.Handle).name] = group;
            }
            var rows = new List<TrainingStepRow>();
            Dictionary<string, Tensor>? previousGrads = null;
            using var capture = new CallCapture(port);
            try
            {
                for (int s = 0; s < recording.StepCount; s++)
                {
                    using var scope = NewDisposeScope();
                    if (options.TeacherForcing && s > 0)
                    {
                        using (no_grad())
                        {
                            foreach (var (name, parameter) in parameters)
                                parameter.copy_(recording.Get($"step/{s - 1}/param/{name}"));
                        }
                        ForceOptimizerState(optimizer, groups, parameters, recording, s - 1);
                    }
                    var before = parameters.ToDictionary(p => p.name, p => p.parameter.detach().clone());
                    var lrBefore = parameters.ToDictionary(p => p.name, p => groupOf[p.name].LearningRate);
                    capture.Clear();
                    Tensor loss = trainStep(recording.Get($"step/{s}/input"), recording.Get($"step/{s}/target"));
                    var lrAfter = parameters.ToDictionary(p => p.name, p => groupOf[p.name].LearningRate);

                    // Forward: every module call, as Parity.Replay compares them.
                    var recorded = new RecordedRun(recording.CallOrder(s), null, recording.ModuleTypes(s), key => recording.CallInputs(s, key),
                                                   key => recording.Find($"step/{s}/call/{key}/output") is { } output ? new List<Tensor> { output } : new List<Tensor>(),
                                                   _ => null);
                    var (calls, _) = CompareCalls(recorded, capture.Calls, port, forwardOptions);
                    var forward = new ParityReport(recording.Path, recording.TorchVersion, recording.ModuleType, calls, new List<ParityRow>());
                    TrainingDivergence? divergence = null;
                    if (forward.FirstDivergence is { } module)
                    {
                        var row = calls.First(r => r.Path == module && r.IsDivergent);
                        divergence = new TrainingDivergence(s, TrainingPhase.Forward, module, row.Detail ?? row.Status.ToString(), Array.Empty<string>());
                    }

                    // Loss.
                    Tensor recordedLoss = recording.Get($"step/{s}/loss");
                    double portLoss = loss.to(ScalarType.Float64).item<double>();
                    if (divergence is null)
                    {
                        var tolerance = options.Loss;
                        string? failure = loss.dtype == recordedLoss.dtype && loss.numel() == 1
                            ? Equivalence.CheckClose(loss.reshape(recordedLoss.shape), recordedLoss, tolerance?.Rtol, tolerance?.Atol, options.EqualNan, false, true, out _)
                            : $"the port's loss is {loss.dtype} of shape [{string.Join(", ", loss.shape)}], PyTorch's {recordedLoss.dtype} of shape [{string.Join(", ", recordedLoss.shape)}]";
                        if (failure is not null)
                        {
                            double ratio = portLoss / recording.Loss(s);
                            var causes = Math.Abs(ratio - Math.Round(ratio)) < 1e-3 && Math.Round(ratio) > 1
                                ? new[] { $"the port's loss is {Math.Round(ratio)}× PyTorch's ({portLoss:G6} against {recording.Loss(s):G6}): reduced by sum where PyTorch takes the mean?" }
                                : new[] { $"the port's loss is {portLoss:G6}, PyTorch's {recording.Loss(s):G6}" };
                            divergence = new TrainingDivergence(s, TrainingPhase.Loss, "loss", failure, causes);
                        }
                    }

                    // Gradients, as the optimizer saw them.
                    var grads = parameters.ToDictionary(p => p.name, p => p.parameter.grad is { } g ? g.detach().clone() : null);
                    var gradientChecks = new List<(string Name, string? Failure, double MaxAbs, long MaxUlp, double Excess)>();
                    foreach (var (name, _) in parameters)
                    {
                        (double, double)? tolerance = options.GradientByParameter.TryGetValue(name, out var own) ? own : options.Gradient;
                        gradientChecks.Add(Check(name, grads[name], recording.Find($"step/{s}/grad/{name}"), tolerance, options.EqualNan, null));
                    }
                    var worstGradient = gradientChecks.OrderByDescending(c => c.Excess).First();
                    if (divergence is null && gradientChecks.FirstOrDefault(c => c.Failure is not null) is { Name: not null } firstGradient && firstGradient.Failure is not null)
                        divergence = new TrainingDivergence(s, TrainingPhase.Gradient, firstGradient.Name, firstGradient.Failure,
                                                            GradientCauses(recording, s, parameters, grads, previousGrads));

                    // Updates: what the step changed, against what PyTorch's step changed.
                    var updateChecks = new List<(string Name, string? Failure, double MaxAbs, long MaxUlp, double Excess)>();
                    var updates = new Dictionary<string, (Tensor Port, Tensor Recorded, Tensor? RelativeGradientDifference)>();
                    long excusedUpdates = 0;
                    foreach (var (name, parameter) in parameters)
                    {
                        Tensor recordedBefore = s == 0 ? initial[name] : recording.Get($"step/{s - 1}/param/{name}");
                        Tensor recordedAfter = recording.Get($"step/{s}/param/{name}");
                        Tensor portUpdate = parameter.detach() - before[name], recordedUpdate = recordedAfter - recordedBefore;
                        var tolerance = (options.UpdateByParameter.TryGetValue(name, out var own) ? own : options.Update)
                                        ?? (Equivalence.DefaultTolerances(recordedAfter.dtype).rtol, 4 * UlpAt(recordedAfter));
                        var check = Check(name, portUpdate, recordedUpdate, tolerance, options.EqualNan, "update");
                        Tensor? relative = null;
                        if (check.Failure is not null)
                        {
                            // Only where the update differs is it worth asking whether the gradients explain it.
                            relative = RelativeGradientDifference(grads[name], recording.Find($"step/{s}/grad/{name}"));
                            var (checkedUpdate, excused) = ExcuseGradientNoise(portUpdate, recordedUpdate, relative, tolerance);
                            if (excused > 0)
                            {
                                excusedUpdates += excused;
                                check = Check(name, checkedUpdate, recordedUpdate, tolerance, options.EqualNan, "update");
                            }
                        }
                        updates[name] = (portUpdate, recordedUpdate, relative);
                        updateChecks.Add(check);
                    }
                    var worstUpdate = updateChecks.OrderByDescending(c => c.Excess).First();
                    if (divergence is null && updateChecks.FirstOrDefault(c => c.Failure is not null) is { Failure: not null } firstUpdate)
                    {
                        string name = firstUpdate.Name;
                        divergence = new TrainingDivergence(s, TrainingPhase.Update, name, firstUpdate.Failure,
                                                            UpdateCauses(recording, s, name, optimizer, groupOf[name], lrBefore[name], lrAfter[name], updates[name]));
                    }

                    rows.Add(new TrainingStepRow(s, recording.Loss(s), portLoss,
                        worstGradient.Excess > 0 ? worstGradient.Name : null, worstGradient.MaxAbs, worstGradient.MaxUlp,
                        worstUpdate.Excess > 0 ? worstUpdate.Name : null, worstUpdate.MaxAbs, worstUpdate.MaxUlp, excusedUpdates, forward, divergence));

                    foreach (var t in previousGrads?.Values ?? Enumerable.Empty<Tensor>())
                        t?.Dispose();
                    previousGrads = grads.Where(kv => kv.Value is not null).ToDictionary(kv => kv.Key, kv => kv.Value!.DetachFromDisposeScope());
                }
            }
            finally
            {
                foreach (var t in previousGrads?.Values ?? Enumerable.Empty<Tensor>())
                    t.Dispose();
            }
            return new TrainingParityReport(recording.Path, recording.TorchVersion, recording.Optimizer, optimizer.GetType().Name, options.TeacherForcing, rows);
        }

        private static List<ParamGroup> Groups(optim.Optimizer optimizer) =>
            optimizer.ParamGroups.Select(g => g as ParamGroup ?? throw new ArgumentException($"Parity.ReplayTraining: {optimizer.GetType().Name}'s parameter groups are not TorchSharp ParamGroups.", nameof(optimizer))).ToList();

        /// <summary>Every way the port or the optimizer does not fit the recording, refused before anything runs.</summary>
        private static void CheckFit(nn.Module<Tensor, Tensor> port, TrainingRecording recording, List<(string name, Parameter parameter)> parameters, List<ParamGroup> groups)
        {
            var problems = StateDicts.Problems(port, recording.StateDict()).ToList();
            var portNames = parameters.Select(p => p.name).ToList();
            foreach (string name in recording.Parameters.Except(portNames))
                problems.Add($"PyTorch's parameter {name} is not a parameter of the port");
            foreach (string name in portNames.Except(recording.Parameters))
                problems.Add($"the port's parameter {name} is not one of PyTorch's");
            var byHandle = parameters.ToDictionary(p => p.parameter.Handle, p => p.name);
            var held = new Dictionary<IntPtr, int>();
            foreach (var group in groups)
            {
                foreach (var p in group.Parameters)
                {
                    if (p.IsInvalid)
                    {
                        problems.Add("the optimizer holds a disposed tensor (a model moved with .to(...) after its optimizer was made gets new " +
                                     "parameters: make the optimizer after moving the model)");
                        continue;
                    }
                    if (!byHandle.ContainsKey(p.Handle))
                        problems.Add($"the optimizer holds a tensor of shape [{string.Join(", ", p.shape)}] that is not a parameter of the port");
                    held[p.Handle] = held.GetValueOrDefault(p.Handle) + 1;
                }
            }
            foreach (var (name, parameter) in parameters)
            {
                int count = held.GetValueOrDefault(parameter.Handle);
                if (count == 0)
                    problems.Add($"the optimizer does not hold the port's parameter {name}");
                else if (count > 1)
                    problems.Add($"the optimizer holds the port's parameter {name} {count} times");
            }
            if (problems.Count > 0)
                throw new InvalidOperationException($"Parity.ReplayTraining: the port {port.GetType().Name} and its optimizer do not fit '{recording.Path}', nothing ran: {string.Join("; ", problems)}.");
        }

        /// <summary>Sets the optimizer's state to the recorded state after <paramref name="step"/>, field by field where the names agree.</summary>
        private static void ForceOptimizerState(optim.Optimizer optimizer, List<ParamGroup> groups, List<(string name, Parameter parameter)> parameters,
                                                TrainingRecording recording, int step)
        {
            if (optimizer is not OptimizerHelper helper)
                return;
            var states = helper.state_dict().State;
            int i = 0;
            foreach (var group in groups)
            {
                foreach (var p in group.Parameters)
                {
                    string name = parameters.First(q => q.parameter.Handle == p.Handle).name;
                    object state = states[i++];
                    var (tensors, numbers) = recording.OptimizerState(step, name);
                    foreach (var field in state.GetType().GetFields(BindingFlags.Public | BindingFlags.Instance))
                    {
                        if (field.FieldType == typeof(Tensor) && tensors.TryGetValue(field.Name, out Tensor? value))
                        {
                            if (field.GetValue(state) is Tensor current && !current.IsInvalid && TensorFacts.SameShape(current, value) && current.dtype == value.dtype)
                            {
                                using (no_grad())
                                    current.copy_(value);
                            }
                            else
                            {
                                (field.GetValue(state) as Tensor)?.Dispose();
                                field.SetValue(state, value.detach().clone().DetachFromDisposeScope());
                            }
                        }
                        else if (field.FieldType == typeof(long) && numbers.TryGetValue(field.Name, out double number))
                        {
                            field.SetValue(state, (long)number);
                        }
                    }
                }
            }
        }

        /// <summary>
        /// How many times the gradients' own relative difference an update element may differ by, beyond its tolerance:
        /// the Update phase judges the optimizer, and a gradient difference the Gradient phase accepted may carry through
        /// it. Large enough that a port's loss scaled by 12 and clipped back (gradients then 1e-6 apart, relatively) is
        /// charged to the gradients, small enough that eps 1e-6 for 1e-8 still shows in the updates.
        /// </summary>
        internal const double GradientNoiseFactor = 4;

        /// <summary>
        /// Update elements whose two gradients differ by more than this fraction of their size are not checked: their
        /// gradient is rounding noise, and so is the optimizer's answer to it. They are also left out when the replay
        /// looks for a uniform scale of the update. In the TrainingParity sample's run every update element that differs
        /// beyond its tolerance has gradients 1e-2 apart or more.
        /// </summary>
        internal const double GradientsAgree = 1e-3;

        /// <summary>
        /// Per element, |port − PyTorch| / max(|port|, |PyTorch|) of the two gradients, in float64 (0 where both are 0);
        /// null where either has none or they do not pair.
        /// </summary>
        private static Tensor? RelativeGradientDifference(Tensor? portGrad, Tensor? recordedGrad)
        {
            if (portGrad is null || recordedGrad is null || !TensorFacts.SameShape(portGrad, recordedGrad) || !is_floating_point(recordedGrad.dtype))
                return null;
            using var scope = NewDisposeScope();
            Tensor gp = portGrad.to(ScalarType.Float64), gr = recordedGrad.to(ScalarType.Float64);
            Tensor size = maximum(gp.abs(), gr.abs());
            return where(size > 0, (gp - gr).abs() / size.clamp_min(double.Epsilon), zeros_like(size)).MoveToOuterDisposeScope();
        }

        /// <summary>
        /// The port's update with every element whose difference from PyTorch's the gradients' own difference explains
        /// set to PyTorch's, and how many there were. Where the two gradients differ by a small fraction r, an optimizer's
        /// update may differ by about r of its size (exactly r for SGD; at most about r for Adam's normalised step):
        /// allowed beyond the tolerance, <see cref="GradientNoiseFactor"/> · r · max(|port update|, |PyTorch update|).
        /// Where they differ by more than <see cref="GradientsAgree"/> of their size, the gradient is rounding noise (a key
        /// bias in attention, whose gradient is mathematically 0) and the update, the optimizer's answer to that noise
        /// (Adam normalises it to a step of ordinary size), is no measure of the port: not checked. An element whose
        /// gradients are equal (r = 0, both 0 included) is checked at the tolerance alone.
        /// </summary>
        private static (Tensor Update, long Excused) ExcuseGradientNoise(Tensor portUpdate, Tensor recordedUpdate, Tensor? relativeGradientDifference,
                                                                        (double Rtol, double Atol) tolerance)
        {
            if (relativeGradientDifference is not { } r || !TensorFacts.SameShape(r, portUpdate) || !TensorFacts.SameShape(portUpdate, recordedUpdate) ||
                portUpdate.dtype != recordedUpdate.dtype || !is_floating_point(portUpdate.dtype))
                return (portUpdate, 0);
            using var scope = NewDisposeScope();
            Tensor up = portUpdate.to(ScalarType.Float64), ur = recordedUpdate.to(ScalarType.Float64);
            Tensor difference = (up - ur).abs();
            Tensor allowed = ur.abs() * tolerance.Rtol + tolerance.Atol;
            Tensor explained = (difference <= allowed + r * maximum(up.abs(), ur.abs()) * GradientNoiseFactor).logical_or(r > GradientsAgree);
            Tensor excused = (difference > allowed).logical_and(explained);
            long count = excused.sum().item<long>();
            if (count == 0)
                return (portUpdate, 0);
            return (where(excused, recordedUpdate, portUpdate).MoveToOuterDisposeScope(), count);
        }

        /// <summary>One unit in the last place at a tensor's largest magnitude.</summary>
        private static double UlpAt(Tensor tensor)
        {
            if (tensor.numel() == 0 || !is_floating_point(tensor.dtype))
                return 0;
            double largest;
            using (var max = tensor.abs().max())
                largest = max.to(ScalarType.Float64).item<double>();
            return tensor.dtype switch
            {
                ScalarType.Float64 => Math.BitIncrement(largest) - largest,
                ScalarType.Float32 => MathF.BitIncrement((float)largest) - (float)largest,
                ScalarType.Float16 => Math.Max(largest, 6.1e-5) * Math.Pow(2, -10),
                ScalarType.BFloat16 => Math.Max(largest, 1.2e-38) * Math.Pow(2, -7),
                _ => 0,
            };
        }

        private static (string Name, string? Failure, double MaxAbs, long MaxUlp, double Excess) Check(string name, Tensor? actual, Tensor? expected,
                                                                                                     (double Rtol, double Atol)? tolerance, bool equalNan, string? what)
        {
            string label = what is null ? $"{name}'s gradient" : $"{name}'s {what}";
            if (actual is null && expected is null)
                return (name, null, 0, 0, 0);
            if (actual is null)
                return (name, $"{label}: PyTorch's optimizer saw a gradient, the port's none (is the parameter used, and does it require grad?)", double.PositiveInfinity, long.MaxValue, double.PositiveInfinity);
            if (expected is null)
                return (name, $"{label}: the port's optimizer saw a gradient, PyTorch's none (PyTorch's loss did not depend on it)", double.PositiveInfinity, long.MaxValue, double.PositiveInfinity);
            if (!TensorFacts.SameShape(actual, expected) || actual.dtype != expected.dtype)
                return (name, $"{label}: the port's is {actual.dtype} [{string.Join(", ", actual.shape)}], PyTorch's {expected.dtype} [{string.Join(", ", expected.shape)}]", double.PositiveInfinity, long.MaxValue, double.PositiveInfinity);
            string? failure = Equivalence.CheckClose(actual, expected, tolerance?.Rtol, tolerance?.Atol, equalNan, false, true, out var scan);
            var (rtol, atol) = tolerance ?? Equivalence.DefaultTolerances(expected.dtype);
            // How far past its tolerance the worst element is (0 while within): the measure that ranks the parameters.
            double excess = scan.MaxAbs == 0 ? 0 : scan.MaxAbs / Math.Max(atol + rtol * Math.Abs(scan.MaxAbs), double.Epsilon);
            return (name, failure is null ? null : $"{label}: {failure}", scan.MaxAbs, scan.MaxUlp, failure is null ? Math.Min(excess, 1) : 1 + excess);
        }

        private static IReadOnlyList<string> GradientCauses(TrainingRecording recording, int step, List<(string name, Parameter parameter)> parameters,
                                                            Dictionary<string, Tensor?> grads, Dictionary<string, Tensor>? previous)
        {
            var causes = new List<string>();
            var pairs = parameters.Where(p => grads[p.name] is not null && recording.Find($"step/{step}/grad/{p.name}") is not null)
                                  .Select(p => (Port: grads[p.name]!, Recorded: recording.Get($"step/{step}/grad/{p.name}"), p.name)).ToList();
            if (pairs.Count == 0)
                return causes;
            // Accumulated: the port's gradients are PyTorch's plus the port's gradients of the step before, each sum
            // perhaps scaled as a whole (clipping scales the sum where PyTorch scaled this step's gradients alone).
            if (previous is not null && pairs.All(p => previous.ContainsKey(p.name)) &&
                Combination(pairs.Select(p => (p.Port, p.Recorded, previous[p.name]))) is { } fit && fit.b > 1e-3)
            {
                string scaled = Math.Abs(fit.a - fit.b) > 1e-4 * Math.Max(fit.a, fit.b)
                    ? $" (scaled as a whole by clipping: {Format(fit.a)} × PyTorch's + {Format(fit.b)} × the step before's)"
                    : "";
                causes.Add($"every gradient is PyTorch's plus the port's gradient of the step before{scaled}: were the gradients zeroed (optimizer.zero_grad()) before backward?");
                return causes;
            }
            // One factor for every gradient: clipping, or a loss reduced otherwise.
            if (UniformScale(pairs.Select(p => (p.Port, p.Recorded))) is { } factor && Math.Abs(factor - 1) > 1e-4)
            {
                string clip = recording.MaxGradNorm is { } norm
                    ? $" PyTorch clipped the gradients to norm {norm.ToString(CultureInfo.InvariantCulture)} (clip_grad_norm_) before the step: was clipping left out, or done at another norm?"
                    : " (a loss scaled or reduced otherwise?)";
                causes.Add($"every gradient is {Format(factor)}× PyTorch's.{clip}");
            }
            return causes;
        }

        private static IReadOnlyList<string> UpdateCauses(TrainingRecording recording, int step, string name, optim.Optimizer optimizer, ParamGroup group,
                                                          double lrBefore, double lrAfter, (Tensor Port, Tensor Recorded, Tensor? RelativeGradientDifference) update)
        {
            var causes = new List<string>();
            string portClass = optimizer.GetType().Name;
            if (!string.Equals(portClass, recording.Optimizer, StringComparison.Ordinal))
                causes.Add($"the optimizer: PyTorch's {recording.Optimizer}, the port's {portClass}" +
                           (recording.Optimizer == "AdamW" && portClass == "Adam" ? " (Adam adds weight decay to the gradient; AdamW decays the weights apart from it)" : ""));
            var options = group.Options;
            var portSettings = new Dictionary<string, object?>();
            foreach (var field in options.GetType().GetFields(BindingFlags.Public | BindingFlags.Instance))
                portSettings[field.Name] = field.GetValue(options);
            foreach (var (key, value) in recording.Settings(name))
            {
                if (key == "lr")
                {
                    double used = recording.LearningRate(step, name);
                    if (!Near(used, lrBefore))
                        causes.Add($"lr: PyTorch used {Format(used)} at this step, the port's optimizer held {Format(lrBefore)}");
                    continue;
                }
                if (key == "betas" && value.ValueKind == JsonValueKind.Array && value.GetArrayLength() == 2)
                {
                    Compare("betas[0]", value[0].GetDouble(), portSettings.GetValueOrDefault("beta1"), causes);
                    Compare("betas[1]", value[1].GetDouble(), portSettings.GetValueOrDefault("beta2"), causes);
                    continue;
                }
                if (!portSettings.TryGetValue(key, out object? port))
                    continue;  // PyTorch-only settings (foreach, capturable, differentiable, fused, initial_lr)
                if (value.ValueKind is JsonValueKind.True or JsonValueKind.False)
                {
                    bool recorded = value.GetBoolean();
                    if (port is bool b && b != recorded)
                        causes.Add($"{key}: PyTorch {(recorded ? "true" : "false")}, the port {(b ? "true" : "false")}");
                }
                else if (value.ValueKind == JsonValueKind.Number)
                {
                    Compare(key, value.GetDouble(), port, causes);
                }
            }
            // An update that is PyTorch's times one factor, with the settings alike: the learning rate used was off by it.
            // Looked for where the gradients agree: an update to gradient noise follows no learning rate.
            using var agree = update.RelativeGradientDifference is { } r ? r <= GradientsAgree : ones_like(update.Recorded, dtype: ScalarType.Bool);
            using var portUpdate = update.Port.masked_select(agree);
            using var recordedUpdate = update.Recorded.masked_select(agree);
            if (causes.Count == 0 && UniformScale(new[] { (portUpdate, recordedUpdate) }) is { } factor && Math.Abs(factor - 1) > 1e-4)
            {
                double used = recording.LearningRate(step, name);
                causes.Add($"the update is {Format(factor)}× PyTorch's in every element: a learning rate of " +
                           $"{Format(factor * used)} where PyTorch used {Format(used)} " +
                           $"(the port's optimizer held {Format(lrBefore)} before its step and {Format(lrAfter)} after it" +
                           (recording.Scheduler is { } scheduler ? $"; PyTorch stepped its {scheduler} after optimizer.step(): was the port's scheduler stepped before it?" : "") + ")");
            }
            return causes;
        }

        private static void Compare(string key, double recorded, object? port, List<string> causes)
        {
            double? value = port switch { double d => d, float f => f, int i => i, long l => l, _ => null };
            if (value is { } v && !Near(recorded, v))
                causes.Add($"{key}: PyTorch {Format(recorded)}, the port {Format(v)}");
        }

        private static bool Near(double a, double b) => a == b || Math.Abs(a - b) <= 1e-12 * Math.Max(Math.Abs(a), Math.Abs(b));

        private static bool Close(Tensor actual, Tensor expected)
        {
            var (rtol, atol) = Equivalence.DefaultTolerances(expected.dtype);
            return Equivalence.CheckClose(actual, expected, rtol, atol, false, false, true, out _) is null;
        }

        /// <summary>
        /// The factors a, b with actual ≈ a · expected + b · other in every element of every triple (least squares), when
        /// the residual is within a millionth of actual's size squared and b · other is not negligible; null otherwise.
        /// </summary>
        private static (double a, double b)? Combination(IEnumerable<(Tensor Actual, Tensor Expected, Tensor Other)> triples)
        {
            double ee = 0, eo = 0, oo = 0, ye = 0, yo = 0, yy = 0;
            foreach (var (actual, expected, other) in triples)
            {
                using var scope = NewDisposeScope();
                Tensor y = actual.to(ScalarType.Float64), e = expected.to(ScalarType.Float64), o = other.to(ScalarType.Float64);
                ee += (e * e).sum().item<double>();
                eo += (e * o).sum().item<double>();
                oo += (o * o).sum().item<double>();
                ye += (y * e).sum().item<double>();
                yo += (y * o).sum().item<double>();
                yy += (y * y).sum().item<double>();
            }
            double det = ee * oo - eo * eo;
            if (yy == 0 || oo == 0 || det <= 1e-12 * ee * oo)
                return null;
            double a = (ye * oo - yo * eo) / det, b = (yo * ee - ye * eo) / det;
            double residual = yy - 2 * a * ye - 2 * b * yo + a * a * ee + 2 * a * b * eo + b * b * oo;
            return residual <= 1e-6 * yy && b * b * oo >= 1e-6 * yy ? (a, b) : null;
        }

        /// <summary>A number as Python prints it in a message: 1e-08, 0.95, 0.001667.</summary>
        private static string Format(double value) => value.ToString("G4", CultureInfo.InvariantCulture).Replace("E", "e", StringComparison.Ordinal);

        /// <summary>
        /// The factor c with actual ≈ c · expected in every element (least squares over all pairs), when the residual is
        /// within a thousandth of the expected values' size; null otherwise.
        /// </summary>
        private static double? UniformScale(IEnumerable<(Tensor Actual, Tensor Expected)> pairs)
        {
            double dot = 0, norm = 0, actualNorm = 0;
            var list = pairs.ToList();
            foreach (var (actual, expected) in list)
            {
                using var a = actual.to(ScalarType.Float64);
                using var e = expected.to(ScalarType.Float64);
                dot += (a * e).sum().item<double>();
                norm += (e * e).sum().item<double>();
                actualNorm += (a * a).sum().item<double>();
            }
            if (norm == 0)
                return null;
            double c = dot / norm;
            double residual = actualNorm - 2 * c * dot + c * c * norm;
            return residual <= 1e-6 * norm * Math.Max(1, c * c) ? c : null;
        }
    }
}
