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

        /// <summary>Recorded in PyTorch but never seen in .NET although the port has a module at that path: it calls it
        /// with <c>forward(x)</c> instead of <c>call(x)</c> (TorchSharp runs forward hooks only through <c>call</c>, as
        /// PyTorch runs them only through <c>module(x)</c>), or computes this step without calling it (a module called
        /// twice in PyTorch and once in the port, the other time functionally).</summary>
        NotCalledInDotNet,

        /// <summary>Nothing was recorded for it: a parameter whose gradient PyTorch did not record (its output did not depend on it).</summary>
        NotRecorded,

        /// <summary>Called in both runs, but the recorded call returned no tensor, so there is nothing to compare.</summary>
        NoTensorOutput,

        /// <summary>Called in .NET but not in the recorded run: the port calls a module PyTorch's model does not.</summary>
        OnlyInDotNet,

        /// <summary>Outside the tolerances, but no farther from PyTorch's value than <see cref="ParityOptions.NoiseFactor"/>
        /// times PyTorch's own rounding error of it (recorded by the float64 reference run): rounding, not a divergence.</summary>
        WithinRounding,

        /// <summary>Recorded in PyTorch, but the port has no module at that path: it is named differently
        /// (<see cref="ParityOptions.NameMap"/>, <see cref="ParityReport.SuggestedNameMap"/>), or the port computes this
        /// step without a module (a functional call). Not a divergence.</summary>
        NoModuleInPort,
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
        /// <summary>True for <see cref="ParityStatus.BitExact"/>, <see cref="ParityStatus.Close"/> and <see cref="ParityStatus.WithinRounding"/>.</summary>
        public bool IsClose => Status is ParityStatus.BitExact or ParityStatus.Close or ParityStatus.WithinRounding;

        /// <summary>The rounding bound that applied to this row — <see cref="ParityOptions.NoiseFactor"/> × PyTorch's own
        /// rounding error of the tensor (of the worst output, for a call of several) — or null when the recording does not
        /// know that error or the rule is off.</summary>
        public double? NoiseBound { get; init; }

        /// <summary>For a parameter's gradient, the module it belongs to as backward reaches it (its owner, or the nearest
        /// called ancestor when the owner itself is never called); null for calls and input gradients.</summary>
        public string? Module { get; init; }

        /// <summary>True when a value was compared and is not close (diverged, or of another shape or dtype).</summary>
        public bool IsDivergent => Status is ParityStatus.Diverged or ParityStatus.ShapeMismatch or ParityStatus.DtypeMismatch;
    }

    /// <summary>
    /// The result of <see cref="Parity.Replay(TorchSharp.torch.nn.Module, string, ParityOptions?)"/>: one row per module
    /// call in PyTorch's call order, the gradients, and where the port first departs from PyTorch.
    /// </summary>
    public sealed class ParityReport
    {
        internal ParityReport(string recording, string torchVersion, string moduleType, IReadOnlyList<ParityRow> modules, IReadOnlyList<ParityRow> gradients,
                              IReadOnlyList<ParityRow>? gradientsInBackwardOrder = null, IReadOnlyDictionary<string, string>? suggestedNameMap = null,
                              string? noRoundingReference = null, double noiseFactor = 0)
        {
            Recording = recording;
            TorchVersion = torchVersion;
            ModuleType = moduleType;
            Modules = modules;
            Gradients = gradients;
            GradientsInBackwardOrder = gradientsInBackwardOrder ?? gradients;
            SuggestedNameMap = suggestedNameMap ?? new Dictionary<string, string>();
            NoRoundingReference = noRoundingReference;
            NoiseFactor = noiseFactor;
            // Where a bug is, in the order of the computation: the first call (children finish before their parents) whose
            // output diverges although its inputs matched; without such a call, the first divergent output; without one,
            // the gradient that backward computes first among the divergent ones.
            FirstDivergenceRow = modules.FirstOrDefault(r => r.IsDivergent && r.InputsMatch != false)
                                 ?? modules.FirstOrDefault(r => r.IsDivergent)
                                 ?? GradientsInBackwardOrder.FirstOrDefault(r => r.IsDivergent);
        }

        /// <summary>The recording replayed.</summary>
        public string Recording { get; }

        /// <summary>The PyTorch version that recorded it.</summary>
        public string TorchVersion { get; }

        /// <summary>The recorded module's class name.</summary>
        public string ModuleType { get; }

        /// <summary>One row per recorded module call, in call order (the order calls finished), then calls made only in .NET.</summary>
        public IReadOnlyList<ParityRow> Modules { get; }

        /// <summary>The gradients of the inputs, then of every parameter in state_dict order.</summary>
        public IReadOnlyList<ParityRow> Gradients { get; }

        /// <summary>The same gradients in the order backward computes them: the parameters of the module called last
        /// first (each row's <see cref="ParityRow.Module"/>), the inputs' last.</summary>
        public IReadOnlyList<ParityRow> GradientsInBackwardOrder { get; }

        /// <summary>
        /// Pairings of modules the port called but PyTorch's model does not have, with recorded modules the port has no
        /// module for (same class, same parent, same output shapes): port path → recorded path, ready for
        /// <see cref="ParityOptions.NameMap"/>. Empty when there is nothing to pair.
        /// </summary>
        public IReadOnlyDictionary<string, string> SuggestedNameMap { get; }

        /// <summary>Why the rounding rule could not be applied (the recording has no float64 reference), or null.</summary>
        public string? NoRoundingReference { get; }

        /// <summary>The <see cref="ParityOptions.NoiseFactor"/> the replay used (0: the rounding rule was off).</summary>
        public double NoiseFactor { get; }

        /// <summary>
        /// The row where the port first departs from PyTorch, in the order of the computation: the first call whose output
        /// diverges while its inputs matched (else the first divergent output), else the first divergent gradient in
        /// backward order; null when nothing diverges.
        /// </summary>
        public ParityRow? FirstDivergenceRow { get; }

        /// <summary>The path of <see cref="FirstDivergenceRow"/>: a module call (e.g. <c>layer1.0.bn1</c>), or a gradient
        /// (<c>fc.weight</c>, <c>input 0</c>); null when nothing diverges.</summary>
        public string? FirstDivergence => FirstDivergenceRow?.Path;

        /// <summary>The module where the port first departs: the call's path, or for a gradient the module it belongs to
        /// (<see cref="ParityRow.Module"/>); null when nothing diverges.</summary>
        public string? FirstDivergentModule => FirstDivergenceRow is { } row ? row.Module ?? (row.ModuleType == "gradient" ? "(model)" : row.Path) : null;

        /// <summary>True when every compared output and gradient is close (bit-exact, within tolerances, or within rounding).</summary>
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
            ParityRow row = FirstDivergenceRow!;
            int divergent = Modules.Concat(Gradients).Count(r => r.IsDivergent);
            throw new TensorMismatchException(
                $"The port diverges from PyTorch {TorchVersion} first at {Name(row)}: {row.Status}, " +
                $"{divergent} of {Modules.Count + Gradients.Count} compared values diverge.{Environment.NewLine}{row.Detail}");
        }

        /// <summary>How a row is named in messages: <c>bn1 (BatchNorm2d)</c>, <c>fc.weight (gradient of fc)</c>.</summary>
        private static string Name(ParityRow row) =>
            row.ModuleType == "gradient" ? $"{row.Path} (gradient{(row.Module is null ? "" : $" of {row.Module}")})" : $"{row.Path} ({row.ModuleType})";

        /// <summary>How the values were judged: the rounding rule's factor, or why it did not apply.</summary>
        private string Judged() =>
            NoRoundingReference is not null ? $"judged by tolerances alone: {NoRoundingReference}"
            : NoiseFactor == 0 ? "judged by tolerances alone: the rounding rule is off (NoiseFactor 0)"
            : $"judged by the tolerances, or within {NoiseFactor.ToString(CultureInfo.InvariantCulture)} × PyTorch's own rounding error (NoiseFactor)";

        /// <summary>A table of every row (gradients in backward order), then the first divergence.</summary>
        public override string ToString()
        {
            var text = new StringBuilder();
            text.AppendLine($"Parity of {ModuleType} against {System.IO.Path.GetFileName(Recording)} (PyTorch {TorchVersion}): {Modules.Count} module calls, {Gradients.Count} gradients; values {Judged()}");
            int width = Math.Max(24, Modules.Concat(Gradients).Select(r => r.Path.Length).DefaultIfEmpty(0).Max() + 2);
            string Line(string path, string type, string status, string abs, string rel, string ulp, string bound, string inputs) =>
                $"{path.PadRight(width)}{type,-14}{status,-18}{abs,11}{rel,11}{ulp,14}{bound,11}  {inputs}";
            string Row(ParityRow r) => Line(r.Path, Truncate(r.ModuleType == "gradient" && r.Module is not null ? r.Module : r.ModuleType, 13), Describe(r.Status),
                Number(r.MaxAbs), Number(r.MaxRel), r.MaxUlp == long.MaxValue ? "inf" : r.MaxUlp.ToString(CultureInfo.InvariantCulture),
                r.NoiseBound is { } b ? Number(b) : "",
                r.InputsMatch switch { true => "inputs match", false => "inputs differ", null => "" });
            text.AppendLine(Line("module", "type", "output", "max |diff|", "max rel", "max ULP", "rounding", ""));
            foreach (ParityRow row in Modules)
                text.AppendLine(Row(row));
            text.AppendLine();
            text.AppendLine(Line("gradient (backward order)", "module", "", "max |diff|", "max rel", "max ULP", "rounding", ""));
            foreach (ParityRow row in GradientsInBackwardOrder)
                text.AppendLine(Row(row));
            text.AppendLine();
            if (FirstDivergenceRow is not { } first)
            {
                int exact = Modules.Concat(Gradients).Count(r => r.Status == ParityStatus.BitExact);
                int rounding = Modules.Concat(Gradients).Count(r => r.Status == ParityStatus.WithinRounding);
                text.Append($"No divergence: every compared output and gradient is close ({exact} bit-exact{(rounding > 0 ? $", {rounding} within rounding" : "")}).");
            }
            else
            {
                text.Append($"First divergence: {Name(first)}, {Describe(first.Status)}{(first.InputsMatch == true ? " although its inputs match" : "")}.");
            }
            foreach (string note in Notes())
                text.Append(' ').Append(note);
            return text.ToString();
        }

        /// <summary>What the rows not compared say: calls not seen, calls without a module, calls only in .NET, pairings.</summary>
        private IEnumerable<string> Notes()
        {
            int unseen = Modules.Count(r => r.Status == ParityStatus.NotCalledInDotNet);
            int missing = Modules.Count(r => r.Status == ParityStatus.NoModuleInPort);
            int only = Modules.Count(r => r.Status == ParityStatus.OnlyInDotNet);
            if (unseen > 0)
                yield return $"{unseen} recorded call{(unseen == 1 ? " was" : "s were")} not seen in .NET although the port has the module{(unseen == 1 ? "" : "s")} (invoke submodules with call(x), not forward(x); or the port computes {(unseen == 1 ? "it" : "them")} without the module).";
            if (missing > 0)
                yield return $"{missing} recorded call{(missing == 1 ? " has" : "s have")} no module in the port (named differently, or computed without a module in the port?).";
            if (only > 0)
                yield return $"{only} call{(only == 1 ? " was" : "s were")} made only in .NET.";
            if (SuggestedNameMap.Count > 0)
                yield return $"Named differently? Suggested ParityOptions.NameMap (port → PyTorch): {string.Join(", ", SuggestedNameMap.Select(kv => $"{Display(kv.Key)} -> {Display(kv.Value)}"))}.";
        }

        /// <summary>
        /// A short Markdown summary to paste into a pull request: the verdict, the first divergence (module or parameter,
        /// status, max |diff|), the worst rows (at most <paramref name="worstRows"/>), and the counts by status.
        /// </summary>
        public string ToMarkdown(int worstRows = 10)
        {
            var text = new StringBuilder();
            string file = System.IO.Path.GetFileName(Recording);
            if (FirstDivergenceRow is not { } first)
                text.AppendLine($"**Parity: no divergence** — {ModuleType} against `{file}` (PyTorch {TorchVersion}).");
            else
                text.AppendLine($"**Parity: diverges** — {ModuleType} against `{file}` (PyTorch {TorchVersion}); first divergence: " +
                                $"`{first.Path}` ({(first.ModuleType == "gradient" ? $"gradient{(first.Module is null ? "" : $" of `{first.Module}`")}" : first.ModuleType)}), " +
                                $"{Describe(first.Status)}{(first.InputsMatch == true ? " although its inputs match" : "")}, max |diff| {Number(first.MaxAbs)}.");
            text.AppendLine();
            text.AppendLine($"Values {Judged()}.");
            text.AppendLine();
            var all = Modules.Select(r => (Row: r, Kind: "output")).Concat(GradientsInBackwardOrder.Select(r => (Row: r, Kind: "gradient"))).ToList();
            var worst = all.Where(x => x.Row.Status is not (ParityStatus.BitExact or ParityStatus.NotCalledInDotNet or ParityStatus.NoModuleInPort
                                                                  or ParityStatus.OnlyInDotNet or ParityStatus.NotRecorded or ParityStatus.NoTensorOutput))
                           .OrderByDescending(x => x.Row.IsDivergent).ThenByDescending(x => x.Row.Status == ParityStatus.WithinRounding)
                           .ThenByDescending(x => x.Row.MaxAbs).Take(Math.Max(0, worstRows)).ToList();
            if (worst.Count > 0)
            {
                text.AppendLine("| | row | status | max \\|diff\\| | max rel | rounding bound |");
                text.AppendLine("|---|---|---|---:|---:|---:|");
                foreach (var (row, kind) in worst)
                    text.AppendLine($"| {kind} | `{row.Path}`{(row.Module is null ? "" : $" ({row.Module})")} | {Describe(row.Status)} | {Number(row.MaxAbs)} | {Number(row.MaxRel)} | {(row.NoiseBound is { } b ? Number(b) : "–")} |");
                text.AppendLine();
            }
            text.Append($"{Modules.Count} calls, {Gradients.Count} gradients: ");
            text.Append(string.Join(", ", Counts().Select(c => $"{c.Count} {c.Name}")));
            text.AppendLine(".");
            foreach (string note in Notes())
                text.AppendLine().AppendLine(note.Replace("|", "\\|", StringComparison.Ordinal));
            return text.ToString();
        }

        /// <summary>How many rows of each kind: bit-exact, close, within rounding, diverged, not seen (0 counts left out but the first four).</summary>
        private IEnumerable<(int Count, string Name)> Counts()
        {
            var rows = Modules.Concat(Gradients).ToList();
            yield return (rows.Count(r => r.Status == ParityStatus.BitExact), "bit-exact");
            yield return (rows.Count(r => r.Status == ParityStatus.Close), "close");
            yield return (rows.Count(r => r.Status == ParityStatus.WithinRounding), "within rounding");
            yield return (rows.Count(r => r.IsDivergent), "diverged");
            int unseen = rows.Count(r => r.Status is ParityStatus.NotCalledInDotNet or ParityStatus.NoModuleInPort);
            if (unseen > 0)
                yield return (unseen, "not seen in .NET");
            int only = rows.Count(r => r.Status == ParityStatus.OnlyInDotNet);
            if (only > 0)
                yield return (only, "only in .NET");
        }

        internal static string Number(double value) =>
            value == 0 ? "0" : double.IsPositiveInfinity(value) ? "inf" : double.IsNaN(value) ? "nan" : value.ToString("0.0e+00", CultureInfo.InvariantCulture);

        private static string Display(string path) => path.Length == 0 ? "(model)" : path;

        internal static string Describe(ParityStatus status) => status switch
        {
            ParityStatus.BitExact => "bit-exact",
            ParityStatus.Close => "close",
            ParityStatus.WithinRounding => "close (rounding)",
            ParityStatus.Diverged => "DIVERGED",
            ParityStatus.ShapeMismatch => "SHAPE DIFFERS",
            ParityStatus.DtypeMismatch => "DTYPE DIFFERS",
            ParityStatus.NotCalledInDotNet => "not seen in .NET",
            ParityStatus.NoModuleInPort => "no module in port",
            ParityStatus.NotRecorded => "not recorded",
            ParityStatus.NoTensorOutput => "no tensor returned",
            ParityStatus.OnlyInDotNet => "only in .NET",
            _ => status.ToString(),
        };

        private static string Truncate(string text, int length) => text.Length <= length ? text : text[..(length - 1)] + "…";
    }
}
