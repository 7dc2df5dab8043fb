using System;
using System.Collections.Generic;
using System.Globalization;
using System.Linq;
using System.Text;

namespace TorchLinear
{
    /// <summary>How one recorded quantity compares with the port's.</summary>
    public enum ParityStatus
    {
        /// <summary>Identical bits.</summary>
        BitExact,

        /// <summary>Within the tolerances (<see cref="Equivalence.AssertClose"/>'s rule), not bit for bit.</summary>
        Close,

        /// <summary>Outside the tolerances.</summary>
        Diverged,

        /// <summary>The shapes differ.</summary>
        ShapeMismatch,

        /// <summary>The dtypes differ.</summary>
        DtypeMismatch,

        /// <summary>Recorded in PyTorch but never seen in .NET: the port has no such module, or calls it with
        /// <c>forward(x)</c> instead of <c>call(x)</c> (TorchSharp runs forward hooks only through <c>call</c>, as
        /// PyTorch runs them only through <c>module(x)</c>), or its forward takes more than one tensor.</summary>
        NotCalledInDotNet,

        /// <summary>Nothing was recorded for it: a parameter whose gradient PyTorch did not record (its output did not depend on it).</summary>
        NotRecorded,

        /// <summary>Called in both runs, but the recorded call returned no tensor, so there is nothing to compare.</summary>
        NoTensorOutput,

        /// <summary>Called in .NET but not in the recorded run: the port calls a module PyTorch's model does not.</summary>
        OnlyInDotNet,
    }

    /// <summary>One row of a <see cref="ParityReport"/>: a module call's output, or a gradient.</summary>
    /// <param name="Path">The module path (the root is "(model)"), or for gradients <c>input 0</c> or the parameter name.
    /// A module called again carries <c>#1</c>, <c>#2</c>...</param>
    /// <param name="ModuleType">The recorded module's class name (for gradients, "gradient").</param>
    /// <param name="Status">How the port's value compares with the recorded one.</param>
    /// <param name="InputsMatch">Whether the module's inputs were close to the recorded ones: a module that diverges
    /// with matching inputs is where a porting bug is; one whose inputs already differed inherited its divergence.
    /// Null when not known.</param>
    /// <param name="MaxAbs">Largest absolute difference over differing elements (0 when bit-exact).</param>
    /// <param name="MaxRel">Largest relative difference over differing elements.</param>
    /// <param name="MaxUlp">Largest distance in ULP over differing elements.</param>
    /// <param name="Detail">For a row that is not close: AssertClose's message or what is missing.</param>
    public sealed record ParityRow(string Path, string ModuleType, ParityStatus Status, bool? InputsMatch, double MaxAbs, double MaxRel, long MaxUlp, string? Detail)
    {
        /// <summary>True for <see cref="ParityStatus.BitExact"/> and <see cref="ParityStatus.Close"/>.</summary>
        public bool IsClose => Status is ParityStatus.BitExact or ParityStatus.Close;

        /// <summary>True when a value was compared and is not close (diverged, or of another shape or dtype).</summary>
        public bool IsDivergent => Status is ParityStatus.Diverged or ParityStatus.ShapeMismatch or ParityStatus.DtypeMismatch;
    }

    /// <summary>
    /// The result of <see cref="Parity.Replay(TorchSharp.torch.nn.Module, string, ParityOptions?)"/>: one row per module
    /// call in PyTorch's call order, the gradients, and the first module that diverges.
    /// </summary>
    public sealed class ParityReport
    {
        internal ParityReport(string recording, string torchVersion, string moduleType, IReadOnlyList<ParityRow> modules, IReadOnlyList<ParityRow> gradients)
        {
            Recording = recording;
            TorchVersion = torchVersion;
            ModuleType = moduleType;
            Modules = modules;
            Gradients = gradients;
            // Where a bug is: the first call (children finish before their parents) whose output diverges although its
            // inputs matched. Without such a call, the first divergent output, then the first divergent gradient.
            FirstDivergence = modules.FirstOrDefault(r => r.IsDivergent && r.InputsMatch != false)?.Path
                              ?? modules.FirstOrDefault(r => r.IsDivergent)?.Path
                              ?? gradients.FirstOrDefault(r => r.IsDivergent)?.Path;
        }

        /// <summary>The recording replayed.</summary>
        public string Recording { get; }

        /// <summary>The PyTorch version that recorded it.</summary>
        public string TorchVersion { get; }

        /// <summary>The recorded module's class name.</summary>
        public string ModuleType { get; }

        /// <summary>One row per recorded module call, in call order, then calls made only in .NET.</summary>
        public IReadOnlyList<ParityRow> Modules { get; }

        /// <summary>The gradients of the inputs and of every parameter.</summary>
        public IReadOnlyList<ParityRow> Gradients { get; }

        /// <summary>
        /// The module path where the port first departs from PyTorch: the first call whose output diverges while its
        /// inputs matched (else the first divergent output, else the first divergent gradient); null when nothing diverges.
        /// </summary>
        public string? FirstDivergence { get; }

        /// <summary>True when every compared output and gradient is close.</summary>
        public bool AllClose => Modules.Concat(Gradients).All(r => !r.IsDivergent);

        /// <summary>
        /// Throws a <see cref="TensorMismatchException"/> naming the first divergent module (with AssertClose's account of
        /// it) unless every compared output and gradient is close.
        /// </summary>
        /// <exception cref="TensorMismatchException">Something diverges.</exception>
        public void AssertAllClose()
        {
            if (AllClose)
                return;
            ParityRow row = Modules.Concat(Gradients).First(r => r.Path == FirstDivergence && r.IsDivergent);
            int divergent = Modules.Concat(Gradients).Count(r => r.IsDivergent);
            throw new TensorMismatchException(
                $"The port diverges from PyTorch {TorchVersion} first at {row.Path} ({row.ModuleType}): {row.Status}, " +
                $"{divergent} of {Modules.Count + Gradients.Count} compared values diverge.{Environment.NewLine}{row.Detail}");
        }

        /// <summary>A table of every row, then the first divergence.</summary>
        public override string ToString()
        {
            var text = new StringBuilder();
            text.AppendLine($"Parity of {ModuleType} against {System.IO.Path.GetFileName(Recording)} (PyTorch {TorchVersion}): {Modules.Count} module calls, {Gradients.Count} gradients");
            int width = Math.Max(24, Modules.Concat(Gradients).Select(r => r.Path.Length).DefaultIfEmpty(0).Max() + 2);
            string Line(string path, string type, string status, string abs, string rel, string ulp, string inputs) =>
                $"{path.PadRight(width)}{type,-14}{status,-18}{abs,11}{rel,11}{ulp,14}  {inputs}";
            string Number(double value) =>
                value == 0 ? "0" : double.IsPositiveInfinity(value) ? "inf" : double.IsNaN(value) ? "nan" : value.ToString("0.0e+00", CultureInfo.InvariantCulture);
            string Row(ParityRow r) => Line(r.Path, Truncate(r.ModuleType, 13), Describe(r.Status), Number(r.MaxAbs), Number(r.MaxRel),
                r.MaxUlp == long.MaxValue ? "inf" : r.MaxUlp.ToString(CultureInfo.InvariantCulture),
                r.InputsMatch switch { true => "inputs match", false => "inputs differ", null => "" });
            text.AppendLine(Line("module", "type", "output", "max |diff|", "max rel", "max ULP", ""));
            foreach (ParityRow row in Modules)
                text.AppendLine(Row(row));
            text.AppendLine();
            text.AppendLine(Line("gradient", "", "", "max |diff|", "max rel", "max ULP", ""));
            foreach (ParityRow row in Gradients)
                text.AppendLine(Row(row));
            text.AppendLine();
            if (FirstDivergence is null)
            {
                int exact = Modules.Concat(Gradients).Count(r => r.Status == ParityStatus.BitExact);
                int unseen = Modules.Count(r => r.Status == ParityStatus.NotCalledInDotNet);
                text.Append($"No divergence: every compared output and gradient is close ({exact} bit-exact)");
                text.Append(unseen > 0 ? $"; {unseen} recorded calls were not seen in .NET (call submodules with call(x))." : ".");
            }
            else
            {
                ParityRow row = Modules.Concat(Gradients).First(r => r.Path == FirstDivergence);
                text.Append($"First divergence: {row.Path} ({row.ModuleType}), {Describe(row.Status)}{(row.InputsMatch == true ? " although its inputs match" : "")}.");
            }
            return text.ToString();
        }

        private static string Describe(ParityStatus status) => status switch
        {
            ParityStatus.BitExact => "bit-exact",
            ParityStatus.Close => "close",
            ParityStatus.Diverged => "DIVERGED",
            ParityStatus.ShapeMismatch => "SHAPE DIFFERS",
            ParityStatus.DtypeMismatch => "DTYPE DIFFERS",
            ParityStatus.NotCalledInDotNet => "not seen in .NET",
            ParityStatus.NotRecorded => "not recorded",
            ParityStatus.NoTensorOutput => "no tensor returned",
            ParityStatus.OnlyInDotNet => "only in .NET",
            _ => status.ToString(),
        };

        private static string Truncate(string text, int length) => text.Length <= length ? text : text[..(length - 1)] + "…";
    }
}
