using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Reflection;
using TorchLinear.Samples.ParityCheck;
using TorchLinear.Samples.TrainingParity;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Tests
{
    /// <summary>
    /// The reports' Markdown summaries (for a pull request) and their verdict rules, on reports built from hand-made rows
    /// (snapshots: no GEMM numbers in them) and on real replays (structure only).
    /// </summary>
    public class ParityReportTests
    {
        private static readonly string Transformer = Path.Combine(AppContext.BaseDirectory, "pytorch", "tiny_transformer.parity.pt");
        private static readonly string Training = Path.Combine(AppContext.BaseDirectory, "pytorch", "tiny_gpt.training.pt");

        /// <summary>A report from rows, through the replay's own (internal) constructor.</summary>
        private static ParityReport Report(IReadOnlyList<ParityRow> modules, IReadOnlyList<ParityRow> gradients, IReadOnlyList<ParityRow>? backward = null,
                                           IReadOnlyDictionary<string, string>? names = null, string? noRounding = null, double noiseFactor = 4) =>
            (ParityReport)typeof(ParityReport).GetConstructors(BindingFlags.NonPublic | BindingFlags.Instance).Single()
                .Invoke(new object?[] { "/data/model.parity.pt", "1.13.0", "Net", modules, gradients, backward, names, noRounding, noiseFactor });

        private static ParityRow Row(string path, string type, ParityStatus status, double maxAbs = 0, bool? inputsMatch = true, double? bound = null, string? module = null) =>
            new ParityRow(path, type, status, inputsMatch, maxAbs, maxAbs / 2, maxAbs == 0 ? 0 : 12, status is ParityStatus.Diverged ? $"{path}: not close" : null)
            { NoiseBound = bound, Module = module };

        /// <summary>Calls as a replay would list them: a bug in norm (inputs matched), inherited by head and the model.</summary>
        private static ParityRow[] Calls() => new[]
        {
            Row("embed", "Embedding", ParityStatus.BitExact),
            Row("proj", "Linear", ParityStatus.Close, 2.5e-7, bound: 1e-6),
            Row("norm", "LayerNorm", ParityStatus.Diverged, 3.0e-2, bound: 4e-6),
            Row("act", "ReLU", ParityStatus.NoModuleInPort, inputsMatch: null),
            Row("head", "Linear", ParityStatus.Diverged, 5.0e-2, inputsMatch: false, bound: 8e-6),
            Row("(model)", "Net", ParityStatus.Diverged, 5.0e-2, inputsMatch: false, bound: 8e-6),
            Row("act1", "ReLU", ParityStatus.OnlyInDotNet, inputsMatch: null),
        };

        /// <summary>Gradients in state_dict order; backward reaches head before proj.</summary>
        private static ParityRow[] Gradients() => new[]
        {
            Row("input 0", "gradient", ParityStatus.Close, 1e-7, null, 4e-7),
            Row("proj.weight", "gradient", ParityStatus.Diverged, 2e-4, null, 4e-5, "proj"),
            Row("head.weight", "gradient", ParityStatus.Diverged, 3e-4, null, 4e-5, "head"),
            Row("head.bias", "gradient", ParityStatus.WithinRounding, 6e-5, null, 8e-5, "head"),
        };

        private static ParityRow[] Backward(ParityRow[] g) => new[] { g[2], g[3], g[1], g[0] };

        [Fact]
        public void TheFirstDivergence_IsTheFirstCallThatDivergesWithMatchingInputs_ThenTheFirstGradientInBackwardOrder()
        {
            var g = Gradients();
            var report = Report(Calls(), g, Backward(g));
            Assert.Equal("norm", report.FirstDivergence);
            Assert.Equal("norm", report.FirstDivergentModule);

            // Without a divergent call: the gradient backward computes first (head.weight), not the first in state_dict order.
            var calls = Calls().Select(r => r.IsDivergent ? r with { Status = ParityStatus.Close } : r).ToArray();
            var gradientsOnly = Report(calls, g, Backward(g));
            Assert.Equal("head.weight", gradientsOnly.FirstDivergence);
            Assert.Equal("head", gradientsOnly.FirstDivergentModule);
            Assert.Contains("First divergence: head.weight (gradient of head), DIVERGED.", gradientsOnly.ToString());
            var error = Assert.Throws<TensorMismatchException>(gradientsOnly.AssertAllClose);
            Assert.Contains("first at head.weight (gradient of head): Diverged, 2 of 11 compared values diverge.", error.Message);

            // Within rounding is close, and never a divergence.
            var rounding = Report(calls, g.Select(r => r.IsDivergent ? r with { Status = ParityStatus.WithinRounding } : r).ToArray());
            Assert.True(rounding.AllClose);
            Assert.Null(rounding.FirstDivergence);
            Assert.Contains("No divergence: every compared output and gradient is close (1 bit-exact, 3 within rounding).", rounding.ToString());
        }

        [Fact]
        public void ToMarkdown_OfHandMadeRows_MatchesItsSnapshot()
        {
            var g = Gradients();
            var report = Report(Calls(), g, Backward(g), new Dictionary<string, string> { ["act1"] = "act" });
            Snapshots.Match(report.ToMarkdown());
        }

        [Fact]
        public void ToMarkdown_WithoutARoundingReference_SaysSo_AndCapsTheTable()
        {
            var many = Enumerable.Range(0, 30).Select(i => Row($"layer{i}", "Linear", ParityStatus.Close, (i + 1) * 1e-7)).ToArray();
            var report = Report(many, Array.Empty<ParityRow>(), noRounding: "a version 1 recording has no rounding reference");
            string markdown = report.ToMarkdown();
            Assert.StartsWith("**Parity: no divergence** — Net against `model.parity.pt` (PyTorch 1.13.0).", markdown);
            Assert.Contains("Values judged by tolerances alone: a version 1 recording has no rounding reference.", markdown);
            var tableRows = markdown.Split('\n').Where(l => l.StartsWith("| output")).ToList();
            Assert.Equal(10, tableRows.Count);
            Assert.StartsWith("| output | `layer29` | close | 3.0e-06 |", tableRows[0]);  // the worst first
            Assert.Equal(3, report.ToMarkdown(worstRows: 3).Split('\n').Count(l => l.StartsWith("| output")));
            Assert.Contains("30 calls, 0 gradients: 0 bit-exact, 30 close, 0 within rounding, 0 diverged.", markdown);
        }

        [Fact]
        public void ToMarkdown_OfARealReplay_NamesThePlantedMistake()
        {
            using var port = new TinyTransformer(mistakes: PortingMistakes.LayerNormEps);
            port.eval();
            var report = Parity.Replay(port, Transformer);
            string markdown = report.ToMarkdown();
            var lines = markdown.Split('\n');
            Assert.StartsWith("**Parity: diverges** — TinyTransformer against `tiny_transformer.parity.pt` (PyTorch 1.13", lines[0]);
            Assert.Contains("first divergence: `blocks.0.ln1` (LayerNorm), DIVERGED although its inputs match, max |diff| ", lines[0]);
            Assert.Contains("Values judged by tolerances alone: a version 1 recording has no rounding reference.", markdown);
            // The table: a header, a separator and at most 10 rows, divergent ones first.
            var table = lines.Where(l => l.StartsWith('|')).ToList();
            Assert.InRange(table.Count, 3, 12);
            Assert.Contains("DIVERGED", table[2]);
            int diverged = report.Modules.Concat(report.Gradients).Count(r => r.IsDivergent);
            Assert.Contains($"28 calls, 39 gradients: ", markdown);
            Assert.Contains($", {diverged} diverged.", markdown);
        }

        [Fact]
        public void TrainingToMarkdown_OfHandMadeSteps_MatchesItsSnapshot()
        {
            var forward = Report(new[] { Row("h.0", "Block", ParityStatus.Close, 1e-7) }, Array.Empty<ParityRow>());
            var steps = new[]
            {
                new TrainingStepRow(0, 2.0856, 2.0856, "wte.weight", 6e-8, 3, "h.0.attn.c_attn.bias", 1e-9, 8, 24, forward, null),
                new TrainingStepRow(1, 1.9412, 1.9412, "lm_head.weight", 5e-8, 2, "wte.weight", 4e-5, 4096, 22, forward,
                                    new TrainingDivergence(1, TrainingPhase.Update, "wte.weight", "not close", new[] { "weight_decay: PyTorch 0, the port 0.1" })),
            };
            var report = (TrainingParityReport)typeof(TrainingParityReport).GetConstructors(BindingFlags.NonPublic | BindingFlags.Instance).Single()
                .Invoke(new object[] { "/data/gpt.training.pt", "1.13.0", "AdamW", "AdamW", true, steps });
            Snapshots.Match(report.ToMarkdown());
        }

        [Fact]
        public void TrainingToMarkdown_OfARealReplay_NamesTheStepPhaseAndCause()
        {
            using var training = new TinyGptTraining(TrainingMistakes.WeightDecayEverywhere);
            var report = Parity.ReplayTraining(training.Model, Training, training.Optimizer, training.Step);
            string markdown = report.ToMarkdown();
            var lines = markdown.Split('\n');
            Assert.StartsWith("**Training parity: diverges** — 20 steps of `tiny_gpt.training.pt` (PyTorch 1.13", lines[0]);
            Assert.Contains("first at step 0, Update, `wte.weight`: weight_decay: PyTorch 0, the port 0.1", lines[0]);
            var table = lines.Where(l => l.StartsWith('|')).ToList();
            Assert.Equal(12, table.Count);  // header, separator, 10 steps
            Assert.Contains("**Update diverges**: `wte.weight`", table[2]);
            int divergent = report.Steps.Count(s => s.Divergence is not null);
            Assert.Contains($"20 steps: {20 - divergent} close, {divergent} diverged (10 steps not shown); forward calls over all steps: ", markdown);
        }
    }
}
