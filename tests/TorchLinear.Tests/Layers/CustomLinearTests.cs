using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Text.Json;
using TorchSharp;
using TorchSharp.Modules;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Tests
{
    public class CustomLinearTests
    {
        // ---- The article's worked example ------------------------------------------------------------

        [Fact]
        public void WorkedExample_GivesTheArticlesNumbers()
        {
            // W = [[1,2,3],[4,5,6]], x = [1,2,3], b = [0,1]: rows · x = 14 and 32, plus b = [14, 33].
            using var layer = new CustomLinear(
                new Parameter(tensor(new float[,] { { 1, 2, 3 }, { 4, 5, 6 } })),
                new Parameter(tensor(new float[] { 0, 1 })));
            using var x = tensor(new float[] { 1, 2, 3 });
            using var batch = tensor(new float[,] { { 1, 2, 3 }, { 4, 5, 6 } });

            using var y = layer.forward(x);
            using var yBatch = layer.forward(batch);

            Assert.Equal(new float[] { 14, 33 }, y.data<float>().ToArray());
            Assert.Equal(new long[] { 2 }, y.shape);
            // Second row: 1·4 + 2·5 + 3·6 = 32, + 0 → 32;  4·4 + 5·5 + 6·6 = 77, + 1 → 78.
            Assert.Equal(new float[] { 14, 33, 32, 78 }, yBatch.data<float>().ToArray());
            Assert.Equal(new long[] { 2, 2 }, yBatch.shape);
        }

        // ---- Construction, registration, state_dict --------------------------------------------------

        [Fact]
        public void StateDict_HasNnLinearsKeysShapesAndDtypes()
        {
            using var plain = new CustomLinear(3, 2);
            using var noBias = new CustomLinear(3, 2, bias: false);
            using var wide = new CustomLinear(4, 5, dtype: ScalarType.Float64);
            using var reference = nn.Linear(3, 2);

            Assert.Equal(reference.state_dict().Keys, plain.state_dict().Keys);
            Assert.Equal(new[] { "weight", "bias" }, plain.named_parameters().Select(p => p.name));
            Assert.Equal(2, plain.parameters().Count());
            Assert.Single(noBias.parameters());
            Assert.Null(noBias.bias);

            static object Describe(CustomLinear layer) => layer.state_dict()
                .Select(kv => new { key = kv.Key, shape = TensorText.Shape(kv.Value), dtype = kv.Value.dtype.ToString(), requires_grad = kv.Value.requires_grad })
                .ToArray();
            Snapshots.Match(new { plain = Describe(plain), noBias = Describe(noBias), float64 = Describe(wide) });
        }

        [Fact]
        public void ToString_MirrorsPyTorchsExtraRepr()
        {
            using var plain = new CustomLinear(3, 2);
            using var noBias = new CustomLinear(1024, 1000, bias: false);

            Assert.Equal("CustomLinear(in_features=3, out_features=2, bias=True)", plain.ToString());
            Assert.Equal("CustomLinear(in_features=1024, out_features=1000, bias=False)", noBias.ToString());
        }

        [Fact]
        public void StateDict_RoundTripsThroughNnLinear()
        {
            manual_seed(11);
            using var custom = new CustomLinear(6, 4);
            using var builtIn = nn.Linear(6, 4);
            using var back = new CustomLinear(6, 4);

            builtIn.load_state_dict(custom.state_dict());
            back.load_state_dict(builtIn.state_dict());

            Assert.Equal(TensorText.Bits(custom.weight), TensorText.Bits(builtIn.weight));
            Assert.Equal(TensorText.Bits(custom.bias!), TensorText.Bits(builtIn.bias!));
            Assert.Equal(TensorText.Bits(custom.weight), TensorText.Bits(back.weight));
            Assert.Equal(TensorText.Bits(custom.bias!), TensorText.Bits(back.bias!));
        }

        [Fact]
        public void ParameterConstructor_TakesOwnershipAwayFromTheCallersDisposeScope()
        {
            CustomLinear layer;
            using (NewDisposeScope())
            {
                layer = new CustomLinear(new Parameter(ones(2, 3)), new Parameter(zeros(2)));
            }
            using (layer)
            {
                using var y = layer.forward(ones(3));
                Assert.Equal(new float[] { 3, 3 }, y.data<float>().ToArray());
            }
        }

        [Fact]
        public void To_Float64_KeepsParametersRegisteredAndMatchesNnLinear()
        {
            manual_seed(5);
            using var custom = new CustomLinear(8, 3);
            manual_seed(5);
            using var builtIn = nn.Linear(8, 3);

            custom.to(ScalarType.Float64);
            builtIn.to(ScalarType.Float64);

            Assert.Equal(new[] { "weight", "bias" }, custom.state_dict().Keys);
            Assert.All(custom.parameters(), p => Assert.Equal(ScalarType.Float64, p.dtype));
            Assert.Same(custom.weight, custom.named_parameters().Single(p => p.name == "weight").parameter);
            Assert.Same(custom.bias, custom.named_parameters().Single(p => p.name == "bias").parameter);
            using var x = randn(5, 8, dtype: ScalarType.Float64);
            Assert.True(Equivalence.CompareModules(builtIn, custom, x).BitExact);
        }

        [Fact]
        public void To_AnotherDevice_MovesBothParametersAndKeepsTheirKeys()
        {
            // The meta device (shapes without data) is the one other device a CPU-only machine has.
            using var layer = new CustomLinear(3, 2);
            layer.to(new Device(DeviceType.META));

            Assert.Equal(new[] { "weight", "bias" }, layer.state_dict().Keys);
            Assert.All(layer.parameters(), p => Assert.Equal(DeviceType.META, p.device_type));
            Assert.Same(layer.weight, layer.named_parameters().Single(p => p.name == "weight").parameter);
            Assert.True(layer.weight.requires_grad);
            using var x = empty(4, 3, device: new Device(DeviceType.META));
            using var y = layer.forward(x);
            Assert.Equal(new long[] { 4, 2 }, y.shape);
            Assert.Equal(DeviceType.META, y.device_type);
        }

        [Fact]
        public void RequiresGradFalse_KeepsParametersRegistered()
        {
            using var layer = new CustomLinear(3, 2);
            foreach (var p in layer.parameters())
                p.requires_grad_(false);
            Assert.Equal(new[] { "weight", "bias" }, layer.state_dict().Keys);
            Assert.All(layer.parameters(), p => Assert.False(p.requires_grad));
        }

        [Fact]
        public void Dispose_ThenForward_ThrowsObjectDisposed()
        {
            var layer = new CustomLinear(3, 2);
            var weight = layer.weight;
            layer.Dispose();

            Assert.True(weight.IsInvalid);
            using var x = ones(3);
            Assert.Throws<ObjectDisposedException>(() => layer.forward(x));
            layer.Dispose();  // a second Dispose is harmless
        }

        // ---- Seeded initialisation -------------------------------------------------------------------

        [Theory]
        [InlineData(0, 3, 2, true)]
        [InlineData(1, 3, 2, false)]
        [InlineData(42, 1, 1, true)]
        [InlineData(7, 64, 32, true)]
        [InlineData(123, 1024, 1000, true)]
        [InlineData(9, 4, 0, true)]
        public void Init_UnderTheSameSeed_HoldsNnLinearsNumbers(int seed, long inFeatures, long outFeatures, bool bias)
        {
            manual_seed(seed);
            using var builtIn = nn.Linear(inFeatures, outFeatures, bias);
            manual_seed(seed);
            using var custom = new CustomLinear(inFeatures, outFeatures, bias);

            Assert.Equal(TensorText.Bits(builtIn.weight), TensorText.Bits(custom.weight));
            if (bias)
                Assert.Equal(TensorText.Bits(builtIn.bias!), TensorText.Bits(custom.bias!));
        }

        [Theory]
        [InlineData(ScalarType.Float64)]
        [InlineData(ScalarType.BFloat16)]
        [InlineData(ScalarType.Float16)]
        [InlineData(ScalarType.ComplexFloat32)]
        [InlineData(ScalarType.ComplexFloat64)]
        public void Init_EveryDtypeNnLinearTakes_HoldsNnLinearsNumbers(ScalarType dtype)
        {
            // Complex too: libtorch's kaiming_uniform_ and uniform_ fill the real and imaginary parts, and TorchSharp's
            // nn.Linear(dtype: ComplexFloat32) constructs, runs and trains (measured), as PyTorch's does.
            manual_seed(11);
            using var builtIn = nn.Linear(7, 5, dtype: dtype);
            manual_seed(11);
            using var custom = new CustomLinear(7, 5, dtype: dtype);
            Assert.Equal(dtype, custom.weight.dtype);
            Assert.Equal(TensorText.Bits(builtIn.weight), TensorText.Bits(custom.weight));
            Assert.Equal(TensorText.Bits(builtIn.bias!), TensorText.Bits(custom.bias!));
        }

        [Fact]
        public void Complex_ForwardAndBackward_MatchNnLinearBitForBit()
        {
            using var scope = NewDisposeScope();
            foreach (var dtype in new[] { ScalarType.ComplexFloat32, ScalarType.ComplexFloat64 })
            foreach (var shape in new[] { new long[] { 7 }, new long[] { 4, 7 }, new long[] { 2, 3, 7 } })
            {
                manual_seed(5);
                var builtIn = nn.Linear(7, 5, dtype: dtype);
                manual_seed(5);
                var custom = new CustomLinear(7, 5, dtype: dtype);
                var x = randn(shape, dtype: dtype);
                var comparison = Equivalence.CompareModules(builtIn, custom, x);
                Assert.True(comparison.BitExact, $"{dtype} {TensorText.Shape(x)}:{Environment.NewLine}{comparison}");
                Assert.Equal(dtype, custom.forward(x).dtype);
            }
        }

        [Fact]
        public void Init_WithoutInFeatures_GivesAZeroBiasLikePyTorch_WhereTorchSharpsNnLinearThrows()
        {
            // PyTorch: a zero-element weight is left alone and the bias bound is 0. TorchSharp's nn.Linear(0, n)
            // throws from libtorch's kaiming_uniform_; should that change, compare against it here instead.
            Assert.Throws<System.Runtime.InteropServices.ExternalException>(() => nn.Linear(0, 4));

            using var layer = new CustomLinear(0, 4);
            Assert.Equal(new long[] { 4, 0 }, layer.weight.shape);
            Assert.Equal(new[] { "00000000", "00000000", "00000000", "00000000" }, TensorText.Bits(layer.bias!));
            using var y = layer.forward(empty(5, 0));
            Assert.Equal(new long[] { 5, 4 }, y.shape);
            Assert.All(y.data<float>().ToArray(), v => Assert.Equal(0f, v));
        }

        [Fact]
        public void Init_UnderTheSameSeed_HoldsRealPyTorchsNumbers()
        {
            // Generated by ReferenceData/pytorch_init.py with Debian's PyTorch; see that script.
            using var document = JsonDocument.Parse(File.ReadAllText(Path.Combine(AppContext.BaseDirectory, "ReferenceData", "pytorch_init.json")));
            var cases = document.RootElement.GetProperty("cases").EnumerateArray().ToList();
            Assert.True(cases.Count >= 8, "the reference file should hold every case of the script");
            foreach (var c in cases)
            {
                int seed = c.GetProperty("seed").GetInt32();
                long inFeatures = c.GetProperty("in_features").GetInt64();
                long outFeatures = c.GetProperty("out_features").GetInt64();
                bool hasBias = c.GetProperty("bias").GetBoolean();
                var dtype = Enum.Parse<ScalarType>(c.GetProperty("dtype").GetString()!);

                manual_seed(seed);
                using var layer = new CustomLinear(inFeatures, outFeatures, hasBias, dtype: dtype);

                string label = $"seed {seed}, Linear({inFeatures}, {outFeatures}, bias={hasBias}, {dtype})";
                var parts = new List<(string Key, Tensor Value)> { ("weight_bits", layer.weight) };
                if (hasBias)
                    parts.Add(("bias_bits", layer.bias!));
                foreach (var (key, value) in parts)
                {
                    var pytorchs = c.GetProperty(key).EnumerateArray().Select(e => e.GetString()!).ToList();
                    if (KernelFacts.FusesMultiplyAdd)
                    {
                        Assert.True(pytorchs.SequenceEqual(TensorText.Bits(value)), $"{key} differs from PyTorch's for {label}");
                    }
                    else if (dtype == ScalarType.Float32)
                    {
                        // Kernels that round from + u · (to − from) twice: within one more rounding of PyTorch's draw.
                        float[] expected = pytorchs.Select(h => BitConverter.Int32BitsToSingle(Convert.ToInt32(h, 16))).ToArray();
                        Assert.True(KernelFacts.WithinUniformRounding(expected, value.numel() == 0 ? Array.Empty<float>() : value.data<float>().ToArray(), inFeatures == 0 ? 0 : 1 / Math.Sqrt(inFeatures)), $"{key} is not PyTorch's draw for {label}");
                    }
                }
            }
        }

        [Fact]
        public void Init_SeededWeights_AreStable()
        {
            object Describe(int seed, long inFeatures, long outFeatures, ScalarType dtype)
            {
                manual_seed(seed);
                using var layer = new CustomLinear(inFeatures, outFeatures, dtype: dtype);
                return SeededLayer(seed, layer, dtype);
            }
            // The snapshot's numbers are those of kernels that round from + u · (to − from) once (AVX2, AVX-512); with
            // the portable kernels they differ in the last bit, and the layer is then checked against nn.Linear's draw.
            if (!KernelFacts.FusesMultiplyAdd)
            {
                foreach (var (seed, inFeatures, outFeatures, dtype) in new[] { (0, 3L, 2L, ScalarType.Float32), (1, 4L, 3L, ScalarType.Float32), (0, 3L, 2L, ScalarType.Float64) })
                {
                    manual_seed(seed);
                    using var layer = new CustomLinear(inFeatures, outFeatures, dtype: dtype);
                    manual_seed(seed);
                    using var builtIn = nn.Linear(inFeatures, outFeatures, dtype: dtype);
                    Assert.Equal(TensorText.Bits(builtIn.weight), TensorText.Bits(layer.weight));
                    Assert.Equal(TensorText.Bits(builtIn.bias!), TensorText.Bits(layer.bias!));
                }
                return;
            }
            Snapshots.Match(new[]
            {
                Describe(0, 3, 2, ScalarType.Float32),
                Describe(1, 4, 3, ScalarType.Float32),
                Describe(0, 3, 2, ScalarType.Float64),
            });
        }

        [Fact]
        public void Init_SeededHalfPrecisionWeights_AreStable()
        {
            // libtorch draws bf16/fp16 uniforms in float and rounds them: the numbers are machine-independent.
            object Describe(int seed, long inFeatures, long outFeatures, ScalarType dtype)
            {
                manual_seed(seed);
                using var layer = new CustomLinear(inFeatures, outFeatures, dtype: dtype);
                manual_seed(seed);
                using var builtIn = nn.Linear(inFeatures, outFeatures, dtype: dtype);
                Assert.Equal(TensorText.Bits(builtIn.weight), TensorText.Bits(layer.weight));
                Assert.Equal(TensorText.Bits(builtIn.bias!), TensorText.Bits(layer.bias!));
                return SeededLayer(seed, layer, dtype);
            }
            Snapshots.Match(new[]
            {
                Describe(0, 3, 2, ScalarType.BFloat16),
                Describe(1, 4, 3, ScalarType.BFloat16),
                Describe(0, 3, 2, ScalarType.Float16),
                Describe(1, 4, 3, ScalarType.Float16),
            });
        }

        [Fact]
        public void ResetParameters_DrawsWeightThenBias_LikeAFreshLayer()
        {
            manual_seed(3);
            using var fresh = new CustomLinear(5, 4);
            using var reused = new CustomLinear(5, 4);
            manual_seed(3);
            reused.reset_parameters();
            Assert.Equal(TensorText.Bits(fresh.weight), TensorText.Bits(reused.weight));
            Assert.Equal(TensorText.Bits(fresh.bias!), TensorText.Bits(reused.bias!));

            // Drawn the other way round, the same seed gives other numbers: the order is observable.
            manual_seed(3);
            using var bias = empty(4);
            nn.init.uniform_(bias, -1 / Math.Sqrt(5), 1 / Math.Sqrt(5));
            Assert.NotEqual(TensorText.Bits(fresh.bias!), TensorText.Bits(bias));
        }

        // ---- Forward: no leaks -----------------------------------------------------------------------

        [Theory]
        [InlineData(new long[] { 3 }, true)]
        [InlineData(new long[] { 4, 3 }, true)]
        [InlineData(new long[] { 4, 3 }, false)]
        [InlineData(new long[] { 2, 4, 3 }, true)]
        public void Forward_LeavesOnlyTheReturnedTensorAlive(long[] shape, bool bias)
        {
            using var layer = new CustomLinear(3, 2, bias);
            using var x = randn(shape);
            Leaks.AssertOnlyTheResultStaysAlive(() => layer.forward(x));
        }

        // ---- Bad input: clear messages, nothing changed ----------------------------------------------

        [Fact]
        public void Forward_ZeroDimensionalInput_IsRefused()
        {
            using var layer = new CustomLinear(3, 2);
            using var scalar = tensor(1.0f);
            var error = AssertRefusedAndUnchanged(layer, () => layer.forward(scalar));
            Assert.Contains("CustomLinear(in_features=3, out_features=2, bias=True)", error.Message);
            Assert.Contains("0-d tensor", error.Message);
        }

        [Theory]
        [InlineData(new long[] { 4 })]
        [InlineData(new long[] { 5, 4 })]
        [InlineData(new long[] { 2, 5, 7 })]
        public void Forward_WrongLastDimension_NamesBothNumbersAndTheShape(long[] shape)
        {
            using var layer = new CustomLinear(3, 2);
            using var x = randn(shape);
            var error = AssertRefusedAndUnchanged(layer, () => layer.forward(x));
            Assert.Contains("in_features = 3", error.Message);
            Assert.Contains($"last dimension {shape[^1]}", error.Message);
            Assert.Contains(TensorText.Shape(x), error.Message);
        }

        [Theory]
        [InlineData(new long[] { 3 })]
        [InlineData(new long[] { 4, 3 })]
        [InlineData(new long[] { 2, 4, 3 })]
        public void Forward_WrongDtype_NamesBothDtypes(long[] shape)
        {
            using var layer = new CustomLinear(3, 2);
            using var x = randn(shape, dtype: ScalarType.Float64);
            var error = AssertRefusedAndUnchanged(layer, () => layer.forward(x));
            Assert.Contains("Float64", error.Message);
            Assert.Contains("Float32", error.Message);
        }

        [Fact]
        public void Forward_InputOnAnotherDevice_NamesBothDevices()
        {
            // The meta device holds shapes without data: enough to provoke a device mismatch on a CPU-only machine.
            using var layer = new CustomLinear(3, 2);
            using var x = empty(4, 3, device: new Device(DeviceType.META));
            var error = AssertRefusedAndUnchanged(layer, () => layer.forward(x));
            Assert.Contains("meta", error.Message);
            Assert.Contains("cpu", error.Message);
        }

        [Theory]
        [InlineData(-1, 2, "in_features")]
        [InlineData(3, -2, "out_features")]
        public void Constructor_NegativeFeatureCount_IsOutOfRange(long inFeatures, long outFeatures, string parameter)
        {
            var error = Assert.Throws<ArgumentOutOfRangeException>(() => new CustomLinear(inFeatures, outFeatures));
            Assert.Equal(parameter, error.ParamName);
            Assert.Contains("must be 0 or more", error.Message);
        }

        [Fact]
        public void Constructor_IntegerDtype_IsRefused_AsLibtorchRefusesIntegerParameters()
        {
            var error = Assert.Throws<ArgumentException>(() => new CustomLinear(3, 2, dtype: ScalarType.Int32));
            Assert.Contains("Int32", error.Message);
            Assert.Contains("floating-point or complex", error.Message);
            Assert.Contains("LinearFunctional.linear", error.Message);
            // The anchor: a Parameter (which requires gradients) of an integer dtype is refused by libtorch itself.
            Assert.Contains("floating point and complex", Assert.ThrowsAny<Exception>(() => new Parameter(ones(2, 3, dtype: ScalarType.Int32))).Message);
        }

        [Theory]
        [InlineData(ScalarType.Int64)]
        [InlineData(ScalarType.Int32)]
        [InlineData(ScalarType.Bool)]
        public void Forward_IntegerInput_SuggestsOnlyWhatWorks(ScalarType dtype)
        {
            using var layer = new CustomLinear(3, 2);
            using var x = ones(4, 3, dtype: dtype);
            var error = AssertRefusedAndUnchanged(layer, () => layer.forward(x));
            Assert.Contains($"input dtype {dtype} does not match weight dtype Float32", error.Message);
            Assert.Contains("input.to(Float32)", error.Message);
            // Module.to accepts floating-point and complex dtypes only, so converting the layer is no advice here.
            Assert.DoesNotContain($".to({dtype})", error.Message);
            Assert.Throws<ArgumentException>(() => layer.to(dtype));
        }

        [Fact]
        public void Forward_FloatInputOfAnotherWidth_SuggestsConvertingEitherSide_AndBothWork()
        {
            using var layer = new CustomLinear(3, 2);
            using var x = ones(4, 3, dtype: ScalarType.Float64);
            var error = AssertRefusedAndUnchanged(layer, () => layer.forward(x));
            Assert.Contains("input.to(Float32)", error.Message);
            Assert.Contains("the layer with .to(Float64)", error.Message);
            using (layer.forward(x.to(ScalarType.Float32))) { }
            layer.to(ScalarType.Float64);
            using var y = layer.forward(x);
            Assert.Equal(ScalarType.Float64, y.dtype);
        }

        [Theory]
        [InlineData(new long[] { 6 })]
        [InlineData(new long[] { 2, 3, 1 })]
        public void ParameterConstructor_NonMatrixWeight_IsRefused(long[] shape)
        {
            using var weight = new Parameter(ones(shape));
            var error = Assert.Throws<ArgumentException>(() => new CustomLinear(weight));
            Assert.Contains("2-D", error.Message);
            Assert.Contains(TensorText.Shape(weight), error.Message);
            Assert.False(weight.IsInvalid);  // a refused weight is not disposed
        }

        [Fact]
        public void ParameterConstructor_BiasOfWrongLengthOrDtype_IsRefused()
        {
            using var weight = new Parameter(ones(2, 3));
            using var shortBias = new Parameter(ones(3));
            using var doubleBias = new Parameter(ones(2, dtype: ScalarType.Float64));

            var length = Assert.Throws<ArgumentException>(() => new CustomLinear(weight, shortBias));
            Assert.Contains("[2]", length.Message);
            Assert.Contains("[3]", length.Message);
            var dtype = Assert.Throws<ArgumentException>(() => new CustomLinear(weight, doubleBias));
            Assert.Contains("Float64", dtype.Message);
            Assert.Contains("Float32", dtype.Message);
        }

        [Fact]
        public void WeightSetter_WrongShape_IsRefusedAndKeepsTheOldWeight()
        {
            using var layer = new CustomLinear(3, 2);
            var before = TensorText.Bits(layer.weight);
            using var transposed = new Parameter(ones(3, 2));

            var error = Assert.Throws<ArgumentException>(() => layer.weight = transposed);

            Assert.Contains("[2, 3]", error.Message);
            Assert.Contains("[3, 2]", error.Message);
            Assert.Equal(before, TensorText.Bits(layer.weight));
            Assert.Same(layer.weight, layer.named_parameters().Single(p => p.name == "weight").parameter);
        }

        [Fact]
        public void WeightSetter_ReplacesAndReregisters()
        {
            using var layer = new CustomLinear(3, 2);
            var old = layer.weight;
            layer.weight = new Parameter(ones(2, 3));
            Assert.True(old.IsInvalid);
            Assert.Same(layer.weight, layer.named_parameters().Single(p => p.name == "weight").parameter);
            using var y = layer.forward(ones(3));
            Assert.Equal(TensorText.Bits(layer.bias! + 3), TensorText.Bits(y));
        }

        [Fact]
        public void WeightSetter_DtypeUnlikeTheBias_IsRefusedAtTheSetter()
        {
            using var layer = new CustomLinear(3, 2);
            var before = TensorText.Bits(layer.weight);
            using var doubles = new Parameter(ones(2, 3, dtype: ScalarType.Float64));
            var error = Assert.Throws<ArgumentException>(() => layer.weight = doubles);
            Assert.Contains("must have the bias's dtype Float32, but is Float64", error.Message);
            Assert.Equal(before, TensorText.Bits(layer.weight));

            using var doubleBias = new Parameter(ones(2, dtype: ScalarType.Float64));
            Assert.Contains("must have the weight's dtype Float32, but is Float64",
                Assert.Throws<ArgumentException>(() => layer.bias = doubleBias).Message);

            // Without a bias there is nothing to disagree with: the weight may change dtype.
            using var noBias = new CustomLinear(3, 2, bias: false);
            noBias.weight = new Parameter(ones(2, 3, dtype: ScalarType.Float64));
            Assert.Equal(ScalarType.Float64, noBias.weight.dtype);
        }

        [Theory]
        [InlineData(ScalarType.Float64)]
        [InlineData(ScalarType.BFloat16)]
        [InlineData(ScalarType.Float16)]
        [InlineData(ScalarType.ComplexFloat64)]
        public void ModuleTo_ReplacesWeightAndBiasThroughTheSetters_AndStillWorks(ScalarType dtype)
        {
            // Module.to replaces the weight, then the bias, through the setters: in between they differ in dtype.
            manual_seed(2);
            using var layer = new CustomLinear(3, 2);
            manual_seed(2);
            using var builtIn = nn.Linear(3, 2);
            layer.to(dtype);
            builtIn.to(dtype);
            Assert.Equal(dtype, layer.weight.dtype);
            Assert.Equal(dtype, layer.bias!.dtype);
            Assert.Equal(TensorText.Bits(builtIn.weight), TensorText.Bits(layer.weight));
            Assert.Equal(2, layer.parameters().Count());
            using var x = randn(4, 3, dtype: dtype);
            Assert.True(Equivalence.CompareModules(builtIn, layer, x).BitExact);
            // After the conversion the setters check again.
            using var stale = new Parameter(ones(2, 3));
            Assert.Throws<ArgumentException>(() => layer.weight = stale);
        }

        // ---- Dispose: everything that reads the tensors says so ----------------------------------------

        public static IEnumerable<object[]> UsesAfterDispose() => new (string, Action<CustomLinear>)[]
        {
            ("forward", l => l.forward(ones(3))),
            ("weight", l => _ = l.weight),
            ("bias", l => _ = l.bias),
            ("state_dict", l => l.state_dict()),
            ("parameters", l => l.parameters()),
            ("named_parameters", l => l.named_parameters()),
            ("buffers", l => l.buffers()),
            ("to(Float64)", l => l.to(ScalarType.Float64)),
            ("load_state_dict", l => l.load_state_dict(new Dictionary<string, Tensor>())),
            ("reset_parameters", l => l.reset_parameters()),
            ("StateDicts.LoadChecked", l => StateDicts.LoadChecked(l, new Dictionary<string, Tensor>())),
        }.Select(use => new object[] { use.Item1, use.Item2 });

        [Theory]
        [MemberData(nameof(UsesAfterDispose))]
        public void AfterDispose_EveryUse_ThrowsObjectDisposed(string use, Action<CustomLinear> action)
        {
            var layer = new CustomLinear(3, 2);
            layer.Dispose();
            var error = Assert.Throws<ObjectDisposedException>(() => action(layer));
            Assert.Contains("CustomLinear", error.Message + error.ObjectName);
            _ = use;
        }

        [Fact]
        public void AfterDispose_Save_Throws_AndWritesNoFile()
        {
            var layer = new CustomLinear(3, 2);
            layer.Dispose();
            string path = Path.Combine(Path.GetTempPath(), $"torchlinear-disposed-{Guid.NewGuid():N}.bin");
            Assert.Throws<ObjectDisposedException>(() => layer.save(path));
            Assert.False(File.Exists(path));
            // Through a Module reference, TorchSharp's own save runs: it still throws, after creating the file.
            try
            {
                Assert.Throws<ObjectDisposedException>(() => ((nn.Module)layer).save(path));
            }
            finally
            {
                File.Delete(path);
            }
        }

        [Fact]
        public void Dispose_Twice_AndInsideAParent_IsHarmless()
        {
            var layer = new CustomLinear(3, 2);
            var weight = layer.weight;
            layer.Dispose();
            layer.Dispose();
            Assert.True(weight.IsInvalid);
            using var parent = nn.Sequential(("0", new CustomLinear(3, 2)));
            parent.Dispose();
        }

        // ---- load_state_dict: checked before anything is copied --------------------------------------

        [Fact]
        public void LoadStateDict_BiasOfShapeOne_IsRefusedWhereTorchSharpBroadcasts()
        {
            using var layer = new CustomLinear(3, 2);
            var source = new Dictionary<string, Tensor> { ["weight"] = ones(2, 3), ["bias"] = ones(1) };

            var error = AssertRefusedAndUnchanged<StateDictMismatchException>(layer, () => layer.load_state_dict(source));
            Assert.Contains("'bias' has shape [1]", error.Message);
            Assert.Contains("[2]", error.Message);
            Assert.Contains("nothing was changed", error.Message);

            // The behaviour this guards against, measured on TorchSharp's own nn.Linear: it copies the
            // (1) tensor into both bias elements without a word.
            using var builtIn = nn.Linear(3, 2);
            builtIn.load_state_dict(source);
            Assert.Equal(new float[] { 1, 1 }, builtIn.bias!.data<float>().ToArray());
        }

        [Fact]
        public void LoadStateDict_WrongDtype_IsRefusedNotConverted()
        {
            using var layer = new CustomLinear(3, 2);
            var source = new Dictionary<string, Tensor> { ["weight"] = ones(2, 3, dtype: ScalarType.Float64), ["bias"] = ones(2) };
            var error = AssertRefusedAndUnchanged<StateDictMismatchException>(layer, () => layer.load_state_dict(source));
            Assert.Contains("'weight' is Float64, this module's is Float32", error.Message);
        }

        [Fact]
        public void LoadStateDict_MissingOrUnexpectedKey_IsRefusedWhenStrict()
        {
            using var layer = new CustomLinear(3, 2);
            var missing = new Dictionary<string, Tensor> { ["weight"] = ones(2, 3) };
            var extra = new Dictionary<string, Tensor> { ["weight"] = ones(2, 3), ["bias"] = ones(2), ["lora_A"] = ones(1, 3) };

            Assert.Contains("missing key 'bias'", AssertRefusedAndUnchanged<StateDictMismatchException>(layer, () => layer.load_state_dict(missing)).Message);
            Assert.Contains("unexpected key 'lora_A'", AssertRefusedAndUnchanged<StateDictMismatchException>(layer, () => layer.load_state_dict(extra)).Message);

            // Not strict: the weight loads, the missing bias is reported, the unexpected key ignored.
            var (missingKeys, _) = layer.load_state_dict(missing, strict: false);
            Assert.Equal(new[] { "bias" }, missingKeys);
            Assert.All(layer.weight.data<float>().ToArray(), v => Assert.Equal(1f, v));
        }

        // ---- The Adapter slot -------------------------------------------------------------------------

        [Fact]
        public void Adapter_RunsThroughCallAndForwardAlike_AndAnEmptySlotChangesNothing()
        {
            using var scope = NewDisposeScope();
            manual_seed(31);
            using var layer = new CustomLinear(5, 3);
            using var reference = nn.Linear(layer.weight.detach().clone().AsParameter(), layer.bias!.detach().clone().AsParameter());
            var x = randn(4, 5);
            Assert.Null(layer.Adapter);
            Assert.True(Equivalence.Compare(reference.forward(x), layer.forward(x)).BitExact);

            int calls = 0;
            layer.Adapter = (input, output) =>
            {
                calls++;
                Assert.Same(x, input);
                return output.add_(1);
            };
            var expected = reference.forward(x) + 1;
            Assert.True(Equivalence.Compare(expected, layer.forward(x)).BitExact);
            Assert.True(Equivalence.Compare(expected, layer.call(x)).BitExact);
            Assert.Equal(2, calls);
        }

        [Fact]
        public void Adapter_ThatReturnsANewTensorOrThrows_LeavesNoTensorBehind()
        {
            using var layer = new CustomLinear(5, 3);
            using var x = randn(4, 5);
            layer.Adapter = (input, output) => output * 2;
            Leaks.AssertOnlyTheResultStaysAlive(() => layer.forward(x));
            layer.Adapter = (input, output) => throw new InvalidTimeZoneException("planted");
            long before = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
            Assert.Throws<InvalidTimeZoneException>(() => layer.forward(x));
            Assert.Equal(before, DisposeScopeManager.Statistics.ThreadTotalLiveCount);
        }

        /// <summary>Asserts an ArgumentException and that neither weight nor bias changed a bit.</summary>
        /// <summary>What the seeded-init snapshots record of a layer: its weights as exact decimals and as bits.</summary>
        private static object SeededLayer(int seed, CustomLinear layer, ScalarType dtype) => new
        {
            layer = $"seed {seed}: {layer} {dtype}",
            weight = TensorText.ExactDecimals(layer.weight),
            weight_bits = TensorText.Bits(layer.weight),
            bias = TensorText.ExactDecimals(layer.bias!),
            bias_bits = TensorText.Bits(layer.bias!),
        };

        private static ArgumentException AssertRefusedAndUnchanged(CustomLinear layer, Action action) =>
            AssertRefusedAndUnchanged<ArgumentException>(layer, action);

        /// <summary>Asserts an exception of exactly <typeparamref name="TException"/> and that neither weight nor bias changed a bit.</summary>
        private static TException AssertRefusedAndUnchanged<TException>(CustomLinear layer, Action action) where TException : Exception
        {
            var weight = TensorText.Bits(layer.weight);
            var bias = layer.bias is null ? null : TensorText.Bits(layer.bias);
            var error = typeof(TException) == typeof(ArgumentException) ? (TException)(Exception)Assert.ThrowsAny<ArgumentException>(action) : Assert.Throws<TException>(action);
            Assert.Equal(weight, TensorText.Bits(layer.weight));
            if (bias is not null)
                Assert.Equal(bias, TensorText.Bits(layer.bias!));
            return error;
        }
    }
}
