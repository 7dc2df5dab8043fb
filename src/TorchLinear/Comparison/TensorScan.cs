using System;
using System.Runtime.InteropServices;
using TorchSharp;
using static TorchSharp.torch;

namespace TorchLinear
{
    /// <summary>
    /// One pass over two tensors of the same dtype and shape that yields everything <see cref="Equivalence.Compare"/>
    /// and <see cref="Equivalence.AssertClose"/> report. It reads the tensors' own (CPU, contiguous) memory through spans,
    /// in chunks of at most 1 GiB: nothing is copied into managed arrays, so managed allocation does not grow with the
    /// tensors. Bit patterns are read as they are stored, which is also how NaN payloads and the sign of zero are told
    /// apart; values are widened to double for differences, as <c>torch.testing</c> promotes to float64.
    /// </summary>
    internal static class TensorScan
    {
        /// <summary>What one pass found. Indices are flat (row-major) element indices, -1 when there is none.</summary>
        internal struct Result
        {
            internal long Count;
            /// <summary>Elements whose bit patterns differ (NaNs with different payloads count unless ignored).</summary>
            internal long BitsDiffering;
            /// <summary>Largest |a − e| and ULP distance over the elements whose bits differ (∞ / long.MaxValue against a NaN).</summary>
            internal double MaxAbs;
            internal long MaxUlp;
            /// <summary>Largest |a − e| / |e| over the elements whose bits differ (∞ where e is 0, NaN-free).</summary>
            internal double MaxRel;
            /// <summary>Elements that are not close in torch.isclose's sense.</summary>
            internal long Mismatched;
            internal double MismatchMaxAbs;
            internal long MismatchMaxAbsIndex;
            internal double MismatchMaxRel;
            internal long MismatchMaxRelIndex;
            internal long MismatchMaxUlp;
            internal long MismatchMaxUlpIndex;
        }

        /// <summary>Tolerances for closeness; <paramref name="Closeness"/> false skips that part (Compare needs bits only).</summary>
        internal readonly record struct Options(double Rtol, double Atol, bool EqualNan, bool IgnoreNaNPayloads, bool Closeness = true);

        /// <summary>Scans two tensors of one dtype and shape; both are read on the CPU, made contiguous if they are not.</summary>
        internal static Result Scan(Tensor actual, Tensor expected, Options options)
        {
            using var scope = NewDisposeScope();
            bool complex = is_complex(actual.dtype);
            Tensor a = Readable(actual, complex), e = Readable(expected, complex);
            ScalarType storage = a.dtype;
            long length = a.numel();
            if (TensorFacts.ElementSize(storage) == 0)
                throw new ArgumentException($"tensors of dtype {actual.dtype} cannot be compared.");

            // Blocks of 4 Mi values (an even number, so complex pairs stay whole), scanned in parallel and merged in
            // order, so that "the first greatest" is the same element as in a sequential scan.
            const long Block = 1L << 22;
            int blocks = (int)((length + Block - 1) / Block);
            var results = new Result[blocks];
            void ScanBlock(int block)
            {
                long start = block * Block, n = Math.Min(Block, length - start);
                // One block reads the tensors themselves; more read 1-D views of them, block by block.
                using Tensor? ca = blocks == 1 ? null : a.reshape(-1).narrow(0, start, n);
                using Tensor? ce = blocks == 1 ? null : e.reshape(-1).narrow(0, start, n);
                var result = new Result { MismatchMaxAbsIndex = -1, MismatchMaxRelIndex = -1, MismatchMaxUlpIndex = -1 };
                long first = complex ? start / 2 : start;
                ReadOnlySpan<byte> sa = (ca ?? a).bytes, se = (ce ?? e).bytes;
                switch (storage)
                {
                    case ScalarType.Float64: Run<F64, ulong>(sa, se, first, complex, options, ref result); break;
                    case ScalarType.Float32: Run<F32, uint>(sa, se, first, complex, options, ref result); break;
                    case ScalarType.Float16: Run<F16, ushort>(sa, se, first, complex, options, ref result); break;
                    case ScalarType.BFloat16: Run<BF16, ushort>(sa, se, first, complex, options, ref result); break;
                    case ScalarType.Int64: Run<I64, long>(sa, se, first, false, options, ref result); break;
                    case ScalarType.Int32: Run<I32, int>(sa, se, first, false, options, ref result); break;
                    case ScalarType.Int16: Run<I16, short>(sa, se, first, false, options, ref result); break;
                    case ScalarType.Int8: Run<I8, sbyte>(sa, se, first, false, options, ref result); break;
                    default: Run<U8, byte>(sa, se, first, false, options, ref result); break;  // Byte, Bool
                }
                results[block] = result;
            }
            // Small tensors (one block) are scanned on this thread: a parallel loop costs more than they take.
            if (blocks == 1)
                ScanBlock(0);
            else
                System.Threading.Tasks.Parallel.For(0, blocks, new System.Threading.Tasks.ParallelOptions { MaxDegreeOfParallelism = Environment.ProcessorCount }, ScanBlock);

            var merged = new Result { MismatchMaxAbsIndex = -1, MismatchMaxRelIndex = -1, MismatchMaxUlpIndex = -1 };
            foreach (Result r in results)
            {
                merged.BitsDiffering += r.BitsDiffering;
                merged.MaxAbs = Math.Max(merged.MaxAbs, r.MaxAbs);
                merged.MaxUlp = Math.Max(merged.MaxUlp, r.MaxUlp);
                merged.MaxRel = Math.Max(merged.MaxRel, r.MaxRel);
                merged.Mismatched += r.Mismatched;
                if (r.MismatchMaxAbsIndex >= 0 && Greater(r.MismatchMaxAbs, merged.MismatchMaxAbs, merged.MismatchMaxAbsIndex))
                    (merged.MismatchMaxAbs, merged.MismatchMaxAbsIndex) = (r.MismatchMaxAbs, r.MismatchMaxAbsIndex);
                if (r.MismatchMaxRelIndex >= 0 && Greater(r.MismatchMaxRel, merged.MismatchMaxRel, merged.MismatchMaxRelIndex))
                    (merged.MismatchMaxRel, merged.MismatchMaxRelIndex) = (r.MismatchMaxRel, r.MismatchMaxRelIndex);
                if (r.MismatchMaxUlpIndex >= 0 && (r.MismatchMaxUlp > merged.MismatchMaxUlp || merged.MismatchMaxUlpIndex < 0))
                    (merged.MismatchMaxUlp, merged.MismatchMaxUlpIndex) = (r.MismatchMaxUlp, r.MismatchMaxUlpIndex);
            }
            merged.Count = complex ? length / 2 : length;
            return merged;
        }

        /// <summary>
        /// The tensor itself when its memory can be read as it is (on the CPU, contiguous, real); otherwise a CPU,
        /// contiguous copy (for complex tensors, of the real view: real and imaginary parts interleaved).
        /// </summary>
        private static Tensor Readable(Tensor tensor, bool complex)
        {
            if (complex)
                return view_as_real(tensor.detach().cpu().resolve_conj()).contiguous();
            return tensor.device_type == DeviceType.CPU && tensor.is_contiguous() ? tensor : tensor.detach().cpu().contiguous();
        }

        private static void Run<TKind, T>(ReadOnlySpan<byte> actualBytes, ReadOnlySpan<byte> expectedBytes, long first, bool pairs, Options options, ref Result result)
            where TKind : IKind<T> where T : unmanaged
        {
            ReadOnlySpan<T> actual = MemoryMarshal.Cast<byte, T>(actualBytes);
            ReadOnlySpan<T> expected = MemoryMarshal.Cast<byte, T>(expectedBytes);
            if (pairs)
            {
                for (int i = 0; i < actual.Length; i += 2)
                {
                    // Fast path: identical bits are identical values, close by any tolerance, unless they are NaNs
                    // (which are close only with equal_nan).
                    if (TKind.Same(actual[i], expected[i]) && !TKind.IsNaN(actual[i])
                        && TKind.Same(actual[i + 1], expected[i + 1]) && !TKind.IsNaN(actual[i + 1]))
                        continue;
                    Element<TKind, T>(actual.Slice(i, 2), expected.Slice(i, 2), first + i / 2, options, ref result);
                }
                return;
            }
            for (int i = 0; i < actual.Length; i++)
            {
                T x = actual[i], y = expected[i];
                if (TKind.Same(x, y) && !TKind.IsNaN(x))
                    continue;
                bool nanX = TKind.IsNaN(x), nanY = TKind.IsNaN(y);
                long index = first + i;
                if (nanX || nanY)
                {
                    Element<TKind, T>(actual.Slice(i, 1), expected.Slice(i, 1), index, options, ref result);
                    continue;
                }
                // Two numbers (finite or infinite) with different bits: the common case of a comparison that is not exact.
                double va = TKind.Value(x), ve = TKind.Value(y);
                double difference = Math.Abs(va - ve);
                double magnitude = Math.Abs(ve);
                long ulp = Distance(TKind.Ordered(x), TKind.Ordered(y));
                result.BitsDiffering++;
                double abs = va == ve ? 0 : (double.IsNaN(difference) ? double.PositiveInfinity : difference);
                if (abs > result.MaxAbs)
                    result.MaxAbs = abs;
                if (ulp > result.MaxUlp)
                    result.MaxUlp = ulp;
                if (difference > 0)
                {
                    double rel = difference / magnitude;
                    if (double.IsNaN(rel))
                        rel = double.PositiveInfinity;
                    if (rel > result.MaxRel)
                        result.MaxRel = rel;
                }
                if (!options.Closeness || va == ve || (double.IsFinite(difference) && difference <= options.Atol + options.Rtol * magnitude))
                    continue;
                Mismatch(difference, magnitude, ulp, index, ref result);
            }
        }

        private static void Mismatch(double difference, double magnitude, long ulp, long index, ref Result result)
        {
            result.Mismatched++;
            double rel = difference / magnitude;
            // torch.max propagates NaN: the first NaN difference is the greatest.
            if (Greater(difference, result.MismatchMaxAbs, result.MismatchMaxAbsIndex))
                (result.MismatchMaxAbs, result.MismatchMaxAbsIndex) = (difference, index);
            if (Greater(rel, result.MismatchMaxRel, result.MismatchMaxRelIndex))
                (result.MismatchMaxRel, result.MismatchMaxRelIndex) = (rel, index);
            if (ulp > result.MismatchMaxUlp || result.MismatchMaxUlpIndex < 0)
                (result.MismatchMaxUlp, result.MismatchMaxUlpIndex) = (ulp, index);
        }

        /// <summary>One element (a number, or a complex pair) whose bits differ or which holds a NaN.</summary>
        private static void Element<TKind, T>(ReadOnlySpan<T> a, ReadOnlySpan<T> e, long index, Options options, ref Result result)
            where TKind : IKind<T> where T : unmanaged
        {
            // Bit patterns: NaN against NaN differs only in its payload, which may be ignored.
            bool bitsDiffer = false;
            double abs = 0;
            long ulp = 0;
            bool anyNaN = false, bothNaN = true;
            for (int p = 0; p < a.Length; p++)
            {
                bool nanA = TKind.IsNaN(a[p]), nanE = TKind.IsNaN(e[p]);
                anyNaN |= nanA | nanE;
                bothNaN &= nanA & nanE;
                if (TKind.Same(a[p], e[p]))
                    continue;
                if (nanA && nanE)
                {
                    bitsDiffer |= !options.IgnoreNaNPayloads;
                    continue;
                }
                bitsDiffer = true;
                if (nanA || nanE)
                {
                    abs = double.PositiveInfinity;
                    ulp = long.MaxValue;
                    continue;
                }
                double va = TKind.Value(a[p]), ve = TKind.Value(e[p]);
                double d = va == ve ? 0 : Math.Abs(va - ve);
                abs = Math.Max(abs, double.IsNaN(d) ? double.PositiveInfinity : d);
                ulp = Math.Max(ulp, Distance(TKind.Ordered(a[p]), TKind.Ordered(e[p])));
            }

            // torch.isclose: equal values are close (so ±0 are, and infinities of one sign); NaNs only with equal_nan;
            // otherwise |a − e| ≤ atol + rtol·|e| with a finite difference. Complex numbers by their magnitudes.
            double difference, magnitude;
            bool equal;
            if (a.Length == 1)
            {
                double va = TKind.Value(a[0]), ve = TKind.Value(e[0]);
                equal = va == ve;
                difference = Math.Abs(va - ve);
                magnitude = Math.Abs(ve);
            }
            else
            {
                double ar = TKind.Value(a[0]), ai = TKind.Value(a[1]), er = TKind.Value(e[0]), ei = TKind.Value(e[1]);
                equal = ar == er && ai == ei;
                difference = Hypot(ar - er, ai - ei);
                magnitude = Hypot(er, ei);
            }
            if (bitsDiffer)
            {
                result.BitsDiffering++;
                result.MaxAbs = Math.Max(result.MaxAbs, abs);
                result.MaxUlp = Math.Max(result.MaxUlp, ulp);
                if (!anyNaN && difference > 0)
                    result.MaxRel = Math.Max(result.MaxRel, double.IsNaN(difference / magnitude) ? double.PositiveInfinity : difference / magnitude);
            }
            bool close = !options.Closeness
                || equal
                || (options.EqualNan && bothNaN)
                || (!anyNaN && double.IsFinite(difference) && difference <= options.Atol + options.Rtol * magnitude);
            if (!close)
                Mismatch(difference, magnitude, ulp, index, ref result);
        }

        private static bool Greater(double candidate, double best, long bestIndex) =>
            bestIndex < 0 || (!double.IsNaN(best) && (double.IsNaN(candidate) || candidate > best));

        private static double Hypot(double x, double y) => Math.Sqrt(x * x + y * y);

        /// <summary>|a − b| of two ordered indices, saturating at long.MaxValue.</summary>
        private static long Distance(long a, long b)
        {
            long difference = a - b;
            bool overflow = ((a ^ b) & (a ^ difference)) < 0;
            return overflow || difference == long.MinValue ? long.MaxValue : Math.Abs(difference);
        }

        // ---- Element kinds: how a stored bit pattern reads as a value and as a position on the number line ----------

        private interface IKind<T> where T : unmanaged
        {
            static abstract bool Same(T a, T b);
            static abstract bool IsNaN(T bits);
            static abstract double Value(T bits);
            /// <summary>Floats: an integer such that consecutive floats are consecutive integers (±0 both 0). Integers: the value.</summary>
            static abstract long Ordered(T bits);
        }

        private readonly struct F64 : IKind<ulong>
        {
            public static bool Same(ulong a, ulong b) => a == b;
            public static bool IsNaN(ulong bits) => (bits & 0x7fffffffffffffffUL) > 0x7ff0000000000000UL;
            public static double Value(ulong bits) => BitConverter.UInt64BitsToDouble(bits);
            public static long Ordered(ulong bits) => (bits >> 63) != 0 ? -(long)(bits & 0x7fffffffffffffffUL) : (long)bits;
        }

        private readonly struct F32 : IKind<uint>
        {
            public static bool Same(uint a, uint b) => a == b;
            public static bool IsNaN(uint bits) => (bits & 0x7fffffffu) > 0x7f800000u;
            public static double Value(uint bits) => BitConverter.UInt32BitsToSingle(bits);
            public static long Ordered(uint bits) => (bits >> 31) != 0 ? -(long)(bits & 0x7fffffffu) : bits;
        }

        private readonly struct F16 : IKind<ushort>
        {
            public static bool Same(ushort a, ushort b) => a == b;
            public static bool IsNaN(ushort bits) => (bits & 0x7fff) > 0x7c00;
            public static double Value(ushort bits) => (double)BitConverter.UInt16BitsToHalf(bits);
            public static long Ordered(ushort bits) => (bits >> 15) != 0 ? -(long)(bits & 0x7fff) : bits;
        }

        private readonly struct BF16 : IKind<ushort>
        {
            public static bool Same(ushort a, ushort b) => a == b;
            public static bool IsNaN(ushort bits) => (bits & 0x7fff) > 0x7f80;
            // A bfloat16 is the high half of a float32.
            public static double Value(ushort bits) => BitConverter.UInt32BitsToSingle((uint)bits << 16);
            public static long Ordered(ushort bits) => (bits >> 15) != 0 ? -(long)(bits & 0x7fff) : bits;
        }

        private readonly struct I64 : IKind<long>
        {
            public static bool Same(long a, long b) => a == b;
            public static bool IsNaN(long bits) => false;
            public static double Value(long bits) => bits;
            public static long Ordered(long bits) => bits;
        }

        private readonly struct I32 : IKind<int>
        {
            public static bool Same(int a, int b) => a == b;
            public static bool IsNaN(int bits) => false;
            public static double Value(int bits) => bits;
            public static long Ordered(int bits) => bits;
        }

        private readonly struct I16 : IKind<short>
        {
            public static bool Same(short a, short b) => a == b;
            public static bool IsNaN(short bits) => false;
            public static double Value(short bits) => bits;
            public static long Ordered(short bits) => bits;
        }

        private readonly struct I8 : IKind<sbyte>
        {
            public static bool Same(sbyte a, sbyte b) => a == b;
            public static bool IsNaN(sbyte bits) => false;
            public static double Value(sbyte bits) => bits;
            public static long Ordered(sbyte bits) => bits;
        }

        private readonly struct U8 : IKind<byte>
        {
            public static bool Same(byte a, byte b) => a == b;
            public static bool IsNaN(byte bits) => false;
            public static double Value(byte bits) => bits;
            public static long Ordered(byte bits) => bits;
        }
    }
}
