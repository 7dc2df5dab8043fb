using System;
using System.Collections.Generic;
using System.Linq;
using TorchLinear.Samples;
using TorchSharp;
using TorchSharp.Modules;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Tests.Samples
{
    public class LoraLinearTests
    {
        /// <summary>An adapter with a non-zero B, so that the adapter path actually contributes.</summary>
        private static LoraLinear TrainedLooking(long inFeatures, long outFeatures, int r, double alpha = 8, bool bias = true, double dropout = 0, bool rslora = false)
        {
            var lora = new LoraLinear(inFeatures, outFeatures, r, alpha, dropout, bias, rslora);
            using (no_grad())
                lora.lora_B.normal_(0, 0.1);
            return lora;
        }

        /// <summary>Values equal element by element; -0.0 and +0.0 count as equal (the one bit difference LoRA may cause).</summary>
        private static void AssertSameValues(Tensor expected, Tensor actual)
        {
            var comparison = Equivalence.Compare(expected, actual);
            Assert.True(comparison.Comparable && comparison.MaxAbsDiff == 0 && comparison.MaxUlp == 0, comparison.ToString());
        }

        // ---- Initialisation ----------------------------------------------------------------------------

        [Fact]
        public void FreshAdapter_ChangesNothing_ForCustomLinearAndNnLinearSources()
        {
            manual_seed(1);
            using var custom = new CustomLinear(32, 16);
            using var builtIn = nn.Linear(32, 16);
            using var fromCustom = LoraLinear.FromLinear(custom, r: 4, lora_alpha: 8);
            using var fromBuiltIn = LoraLinear.FromLinear(builtIn, r: 4, lora_alpha: 8);

            Assert.All(fromCustom.lora_B.data<float>().ToArray(), v => Assert.Equal(0f, v));
            Assert.Contains(fromCustom.lora_A.data<float>().ToArray(), v => v != 0);
            foreach (var shape in new[] { new long[] { 32 }, new long[] { 5, 32 }, new long[] { 2, 3, 32 } })
            {
                using var x = randn(shape);
                AssertSameValues(custom.forward(x), fromCustom.forward(x));
                AssertSameValues(builtIn.forward(x), fromBuiltIn.forward(x));
            }
        }

        [Fact]
        public void Constructor_InitialisesTheBaseLayerLikeCustomLinear_ThenTheAdapter()
        {
            manual_seed(2);
            using var plain = new CustomLinear(12, 5);
            using var aFromKaiming = empty(3, 12);
            nn.init.kaiming_uniform_(aFromKaiming, a: Math.Sqrt(5));
            manual_seed(2);
            using var lora = new LoraLinear(12, 5, r: 3);

            Assert.Equal(TensorText.Bits(plain.weight), TensorText.Bits(lora.weight));
            Assert.Equal(TensorText.Bits(plain.bias!), TensorText.Bits(lora.bias!));
            Assert.Equal(TensorText.Bits(aFromKaiming), TensorText.Bits(lora.lora_A));
            Assert.Equal(new long[] { 5, 3 }, lora.lora_B.shape);
        }

        [Fact]
        public void FromLinear_CopiesWithoutAliasing()
        {
            manual_seed(3);
            using var source = new CustomLinear(8, 4);
            var weight = TensorText.Bits(source.weight);
            var bias = TensorText.Bits(source.bias!);
            using var lora = LoraLinear.FromLinear(source, r: 2);
            using (no_grad())
                lora.lora_B.fill_(1);

            lora.merge();
            using (no_grad())
                lora.bias!.add_(1);

            Assert.Equal(weight, TensorText.Bits(source.weight));
            Assert.Equal(bias, TensorText.Bits(source.bias!));
            Assert.True(source.weight.requires_grad, "the source keeps its own requires_grad");
        }

        // ---- Forward -----------------------------------------------------------------------------------

        /// <summary>
        /// A layer of small integers (|W|, |b|, |A|, |B| ≤ 3) and input of small integers: every product and sum is an
        /// exact integer in float32 and float64, so the expected output, computed here in C# doubles, has only the
        /// scaling's rounding in it — none, for the scalings used (1.5 and 3).
        /// </summary>
        private static (LoraLinear Layer, double[] W, double[] Bias, double[] A, double[] B) IntegerLayer(int r, double alpha, bool rslora, double dropout = 0)
        {
            var layer = new LoraLinear(5, 3, r, alpha, dropout, use_rslora: rslora);
            double[] Values(int count, int seed) => Enumerable.Range(0, count).Select(i => (double)((i * seed + 1) % 7 - 3)).ToArray();
            double[] w = Values(15, 5), bias = Values(3, 2), a = Values(r * 5, 3), b = Values(3 * r, 4);
            using (NewDisposeScope())
            using (no_grad())
            {
                layer.weight.copy_(tensor(w, new long[] { 3, 5 }));
                layer.bias!.copy_(tensor(bias));
                layer.lora_A.copy_(tensor(a, new long[] { r, 5 }));
                layer.lora_B.copy_(tensor(b, new long[] { 3, r }));
            }
            return (layer, w, bias, a, b);
        }

        /// <summary><c>x Wᵀ + b + (x Aᵀ Bᵀ) · scaling</c>, row by row, in C# doubles.</summary>
        private static double[] Expected(double[] x, int rows, (double[] W, double[] Bias, double[] A, double[] B) layer, int r, double scaling)
        {
            var result = new double[rows * 3];
            for (int row = 0; row < rows; row++)
            {
                for (int o = 0; o < 3; o++)
                {
                    double value = layer.Bias[o], update = 0;
                    for (int i = 0; i < 5; i++)
                        value += x[row * 5 + i] * layer.W[o * 5 + i];
                    for (int k = 0; k < r; k++)
                        update += Enumerable.Range(0, 5).Sum(i => x[row * 5 + i] * layer.A[k * 5 + i]) * layer.B[o * r + k];
                    result[row * 3 + o] = value + update * scaling;
                }
            }
            return result;
        }

        [Theory]
        [InlineData(new long[] { 5 }, false)]
        [InlineData(new long[] { 7, 5 }, false)]
        [InlineData(new long[] { 2, 4, 5 }, false)]
        [InlineData(new long[] { 7, 5 }, true)]
        public void Forward_IsTheFrozenLayerPlusTheScaledUpdate(long[] shape, bool rslora)
        {
            // The expectation is computed from the layer's values and the scaling this test derives itself (alpha / r, or
            // alpha / √r): 6 / 4 = 1.5, 6 / √4 = 3.
            const int r = 4;
            var (lora, w, bias, a, b) = IntegerLayer(r, alpha: 6, rslora);
            using var _ = lora;
            using var scope = NewDisposeScope();
            var x = (arange(shape.Aggregate(1L, (p, n) => p * n)) % 7 - 3).to(ScalarType.Float32).reshape(shape);
            int rows = (int)(x.numel() / 5);
            var expected = Expected(x.to(ScalarType.Float64).data<double>().ToArray(), rows, (w, bias, a, b), r, rslora ? 3.0 : 1.5);
            Assert.Equal(expected.Select(v => (float)v).ToArray(), lora.forward(x).data<float>().ToArray());
        }

        [Fact]
        public void Scaling_IsAlphaOverR_OrAlphaOverRootROfRsLora()
        {
            using var plain = new LoraLinear(4, 3, r: 16, lora_alpha: 8);
            using var rs = new LoraLinear(4, 3, r: 16, lora_alpha: 8, use_rslora: true);
            Assert.Equal(0.5, plain.scaling);
            Assert.Equal(2.0, rs.scaling);
            using var delta = TrainedLooking(4, 3, r: 16, alpha: 8, rslora: true);
            using var expected = delta.lora_B.matmul(delta.lora_A) * 2.0;
            using var actual = delta.delta_weight();
            Assert.True(Equivalence.Compare(expected, actual).BitExact);
        }

        [Fact]
        public void Dropout_AppliesInTrainingOnly_AndOnlyToTheAdaptersInput()
        {
            const int r = 4;
            var (lora, w, bias, a, b) = IntegerLayer(r, alpha: 6, rslora: false, dropout: 0.5);
            using var _ = lora;
            using var scope = NewDisposeScope();
            var x = (arange(30) % 7 - 3).to(ScalarType.Float32).reshape(6, 5);
            var xs = x.to(ScalarType.Float64).data<double>().ToArray();
            var adapted = Expected(xs, 6, (w, bias, a, b), r, 1.5).Select(v => (float)v).ToArray();

            lora.eval();
            Assert.Equal(adapted, lora.forward(x).data<float>().ToArray());
            manual_seed(5);
            lora.train();
            Assert.NotEqual(adapted, lora.forward(x).data<float>().ToArray());
            // The base path never sees dropout: with B = 0 the training output is the frozen layer's exactly.
            using (no_grad())
                lora.lora_B.zero_();
            var frozen = Expected(xs, 6, (w, bias, a, new double[3 * r]), r, 1.5).Select(v => (float)v).ToArray();
            Assert.Equal(frozen, lora.forward(x).data<float>().ToArray());
        }

        // ---- Gradients ---------------------------------------------------------------------------------

        [Fact]
        public void Gradients_ReachOnlyTheAdapter_AndAIsExactlyZeroAtTheFirstStep()
        {
            manual_seed(6);
            using var lora = new LoraLinear(16, 8, r: 4);
            using var x = randn(10, 16);
            using var target = randn(10, 8);
            using (var loss = nn.functional.mse_loss(lora.forward(x), target))
                loss.backward();

            Assert.Null(lora.weight.grad);
            Assert.Null(lora.bias!.grad);
            Assert.False(lora.weight.requires_grad);
            // dL/dA = Bᵀ (dL/dy) x · scaling, and B starts at zero: every element is exactly 0.
            Assert.All(lora.lora_A.grad!.data<float>().ToArray(), v => Assert.Equal(0f, v));
            Assert.Contains(lora.lora_B.grad!.data<float>().ToArray(), v => v != 0);
        }

        // ---- Merge -------------------------------------------------------------------------------------

        [Fact]
        public void Merge_AgreesWithUnmergedWithinTolerance_AndTwiceIsANoOp()
        {
            manual_seed(7);
            using var lora = TrainedLooking(64, 32, r: 8);
            using var scope = NewDisposeScope();
            var x = randn(20, 64);
            var unmerged = lora.forward(x);
            // Each way is within γ_75 · (|x| (|W| + s |B| |A|)ᵀ + |b|) of the exact value, whatever order its GEMMs sum in
            // (the longest chain of roundings: 64 products summed, the scaling, 8 more, the adds; γ_k = k·u / (1 − k·u),
            // u = 2⁻²⁴): so they are within twice that of each other.
            double u = Math.Pow(2, -24), gamma = 75 * u / (1 - 75 * u);
            Tensor magnitude = x.abs().to(ScalarType.Float64).matmul(
                (lora.weight.detach().abs().to(ScalarType.Float64) + lora.scaling * lora.lora_B.detach().abs().to(ScalarType.Float64).matmul(lora.lora_A.detach().abs().to(ScalarType.Float64))).t())
                + lora.bias!.detach().abs().to(ScalarType.Float64);
            Tensor bound = 2 * gamma * magnitude;

            lora.merge();
            var mergedWeight = TensorText.Bits(lora.weight);
            lora.merge();

            Assert.True(lora.merged);
            Assert.Equal(mergedWeight, TensorText.Bits(lora.weight));
            var merged = lora.forward(x);
            // Merged: one linear with W + Δ. Equal to the unmerged result up to rounding, within the bound above.
            double excess = ((merged - unmerged).abs().to(ScalarType.Float64) - bound).max().item<double>();
            Assert.True(excess <= 0, $"beyond the rounding bound by {excess:G3}: {Equivalence.Compare(unmerged, merged)}");
            Assert.True(Equivalence.Compare(LinearFunctional.linear(x, lora.weight, lora.bias), merged).BitExact);
        }

        [Fact]
        public void Unmerge_RestoresTheWeightBitForBit_WhereSubtractingWouldNot_AndWhenNotMergedDoesNothing()
        {
            manual_seed(8);
            using var lora = TrainedLooking(64, 32, r: 8, alpha: 16);
            using var original = lora.weight.detach().clone();

            lora.unmerge();
            Assert.Equal(TensorText.Bits(original), TensorText.Bits(lora.weight));

            lora.merge();
            using var mergedWeight = lora.weight.detach().clone();
            lora.unmerge();
            Assert.False(lora.merged);
            Assert.Equal(TensorText.Bits(original), TensorText.Bits(lora.weight));

            // What loralib's and PEFT's unmerge (W + Δ − Δ) gives instead: not W for every element.
            using var delta = lora.delta_weight();
            using var subtracted = mergedWeight - delta;
            Assert.False(Equivalence.Compare(original, subtracted).BitExact, "this layer's rounding should show why the weight is kept");
        }

        // ---- Checked loading, and the merged state across a save --------------------------------------

        [Theory]
        [InlineData(1)]
        [InlineData(8)]
        public void LoadStateDict_AdapterOfAnotherRank_IsRefusedNamingTheKey_AndChangesNothing(int otherRank)
        {
            // TorchSharp's own load_state_dict broadcasts an r = 1 lora_A into every row of an r = 4 layer, and fails with
            // a bare libtorch error for r = 8.
            manual_seed(9);
            using var layer = TrainedLooking(16, 6, r: 4);
            using var other = new LoraLinear(16, 6, r: otherRank);
            var before = layer.state_dict().ToDictionary(kv => kv.Key, kv => TensorText.Bits(kv.Value));

            var error = Assert.Throws<InvalidOperationException>(() => layer.load_state_dict(other.state_dict()));

            Assert.Contains($"'lora_A' has shape [{otherRank}, 16], this module's has shape [4, 16]", error.Message);
            Assert.Contains($"'lora_B' has shape [6, {otherRank}], this module's has shape [6, 4]", error.Message);
            Assert.Contains("nothing was changed", error.Message);
            foreach (var (key, tensor) in layer.state_dict())
                Assert.Equal(before[key], TensorText.Bits(tensor));
        }

        [Fact]
        public void LoadStateDict_WrongDtypeOrMissingKey_IsRefused()
        {
            using var layer = new LoraLinear(5, 3, r: 2);
            var doubles = layer.state_dict().ToDictionary(kv => kv.Key, kv => kv.Key == "lora_B" ? kv.Value.to(ScalarType.Float64) : kv.Value.clone());
            Assert.Contains("'lora_B' is Float64, this module's is Float32", Assert.Throws<InvalidOperationException>(() => layer.load_state_dict(doubles)).Message);
            var missing = layer.state_dict().Where(kv => kv.Key != "lora_A").ToDictionary(kv => kv.Key, kv => kv.Value.clone());
            Assert.Contains("missing key 'lora_A'", Assert.Throws<InvalidOperationException>(() => layer.load_state_dict(missing)).Message);
        }

        [Fact]
        public void MergedLayer_SavedAndLoadedIntoAFreshLayer_AppliesTheUpdateOnce()
        {
            manual_seed(10);
            using var scope = NewDisposeScope();
            using var lora = TrainedLooking(24, 12, r: 4, alpha: 8);
            var x = randn(7, 24);
            var expected = lora.forward(x);
            lora.merge();
            var merged = lora.forward(x);

            // The state_dict of a merged layer holds the weight before merging.
            var saved = lora.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone());
            using var fresh = new LoraLinear(24, 12, r: 4, lora_alpha: 8);
            fresh.load_state_dict(saved);
            var reloaded = fresh.forward(x);

            Assert.True(Equivalence.Compare(expected, reloaded).BitExact, "a fresh layer loaded from a merged one computes the unmerged layer's output");
            Assert.True(Equivalence.Compare(merged, reloaded).MaxAbsDiff <= 1e-5);
            // The measured failure before: loaded W + Δ, then + Δ again in forward, off by far more than rounding.
            var doubled = LinearFunctional.linear(x, lora.weight, lora.bias) + x.matmul(lora.lora_A.t()).matmul(lora.lora_B.t()) * (8.0 / 4);
            Assert.True(Equivalence.Compare(expected, doubled).MaxAbsDiff > 1e-3);
        }

        [Fact]
        public void StateLoadedIntoAMergedLayer_IsMergedWithTheNewAdapter()
        {
            manual_seed(11);
            using var scope = NewDisposeScope();
            using var source = TrainedLooking(24, 12, r: 4, alpha: 8);
            var x = randn(7, 24);
            var expected = source.forward(x);

            using var target = TrainedLooking(24, 12, r: 4, alpha: 8);
            target.merge();
            target.load_state_dict(source.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone()));

            Assert.True(target.merged);
            Assert.True(Equivalence.Compare(expected, target.forward(x)).MaxAbsDiff <= 1e-5);
            target.unmerge();
            Assert.True(Equivalence.Compare(source.weight, target.weight).BitExact);
            Assert.True(Equivalence.Compare(expected, target.forward(x)).BitExact);
        }

        [Fact]
        public void MergedLayer_ConvertedWithTo_StaysMergedAndConsistent()
        {
            manual_seed(12);
            using var scope = NewDisposeScope();
            using var lora = TrainedLooking(8, 4, r: 2);
            var original = lora.weight.detach().clone();
            lora.merge();
            lora.to(ScalarType.Float64);
            Assert.True(lora.merged);
            lora.unmerge();
            Assert.True(Equivalence.Compare(original.to(ScalarType.Float64), lora.weight).BitExact);
        }

        public static IEnumerable<object[]> UsesAfterDispose() => new (string, Action<LoraLinear>)[]
        {
            ("forward", l => l.forward(ones(3))),
            ("weight", l => _ = l.weight),
            ("lora_A", l => _ = l.lora_A),
            ("state_dict", l => l.state_dict()),
            ("parameters", l => l.parameters()),
            ("load_state_dict", l => l.load_state_dict(new Dictionary<string, Tensor>())),
            ("merge", l => l.merge()),
            ("delta_weight", l => l.delta_weight()),
            ("to(Float64)", l => l.to(ScalarType.Float64)),
        }.Select(use => new object[] { use.Item1, use.Item2 });

        [Theory]
        [MemberData(nameof(UsesAfterDispose))]
        public void AfterDispose_EveryUse_ThrowsObjectDisposed(string use, Action<LoraLinear> action)
        {
            var layer = new LoraLinear(3, 2, r: 1);
            layer.Dispose();
            Assert.Throws<ObjectDisposedException>(() => action(layer));
            _ = use;
        }

        // ---- state_dict and the loralib helpers --------------------------------------------------------

        [Fact]
        public void StateDict_HasLoralibsKeys()
        {
            using var withBias = new LoraLinear(6, 4, r: 2);
            using var withoutBias = new LoraLinear(6, 4, r: 2, bias: false);
            Assert.Equal(new[] { "weight", "bias", "lora_A", "lora_B" }, withBias.state_dict().Keys);
            Assert.Equal(new[] { "weight", "lora_A", "lora_B" }, withoutBias.state_dict().Keys);
            Assert.Equal(new long[] { 2, 6 }, withBias.lora_A.shape);
            Assert.Equal(new long[] { 4, 2 }, withBias.lora_B.shape);
        }

        [Fact]
        public void To_Float64_KeepsKeysAndFreezing()
        {
            using var lora = new LoraLinear(6, 4, r: 2);
            lora.to(ScalarType.Float64);
            Assert.Equal(new[] { "weight", "bias", "lora_A", "lora_B" }, lora.state_dict().Keys);
            Assert.All(lora.parameters(), p => Assert.Equal(ScalarType.Float64, p.dtype));
            Assert.False(lora.weight.requires_grad);
            Assert.True(lora.lora_A.requires_grad);
            Assert.Same(lora.lora_B, lora.named_parameters().Single(p => p.name == "lora_B").parameter);
            using var y = lora.forward(randn(new long[] { 3, 6 }, dtype: ScalarType.Float64));
            Assert.Equal(ScalarType.Float64, y.dtype);
        }

        [Theory]
        [InlineData("none", new[] { "0.lora_A", "0.lora_B" })]
        [InlineData("all", new[] { "0.bias", "0.lora_A", "0.lora_B", "1.bias" })]
        [InlineData("lora_only", new[] { "0.bias", "0.lora_A", "0.lora_B" })]
        public void LoraStateDict_AndTrainability_FollowLoralibsBiasModes(string mode, string[] expected)
        {
            using var model = nn.Sequential(("0", new LoraLinear(6, 4, r: 2)), ("1", new CustomLinear(4, 3)));

            var keys = LoraLinear.lora_state_dict(model, mode).Keys.OrderBy(k => k, StringComparer.Ordinal);
            LoraLinear.mark_only_lora_as_trainable(model, mode);
            var trainable = model.named_parameters().Where(p => p.parameter.requires_grad).Select(p => p.name).OrderBy(k => k, StringComparer.Ordinal);

            Assert.Equal(expected, keys);
            Assert.Equal(expected, trainable);
        }

        [Fact]
        public void LoraStateDict_Snapshot()
        {
            using var lora = new LoraLinear(6, 4, r: 2, lora_alpha: 4);
            Snapshots.Match(new
            {
                layer = lora.ToString(),
                state_dict = lora.state_dict().Select(kv => $"{kv.Key} [{string.Join(", ", kv.Value.shape)}] requires_grad={kv.Value.requires_grad}").ToArray(),
                none = LoraLinear.lora_state_dict(lora).Keys.ToArray(),
                all = LoraLinear.lora_state_dict(lora, "all").Keys.ToArray(),
                lora_only = LoraLinear.lora_state_dict(lora, "lora_only").Keys.ToArray(),
            });
        }

        // ---- Bad arguments -----------------------------------------------------------------------------

        [Theory]
        [InlineData(0, 1.0, 0.0, "r")]
        [InlineData(-2, 1.0, 0.0, "r")]
        [InlineData(4, double.PositiveInfinity, 0.0, "lora_alpha")]
        [InlineData(4, double.NaN, 0.0, "lora_alpha")]
        [InlineData(4, 1.0, 1.0, "lora_dropout")]
        [InlineData(4, 1.0, -0.1, "lora_dropout")]
        public void BadAdapterArguments_AreOutOfRange(int r, double alpha, double dropout, string parameter)
        {
            var direct = Assert.Throws<ArgumentOutOfRangeException>(() => new LoraLinear(4, 3, r, alpha, dropout));
            Assert.Equal(parameter, direct.ParamName);
            Assert.Contains(parameter, direct.Message);
            using var source = nn.Linear(4, 3);
            var wrapped = Assert.Throws<ArgumentOutOfRangeException>(() => LoraLinear.FromLinear(source, r, alpha, dropout));
            Assert.Equal(parameter, wrapped.ParamName);
        }

        [Fact]
        public void FromLinear_NonMatrixWeight_IsRefused()
        {
            using var source = nn.Linear(4, 3);
            source.weight = new Parameter(ones(12));
            var error = Assert.Throws<ArgumentException>(() => LoraLinear.FromLinear(source, r: 2));
            Assert.Contains("2-D", error.Message);
            Assert.Contains("[12]", error.Message);
        }

        [Fact]
        public void BadInput_IsExplainedAndNamesTheLayer()
        {
            using var lora = new LoraLinear(4, 3, r: 2);
            using var wrong = randn(5, 7);
            using var doubles = randn(new long[] { 5, 4 }, dtype: ScalarType.Float64);

            var shape = Assert.Throws<ArgumentException>(() => lora.forward(wrong));
            Assert.StartsWith("LoraLinear(in_features=4, out_features=3, r=2", shape.Message);
            Assert.Contains("in_features = 4", shape.Message);
            Assert.Contains("[5, 7]", shape.Message);
            Assert.Contains("Float64", Assert.Throws<ArgumentException>(() => lora.forward(doubles)).Message);
            Assert.Throws<ArgumentException>(() => LoraLinear.lora_state_dict(lora, "some"));
        }

        [Fact]
        public void Forward_LeavesOnlyTheReturnedTensorAlive()
        {
            using var lora = TrainedLooking(8, 4, r: 2, dropout: 0.1);
            using var x = randn(3, 8);
            Leaks.AssertOnlyTheResultStaysAlive(() => lora.forward(x));
        }
    }
}
