using System;
using System.Collections.Generic;
using System.Globalization;
using System.Linq;
using System.Text;

namespace TorchLinear
{
    /// <summary>What a training step does, in the order <see cref="Parity.ReplayTraining(TorchSharp.torch.nn.Module{TorchSharp.torch.Tensor, TorchSharp.torch.Tensor}, string, TorchSharp.torch.optim.Optimizer, Func{TorchSharp.torch.Tensor, TorchSharp.torch.Tensor, TorchSharp.torch.Tensor}, TrainingParityOptions?)"/> checks it.</summary>
    public enum TrainingPhase
    {
        /// <summary>The model's forward: every module call's output (the module-by-module report of <see cref="Parity.Replay(TorchSharp.torch.nn.Module, string, ParityOptions?)"/>).</summary>
        Forward,

        /// <summary>The loss the training step returned.</summary>
        Loss,

        /// <summary>Each parameter's gradient, as the optimizer saw it (after any clipping).</summary>
        Gradient,

        /// <summary>Each parameter's update: the change the step made, against the change PyTorch's step made.</summary>
        Update,
    }

    /// <summary>How <see cref="Parity.ReplayTraining(TorchSharp.torch.nn.Module{TorchSharp.torch.Tensor, TorchSharp.torch.Tensor}, string, TorchSharp.torch.optim.Optimizer, Func{TorchSharp.torch.Tensor, TorchSharp.torch.Tensor, TorchSharp.torch.Tensor}, TrainingParityOptions?)"/> replays and compares.</summary>
    public sealed record TrainingParityOptions
    {
        /// <summary>
        /// Teacher forcing (the default): every step starts from the recorded parameters and optimizer state of the step
        /// before, so that a divergence is charged to the step where it happens instead of compounding. False: the port
        /// trains on its own, and the report shows the two loss curves side by side.
        /// </summary>
        public bool TeacherForcing { get; init; } = true;

        /// <summary>Tolerances of the module outputs; null: AssertClose's defaults by dtype.</summary>
        public (double Rtol, double Atol)? Forward { get; init; }

        /// <summary>Tolerances of the loss; null: AssertClose's defaults by dtype.</summary>
        public (double Rtol, double Atol)? Loss { get; init; }

        /// <summary>Tolerances of the gradients; null: AssertClose's defaults by dtype.</summary>
        public (double Rtol, double Atol)? Gradient { get; init; }

        /// <summary>
        /// Tolerances of the updates; null: AssertClose's rtol by dtype, and as atol four units in the last place of the
        /// parameter's largest magnitude — the finest change its values can show, so that a small learning-rate or eps
        /// mistake is not lost inside the weights' own magnitude.
        /// </summary>
        public (double Rtol, double Atol)? Update { get; init; }

        /// <summary>Per parameter (state_dict name), tolerances of its gradient that replace <see cref="Gradient"/>'s.</summary>
        public IReadOnlyDictionary<string, (double Rtol, double Atol)> GradientByParameter { get; init; } = new Dictionary<string, (double, double)>();

        /// <summary>Per parameter (state_dict name), tolerances of its update that replace <see cref="Update"/>'s.</summary>
        public IReadOnlyDictionary<string, (double Rtol, double Atol)> UpdateByParameter { get; init; } = new Dictionary<string, (double, double)>();

        /// <summary>Whether NaNs compare equal to NaNs.</summary>
        public bool EqualNan { get; init; }
    }

    /// <summary>Where a port's training first departs from the recorded run.</summary>
    /// <param name="Step">The batch index, from 0.</param>
    /// <param name="Phase">What diverged first within the step.</param>
    /// <param name="Name">The module (Forward), "loss", or the state_dict name of the parameter (Gradient, Update).</param>
    /// <param name="Detail">AssertClose's account of the difference.</param>
    /// <param name="Causes">What the replay could tell about why: the optimizer's settings that differ from the recorded
    /// ones for this parameter (lr, betas, eps, weight_decay, ...), the optimizer's class, a uniform scale of the update or
    /// the gradients, gradients accumulated over steps.</param>
    public sealed record TrainingDivergence(int Step, TrainingPhase Phase, string Name, string Detail, IReadOnlyList<string> Causes)
    {
        /// <summary>For example <c>step 3, Update, h.0.ln_1.bias: weight_decay: PyTorch 0, the port 0.1</c>.</summary>
        public override string ToString() =>
            $"step {Step}, {Phase}, {Name}" + (Causes.Count > 0 ? ": " + string.Join("; ", Causes) : "");
    }

    /// <summary>One step of a <see cref="TrainingParityReport"/>.</summary>
    /// <param name="Step">The batch index, from 0.</param>
    /// <param name="RecordedLoss">PyTorch's loss.</param>
    /// <param name="PortLoss">The loss the port's training step returned.</param>
    /// <param name="WorstGradient">The parameter whose gradient differs most (relative to its tolerance), or null.</param>
    /// <param name="GradientMaxAbs">Its largest absolute difference.</param>
    /// <param name="GradientMaxUlp">Its largest distance in ULP.</param>
    /// <param name="WorstUpdate">The parameter whose update differs most (relative to its tolerance), or null.</param>
    /// <param name="UpdateMaxAbs">Its largest absolute difference.</param>
    /// <param name="UpdateMaxUlp">Its largest distance in ULP.</param>
    /// <param name="ExcusedUpdateElements">Update elements, over all parameters, that differ beyond the tolerance by no
    /// more than their gradients' own difference explains (an update to rounding noise, such as attention's key bias,
    /// whose gradient is mathematically 0): not counted as divergent, and not in the two columns before.</param>
    /// <param name="Forward">The module-by-module comparison of the step's forward.</param>
    /// <param name="Divergence">The first divergence within the step, or null.</param>
    public sealed record TrainingStepRow(int Step, double RecordedLoss, double PortLoss,
                                         string? WorstGradient, double GradientMaxAbs, long GradientMaxUlp,
                                         string? WorstUpdate, double UpdateMaxAbs, long UpdateMaxUlp, long ExcusedUpdateElements,
                                         ParityReport Forward, TrainingDivergence? Divergence);

    /// <summary>
    /// The result of <see cref="Parity.ReplayTraining(TorchSharp.torch.nn.Module{TorchSharp.torch.Tensor, TorchSharp.torch.Tensor}, string, TorchSharp.torch.optim.Optimizer, Func{TorchSharp.torch.Tensor, TorchSharp.torch.Tensor, TorchSharp.torch.Tensor}, TrainingParityOptions?)"/>:
    /// one row per step and the first step, phase and parameter where the port's training departs from PyTorch's.
    /// </summary>
    public sealed class TrainingParityReport
    {
        internal TrainingParityReport(string recording, string torchVersion, string recordedOptimizer, string portOptimizer, bool teacherForcing,
                                      IReadOnlyList<TrainingStepRow> steps)
        {
            Recording = recording;
            TorchVersion = torchVersion;
            RecordedOptimizer = recordedOptimizer;
            PortOptimizer = portOptimizer;
            TeacherForcing = teacherForcing;
            Steps = steps;
            FirstDivergence = steps.Select(s => s.Divergence).FirstOrDefault(d => d is not null);
        }

        /// <summary>The recording replayed.</summary>
        public string Recording { get; }

        /// <summary>The PyTorch version that recorded it.</summary>
        public string TorchVersion { get; }

        /// <summary>The recorded optimizer's class.</summary>
        public string RecordedOptimizer { get; }

        /// <summary>The port's optimizer's class.</summary>
        public string PortOptimizer { get; }

        /// <summary>Whether every step started from the recorded state (see <see cref="TrainingParityOptions.TeacherForcing"/>).</summary>
        public bool TeacherForcing { get; }

        /// <summary>One row per recorded step.</summary>
        public IReadOnlyList<TrainingStepRow> Steps { get; }

        /// <summary>The first step, phase and parameter (or module) where the port departs; null when nothing does.</summary>
        public TrainingDivergence? FirstDivergence { get; }

        /// <summary>True when no step diverges.</summary>
        public bool AllClose => FirstDivergence is null;

        /// <summary>
        /// Throws a <see cref="TensorMismatchException"/> whose message names the step, the phase and the parameter (or
        /// module) first, then why where the replay could tell, then AssertClose's account — unless no step diverges.
        /// </summary>
        /// <exception cref="TensorMismatchException">A step diverges.</exception>
        public void AssertAllClose()
        {
            if (FirstDivergence is not { } d)
                return;
            int divergent = Steps.Count(s => s.Divergence is not null);
            throw new TensorMismatchException(
                $"Training diverges from PyTorch {TorchVersion} first at step {d.Step}, {d.Phase}, {d.Name}" +
                (d.Causes.Count > 0 ? $" ({string.Join("; ", d.Causes)})" : "") +
                $": {divergent} of {Steps.Count} steps diverge{(TeacherForcing ? " (each replayed from the recorded state)" : "")}.{Environment.NewLine}{d.Detail}");
        }

        /// <summary>A table of the steps — the two loss curves side by side, the worst gradient and update — then the first divergence.</summary>
        public override string ToString()
        {
            var text = new StringBuilder();
            text.AppendLine($"Training parity against {System.IO.Path.GetFileName(Recording)} (PyTorch {TorchVersion}, {RecordedOptimizer}; the port: {PortOptimizer}), " +
                            $"{Steps.Count} steps, {(TeacherForcing ? "each from the recorded state" : "free-running")}");
            int width = Math.Max(14, Steps.Select(s => Math.Max(s.WorstGradient?.Length ?? 0, s.WorstUpdate?.Length ?? 0)).DefaultIfEmpty(0).Max() + 2);
            static string Number(double value) =>
                value == 0 ? "0" : double.IsNaN(value) ? "nan" : double.IsInfinity(value) ? "inf" : value.ToString("0.00e+00", CultureInfo.InvariantCulture);
            static string Ulp(long value) => value == long.MaxValue ? "inf" : value.ToString(CultureInfo.InvariantCulture);
            text.AppendLine($"{"step",4}  {"PyTorch loss",12}  {"port loss",12}  {"worst gradient".PadRight(width)}{"max |diff|",10} {"ULP",9}  {"worst update".PadRight(width)}{"max |diff|",10} {"ULP",9} {"noise",6}  verdict");
            foreach (var row in Steps)
            {
                string verdict = row.Divergence is { } d ? $"{d.Phase} diverges: {d.Name}" : "close";
                text.AppendLine($"{row.Step,4}  {row.RecordedLoss,12:F6}  {row.PortLoss,12:F6}  {(row.WorstGradient ?? "-").PadRight(width)}{Number(row.GradientMaxAbs),10} {Ulp(row.GradientMaxUlp),9}  " +
                                $"{(row.WorstUpdate ?? "-").PadRight(width)}{Number(row.UpdateMaxAbs),10} {Ulp(row.UpdateMaxUlp),9} {row.ExcusedUpdateElements,6}  {verdict}");
            }
            text.AppendLine();
            text.AppendLine(FirstDivergence is { } first ? $"first divergence: {first}" : "no divergence");
            return text.ToString();
        }

        /// <summary>
        /// A short Markdown summary to paste into a pull request: the verdict with the first divergence (step, phase,
        /// parameter or module, causes), a table of at most <paramref name="worstSteps"/> steps (the divergent ones first,
        /// then those whose gradients differ most; in step order), and the counts.
        /// </summary>
        public string ToMarkdown(int worstSteps = 10)
        {
            var text = new StringBuilder();
            string file = System.IO.Path.GetFileName(Recording);
            string run = $"{Steps.Count} step{(Steps.Count == 1 ? "" : "s")} of `{file}` (PyTorch {TorchVersion}, {RecordedOptimizer}; the port: {PortOptimizer}), " +
                         (TeacherForcing ? "each from the recorded state" : "free-running");
            if (FirstDivergence is not { } first)
                text.AppendLine($"**Training parity: no divergence** — {run}.");
            else
                text.AppendLine($"**Training parity: diverges** — {run}; first at step {first.Step}, {first.Phase}, `{first.Name}`" +
                                (first.Causes.Count > 0 ? $": {Escape(string.Join("; ", first.Causes))}" : "") + ".");
            text.AppendLine();
            var shown = Steps.OrderByDescending(s => s.Divergence is not null).ThenByDescending(s => s.GradientMaxAbs)
                             .Take(Math.Max(0, worstSteps)).OrderBy(s => s.Step).ToList();
            if (shown.Count > 0)
            {
                text.AppendLine("| step | PyTorch loss | port loss | worst gradient | max \\|diff\\| | worst update | max \\|diff\\| | verdict |");
                text.AppendLine("|---:|---:|---:|---|---:|---|---:|---|");
                foreach (var row in shown)
                {
                    string verdict = row.Divergence is { } d ? $"**{d.Phase} diverges**: `{d.Name}`" : "close";
                    text.AppendLine($"| {row.Step} | {row.RecordedLoss.ToString("F6", CultureInfo.InvariantCulture)} | {row.PortLoss.ToString("F6", CultureInfo.InvariantCulture)} | " +
                                    $"{(row.WorstGradient is null ? "–" : $"`{row.WorstGradient}`")} | {ParityReport.Number(row.GradientMaxAbs)} | " +
                                    $"{(row.WorstUpdate is null ? "–" : $"`{row.WorstUpdate}`")} | {ParityReport.Number(row.UpdateMaxAbs)} | {verdict} |");
                }
                text.AppendLine();
            }
            int divergent = Steps.Count(s => s.Divergence is not null);
            var forward = Steps.SelectMany(s => s.Forward.Modules).ToList();
            text.AppendLine($"{Steps.Count} steps: {Steps.Count - divergent} close, {divergent} diverged" +
                            (shown.Count < Steps.Count ? $" ({Steps.Count - shown.Count} steps not shown)" : "") +
                            $"; forward calls over all steps: {forward.Count(r => r.Status == ParityStatus.BitExact)} bit-exact, " +
                            $"{forward.Count(r => r.Status == ParityStatus.Close)} close, {forward.Count(r => r.Status == ParityStatus.WithinRounding)} within rounding, " +
                            $"{forward.Count(r => r.IsDivergent)} diverged, {forward.Count(r => r.Status is ParityStatus.NotCalledInDotNet or ParityStatus.NoModuleInPort)} not seen in .NET; " +
                            $"update elements let through as gradient noise: {Steps.Sum(s => s.ExcusedUpdateElements)}.");
            return text.ToString();
        }

        private static string Escape(string text) => text.Replace("|", "\\|", StringComparison.Ordinal);
    }
}
