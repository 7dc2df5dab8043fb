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
        // A few units in the last place, counted at the output's largest magnitude: addmm and mm-then-add
        // round the bias in at a different step. (Counted element by element the distance is meaningless
        // for outputs that cancel to nearly zero, where one rounding step of the sum is thousands of ULP.)
        private const int UlpBound = 4;

        private readonly ITestOutputHelper _output;

        public LinearFormulasTests(ITestOutputHelper output) => _output = output;

        [Theory]
        [InlineData(new long[] { 3 }, 3, 2)]
        [InlineData(new long[] { 8, 3 }, 3, 2)]
        [InlineData(new long[] { 64, 512 }, 512, 256)]
        [InlineData(new long[] { 300, 1024 }, 1024, 1000)]
        [InlineData(new long[] { 4, 16, 512 }, 512, 256)]
        [InlineData(new long[] { 2, 3, 4, 64 }, 64, 32)]
        public void ArticleAndFlattenedAddmm_AgreeWithNnLinearWithinAFewUlp(long[] shape, long inFeatures, long outFeatures)
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
            float scale = expected.abs().max().item<float>();
            double tolerance = UlpBound * (MathF.BitIncrement(scale) - scale);
            _output.WriteLine($"tolerance: {UlpBound} ULP of the largest |output| {scale:G4} = {tolerance:G3}");
            Assert.True(article.Comparable && article.MaxAbsDiff <= tolerance, $"article formula, {input}: {article}; tolerance {tolerance:G3}");
            Assert.True(flattened.Comparable && flattened.MaxAbsDiff <= tolerance, $"flattened addmm, {input}: {flattened}; tolerance {tolerance:G3}");
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
