using System;
using System.IO;
using System.Linq;
using TorchSharp;
using TorchSharp.Modules;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Tests
{
    /// <summary>
    /// Format 2 on a root of two inputs returning a tuple, with a child of two inputs (one passed by keyword in PyTorch)
    /// returning a tuple, and an in-place ReLU (ReferenceData/Parity/V2/make_v2.py).
    /// </summary>
    public class ParityV2Tests
    {
        private static readonly string Folder = Path.Combine(AppContext.BaseDirectory, "ReferenceData", "Parity", "V2");

        /// <summary>The port of make_v2.py's TwoInputs.</summary>
        private sealed class TwoInputs : nn.Module<Tensor, Tensor, (Tensor Output, Tensor Difference)>
        {
            private readonly Mix mix;
            private readonly Linear proj = nn.Linear(4, 4);
            private readonly ReLU act = nn.ReLU(inplace: true);
            private readonly Linear head = nn.Linear(4, 3);

            public TwoInputs(bool swapped = false) : base(nameof(TwoInputs))
            {
                mix = new Mix(swapped);
                RegisterComponents();
            }

            public override (Tensor Output, Tensor Difference) forward(Tensor x, Tensor y)
            {
                var (gate, difference) = mix.call(x, y);
                return (head.call(act.call(proj.call(gate))), difference);
            }
        }

        /// <summary>(a, b) → (a·w + b, a − b); <c>swapped</c> plants b − a.</summary>
        private sealed class Mix : nn.Module<Tensor, Tensor, (Tensor, Tensor)>
        {
            private readonly Parameter w = new(zeros(4));
            private readonly bool _swapped;

            public Mix(bool swapped) : base(nameof(Mix))
            {
                _swapped = swapped;
                RegisterComponents();
            }

            public override (Tensor, Tensor) forward(Tensor a, Tensor b) => (a * w + b, _swapped ? b - a : a - b);
        }

        [Fact]
        public void AFormat2Recording_IsRead_WithNamesModesAndNoise()
        {
            using var recording = ParityRecording.Load(Path.Combine(Folder, "two_inputs.parity.pt"));
            Assert.Equal(2, recording.FormatVersion);
            Assert.Equal(2, recording.InputCount);
            Assert.Equal(new[] { "mix", "proj", "act", "head", "" }, recording.CallOrder);
            Assert.Equal(new[] { "", "mix", "proj", "act", "head" }, recording.CallStartOrder);
            Assert.Equal(new[] { "0", "b" }, recording.CallInputNames("mix"));
            Assert.Equal(new[] { "0", "1" }, recording.CallOutputNames("mix"));
            Assert.Equal(new[] { "0", "1" }, recording.CallOutputNames(""));
            Assert.All(recording.Training!.Values, Assert.False);
            Assert.Equal(new[] { "", "mix", "proj", "act", "head" }, recording.Training!.Keys);
            Assert.True(recording.HasRoundingReference);
            Assert.Equal("float64", recording.NoiseReference);
            Assert.Empty(recording.Tied);
            Assert.Equal(0, recording.OutputIndex);
            Assert.True(recording.NoiseOf("grad/input/1") > 0);
            Assert.NotNull(recording.NoiseOf("call/mix/output/1"));
            Assert.Null(recording.NoiseOf("no such key"));

            using var without = ParityRecording.Load(Path.Combine(Folder, "two_inputs_no64.parity.pt"));
            Assert.False(without.HasRoundingReference);
            Assert.Null(without.NoiseUnavailable);
            Assert.Empty(without.Noise);
        }

        [Fact]
        public void ARootOfTwoInputsReturningATuple_IsReplayed_CallByCallAndTensorByTensor()
        {
            using var port = new TwoInputs();
            port.eval();
            var report = Parity.Replay(port, Path.Combine(Folder, "two_inputs.parity.pt"));
            Assert.True(report.AllClose, string.Join("; ", report.Modules.Concat(report.Gradients).Select(r => $"{r.Path} {r.Status} {r.Detail}")));
            Assert.Equal(new[] { "mix", "proj", "act", "head", "(model)" }, report.Modules.Select(r => r.Path));
            // Every call compared, with its inputs (the in-place ReLU's copied before it ran).
            Assert.All(report.Modules, r => Assert.True(r.InputsMatch, r.Path));
            Assert.Equal(new[] { "input 0", "input 1", "mix.w", "proj.weight", "proj.bias", "head.weight", "head.bias" }, report.Gradients.Select(r => r.Path));
            Assert.Equal(new[] { "head.weight", "head.bias", "proj.weight", "proj.bias", "mix.w", "input 0", "input 1" }, report.GradientsInBackwardOrder.Select(r => r.Path));
            Assert.Contains("7 gradients; values judged by the tolerances, or within 4 × PyTorch's own rounding error (NoiseFactor)", report.ToString());
        }

        [Fact]
        public void AMistakeInACallsSecondOutput_IsNamed_WithWhichOutput()
        {
            using var port = new TwoInputs(swapped: true);
            port.eval();
            var report = Parity.Replay(port, Path.Combine(Folder, "two_inputs.parity.pt"));
            Assert.Equal("mix", report.FirstDivergence);
            Assert.StartsWith("mix output 1: Tensor-likes are not close!", report.FirstDivergenceRow!.Detail);
            // The root's second output diverges too; its first, and the gradients, do not depend on it.
            Assert.Equal(ParityStatus.Diverged, report.Modules.Single(r => r.Path == "(model)").Status);
            Assert.All(report.Gradients, r => Assert.True(r.IsClose, r.Path));
        }

        [Fact]
        public void WithoutAFloat64Reference_TheReportSaysItJudgesByTolerancesAlone()
        {
            using var port = new TwoInputs();
            port.eval();
            var report = Parity.Replay(port, Path.Combine(Folder, "two_inputs_no64.parity.pt"));
            Assert.True(report.AllClose);
            Assert.Equal("the recording has no float64 reference (recorded with reference64=False)", report.NoRoundingReference);
            Assert.Contains("7 gradients; values judged by tolerances alone: the recording has no float64 reference", report.ToString());
            Assert.All(report.Modules.Concat(report.Gradients), r => Assert.Null(r.NoiseBound));
        }

        [Fact]
        public void APortOfAnotherArity_IsRefused_NamingBoth()
        {
            using var port = nn.Sequential(nn.Linear(4, 4));
            var error = Assert.Throws<ArgumentException>(() => Parity.Replay(port, Path.Combine(Folder, "two_inputs.parity.pt")));
            Assert.Contains("has 2 inputs; Sequential's forward takes 1 tensor.", error.Message);
        }

        /// <summary>The port of make_v2.py's TiedLm: the head's weight is the embedding's, one parameter.</summary>
        private sealed class TiedLm : nn.Module<Tensor, Tensor>
        {
            private readonly Embedding embed = nn.Embedding(10, 4);
            private readonly LayerNorm norm = nn.LayerNorm(4);
            private readonly Linear head = nn.Linear(4, 10, hasBias: false);

            public TiedLm(bool tied = true) : base(nameof(TiedLm))
            {
                if (tied)
                    head.weight = embed.weight!;
                RegisterComponents();
            }

            public override Tensor forward(Tensor ids) => head.call(norm.call(embed.call(ids)));
        }

        [Fact]
        public void ATiedPort_ComparesTheSharedGradient_UnderEachName()
        {
            using var recording = ParityRecording.Load(Path.Combine(Folder, "tied.parity.pt"));
            Assert.Equal("embed.weight", recording.Tied["head.weight"]);
            using var port = new TiedLm();
            port.eval();
            // TorchSharp 0.107 lists the shared parameter under both names, as PyTorch's state_dict and the recording do:
            // each name's gradient is the whole gradient of the one tensor.
            Assert.Equal(new[] { "embed.weight", "norm.weight", "norm.bias", "head.weight" }, port.named_parameters().Select(p => p.name));
            var report = Parity.Replay(port, recording);
            Assert.True(report.AllClose, report.ToString());
            Assert.Null(report.FirstDivergence);
            Assert.Equal(new[] { "embed.weight", "head.weight", "norm.bias", "norm.weight" }, report.Gradients.Select(r => r.Path).OrderBy(p => p, StringComparer.Ordinal));
        }

        [Fact]
        public void APortThatDoesNotTie_IsNamedAtTheUntiedGradient()
        {
            // The head's own weight, loaded with the same values, gets only the head's share of the gradient.
            using var port = new TiedLm(tied: false);
            port.eval();
            var report = Parity.Replay(port, Path.Combine(Folder, "tied.parity.pt"));
            Assert.False(report.AllClose);
            Assert.All(report.Modules, r => Assert.True(r.IsClose, r.Path));
            Assert.Equal("head.weight", report.FirstDivergence);
        }

        /// <summary>The port of make_v2.py's Twice: x * 2, exact.</summary>
        private sealed class Twice : nn.Module<Tensor, Tensor>
        {
            public Twice() : base(nameof(Twice)) { }

            public override Tensor forward(Tensor x) => x * 2;
        }

        [Theory]
        [InlineData("boundary_3.996.parity.pt", ParityStatus.WithinRounding)]
        [InlineData("boundary_4.008.parity.pt", ParityStatus.Diverged)]
        public void TheRoundingRule_AdmitsUpToNoiseFactorTimesPyTorchsOwnError_AndNoMore(string file, ParityStatus expected)
        {
            // The recorded output was moved by hand by 3.996 or 4.008 times the noise recorded beside it (2^-12), all
            // exact in float32: either side of the default NoiseFactor 4.
            using var port = new Twice();
            port.eval();
            var report = Parity.Replay(port, Path.Combine(Folder, file));
            ParityRow root = report.Modules.Single(r => r.Path == "(model)");
            Assert.Equal(expected, root.Status);
            Assert.Equal(4 * Math.Pow(2, -12), root.NoiseBound);
            Assert.Equal(ParityOptions.DefaultNoiseFactor * Math.Pow(2, -12), root.NoiseBound);
            // Without the rule both are divergences (about 1e-3 apart, where assert_close allows 1e-5).
            var off = Parity.Replay(port, Path.Combine(Folder, file), new ParityOptions { NoiseFactor = 0 });
            Assert.Equal(ParityStatus.Diverged, off.Modules.Single(r => r.Path == "(model)").Status);
        }

        [Fact]
        public void ARecordingWhoseOutputIndexIsNoIndex_IsRefusedNamingTheFile()
        {
            var tensors = StateDicts.ReadPyTorchFile(Path.Combine(Folder, "two_inputs.parity.pt"));
            string json = System.Text.Encoding.UTF8.GetString(tensors["metadata"].bytes).Replace("\"output_index\": 0", "\"output_index\": -1");
            Assert.Contains("\"output_index\": -1", json);
            tensors["metadata"] = tensor(System.Text.Encoding.UTF8.GetBytes(json));
            string file = Path.Combine(Path.GetTempPath(), $"torchlinear-output-index-{Environment.ProcessId}.safetensors");
            try
            {
                TorchSharp.PyBridge.Safetensors.SaveStateDict(file, tensors);
                var error = Assert.Throws<CheckpointFormatException>(() => ParityRecording.Load(file));
                Assert.Contains(file, error.Message);
                Assert.Contains("output_index -1 is not an index of the root's output tensors", error.Message);
            }
            finally
            {
                File.Delete(file);
                foreach (var t in tensors.Values)
                    t.Dispose();
            }
        }
    }
}
