using System;
using System.Linq;
using TorchSharp;
using TorchSharp.Modules;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Tests
{
    public class EquivalenceTests
    {
        [Fact]
        public void Compare_SameBits_IsBitExact()
        {
            using var a = tensor(new float[] { 1, -2.5f, 0, float.NaN, float.PositiveInfinity });
            using var b = a.clone();
            var result = Equivalence.Compare(a, b);
            Assert.True(result.BitExact);
            Assert.Equal(0, result.DifferingElements);
            Assert.Equal(5, result.ElementCount);
            Assert.Equal("bit-exact", result.ToString());
        }

        [Fact]
        public void Compare_NeighbouringFloats_AreOneUlpApart()
        {
            float one = 1f;
            float next = MathF.BitIncrement(one);
            using var a = tensor(new float[] { one, 3 });
            using var b = tensor(new float[] { next, 3 });
            var result = Equivalence.Compare(a, b);
            Assert.False(result.BitExact);
            Assert.Equal(1, result.DifferingElements);
            Assert.Equal(1, result.MaxUlp);
            Assert.Equal(Math.Pow(2, -23), result.MaxAbsDiff);
        }

        [Fact]
        public void Compare_CountsUlpAcrossZero()
        {
            // The smallest positive and negative subnormals are two steps apart (through ±0).
            using var a = tensor(new double[] { -double.Epsilon, 5 });
            using var b = tensor(new double[] { double.Epsilon, 5 });
            Assert.Equal(2, Equivalence.Compare(a, b).MaxUlp);

            using var lowest = tensor(new float[] { float.MinValue });
            using var highest = tensor(new float[] { float.MaxValue });
            Assert.Equal(2L * (0x7f7fffff), Equivalence.Compare(lowest, highest).MaxUlp);
        }

        [Fact]
        public void Compare_SignedZeros_DifferInBitsButNotInValue()
        {
            using var a = tensor(new float[] { 0f });
            using var b = tensor(new float[] { -0f });
            var result = Equivalence.Compare(a, b);
            Assert.False(result.BitExact);
            Assert.Equal(0, result.MaxUlp);
            Assert.Equal(0, result.MaxAbsDiff);
        }

        [Fact]
        public void Compare_NaNAgainstANumber_IsInfinitelyFar()
        {
            using var a = tensor(new float[] { float.NaN });
            using var b = tensor(new float[] { 1 });
            var result = Equivalence.Compare(a, b);
            Assert.Equal(long.MaxValue, result.MaxUlp);
            Assert.Equal(double.PositiveInfinity, result.MaxAbsDiff);
        }

        [Fact]
        public void Compare_ShapeOrDtypeMismatch_IsNotComparable()
        {
            using var a = zeros(2, 3);
            using var b = zeros(3, 2);
            using var c = zeros(new long[] { 2, 3 }, dtype: ScalarType.Float64);
            Assert.False(Equivalence.Compare(a, b).Comparable);
            Assert.False(Equivalence.Compare(a, b).BitExact);
            Assert.Contains("shape differs", Equivalence.Compare(a, b).ToString());
            Assert.Contains("dtype differs", Equivalence.Compare(a, c).ToString());
        }

        [Fact]
        public void Compare_HalfAndBFloat16_AreSupported()
        {
            using var h = ones(new long[] { 3 }, dtype: ScalarType.Float16);
            using var h2 = full(new long[] { 3 }, 1.0009765625, dtype: ScalarType.Float16);  // 1 + 2^-10, the next half
            Assert.Equal(1, Equivalence.Compare(h, h2).MaxUlp);
            using var bf = ones(new long[] { 3 }, dtype: ScalarType.BFloat16);
            using var bf2 = full(new long[] { 3 }, 1.0078125, dtype: ScalarType.BFloat16);  // 1 + 2^-7, the next bfloat16
            Assert.Equal(1, Equivalence.Compare(bf, bf2).MaxUlp);
        }

        [Theory]
        [InlineData(ScalarType.Int64)]
        [InlineData(ScalarType.Int32)]
        [InlineData(ScalarType.Int8)]
        [InlineData(ScalarType.Byte)]
        [InlineData(ScalarType.Bool)]
        public void Compare_IntegerAndBoolTensors_AreComparedExactly(ScalarType dtype)
        {
            using var a = tensor(new long[] { 0, 1, 1, 0 }).to(dtype);
            using var b = tensor(new long[] { 0, 1, 0, 0 }).to(dtype);
            Assert.True(Equivalence.Compare(a, a).BitExact);
            var comparison = Equivalence.Compare(a, b);
            Assert.Equal(4, comparison.ElementCount);
            Assert.Equal(1, comparison.DifferingElements);
            Assert.Equal(1, comparison.MaxAbsDiff);
            Assert.Equal(1, comparison.MaxUlp);  // one integer apart
        }

        [Fact]
        public void Compare_ComplexTensors_CountAnElementOnce_AndMeasureBothParts()
        {
            using var a = complex(tensor(new float[] { 1, 2, 3 }), tensor(new float[] { 1, 1, 1 }));
            using var b = complex(tensor(new float[] { 1, 2, MathF.BitIncrement(3) }), tensor(new float[] { 1, 1.5f, 1 }));
            Assert.True(Equivalence.Compare(a, a).BitExact);
            var comparison = Equivalence.Compare(a, b);
            Assert.Equal(3, comparison.ElementCount);
            Assert.Equal(2, comparison.DifferingElements);
            Assert.Equal(0.5, comparison.MaxAbsDiff);
            Assert.Equal(1L << 22, comparison.MaxUlp);  // 1 and 1.5 are 2^22 floats apart
            using var c = a.to(ScalarType.ComplexFloat64);
            Assert.False(Equivalence.Compare(a, c).Comparable);
        }

        [Fact]
        public void CompareModules_SameParameters_IsBitExact_AndLeavesGradsAlone()
        {
            manual_seed(1);
            using var a = nn.Linear(4, 3);
            using var b = new CustomLinear(new Parameter(a.weight.detach().clone()), new Parameter(a.bias!.detach().clone()));
            using var x = randn(5, 4);

            Equivalence.CompareModules(a, b, x);  // CustomLinear keeps a Wᵀ view from its first call on
            long before = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
            var result = Equivalence.CompareModules(a, b, x);

            Assert.True(result.BitExact, result.ToString());
            Assert.Equal(new[] { "weight", "bias" }, result.ParameterGradients.Keys);
            Assert.Null(a.weight.grad);
            Assert.Null(b.weight.grad);
            Assert.False(x.requires_grad);
            Assert.Equal(before, DisposeScopeManager.Statistics.ThreadTotalLiveCount);
        }

        [Fact]
        public void CompareModules_PerturbedWeight_IsCaught()
        {
            manual_seed(2);
            using var a = nn.Linear(4, 3);
            using var w = a.weight.detach().clone();
            w[0, 0] = w[0, 0] + 1e-3f;
            using var b = new CustomLinear(new Parameter(w.clone()), new Parameter(a.bias!.detach().clone()));
            using var x = randn(5, 4);

            var result = Equivalence.CompareModules(a, b, x);

            Assert.False(result.BitExact);
            Assert.False(result.Output.BitExact);
            Assert.False(result.InputGradient.BitExact);  // dL/dx = g W: the perturbed W shows here too
            Assert.True(result.ParameterGradients["weight"].BitExact);  // dL/dW = gᵀ x does not involve W
            Assert.Contains("output:", result.ToString());
        }

        [Fact]
        public void CompareModules_DifferentParameterNames_AreRefused()
        {
            using var a = nn.Linear(4, 3);
            using var b = new CustomLinear(4, 3, bias: false);
            using var x = randn(2, 4);
            var error = Assert.Throws<ArgumentException>(() => Equivalence.CompareModules(a, b, x));
            Assert.Contains("[weight, bias]", error.Message);
            Assert.Contains("[weight]", error.Message);
        }
    }
}
