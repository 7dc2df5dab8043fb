using System;
using System.Linq;
using TorchLinear.Samples;
using TorchSharp;
using Xunit;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace TorchLinear.Tests.Samples
{
    public class LinearFormulasTests
    {
        /// <summary>
        /// How far two float32 computations of x Wᵀ + b may be apart, element by element, whatever order or blocking their
        /// GEMMs sum in, with or without fused multiply-adds: each is within γ_{n+1} · (|x| |W|ᵀ + |b|) of the exact value
        /// (the dot product's error bound, the bias counted as one more term), γ_k = k·u / (1 − k·u), u = 2⁻²⁴; so the two
        /// are within twice that of each other. A bound from the arithmetic, not from this CPU's kernels (addmm and
        /// mm-then-add round the bias in at different steps, and which shapes then differ depends on the kernels).
        /// </summary>
        internal static Tensor DotProductBound(Tensor x, Tensor weight, Tensor? bias)
        {
            long n = weight.size(1) + 1;
            double u = Math.Pow(2, -24), gamma = n * u / (1 - n * u);
            using var scope = NewDisposeScope();
            Tensor magnitude = x.abs().to(ScalarType.Float64).matmul(weight.abs().to(ScalarType.Float64).t());
            if (bias is not null)
                magnitude = magnitude + bias.abs().to(ScalarType.Float64);
            return (2 * gamma * magnitude).MoveToOuterDisposeScope();
        }

        private readonly ITestOutputHelper _output;

        public LinearFormulasTests(ITestOutputHelper output) => _output = output;

        [Theory]
        [InlineData(new long[] { 3 }, 3, 2)]
        [InlineData(new long[] { 8, 3 }, 3, 2)]
        [InlineData(new long[] { 64, 512 }, 512, 256)]
        [InlineData(new long[] { 300, 1024 }, 1024, 1000)]
        [InlineData(new long[] { 4, 16, 512 }, 512, 256)]
        [InlineData(new long[] { 2, 3, 4, 64 }, 64, 32)]
        public void ArticleAndFlattenedAddmm_AgreeWithNnLinear_WithinTheDotProductsErrorBound(long[] shape, long inFeatures, long outFeatures)
        {
            using var scope = NewDisposeScope();
            manual_seed(21);
            var layer = nn.Linear(inFeatures, outFeatures);
            using var generator = new Generator(22);
            var x = randn(shape, generator: generator);
            var expected = layer.forward(x);

            var article = Equivalence.Compare(expected, LinearFormulas.Article(x, layer.weight, layer.bias));
            var flattened = Equivalence.Compare(expected, LinearFormulas.FlattenedAddmm(x, layer.weight, layer.bias));

            // Reported, not asserted exact: which of them is bit-exact depends on this CPU's kernels.
            string input = "[" + string.Join(", ", shape) + $"] → {outFeatures}";
            _output.WriteLine($"matmul(x, W.T) + b, {input}: {article}");
            _output.WriteLine($"flatten → addmm → view, {input}: {flattened}");
            var bound = DotProductBound(x, layer.weight, layer.bias);
            foreach (var (name, actual) in new[] { ("article formula", LinearFormulas.Article(x, layer.weight, layer.bias)), ("flattened addmm", LinearFormulas.FlattenedAddmm(x, layer.weight, layer.bias)) })
            {
                var excess = ((actual - expected).abs().to(ScalarType.Float64) - bound).max().item<double>();
                Assert.True(excess <= 0, $"{name}, {input}: beyond 2·γ_(n+1)·(|x||W|ᵀ + |b|) by {excess:G3} somewhere; {Equivalence.Compare(expected, actual)}");
            }
        }

        [Theory]
        [InlineData(new long[] { 512 })]
        [InlineData(new long[] { 4, 16, 512 })]
        public void Article_OutsideTheTwoDimensionalCase_IsNnLinearsOwnSequence(long[] shape)
        {
            // For 1-D and N-D input nn.Linear itself computes matmul then add: same kernels, same bits on any CPU.
            using var scope = NewDisposeScope();
            manual_seed(23);
            var layer = nn.Linear(512, 256);
            var x = randn(shape);
            Assert.True(Equivalence.Compare(layer.forward(x), LinearFormulas.Article(x, layer.weight, layer.bias)).BitExact);
        }

        [Fact]
        public void FlattenedAddmm_OnTwoDimensionalInput_IsNnLinearsOwnCall()
        {
            using var scope = NewDisposeScope();
            manual_seed(24);
            var layer = nn.Linear(512, 256);
            var x = randn(64, 512);
            Assert.True(Equivalence.Compare(layer.forward(x), LinearFormulas.FlattenedAddmm(x, layer.weight, layer.bias)).BitExact);
        }

        [Fact]
        public void Formulas_WorkedExample_GiveTheArticlesNumbers()
        {
            using var scope = NewDisposeScope();
            var w = tensor(new float[,] { { 1, 2, 3 }, { 4, 5, 6 } });
            var b = tensor(new float[] { 0, 1 });
            var x = tensor(new float[] { 1, 2, 3 });
            Assert.Equal(new float[] { 14, 33 }, LinearFormulas.Article(x, w, b).data<float>().ToArray());
            Assert.Equal(new float[] { 14, 33 }, LinearFormulas.FlattenedAddmm(x, w, b).data<float>().ToArray());
            Assert.Equal(new float[] { 14, 32 }, LinearFormulas.Article(x, w).data<float>().ToArray());
        }
    }
}
