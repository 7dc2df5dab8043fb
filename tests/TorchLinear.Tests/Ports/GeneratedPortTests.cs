using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Security.Cryptography;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Tests
{
    /// <summary>
    /// The ports tools/pytorch/export_port.py generated (Ports/make_ports.py), compiled into this project: each loads
    /// its model's state_dict key for key, replays its recording with no divergence at the example shape and at a second
    /// shape, and the repository's two hand-written sample ports agree with the generated ones.
    /// </summary>
    public class GeneratedPortTests
    {
        private static readonly string PortsFolder = Path.Combine(Snapshots.RepositoryRoot, "tests", "TorchLinear.Tests", "Ports");

        private static string PortFile(string folder, string file) => Path.Combine(PortsFolder, folder, file);

        private static string Rows(ParityReport report) =>
            string.Join(Environment.NewLine, report.Modules.Concat(report.Gradients).Where(r => !r.IsClose).Select(r => $"{r.Path}: {r.Status} {r.Detail}"));

        /// <summary>Every recorded call was compared with a port call under the same path, and nothing diverged.</summary>
        private static void AssertFaithful(ParityReport report, int calls)
        {
            Assert.True(report.AllClose, Rows(report));
            Assert.Null(report.FirstDivergence);
            Assert.Equal(calls, report.Modules.Count);
            Assert.All(report.Modules, r => Assert.True(r.Status is ParityStatus.BitExact or ParityStatus.Close or ParityStatus.WithinRounding,
                                                        $"{r.Path}: {r.Status} {r.Detail}"));
            Assert.All(report.Modules, r => Assert.True(r.InputsMatch, $"{r.Path}: inputs differ"));
        }

        private static T Eval<T>(T module) where T : nn.Module
        {
            module.eval();
            return module;
        }

        public static IEnumerable<object[]> TinyPorts() => new[]
        {
            new object[] { "TinyTransformer" },
            new object[] { "TinyGpt" },
            new object[] { "MergedClasses" },
            new object[] { "ShapeGuard" },
        };

        private static nn.Module<Tensor, Tensor> NewTiny(string name) => name switch
        {
            "TinyTransformer" => new Ports.TinyTransformer.TinyTransformer(),
            "TinyGpt" => new Ports.TinyGpt.TinyGpt(),
            "MergedClasses" => new Ports.MergedClasses.MergedClasses(),
            "ShapeGuard" => new Ports.ShapeGuard.ShapeGuard(),
            _ => throw new ArgumentOutOfRangeException(nameof(name), name, "no such generated port"),
        };

        [Theory]
        [MemberData(nameof(TinyPorts))]
        public void GeneratedTinyPort_LoadsEveryKeyOfItsSafetensors_AndReplaysWithNoDivergence_AtBothShapes(string name)
        {
            using var port = Eval(NewTiny(name));
            using var recording = ParityRecording.Load(PortFile(name, $"{name}.parity.pt"));
            // The exported state_dict: every key of the port's, no other (strict), and the recording's state is the same.
            Assert.Empty(StateDicts.LoadPyTorchFile(port, PortFile(name, $"{name}.safetensors")));
            Assert.Equal(recording.StateDict().Keys.OrderBy(k => k, StringComparer.Ordinal),
                         port.state_dict().Keys.OrderBy(k => k, StringComparer.Ordinal));

            var report = Parity.Replay(port, recording);
            AssertFaithful(report, recording.CallOrder.Count);
            Assert.All(report.Gradients, r => Assert.True(r.IsClose, $"{r.Path}: {r.Status}"));

            using var second = ParityRecording.Load(PortFile(name, $"{name}.second.parity.pt"));
            Assert.NotEqual(InputShape(PortFile(name, $"{name}.parity.pt")), InputShape(PortFile(name, $"{name}.second.parity.pt")));
            AssertFaithful(Parity.Replay(port, second), second.CallOrder.Count);
        }

        private static long[] InputShape(string recordingPath)
        {
            var tensors = StateDicts.ReadPyTorchFile(recordingPath);
            long[] shape = tensors["input/0"].shape;
            foreach (var t in tensors.Values)
                t.Dispose();
            return shape;
        }

        /// <summary>
        /// Ports/merged_classes.py's MergedClasses (replayed above at two shapes): the instances with and without a submodule are one
        /// class (the submodule a nullable parameter, not registered where absent), so are those a bool attribute tells
        /// apart; the ones nothing tells apart are two classes.
        /// </summary>
        [Fact]
        public void GeneratedMergedClasses_AreOneClassWherePossible_AndRegisterOnlyTheSubmodulesAnInstanceHas()
        {
            using var port = new Ports.MergedClasses.MergedClasses();
            AssertOneClass(port, "a", "b");
            AssertOneClass(port, "c", "d");
            var types = port.named_children().ToDictionary(c => c.name, c => c.module.GetType());
            Assert.NotEqual(types["e"], types["f"]);
            Assert.NotEqual(types["g"], types["h"]);
            Assert.Contains("a.norm.weight", port.state_dict().Keys);
            Assert.DoesNotContain(port.state_dict().Keys, key => key.StartsWith("b.norm", StringComparison.Ordinal));
        }

        /// <summary>
        /// Ports/shape_guard.py's ShapeGuard (replayed above at the traced side, two shapes): a branch on sizes only is in
        /// the port as the side the trace took, so the port checks its condition where Python evaluated it and throws,
        /// naming the Python line, on an input that takes the other side (Wide's <c>x.shape[1] &gt; 4</c>, taken; its
        /// <c>min(x.shape[1], 4)</c>, baked as 4; the root's <c>x.shape[0] == 1</c>, not taken), and on an input of
        /// another rank.
        /// </summary>
        [Fact]
        public void GeneratedShapeGuard_ThrowsNamingThePythonLine_OnAnInputThatTakesTheOtherBranch()
        {
            using var port = Eval(new Ports.ShapeGuard.ShapeGuard());
            Assert.Empty(StateDicts.LoadPyTorchFile(port, PortFile("ShapeGuard", "ShapeGuard.safetensors")));
            using (var wide = randn(2, 7, 4, generator: new Generator(3)))
            using (var y = port.call(wide))
                Assert.Equal(new long[] { 2, 4, 3 }, y.shape);   // the traced side: no guard fires, min(7, 4) = 4 positions

            using var narrow = randn(2, 3, 4, generator: new Generator(3));
            var e = Assert.Throws<InvalidOperationException>(() => port.call(narrow));
            Assert.StartsWith("Wide: traced with shape_guard.py:", e.Message, StringComparison.Ordinal);
            Assert.Contains(": if x.shape[1] > 4: where (size > 4) was True; this input makes it False", e.Message, StringComparison.Ordinal);
            Assert.Contains("re-export at that shape", e.Message, StringComparison.Ordinal);

            using var one = randn(1, 6, 4, generator: new Generator(3));
            e = Assert.Throws<InvalidOperationException>(() => port.call(one));
            Assert.StartsWith("ShapeGuard: traced with shape_guard.py:", e.Message, StringComparison.Ordinal);
            Assert.Contains(": if x.shape[0] == 1: where (size == 1) was False; this input makes it True", e.Message, StringComparison.Ordinal);

            using var flat = randn(6, 4, generator: new Generator(3));
            e = Assert.Throws<InvalidOperationException>(() => port.call(flat));
            Assert.Equal("ShapeGuard: input x has 2 dimensions; the port was traced with 3 and computes only that rank: re-export at it", e.Message);
        }

        [Fact]
        public void GeneratedTinyTransformer_HasTheHandWrittenPortsKeys_AndItsOutputBitForBit()
        {
            using var generated = Eval(new Ports.TinyTransformer.TinyTransformer());
            using var handWritten = Eval(new global::TorchLinear.Samples.ParityCheck.TinyTransformer());
            AssertSameKeysAndOutputs(generated, handWritten, "TinyTransformer", randn(3, 9, 8, generator: new Generator(5)), bitExact: true);
        }

        /// <summary>
        /// Close, not asserted bit for bit: the hand-written TinyGpt holds TorchSharp's nn.Linear (matmul, then the bias
        /// added in place, on 3-D input) where the generated port computes PyTorch's aten::linear (one addmm), so equal
        /// bits would depend on the CPU's GEMM.
        /// </summary>
        [Fact]
        public void GeneratedTinyGpt_HasTheHandWrittenPortsKeys_AndItsOutput()
        {
            using var generated = Eval(new Ports.TinyGpt.TinyGpt());
            // Its two blocks compute the same thing, so they are one class, as in the hand-written port (the tracer names
            // their inputs differently; the generator groups instances by their code, not by those names).
            var blocks = generated.named_modules().Where(m => m.name is "h.0" or "h.1").Select(m => m.module.GetType()).ToList();
            Assert.Equal(2, blocks.Count);
            Assert.Same(blocks[0], blocks[1]);
            using var handWritten = Eval(new global::TorchLinear.Samples.TrainingParity.TinyGpt());
            AssertSameKeysAndOutputs(generated, handWritten, "TinyGpt", randint(0, 8, new long[] { 3, 5 }, generator: new Generator(5)), bitExact: false);
        }

        private static void AssertSameKeysAndOutputs(nn.Module<Tensor, Tensor> generated, nn.Module<Tensor, Tensor> handWritten, string name, Tensor input, bool bitExact)
        {
            Assert.Equal(handWritten.state_dict().Keys.OrderBy(k => k, StringComparer.Ordinal), generated.state_dict().Keys.OrderBy(k => k, StringComparer.Ordinal));
            foreach (var (key, tensor) in handWritten.state_dict())
                Assert.Equal(tensor.shape, generated.state_dict()[key].shape);
            string weights = PortFile(name, $"{name}.safetensors");
            StateDicts.LoadPyTorchFile(generated, weights);
            StateDicts.LoadPyTorchFile(handWritten, weights);
            using var noGrad = no_grad();
            using Tensor a = generated.call(input), b = handWritten.call(input);
            var comparison = Equivalence.Compare(b, a);
            if (bitExact)
                Assert.True(comparison.Comparable && comparison.DifferingElements == 0, $"{comparison.DifferingElements} elements differ, max |generated - hand-written| = {comparison.MaxAbsDiff}");
            else
                Equivalence.AssertClose(a, b);
        }

        /// <summary>
        /// The committed generated files are the reviewed artifacts: this asserts they are exactly what make_ports.py
        /// last wrote (its ports.sha256 manifest), so a hand edit of a generated port, or a file regenerated without
        /// the manifest, fails here. A change of the generator shows as a diff of the .cs files when make_ports.py is
        /// run again (docs/porting.md).
        /// </summary>
        [Fact]
        public void CommittedGeneratedFiles_AreThoseMakePortsLastWrote()
        {
            var manifest = File.ReadAllLines(Path.Combine(PortsFolder, "ports.sha256"))
                               .Where(line => line.Length > 0)
                               .Select(line => line.Split("  ", 2))
                               .ToDictionary(parts => parts[1], parts => parts[0]);
            var onDisk = Directory.GetDirectories(PortsFolder)
                                  .SelectMany(folder => Directory.GetFiles(folder, "*", SearchOption.AllDirectories))
                                  .Select(path => Path.GetRelativePath(PortsFolder, path).Replace('\\', '/'))
                                  .ToList();
            Assert.Equal(manifest.Keys.OrderBy(k => k, StringComparer.Ordinal), onDisk.OrderBy(k => k, StringComparer.Ordinal));
            foreach (var (file, digest) in manifest)
            {
                using var stream = File.OpenRead(Path.Combine(PortsFolder, file));
                Assert.True(digest == Convert.ToHexStringLower(SHA256.HashData(stream)),
                            $"{file} is not the file make_ports.py wrote (sha256 differs from ports.sha256): regenerate with make_ports.py, do not edit");
            }
            Assert.Contains("ResNet/ResNet.cs", manifest.Keys);
        }

        /// <summary>
        /// End to end with LoRA: an adapter made by real PEFT in Python on the TinyTransformer (make_ports.py) loads into
        /// the generated port with TorchLinear.Lora (every generated linear layer is a CustomLinear, which takes an
        /// adapter however it is invoked) and gives PEFT's adapted output; with the adapters disabled, the base model's.
        /// </summary>
        [Fact]
        public void APeftAdapter_LoadsIntoTheGeneratedTinyTransformer_AndGivesPeftsOutput()
        {
            string folder = PortFile("TinyTransformer", "peft-adapter");
            using var port = Eval(new Ports.TinyTransformer.TinyTransformer());
            StateDicts.LoadPyTorchFile(port, PortFile("TinyTransformer", "TinyTransformer.safetensors"));
            var cases = StateDicts.ReadPyTorchFile(Path.Combine(folder, "cases.pt"));
            using var noGrad = no_grad();
            using Tensor baseOutput = port.call(cases["input"]);
            var adapted = Lora.LoraModel.load_adapter(port, folder);
            Assert.Equal(6, adapted.Count);   // q_proj and v_proj of both blocks, and both fc1
            Assert.Contains("blocks.0.attn.q_proj.lora_A.default.weight", port.state_dict().Keys);
            using Tensor output = port.call(cases["input"]);
            Equivalence.AssertClose(output, cases["adapted_output"]);
            Assert.True((output - baseOutput).abs().max().item<float>() > 1e-3f, "the adapter changes the output");
            using (Lora.LoraModel.disable_adapter(port))
            {
                using Tensor disabled = port.call(cases["input"]);
                Assert.True(Equivalence.Compare(baseOutput, disabled).DifferingElements == 0);
            }
            foreach (var t in cases.Values)
                t.Dispose();
        }

        [Fact]
        public void GeneratedResNet_ReplaysTheRealModelRecording_WithNoDivergence_AndMatchesTorchvisionAtASecondShape()
        {
            using var port = Eval(new Ports.ResNet.ResNet());
            // torchvision's BasicBlocks, with and without downsample, are one class (downsample a nullable parameter).
            AssertOneClass(port, "layer1.0", "layer2.0", "layer3.0", "layer4.0");
            using var recording = ParityRecording.Load(Path.Combine(RealModelRecordings.Folder, "resnet_basic_1111.parity.pt"));
            var report = Parity.Replay(port, recording);
            // Every recorded call, the block's second ReLU call (relu#1) included, under torchvision's own paths.
            AssertFaithful(report, 48);
            Assert.Equal(39, report.Gradients.Count);
            Assert.All(report.Gradients, r => Assert.True(r.IsClose, $"{r.Path}: {r.Status}"));
            AssertSecondShape(port, recording, PortFile("ResNet", "ResNet.second.pt"));
        }

        [Fact]
        public void GeneratedMobileNetV2_ReplaysTheRealModelRecording_WithNoDivergence_AndMatchesTorchvisionAtASecondShape()
        {
            using var port = Eval(new Ports.MobileNet.MobileNetV2());
            // Its 17 InvertedResiduals (with and without the expanding convolution and the residual) are one class.
            AssertOneClass(port, Enumerable.Range(1, 17).Select(i => $"features.{i}").ToArray());
            using var recording = ParityRecording.Load(Path.Combine(RealModelRecordings.Folder, "mobilenet_v2_025.parity.pt"));
            var report = Parity.Replay(port, recording);
            AssertFaithful(report, 213);
            Assert.All(report.Gradients, r => Assert.True(r.IsClose, $"{r.Path}: {r.Status}"));
            AssertSecondShape(port, recording, PortFile("MobileNet", "MobileNetV2.second.pt"));
        }

        private static void AssertOneClass(nn.Module port, params string[] paths)
        {
            var types = port.named_modules().Where(m => paths.Contains(m.name)).Select(m => m.module.GetType()).Distinct().ToList();
            Assert.True(port.named_modules().Count(m => paths.Contains(m.name)) == paths.Length, "every path is a module of the port");
            Assert.Single(types);
        }

        /// <summary>The port, with the recording's weights, on the second file's input gives its output (assert_close's tolerances).</summary>
        private static void AssertSecondShape(nn.Module<Tensor, Tensor> port, ParityRecording recording, string path)
        {
            port.load_state_dict(recording.StateDict().ToDictionary(kv => kv.Key, kv => kv.Value));
            var file = StateDicts.ReadPyTorchFile(path);
            try
            {
                Tensor input = file["input"], expected = file["output"];
                Assert.Equal(new long[] { 1, 3, 48, 48 }, input.shape);  // the recording's is (2, 3, 32, 32)
                using var noGrad = no_grad();
                using Tensor actual = port.call(input);
                // The replay's rule: close by assert_close's tolerances, or within DefaultNoiseFactor times PyTorch's own
                // rounding error on this output (max |float32 - float64|, stored beside it).
                double noise = file["noise"].item<double>();
                double maxAbs = Equivalence.Compare(expected, actual).MaxAbsDiff;
                bool close = (actual - expected).abs().le(1e-5 + 1.3e-6 * expected.abs()).all().item<bool>();
                Assert.True(close || maxAbs <= ParityOptions.DefaultNoiseFactor * noise,
                            $"max |port - torchvision| = {maxAbs}, PyTorch's own rounding error {noise}");
            }
            finally
            {
                foreach (var t in file.Values)
                    t.Dispose();
            }
        }
    }
}
