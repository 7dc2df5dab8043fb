using System;

namespace TorchLinear.Benchmarks
{
    /// <summary>The layer and input sizes the benchmarks run on.</summary>
    public enum Shape
    {
        /// <summary>1×3→2: per-call overhead only.</summary>
        Tiny_1x3to2,
        /// <summary>32×128→128.</summary>
        Small_32x128to128,
        /// <summary>64×1024→1024.</summary>
        Batch_64x1024to1024,
        /// <summary>8×128×768→768: a 3-D (sequence) input, the matmul path.</summary>
        Sequence_8x128x768to768,
        /// <summary>512×2048→2048: compute-bound.</summary>
        Large_512x2048to2048,
    }

    /// <summary>Sizes of each <see cref="Shape"/>, and the floating-point operations it costs.</summary>
    public static class Shapes
    {
        public static (long[] Input, long In, long Out) Of(Shape shape) => shape switch
        {
            Shape.Tiny_1x3to2 => (new long[] { 1, 3 }, 3, 2),
            Shape.Small_32x128to128 => (new long[] { 32, 128 }, 128, 128),
            Shape.Batch_64x1024to1024 => (new long[] { 64, 1024 }, 1024, 1024),
            Shape.Sequence_8x128x768to768 => (new long[] { 8, 128, 768 }, 768, 768),
            Shape.Large_512x2048to2048 => (new long[] { 512, 2048 }, 2048, 2048),
            _ => throw new ArgumentOutOfRangeException(nameof(shape)),
        };

        /// <summary>
        /// 2·rows·in·out for the forward product. Training adds one backward product, the weight's gradient (×2): the
        /// benchmarks' inputs do not require gradients, so autograd computes no input gradient.
        /// </summary>
        public static double Flops(Shape shape, bool training)
        {
            var (input, inFeatures, outFeatures) = Of(shape);
            long rows = 1;
            for (int i = 0; i < input.Length - 1; i++)
                rows *= input[i];
            return 2.0 * rows * inFeatures * outFeatures * (training ? 2 : 1);
        }
    }
}
