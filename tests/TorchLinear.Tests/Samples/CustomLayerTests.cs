using System;
using System.Linq;
using TorchLinear.Samples;
using TorchSharp;
using TorchSharp.Modules;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Tests.Samples
{
    public class CustomLayerTests
    {
        [Fact]
        public void InOutLinear_RegistersItsParametersAndSurvivesTo()
        {
            using var layer = new InOutLinear(5, 3);
            Assert.Equal(new[] { "weight", "bias" }, layer.state_dict().Keys);
            Assert.Equal(new long[] { 5, 3 }, layer.weight.shape);

            layer.to(ScalarType.Float64);

            Assert.Equal(new[] { "weight", "bias" }, layer.state_dict().Keys);
            Assert.All(layer.parameters(), p => Assert.Equal(ScalarType.Float64, p.dtype));
            Assert.Same(layer.weight, layer.named_parameters().First().parameter);
        }

        [Fact]
        public void InOutLinear_InitialisesWithinNnLinearsBound()
        {
            manual_seed(0);
            using var layer = new InOutLinear(64, 32);
            double bound = 1 / Math.Sqrt(64);
            Assert.True(layer.weight.abs().max().item<float>() <= bound);
            Assert.True(layer.bias!.abs().max().item<float>() <= bound);
            Assert.True(layer.weight.abs().max().item<float>() > bound * 0.9, "the whole range should be used");
        }

        [Fact]
        public void InOutLinear_RefusesBadInputBeforeMatmul()
        {
            using var layer = new InOutLinear(5, 3);
            using var wrong = ones(2, 4);
            var error = Assert.Throws<ArgumentException>(() => layer.forward(wrong));
            Assert.Contains("(*, 5)", error.Message);
            Assert.Contains("[2, 4]", error.Message);
        }

        [Theory]
        [InlineData(new long[] { 64 })]
        [InlineData(new long[] { 16, 64 })]
        [InlineData(new long[] { 4, 8, 64 })]
        public void InOutLinear_MatchesNnLinear_WithinTheDotProductsErrorBound_OutputAndAlignedGradients(long[] shape)
        {
            manual_seed(0);
            using var layer = new InOutLinear(64, 32);
            using var reference = nn.Linear(new Parameter(layer.weight.detach().t().contiguous()), new Parameter(layer.bias!.detach().clone()));
            using var x = randn(shape);
            using var upstream = randn(shape.SkipLast(1).Append(32L).ToArray());

            var verdict = Equivalence.CompareModules(reference, layer, x, gradOutput: upstream,
                alignGradient: (name, gradient) => name == "weight" ? gradient.t() : gradient);

            // Not asserted bit-exact: the memory layout differs, so BLAS may sum in another order. Each result is a dot
            // product, so the two are within twice its error bound, γ_n · Σ|terms| (LinearFormulasTests.DotProductBound),
            // whatever order either sums in: the output over the 64 inputs and the bias, the input gradient g W over the
            // 32 outputs, the weight and bias gradients gᵀ x and Σ g over the rows.
            using var scope = NewDisposeScope();
            Tensor W = reference.weight.detach(), rows = x.reshape(-1, 64), g = upstream.reshape(-1, 32);
            Tensor ones = ones_like(g.narrow(1, 0, 1));
            var bounds = new[]
            {
                ("output", verdict.Output, LinearFormulasTests.DotProductBound(x, W, reference.bias!.detach())),
                ("input gradient", verdict.InputGradient!, LinearFormulasTests.DotProductBound(upstream, W.t(), null)),
                ("weight gradient", verdict.ParameterGradients["weight"], LinearFormulasTests.DotProductBound(g.t(), rows.t(), null)),
                ("bias gradient", verdict.ParameterGradients["bias"], LinearFormulasTests.DotProductBound(g.t(), ones.t(), null)),
            };
            Assert.Equal(verdict.ParameterGradients.Count + 2, bounds.Length);
            foreach (var (what, comparison, bound) in bounds)
            {
                Assert.True(comparison.Comparable, comparison.ToString());
                double allowed = bound.max().item<double>();
                Assert.True(comparison.MaxAbsDiff <= allowed, $"{what}: {comparison}; the bound is {allowed:G3}");
            }
        }
    }
}
