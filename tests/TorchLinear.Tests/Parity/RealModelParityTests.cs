using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Reflection;
using TorchSharp;
using TorchSharp.Modules;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Tests
{
    /// <summary>The real-model recordings (format 2, with PyTorch's rounding error), each read once for the test class.</summary>
    public sealed class RealModelRecordings : IDisposable
    {
        public static readonly string Folder = Path.Combine(AppContext.BaseDirectory, "ReferenceData", "Parity", "RealModels");

        public ParityRecording ResNet { get; } = ParityRecording.Load(Path.Combine(Folder, "resnet_basic_1111.parity.pt"));

        public ParityRecording MobileNet { get; } = ParityRecording.Load(Path.Combine(Folder, "mobilenet_v2_025.parity.pt"));

        public void Dispose()
        {
            ResNet.Dispose();
            MobileNet.Dispose();
        }
    }

    /// <summary>
    /// Parity.Replay on TorchVision.NET 0.107's own ResNet and MobileNetV2 against torchvision 0.14's, recorded with
    /// PyTorch 1.13 (ReferenceData/Parity/RealModels, make_real_models.py): the faithful ports pass with the default
    /// rounding rule and fail without it, each planted mistake is named with the right module, a port in the wrong mode is
    /// refused, and TorchVision.NET's renamed ReLU is paired with torchvision's.
    /// </summary>
    public class RealModelParityTests : IClassFixture<RealModelRecordings>
    {
        private readonly RealModelRecordings _recordings;

        public RealModelParityTests(RealModelRecordings recordings) => _recordings = recordings;

        /// <summary>
        /// torchvision's <c>ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)</c> as TorchVision.NET builds it: its public
        /// constructor with its own (private) BasicBlock.
        /// </summary>
        internal static ResNet BuildResNet(Func<int, nn.Module<Tensor, Tensor>>? normLayer = null)
        {
            Type basic = typeof(ResNet).GetNestedType("BasicBlock", BindingFlags.NonPublic)
                         ?? throw new InvalidOperationException("TorchVision's ResNet has no nested BasicBlock any more.");
            ResNet.BlockFunc block = (inplanes, planes, stride, downsample, groups, baseWidth, dilation, norm) =>
                (nn.Module<Tensor, Tensor>)Activator.CreateInstance(basic, inplanes, planes, stride, downsample, groups, baseWidth, dilation, norm)!;
            var model = new ResNet("ResNet", block, 1, new[] { 1, 1, 1, 1 }, numClasses: 10, norm_layer: normLayer);
            model.eval();
            return model;
        }

        internal static MobileNetV2 BuildMobileNet()
        {
            var model = torchvision.models.mobilenet_v2(num_classes: 10, width_mult: 0.25);
            model.eval();
            return model;
        }

        private static nn.Module Find(nn.Module root, string path) => root.named_modules().Single(m => m.name == path).module;

        /// <summary>Replaces the child <paramref name="name"/> of <paramref name="parent"/> (its registration and the field its forward uses).</summary>
        private static void Replace(nn.Module parent, string name, nn.Module<Tensor, Tensor> replacement)
        {
            FieldInfo field = parent.GetType().GetField(name, BindingFlags.NonPublic | BindingFlags.Instance)
                              ?? throw new InvalidOperationException($"{parent.GetType().Name} has no field {name}.");
            parent.register_module(name, null!);
            parent.register_module(name, replacement);
            field.SetValue(parent, replacement);
        }

        private static string Rows(ParityReport report) =>
            string.Join(Environment.NewLine, report.Modules.Concat(report.Gradients).Where(r => !r.IsClose).Select(r => $"{r.Path}: {r.Status} {r.Detail}"));

        [Fact]
        public void TorchVisionsResNet_IsFaithful_WithinRounding_ForwardAndBackward()
        {
            using var port = BuildResNet();
            var report = Parity.Replay(port, _recordings.ResNet);
            Assert.True(report.AllClose, Rows(report));
            Assert.Null(report.FirstDivergence);
            Assert.Null(report.NoRoundingReference);
            Assert.Equal(ParityOptions.DefaultNoiseFactor, report.NoiseFactor);
            // Every gradient was compared (38 parameters and the input), and the rule was needed for some of them.
            Assert.Equal(39, report.Gradients.Count);
            Assert.All(report.Gradients, r => Assert.True(r.IsClose, $"{r.Path}: {r.Status}"));
            Assert.Contains(report.Gradients, r => r.Status == ParityStatus.WithinRounding && r.NoiseBound is > 0);
            // Forward: every recorded call but the second ReLU of each block was compared (TorchVision.NET applies it functionally).
            var compared = report.Modules.Where(r => r.Status is ParityStatus.BitExact or ParityStatus.Close or ParityStatus.WithinRounding).ToList();
            Assert.Equal(48 - 8, compared.Count);
        }

        [Fact]
        public void WithoutTheRoundingRule_TheFaithfulResNet_Diverges_InItsGradients_NamedInBackwardOrder()
        {
            using var port = BuildResNet();
            var report = Parity.Replay(port, _recordings.ResNet, new ParityOptions { NoiseFactor = 0 });
            Assert.False(report.AllClose);
            Assert.Contains("judged by tolerances alone: the rounding rule is off", report.ToString());
            var divergent = report.Gradients.Where(r => r.IsDivergent).ToList();
            Assert.True(divergent.Count > 1, $"{divergent.Count} gradients diverge");
            // Everything that diverges without the rule is within rounding with it (the faithful-port test above).
            // Whether some forward outputs diverge too depends on the CPU's kernels: with AVX2 and FMA none does; with
            // ATEN_CPU_CAPABILITY=default (BatchNorm without fused multiply-adds) a few BatchNorm outputs do, and the
            // first of them is then the first divergence. Without one, the first divergence is the divergent gradient
            // backward computes first, not the first in state_dict order (conv1.weight, computed last).
            if (!report.Modules.Any(r => r.IsDivergent))
            {
                Assert.Equal(report.GradientsInBackwardOrder.First(r => r.IsDivergent).Path, report.FirstDivergence);
                Assert.NotEqual(divergent[0].Path, report.FirstDivergence);
                Assert.Equal(report.FirstDivergenceRow!.Module, report.FirstDivergentModule);
                Assert.Contains($"First divergence: {report.FirstDivergence} (gradient of {report.FirstDivergentModule})", report.ToString());
            }
            else
            {
                Assert.Equal(report.Modules.First(r => r.IsDivergent && r.InputsMatch != false).Path, report.FirstDivergence);
            }
            // Backward order: fc first, the stem's conv1 last among the parameters, the input after everything.
            var order = report.GradientsInBackwardOrder.Select(r => r.Path).ToList();
            Assert.Equal(new[] { "fc.weight", "fc.bias" }, order.Take(2));
            Assert.Equal("input 0", order[^1]);
            Assert.Equal("conv1.weight", order[^2]);
            Assert.True(order.IndexOf("layer4.0.bn2.weight") < order.IndexOf("layer4.0.conv1.weight"));
        }

        [Fact]
        public void TorchVisionsRenamedReLU_IsPaired_AndWithTheSuggestedNameMap_ItsCallsAreCompared()
        {
            using var port = BuildResNet();
            var report = Parity.Replay(port, _recordings.ResNet);
            // TorchVision.NET names BasicBlock's ReLU relu1 and applies the block's second ReLU functionally.
            var expected = Enumerable.Range(1, 4).ToDictionary(i => $"layer{i}.0.relu1", i => $"layer{i}.0.relu");
            Assert.Equal(expected.OrderBy(kv => kv.Key), report.SuggestedNameMap.OrderBy(kv => kv.Key));
            var relu = report.Modules.Single(r => r.Path == "layer1.0.relu");
            Assert.Equal(ParityStatus.NoModuleInPort, relu.Status);
            Assert.Contains("The port's layer1.0.relu1 has the same type and output shapes", relu.Detail);
            var relu1 = report.Modules.Single(r => r.Path == "layer1.0.relu1");
            Assert.Equal(ParityStatus.OnlyInDotNet, relu1.Status);
            Assert.Contains("PyTorch's layer1.0.relu has the same type", relu1.Detail);
            Assert.DoesNotContain("call submodules with call(x)", report.ToString());
            Assert.Contains("layer1.0.relu1 -> layer1.0.relu", report.ToString());
            // TorchVision.NET's extra Flatten module is only in .NET, and paired with nothing.
            Assert.Equal(ParityStatus.OnlyInDotNet, report.Modules.Single(r => r.Path == "flatten").Status);

            var mapped = Parity.Replay(port, _recordings.ResNet, new ParityOptions { NameMap = report.SuggestedNameMap });
            Assert.True(mapped.AllClose, Rows(mapped));
            Assert.Empty(mapped.SuggestedNameMap);
            for (int i = 1; i <= 4; i++)
            {
                var row = mapped.Modules.Single(r => r.Path == $"layer{i}.0.relu");
                Assert.True(row.Status is ParityStatus.BitExact or ParityStatus.Close or ParityStatus.WithinRounding, $"{row.Path}: {row.Status}");
                Assert.True(row.InputsMatch);
                // The block's second ReLU: the port has the module, called once; the second time it computes it without a module.
                var second = mapped.Modules.Single(r => r.Path == $"layer{i}.0.relu#1");
                Assert.Equal(ParityStatus.NotCalledInDotNet, second.Status);
                Assert.Contains("computed without a module in the port?", second.Detail);
            }
            Assert.DoesNotContain(mapped.Modules, r => r.Path.Contains("relu1"));
        }

        [Fact]
        public void TorchVisionsMobileNetV2_HasTorchvisionsArchitecture_AndIsFaithful()
        {
            using var port = BuildMobileNet();
            var report = Parity.Replay(port, _recordings.MobileNet);
            Assert.True(report.AllClose, Rows(report));
            // Every recorded call is seen under torchvision's names: same modules, same paths.
            Assert.DoesNotContain(report.Modules, r => r.Status is ParityStatus.NotCalledInDotNet or ParityStatus.NoModuleInPort or ParityStatus.OnlyInDotNet);
            Assert.Equal(213, report.Modules.Count);
            Assert.Equal(_recordings.MobileNet.StateDict().Keys.Count(k => !k.EndsWith("running_mean") && !k.EndsWith("running_var") && !k.EndsWith("num_batches_tracked")) + 1,
                         report.Gradients.Count);
            // The in-place ReLU6: its recorded input, copied before the call, holds negatives; the port's too.
            Assert.True(report.Modules.Single(r => r.Path == "features.0.2").InputsMatch);
            // Without the rounding rule, the faithful port's forward diverges (in features.13, whose inputs match).
            Assert.Contains(Parity.Replay(port, _recordings.MobileNet, new ParityOptions { NoiseFactor = 0 }).Modules, r => r.IsDivergent);
        }

        public static IEnumerable<object[]> Mistakes() => new[]
        {
            new object[] { "BatchNorm eps 1e-3 (Keras') instead of 1e-5", "layer2.0.bn1" },
            new object[] { "a weight read 0.1% too large", "layer3.0.conv2" },
            new object[] { "LeakyReLU instead of ReLU in the stem", "relu" },
            new object[] { "the downsample's BatchNorm with eps 1e-3", "layer2.0.downsample.1" },
        };

        [Theory]
        [MemberData(nameof(Mistakes))]
        public void APlantedMistake_InTorchVisionsResNet_IsNamed(string mistake, string module)
        {
            using var port = BuildResNet();
            var options = new ParityOptions();
            switch (mistake)
            {
                case "BatchNorm eps 1e-3 (Keras') instead of 1e-5":
                case "the downsample's BatchNorm with eps 1e-3":
                    ((BatchNorm2d)Find(port, module)).eps = 1e-3;
                    break;
                case "a weight read 0.1% too large":
                    options = options with { ConvertState = (key, t) => key == "layer3.0.conv2.weight" ? t * 1.001f : t };
                    break;
                case "LeakyReLU instead of ReLU in the stem":
                    Replace(port, "relu", nn.LeakyReLU(0.01, inplace: true));
                    port.eval();  // a new module starts in training mode, which the replay would refuse
                    break;
            }
            var report = Parity.Replay(port, _recordings.ResNet, options);
            Assert.Equal(module, report.FirstDivergence);
            Assert.Equal(module, report.FirstDivergentModule);
            var row = report.FirstDivergenceRow!;
            Assert.Equal(ParityStatus.Diverged, row.Status);
            Assert.True(row.InputsMatch);
            // Far outside the rounding bound, not a borderline call.
            Assert.True(row.MaxAbs > 10 * row.NoiseBound!.Value, $"{row.MaxAbs} against the bound {row.NoiseBound}");
        }

        [Fact]
        public void AFrozenBatchNorm_IsAGradientOnlyMistake_NamedAtTheModuleBackwardReachesFirst()
        {
            // A port that uses a frozen BatchNorm (weight and bias as buffers, as torchvision.ops.FrozenBatchNorm2d) in
            // layer3: the forward is PyTorch's bit for bit, but PyTorch trains those weights. In state_dict order the first
            // missing gradient is layer3.0.bn1's; backward reaches the downsample's BatchNorm (called after bn2) first.
            using var port = BuildResNet(planes => planes == 256 ? new FrozenBatchNorm2d(planes) : nn.BatchNorm2d(planes));
            port.eval();
            var report = Parity.Replay(port, _recordings.ResNet);
            Assert.All(report.Modules, r => Assert.False(r.IsDivergent, $"{r.Path}: {r.Status}"));
            Assert.Equal("layer3.0.downsample.1.weight", report.FirstDivergence);
            Assert.Equal("layer3.0.downsample.1", report.FirstDivergentModule);
            Assert.Equal("layer3.0.bn1.weight", report.Gradients.First(r => r.IsDivergent).Path);
            Assert.Contains("the port has no parameter layer3.0.downsample.1.weight that requires grad", report.FirstDivergenceRow!.Detail);
            Assert.Equal(6, report.Gradients.Count(r => r.IsDivergent));
            var error = Assert.Throws<TensorMismatchException>(report.AssertAllClose);
            Assert.Contains("first at layer3.0.downsample.1.weight (gradient of layer3.0.downsample.1)", error.Message);
        }

        /// <summary>BatchNorm2d in eval mode with its affine weights as buffers (torchvision.ops.FrozenBatchNorm2d, with PyTorch's BatchNorm's keys).</summary>
        private sealed class FrozenBatchNorm2d : nn.Module<Tensor, Tensor>
        {
            private readonly Tensor weight, bias, running_mean, running_var, num_batches_tracked;

            public FrozenBatchNorm2d(long features) : base(nameof(FrozenBatchNorm2d))
            {
                weight = ones(features);
                bias = zeros(features);
                running_mean = zeros(features);
                running_var = ones(features);
                num_batches_tracked = tensor(0L);
                register_buffer(nameof(weight), weight);
                register_buffer(nameof(bias), bias);
                register_buffer(nameof(running_mean), running_mean);
                register_buffer(nameof(running_var), running_var);
                register_buffer(nameof(num_batches_tracked), num_batches_tracked);
            }

            public override Tensor forward(Tensor x) => nn.functional.batch_norm(x, running_mean, running_var, weight, bias, training: false, momentum: 0.1, eps: 1e-5);
        }

        [Fact]
        public void APortInTrainingMode_IsRefused_NamingTheModules_BeforeAnythingIsLoaded()
        {
            using var port = BuildResNet();
            port.train();
            var before = TensorText.Bits(((Conv2d)Find(port, "conv1")).weight!);
            var error = Assert.Throws<InvalidOperationException>(() => Parity.Replay(port, _recordings.ResNet));
            // Every module the recording and the port share (40) differs; the 12 BatchNorms, why it matters, come first.
            Assert.StartsWith("Parity.Replay: the recording was made with 40 modules in eval mode that the port has in training mode (call port.eval()): " +
                              "12 that compute differently by mode: bn1 (BatchNorm2d), layer1.0.bn1 (BatchNorm2d), layer1.0.bn2 (BatchNorm2d), layer2.0.bn1 (BatchNorm2d),", error.Message);
            Assert.Contains("layer4.0.downsample.1 (BatchNorm2d); 28 others: (model), conv1, relu, maxpool, layer1,", error.Message);
            Assert.Contains("nothing was loaded or compared", error.Message);
            Assert.Equal(before, TensorText.Bits(((Conv2d)Find(port, "conv1")).weight!));

            // One module left in training mode is named alone.
            port.eval();
            Find(port, "layer2.0.bn2").train();
            var one = Assert.Throws<InvalidOperationException>(() => Parity.Replay(port, _recordings.ResNet));
            Assert.Contains("with 1 module in eval mode that the port has in training mode (call port.eval()): 1 that compute differently by mode: layer2.0.bn2 (BatchNorm2d).", one.Message);
        }
    }
}
