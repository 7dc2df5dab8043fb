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
            Snapshots.Match(new
            {
                vector = new { input = TensorText.Shape(x), output = y.data<float>().ToArray(), shape = TensorText.Shape(y) },
                batch = new { input = TensorText.Shape(batch), output = yBatch.data<float>().ToArray(), shape = TensorText.Shape(yBatch) },
            });
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
            Snapshots.Match(new[] { plain.ToString(), noBias.ToString() });
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
                Assert.True(
                    c.GetProperty("weight_bits").EnumerateArray().Select(e => e.GetString()).SequenceEqual(TensorText.Bits(layer.weight)),
                    $"weight differs from PyTorch's for {label}");
                if (hasBias)
                    Assert.True(
                        c.GetProperty("bias_bits").EnumerateArray().Select(e => e.GetString()).SequenceEqual(TensorText.Bits(layer.bias!)),
                        $"bias differs from PyTorch's for {label}");
            }
        }

        [Fact]
        public void Init_SeededWeights_AreStable()
        {
            object Describe(int seed, long inFeatures, long outFeatures, ScalarType dtype)
            {
                manual_seed(seed);
                using var layer = new CustomLinear(inFeatures, outFeatures, dtype: dtype);
                return new
                {
                    layer = $"seed {seed}: {layer} {dtype}",
                    weight = TensorText.ExactDecimals(layer.weight),
                    weight_bits = TensorText.Bits(layer.weight),
                    bias = TensorText.ExactDecimals(layer.bias!),
                    bias_bits = TensorText.Bits(layer.bias!),
                };
            }
            Snapshots.Match(new[]
            {
                Describe(0, 3, 2, ScalarType.Float32),
                Describe(1, 4, 3, ScalarType.Float32),
                Describe(0, 3, 2, ScalarType.Float64),
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
        public void Constructor_IntegerDtype_IsRefused()
        {
            var error = Assert.Throws<ArgumentException>(() => new CustomLinear(3, 2, dtype: ScalarType.Int32));
            Assert.Contains("Int32", error.Message);
            Assert.Contains("floating-point", error.Message);
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

        // ---- load_state_dict: checked before anything is copied --------------------------------------

        [Fact]
        public void LoadStateDict_BiasOfShapeOne_IsRefusedWhereTorchSharpBroadcasts()
        {
            using var layer = new CustomLinear(3, 2);
            var source = new Dictionary<string, Tensor> { ["weight"] = ones(2, 3), ["bias"] = ones(1) };

            var error = AssertRefusedAndUnchanged(layer, () => layer.load_state_dict(source));
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
            var error = AssertRefusedAndUnchanged(layer, () => layer.load_state_dict(source));
            Assert.Contains("'weight' is Float64, this module's is Float32", error.Message);
        }

        [Fact]
        public void LoadStateDict_MissingOrUnexpectedKey_IsRefusedWhenStrict()
        {
            using var layer = new CustomLinear(3, 2);
            var missing = new Dictionary<string, Tensor> { ["weight"] = ones(2, 3) };
            var extra = new Dictionary<string, Tensor> { ["weight"] = ones(2, 3), ["bias"] = ones(2), ["lora_A"] = ones(1, 3) };

            Assert.Contains("missing key 'bias'", AssertRefusedAndUnchanged(layer, () => layer.load_state_dict(missing)).Message);
            Assert.Contains("unexpected key 'lora_A'", AssertRefusedAndUnchanged(layer, () => layer.load_state_dict(extra)).Message);

            // Not strict: the weight loads, the missing bias is reported, the unexpected key ignored.
            var (missingKeys, _) = layer.load_state_dict(missing, strict: false);
            Assert.Equal(new[] { "bias" }, missingKeys);
            Assert.All(layer.weight.data<float>().ToArray(), v => Assert.Equal(1f, v));
        }

        /// <summary>Asserts an ArgumentException and that neither weight nor bias changed a bit.</summary>
        private static ArgumentException AssertRefusedAndUnchanged(CustomLinear layer, Action action)
        {
            var weight = TensorText.Bits(layer.weight);
            var bias = layer.bias is null ? null : TensorText.Bits(layer.bias);
            var error = Assert.ThrowsAny<ArgumentException>(action);
            Assert.Equal(weight, TensorText.Bits(layer.weight));
            if (bias is not null)
                Assert.Equal(bias, TensorText.Bits(layer.bias!));
            return error;
        }
    }
}
