using System;
using System.Linq;
using TorchLinear.Tests;
using TorchSharp;
using TorchSharp.Modules;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Lora.Tests
{
    /// <summary>The arithmetic, written once: against expectations computed here in C#, from values every product holds exactly.</summary>
    public class LoraLayerTests
    {
        /// <summary>A (2, 4) and B (3, 2) of small integers.</summary>
        private static LoraLayer IntegerLayer(double alpha, ScalarType dtype = ScalarType.Float64, bool rslora = false)
        {
            var layer = new LoraLayer(4, 3, r: 2, lora_alpha: alpha, use_rslora: rslora, dtype: dtype);
            using (NewDisposeScope())
            using (no_grad())
            {
                layer.lora_A.weight.copy_(tensor(new double[] { 1, -2, 0, 3, 2, 1, -1, 0 }, new long[] { 2, 4 }).to(dtype));
                layer.lora_B.weight.copy_(tensor(new double[] { 1, 0, -1, 2, 3, 1 }, new long[] { 3, 2 }).to(dtype));
            }
            return layer;
        }

        // (B A) by hand: B = [[1, 0], [-1, 2], [3, 1]], A = [[1, -2, 0, 3], [2, 1, -1, 0]].
        private static readonly double[] BA = { 1, -2, 0, 3, 3, 4, -2, -3, 5, -5, -1, 9 };

        [Theory]
        [InlineData(ScalarType.Float32)]
        [InlineData(ScalarType.Float64)]
        [InlineData(ScalarType.BFloat16)]
        public void TheForwardTerm_IsXATimesTheScaling_ThenTimesB_ForEveryInputRank(ScalarType dtype)
        {
            // The order every path shares (an ordinary forward, a mixed batch's rows, the stacked products with zeros):
            // ((x Aᵀ) · scaling) Bᵀ added to the base output; a float32 2-D batch accumulates it with one addmm_.
            using var scope = NewDisposeScope();
            manual_seed(3);
            var layer = new LoraLayer(16, 8, r: 4, lora_alpha: 3, dtype: dtype);
            using (no_grad())
                layer.lora_B.weight.normal_();
            foreach (var shape in new[] { new long[] { 16 }, new long[] { 5, 16 }, new long[] { 2, 3, 16 } })
            {
                var x = randn(shape).to(dtype);
                var output = randn(shape.SkipLast(1).Append(8L).ToArray()).to(dtype);
                Tensor h = x.matmul(layer.lora_A.weight.t()).mul(layer.scaling);
                Tensor expected = dtype == ScalarType.Float32 && x.dim() == 2 ? output.addmm(h, layer.lora_B.weight.t()) : output + h.matmul(layer.lora_B.weight.t());
                using (no_grad())
                    layer.AddTo(output, x, training: false);
                Assert.True(Equivalence.Compare(expected, output).BitExact, $"{dtype} [{string.Join(", ", shape)}]: {Equivalence.Compare(expected, output)}");
            }
            layer.Dispose();
        }

        [Theory]
        [InlineData(1.0, false)]   // scaling 1/2
        [InlineData(3.0, false)]   // scaling 3/2
        [InlineData(1.0, true)]    // rsLoRA: 1/√2
        public void DeltaWeight_IsBATimesTheScaling(double alpha, bool rslora)
        {
            using var layer = IntegerLayer(alpha, rslora: rslora);
            double scaling = rslora ? alpha / Math.Sqrt(2) : alpha / 2;
            Assert.Equal(scaling, layer.scaling);
            using var delta = layer.get_delta_weight();
            Assert.Equal(new long[] { 3, 4 }, delta.shape);
            Assert.Equal(BA.Select(v => v * scaling).ToArray(), delta.data<double>().ToArray());
        }

        [Fact]
        public void AddTo_AddsTheUpdateInTheLayersDtype_ForEveryRank()
        {
            using var layer = IntegerLayer(1.0 / 3 * 2);   // scaling 1/3, which a float cannot hold
            double scaling = 1.0 / 3;
            var x = tensor(new double[] { 1, 2, -1, 0, 0, 1, 1, -2 }, new long[] { 2, 4 });
            var output = zeros(2, 3, dtype: ScalarType.Float64) + 10;
            var expected = new double[6];
            for (int row = 0; row < 2; row++)
                for (int o = 0; o < 3; o++)
                    expected[row * 3 + o] = 10 + Enumerable.Range(0, 4).Sum(i => x.data<double>()[row * 4 + i] * BA[o * 4 + i]) * scaling;
            using (no_grad())
            {
                Assert.Equal(expected, layer.AddTo(output.clone(), x, training: false).data<double>().ToArray());
                Assert.Equal(expected, layer.AddTo(output.clone().unsqueeze(0), x.unsqueeze(0), training: false).data<double>().ToArray());
                Assert.Equal(expected[..3], layer.AddTo(output[0].clone(), x[0], training: false).data<double>().ToArray());
            }
        }

        [Fact]
        public void Merge_FoldsTheUpdateIn_AndUnmergeRestoresTheWeightBitForBit()
        {
            using var layer = IntegerLayer(2.0, ScalarType.Float32);   // scaling 1: exact
            var weight = new Parameter(arange(12, dtype: ScalarType.Float32).reshape(3, 4) * 0.1f, requires_grad: false);
            var before = TensorText.Bits(weight);
            layer.merge(weight);
            Assert.True(layer.merged);
            Assert.NotNull(layer.WeightBeforeMerge);
            var expected = before.Select((_, i) => BitConverter.SingleToUInt32Bits(BitConverter.UInt32BitsToSingle(Convert.ToUInt32(before[i], 16)) + (float)BA[i]).ToString("x8")).ToArray();
            Assert.Equal(expected, TensorText.Bits(weight));
            // While merged the adapter adds nothing: the weight carries it.
            using (no_grad())
            {
                using var zero = zeros(2, 3);
                Assert.All(layer.AddTo(zero, ones(2, 4), false).data<float>().ToArray(), v => Assert.Equal(0f, v));
            }
            layer.merge(weight);   // a second merge does nothing
            Assert.Equal(expected, TensorText.Bits(weight));
            layer.unmerge(weight);
            Assert.False(layer.merged);
            Assert.Equal(before, TensorText.Bits(weight));
            Assert.Throws<ArgumentException>(() => layer.merge(new Parameter(zeros(4, 3))));
        }

        [Fact]
        public void Merge_OfAnUpdateThatOverflows_IsRefusedWithNothingWritten()
        {
            using var layer = IntegerLayer(2.0, ScalarType.Float32);
            using (no_grad())
                layer.lora_B.weight.fill_(3e38f);
            var weight = new Parameter(ones(3, 4), requires_grad: false);
            var before = TensorText.Bits(weight);
            var error = Assert.Throws<InvalidOperationException>(() => layer.merge(weight));
            Assert.Contains("would put NaN or infinity into its weight; no weight was changed", error.Message);
            Assert.Equal(before, TensorText.Bits(weight));
            Assert.False(layer.merged);
        }

        [Theory]
        [InlineData(0, 1.0, 0.0, "r")]
        [InlineData(4, double.NaN, 0.0, "lora_alpha")]
        [InlineData(4, double.NegativeInfinity, 0.0, "lora_alpha")]
        [InlineData(4, 1.0, 1.0, "lora_dropout")]
        [InlineData(4, 1.0, -0.1, "lora_dropout")]
        public void BadArguments_AreOutOfRange_NamingTheArgument(int r, double alpha, double dropout, string parameter)
        {
            var error = Assert.Throws<ArgumentOutOfRangeException>(() => new LoraLayer(4, 3, r, alpha, dropout));
            Assert.Equal(parameter, error.ParamName);
            Assert.Contains("dtype", Assert.Throws<ArgumentException>(() => new LoraLayer(4, 3, 2, dtype: ScalarType.ComplexFloat32)).ParamName);
            // A scaling a float cannot hold, for a float layer; the same is fine in float64.
            Assert.Contains("not finite in Float32", Assert.Throws<ArgumentException>(() => new LoraLayer(4, 3, 1, lora_alpha: 1e39)).Message);
            using var doubles = new LoraLayer(4, 3, 1, lora_alpha: 1e39, dtype: ScalarType.Float64);
            // Negative alpha is a number like any other, as in loralib and PEFT.
            using var negative = new LoraLayer(4, 3, 1, lora_alpha: -2);
            Assert.Equal(-2, negative.scaling);
        }

        [Fact]
        public void Initialisation_FollowsLoralibByDefault_AndPeftsOtherModes()
        {
            manual_seed(7);
            using var expectedA = empty(8, 64);
            nn.init.kaiming_uniform_(expectedA, a: Math.Sqrt(5));
            manual_seed(7);
            using var plain = new LoraLayer(64, 32, r: 8);
            Assert.Equal(TensorText.Bits(expectedA), TensorText.Bits(plain.lora_A.weight));
            Assert.All(plain.lora_B.weight.data<float>().ToArray(), v => Assert.Equal(0f, v));

            using var gaussian = new LoraLayer(256, 32, r: 8, init_lora_weights: "gaussian");
            double std = gaussian.lora_A.weight.std().item<float>();
            Assert.InRange(std, 0.9 / 8, 1.1 / 8);   // 2048 draws of N(0, 1/r)
            Assert.All(gaussian.lora_B.weight.data<float>().ToArray(), v => Assert.Equal(0f, v));

            using var random = new LoraLayer(64, 32, r: 8, init_lora_weights: "false");
            Assert.Contains(random.lora_B.weight.data<float>().ToArray(), v => v != 0);
            Assert.Throws<ArgumentException>(() => new LoraLayer(64, 32, r: 8, init_lora_weights: "pissa"));
        }

        [Fact]
        public void Dropout_TouchesOnlyTheAdaptersInput_AndOnlyInTraining()
        {
            manual_seed(8);
            using var layer = new LoraLayer(32, 8, r: 4, lora_dropout: 0.5, init_lora_weights: "false");
            using var x = randn(6, 32);
            using var output = zeros(6, 8);
            using var _ = no_grad();
            var eval = layer.AddTo(output.clone(), x, training: false);
            var train = layer.AddTo(output.clone(), x, training: true);
            Assert.False(Equivalence.Compare(eval, train).BitExact);
            using var delta = layer.get_delta_weight();
            Equivalence.AssertClose(eval, x.matmul(delta.t()), rtol: 1e-5, atol: 1e-5);
        }

        [Fact]
        public void AConvertedHostConvertsTheKeptWeight_SoUnmergeStillRestoresIt()
        {
            using var scope = NewDisposeScope();
            manual_seed(9);
            using var model = nn.Sequential(("0", new CustomLinear(8, 4)));
            var original = model.state_dict()["0.weight"].detach().clone();
            LoraModel.Inject(model, new LoraConfig { r = 2, target_modules = new[] { "0" }, init_lora_weights = "false" });
            LoraModel.merge_adapter(model);
            model.to(ScalarType.Float64);
            LoraModel.unmerge_adapter(model);
            Assert.True(Equivalence.Compare(original.to(ScalarType.Float64), model.state_dict()["0.weight"]).BitExact);
        }

        [Fact]
        public void Dispose_FreesTheKeptWeightAndTheProjections()
        {
            long before = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
            LoraLayer layer;
            using (NewDisposeScope())
            {
                // The weight is the scope's; the kept copy merge makes is the layer's own, freed by its Dispose alone.
                layer = IntegerLayer(2.0, ScalarType.Float32);
                var weight = new Parameter(ones(3, 4), requires_grad: false);
                layer.merge(weight);
                layer.Dispose();
            }
            Assert.Equal(before, DisposeScopeManager.Statistics.ThreadTotalLiveCount);
            Assert.Throws<ObjectDisposedException>(() => layer.get_delta_weight());
        }

        [Fact]
        public void ToString_SaysWhatTheAdapterIs()
        {
            using var layer = new LoraLayer(4, 3, r: 4, lora_alpha: 8, lora_dropout: 0.1, use_rslora: true);
            Assert.Equal("LoraLayer(r=4, lora_alpha=8, scaling=4, use_rslora=True, lora_dropout=0.1, merged=False)", layer.ToString());
            Assert.Equal("LoraProjection(in_features=4, out_features=4)", layer.lora_A.ToString());
        }
    }
}
