using System;
using System.Linq;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Tests
{
    /// <summary>
    /// What libtorch's CPU kernels on this machine do that decides whether a result can be PyTorch 1.13's bit for bit.
    /// libtorch picks its kernels by the CPU (<c>ATEN_CPU_CAPABILITY</c> overrides it): the AVX2 and AVX-512 ones, built
    /// with fused multiply-adds, compute <c>a + α·b</c> (the elementwise add, uniform init's <c>from + u·(to − from)</c>)
    /// with one rounding, as the PyTorch 1.13 that recorded the reference data did; the portable ones (a CPU without AVX2,
    /// or <c>ATEN_CPU_CAPABILITY=default</c>) with two, and then seeded inits and SGD's steps differ from it in the last bit.
    /// </summary>
    internal static class KernelFacts
    {
        private static readonly Lazy<bool> Fused = new(() =>
        {
            // α·b is exact in 34 bits; 1 + α·b lies just past a point halfway between two floats, and α·b rounded to a float
            // first lands it on the other side: one rounding gives 1.5006601, two give 1.50066. 64 elements: the vectorised path.
            float alpha = 1 + 5 * MathF.Pow(2, -12), b = 0.5f + 52 * MathF.Pow(2, -20);
            using var ones = torch.ones(64);
            using var bs = full(64, b);
            using var sum = ones.add(bs, alpha: alpha);
            float fused = MathF.FusedMultiplyAdd(alpha, b, 1), twice = 1 + alpha * b;
            Assert.NotEqual(fused, twice);
            float[] values = sum.data<float>().ToArray();
            Assert.All(values, v => Assert.True(v == fused || v == twice, $"{v:R} is neither {fused:R} nor {twice:R}"));
            return values[0] == fused;
        });

        /// <summary>Whether libtorch's kernels round <c>a + α·b</c> once here, as PyTorch 1.13's did when it recorded.</summary>
        public static bool FusesMultiplyAdd => Fused.Value;

        /// <summary>
        /// Whether two draws of U(−bound, bound) from the same random numbers are within what one more rounding of
        /// <c>from + u · (to − from)</c> allows: the product's half ULP and the sum's, at most one ULP of 2 · bound.
        /// </summary>
        public static bool WithinUniformRounding(float[] expected, float[] actual, double bound)
        {
            float range = (float)(2 * bound);
            double allowed = MathF.BitIncrement(range) - range;
            return expected.Length == actual.Length && expected.Zip(actual).All(p => Math.Abs((double)p.First - p.Second) <= allowed);
        }
    }
}
