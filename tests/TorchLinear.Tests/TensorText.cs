using System;
using System.Globalization;
using System.Linq;
using System.Numerics;
using static TorchSharp.torch;

namespace TorchLinear.Tests
{
    /// <summary>Exact, machine-independent text for tensors that snapshots and messages can hold.</summary>
    internal static class TensorText
    {
        /// <summary>IEEE bit patterns, lower-case hex, in row-major order.</summary>
        public static string[] Bits(Tensor tensor)
        {
            using var host = tensor.detach().cpu().contiguous();
            if (host.numel() == 0)
                return Array.Empty<string>();
            if (is_complex(tensor.dtype))
            {
                // Real and imaginary parts, in that order, element after element.
                using var parts = view_as_real(host.resolve_conj());
                return Bits(parts);
            }
            return tensor.dtype switch
            {
                ScalarType.Float32 => host.data<float>().ToArray().Select(v => BitConverter.SingleToUInt32Bits(v).ToString("x8", CultureInfo.InvariantCulture)).ToArray(),
                ScalarType.Float64 => host.data<double>().ToArray().Select(v => BitConverter.DoubleToUInt64Bits(v).ToString("x16", CultureInfo.InvariantCulture)).ToArray(),
                ScalarType.Float16 => host.data<Half>().ToArray().Select(v => BitConverter.HalfToUInt16Bits(v).ToString("x4", CultureInfo.InvariantCulture)).ToArray(),
                ScalarType.BFloat16 => BFloat16Bits(host),
                _ => throw new ArgumentException($"unsupported dtype {tensor.dtype}"),
            };
        }

        /// <summary>Every bfloat16 is exactly the float32 whose low 16 bits are zero: its bits are the float's high half.</summary>
        private static string[] BFloat16Bits(Tensor host)
        {
            using var widened = host.to(ScalarType.Float32);
            return widened.data<float>().ToArray().Select(v => (BitConverter.SingleToUInt32Bits(v) >> 16).ToString("x4", CultureInfo.InvariantCulture)).ToArray();
        }

        /// <summary>The exact decimal value of each element (every binary float is a finite decimal).</summary>
        public static string[] ExactDecimals(Tensor tensor)
        {
            using var host = tensor.detach().cpu().contiguous().to(ScalarType.Float64);
            if (host.numel() == 0)
                return Array.Empty<string>();
            return host.data<double>().ToArray().Select(ExactDecimal).ToArray();
        }

        /// <summary>Writes a finite double as its exact decimal expansion, e.g. 0.1 → 0.1000000000000000055511151231257827021181583404541015625.</summary>
        public static string ExactDecimal(double value)
        {
            if (!double.IsFinite(value))
                return value.ToString(CultureInfo.InvariantCulture);
            long bits = BitConverter.DoubleToInt64Bits(value);
            bool negative = bits < 0;
            int exponent = (int)((bits >> 52) & 0x7ff);
            long mantissa = bits & 0xfffffffffffffL;
            if (exponent == 0)
                exponent++;
            else
                mantissa |= 1L << 52;
            exponent -= 1075;  // value = mantissa * 2^exponent
            string digits;
            int scale = 0;
            if (exponent >= 0)
            {
                digits = (new BigInteger(mantissa) << exponent).ToString(CultureInfo.InvariantCulture);
            }
            else
            {
                // mantissa / 2^k = mantissa * 5^k / 10^k
                scale = -exponent;
                digits = (new BigInteger(mantissa) * BigInteger.Pow(5, scale)).ToString(CultureInfo.InvariantCulture);
            }
            if (scale > 0)
            {
                digits = digits.PadLeft(scale + 1, '0');
                digits = digits[..^scale] + "." + digits[^scale..];
                digits = digits.TrimEnd('0').TrimEnd('.');
            }
            return (negative ? "-" : "") + digits;
        }

        /// <summary>Shape as <c>[a, b]</c>.</summary>
        public static string Shape(Tensor tensor) => "[" + string.Join(", ", tensor.shape) + "]";
    }
}
