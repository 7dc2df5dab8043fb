using System;
using System.Linq;
using TorchSharp;
using TorchSharp.Modules;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Tests.Robustness
{
    /// <summary>NaN, ±Inf, −0.0, subnormals and the largest finite values go through CustomLinear exactly as through nn.Linear.</summary>
    public class SpecialValuesTests
    {
        private static double[] Specials(bool float64) => new[]
        {
            double.NaN, double.PositiveInfinity, double.NegativeInfinity, -0.0, 0.0,
            float64 ? double.Epsilon : float.Epsilon,                       // smallest subnormal
            float64 ? 2.2250738585072009e-308 : 1.1754942e-38,              // largest subnormal
            float64 ? double.MaxValue : float.MaxValue,
            float64 ? -double.MaxValue : -float.MaxValue,
            1.0, -2.5,
        };

        [Theory]
        [InlineData(false, 1, true)]
        [InlineData(false, 2, true)]
        [InlineData(false, 2, false)]
        [InlineData(false, 3, true)]
        [InlineData(true, 1, true)]
        [InlineData(true, 2, true)]
        [InlineData(true, 3, false)]
        public void SpecialValues_PropagateExactlyAsThroughNnLinear(bool float64, int rank, bool bias)
        {
            using var scope = NewDisposeScope();
            var dtype = float64 ? ScalarType.Float64 : ScalarType.Float32;
            double[] specials = Specials(float64);
            int n = specials.Length;

            // Input row i carries special value i on the diagonal (0.5 elsewhere); the weight is the identity (each
            // output picks one input element, so specials reach the output one by one) stacked on three dense rows
            // that mix everything (so NaN, overflow to ±Inf and subnormal sums occur). The bias adds specials too.
            double[,] rows = new double[n, n];
            for (int i = 0; i < n; i++)
                for (int j = 0; j < n; j++)
                    rows[i, j] = i == j ? specials[i] : 0.5;
            double[,] weights = new double[n + 3, n];
            for (int j = 0; j < n; j++)
                weights[j, j] = 1;
            for (int r = 0; r < 3; r++)
                for (int k = 0; k < n; k++)
                    weights[n + r, k] = (k + r) % 4 == 0 ? specials[(k + 3 * r) % n] : 0.25 * (k - r);
            Tensor matrix = tensor(rows, dtype: dtype);
            Tensor input = rank switch
            {
                1 => matrix[1].clone(),
                2 => matrix,
                _ => matrix.reshape(1, n, n).expand(2, n, n).contiguous(),
            };
            Tensor weight = tensor(weights, dtype: dtype);
            Tensor? biasValues = bias ? tensor(Enumerable.Range(0, n + 3).Select(i => specials[(i + 5) % n]).ToArray(), dtype: dtype) : null;

            var builtIn = nn.Linear(new Parameter(weight.clone()), biasValues is null ? null : new Parameter(biasValues.clone()));
            var custom = new CustomLinear(new Parameter(weight.clone()), biasValues is null ? null : new Parameter(biasValues.clone()));
            var grad = full(builtIn.forward(input).shape, 1.0, dtype: dtype);

            var comparison = Equivalence.CompareModules(builtIn, custom, input, grad, equal_nan: true);

            Assert.True(comparison.BitExact, comparison.ToString());
            // The specials did reach the output: NaN, infinities and signed zeros are all there.
            var output = custom.forward(input);
            Assert.True(output.isnan().any().item<bool>());
            Assert.True(output.isinf().any().item<bool>());
        }
    }
}
