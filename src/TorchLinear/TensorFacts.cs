using static TorchSharp.torch;

namespace TorchLinear
{
    /// <summary>
    /// The few facts about tensors that every concern of the library asks (the layer's checks, the comparison toolkit,
    /// parity, the checkpoint readers): a shape as text, whether two shapes or devices agree, how many bytes an element or
    /// a tensor takes. Asked through <c>dim()</c> and <c>size(i)</c> where it matters: TorchSharp's <c>shape</c> getter
    /// costs about 1.6 µs a call here, <c>size(i)</c> about 0.02 µs.
    /// </summary>
    internal static class TensorFacts
    {
        /// <summary>For example <c>[2, 3]</c>.</summary>
        internal static string Shape(Tensor tensor) => "[" + string.Join(", ", tensor.shape) + "]";

        /// <summary>Equal shapes, asked through <c>dim()</c> and <c>size(i)</c>.</summary>
        internal static bool SameShape(Tensor a, Tensor b)
        {
            long rank = a.dim();
            if (rank != b.dim())
                return false;
            for (int i = 0; i < rank; i++)
            {
                if (a.size(i) != b.size(i))
                    return false;
            }
            return true;
        }

        /// <summary>The same device: TorchSharp's <c>Device</c> has no value equality.</summary>
        internal static bool SameDevice(Tensor a, Tensor b) => a.device_type == b.device_type && a.device_index == b.device_index;

        /// <summary>Bytes per element; 0 for a dtype TorchSharp cannot hold.</summary>
        internal static int ElementSize(ScalarType dtype) => dtype switch
        {
            ScalarType.Bool or ScalarType.Byte or ScalarType.Int8 => 1,
            ScalarType.Int16 or ScalarType.Float16 or ScalarType.BFloat16 => 2,
            ScalarType.Int32 or ScalarType.Float32 => 4,
            ScalarType.Int64 or ScalarType.Float64 or ScalarType.ComplexFloat32 => 8,
            ScalarType.ComplexFloat64 => 16,
            _ => 0,
        };

        /// <summary>numel × element size, or null if it overflows a long (or a size is negative).</summary>
        internal static long? ByteCount(long[] shape, ScalarType dtype)
        {
            long count = 1;
            foreach (long size in shape)
            {
                if (size < 0)
                    return null;
                if (size != 0 && count > long.MaxValue / size)
                    return null;
                count *= size;
            }
            long element = ElementSize(dtype);
            return count > long.MaxValue / element ? null : count * element;
        }
    }
}
