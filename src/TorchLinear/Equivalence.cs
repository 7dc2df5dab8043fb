using System;
using System.Collections.Generic;
using System.Linq;
using TorchSharp;
using static TorchSharp.torch;

namespace TorchLinear
{
    /// <summary>
    /// How two tensors compare, element by element and bit by bit.
    /// </summary>
    /// <param name="ExpectedShape">Shape of the expected tensor.</param>
    /// <param name="ActualShape">Shape of the actual tensor.</param>
    /// <param name="ExpectedDType">Element type of the expected tensor.</param>
    /// <param name="ActualDType">Element type of the actual tensor.</param>
    /// <param name="ElementCount">Number of elements compared (0 when shapes or dtypes differ).</param>
    /// <param name="DifferingElements">Elements whose bit patterns differ.</param>
    /// <param name="MaxAbsDiff">Largest absolute difference (∞ where one side is NaN or the infinities differ).</param>
    /// <param name="MaxUlp">Largest distance in units in the last place; <see cref="long.MaxValue"/> where one side is NaN.</param>
    public sealed record TensorComparison(
        long[] ExpectedShape,
        long[] ActualShape,
        ScalarType ExpectedDType,
        ScalarType ActualDType,
        long ElementCount,
        long DifferingElements,
        double MaxAbsDiff,
        long MaxUlp)
    {
        /// <summary>True when shapes and dtypes agree.</summary>
        public bool Comparable => ExpectedDType == ActualDType && ExpectedShape.SequenceEqual(ActualShape);

        /// <summary>True when shapes and dtypes agree and every element has the same bit pattern.</summary>
        public bool BitExact => Comparable && DifferingElements == 0;

        /// <summary>"bit-exact", or a short account of how far apart the tensors are.</summary>
        public override string ToString()
        {
            if (!ExpectedDType.Equals(ActualDType))
                return $"dtype differs: expected {ExpectedDType}, actual {ActualDType}";
            if (!ExpectedShape.SequenceEqual(ActualShape))
                return $"shape differs: expected [{string.Join(", ", ExpectedShape)}], actual [{string.Join(", ", ActualShape)}]";
            return BitExact
                ? "bit-exact"
                : $"{DifferingElements} of {ElementCount} elements differ, max |diff| {MaxAbsDiff:G3}, max {MaxUlp} ULP";
        }
    }

    /// <summary>How two modules compare on one input: output, input gradient and each parameter's gradient.</summary>
    /// <param name="Output">The forward outputs.</param>
    /// <param name="InputGradient">Gradients with respect to the input.</param>
    /// <param name="ParameterGradients">Gradients of each parameter, by state_dict name.</param>
    public sealed record ModuleComparison(
        TensorComparison Output,
        TensorComparison InputGradient,
        IReadOnlyDictionary<string, TensorComparison> ParameterGradients)
    {
        /// <summary>True when the output and every gradient are bit-exact.</summary>
        public bool BitExact => Output.BitExact && InputGradient.BitExact && ParameterGradients.Values.All(c => c.BitExact);

        /// <summary>One line per compared quantity.</summary>
        public override string ToString() =>
            string.Join(Environment.NewLine,
                new[] { $"output: {Output}", $"input gradient: {InputGradient}" }
                    .Concat(ParameterGradients.Select(p => $"{p.Key} gradient: {p.Value}")));
    }

    /// <summary>
    /// A small toolkit to prove that two computations agree bit for bit, or to measure by how much they do not.
    /// </summary>
    public static class Equivalence
    {
        /// <summary>
        /// Compares two tensors element by element: bit patterns, absolute difference and distance in ULP.
        /// Floating-point tensors (Float16, BFloat16, Float32, Float64): <c>-0.0</c> and <c>+0.0</c> are 0 ULP apart
        /// but differ in bits; two NaNs with the same payload are equal in bits. Complex tensors: an element differs
        /// when its real or imaginary part does, and the distances are the largest over both parts. Integer and Bool
        /// tensors: exact comparison; the distance in ULP is the distance in integers (one unit each).
        /// </summary>
        /// <param name="expected">The tensor taken as the truth.</param>
        /// <param name="actual">The tensor under test.</param>
        /// <param name="ignoreNaNPayloads">When true, any two NaNs count as equal, whatever their payload and sign bits
        /// (kernels may produce different NaN bit patterns for the same invalid operation).</param>
        /// <exception cref="ArgumentException">A tensor is of a quantized dtype.</exception>
        public static TensorComparison Compare(Tensor expected, Tensor actual, bool ignoreNaNPayloads = false)
        {
            ArgumentNullException.ThrowIfNull(expected);
            ArgumentNullException.ThrowIfNull(actual);
            long[] expectedShape = expected.shape;
            long[] actualShape = actual.shape;
            if (expected.dtype != actual.dtype || !expectedShape.SequenceEqual(actualShape))
                return new TensorComparison(expectedShape, actualShape, expected.dtype, actual.dtype, 0, 0, double.NaN, 0);
            if (is_complex(expected.dtype))
                return CompareComplex(expected, actual, ignoreNaNPayloads);
            if (is_integral(expected.dtype))
                return CompareIntegers(expected, actual);
            var (expectedBits, expectedValues, width) = Read(expected, nameof(expected));
            var (actualBits, actualValues, _) = Read(actual, nameof(actual));

            long differing = 0;
            long maxUlp = 0;
            double maxAbs = 0;
            for (int i = 0; i < expectedBits.Length; i++)
            {
                if (expectedBits[i] == actualBits[i])
                    continue;
                differing++;
                double e = expectedValues[i], a = actualValues[i];
                if (double.IsNaN(e) || double.IsNaN(a))
                {
                    if (double.IsNaN(e) && double.IsNaN(a))
                    {
                        if (ignoreNaNPayloads)
                            differing--;
                        continue;  // payloads differ: counted as differing bits (unless ignored), no distance to measure
                    }
                    maxUlp = long.MaxValue;
                    maxAbs = double.PositiveInfinity;
                    continue;
                }
                double abs = e == a ? 0 : Math.Abs(e - a);
                if (double.IsNaN(abs))
                    abs = double.PositiveInfinity;
                maxAbs = Math.Max(maxAbs, abs);
                maxUlp = Math.Max(maxUlp, UlpDistance(expectedBits[i], actualBits[i], width));
            }
            return new TensorComparison(expectedShape, actualShape, expected.dtype, actual.dtype, expectedBits.Length, differing, maxAbs, maxUlp);
        }

        /// <summary>
        /// Runs both modules on <paramref name="input"/> and compares the outputs, the gradients with respect to
        /// the input, and the gradients of the parameters paired by name. Gradients are computed with
        /// <c>torch.autograd.grad</c> for the same upstream gradient (seeded random values, or
        /// <paramref name="gradOutput"/>), so no <c>.grad</c> of either module is touched and the modules may
        /// even share parameters. Every temporary tensor is disposed.
        /// </summary>
        /// <param name="reference">The module taken as the truth, for example <c>nn.Linear</c>.</param>
        /// <param name="candidate">The module under test.</param>
        /// <param name="input">The input; it is not modified.</param>
        /// <param name="gradOutput">The upstream gradient; by default standard normal values from seed 0.</param>
        /// <param name="alignGradient">
        /// For a candidate that stores a parameter in another layout: maps the candidate's gradient of the named
        /// parameter into the reference's layout before comparing, e.g. <c>(name, g) => name == "weight" ? g.t() : g</c>
        /// for a weight stored <c>(in, out)</c>. Tensors it creates are disposed with the rest.
        /// </param>
        /// <param name="ignoreNaNPayloads">Passed to every <see cref="Compare"/>: any two NaNs count as equal.</param>
        /// <exception cref="ArgumentException">The modules' parameter names differ.</exception>
        public static ModuleComparison CompareModules(
            nn.Module<Tensor, Tensor> reference, nn.Module<Tensor, Tensor> candidate, Tensor input, Tensor? gradOutput = null,
            Func<string, Tensor, Tensor>? alignGradient = null, bool ignoreNaNPayloads = false)
        {
            ArgumentNullException.ThrowIfNull(reference);
            ArgumentNullException.ThrowIfNull(candidate);
            ArgumentNullException.ThrowIfNull(input);

            using var scope = NewDisposeScope();
            var referenceParameters = reference.named_parameters().Where(p => p.parameter.requires_grad).ToList();
            var candidateParameters = candidate.named_parameters().Where(p => p.parameter.requires_grad).ToList();
            var referenceNames = referenceParameters.Select(p => p.name).ToList();
            var candidateNames = candidateParameters.Select(p => p.name).ToList();
            if (!referenceNames.SequenceEqual(candidateNames))
                throw new ArgumentException(
                    $"Equivalence.CompareModules: the modules' trainable parameters differ: reference has [{string.Join(", ", referenceNames)}], candidate has [{string.Join(", ", candidateNames)}].",
                    nameof(candidate));

            var (referenceOutput, referenceGrads) = Run(reference, input, referenceParameters.Select(p => (Tensor)p.parameter).ToList(), gradOutput);
            var (candidateOutput, candidateGrads) = Run(candidate, input, candidateParameters.Select(p => (Tensor)p.parameter).ToList(), gradOutput);

            var parameterComparisons = new Dictionary<string, TensorComparison>();
            for (int i = 0; i < referenceNames.Count; i++)
            {
                Tensor? candidateGrad = candidateGrads[i + 1];
                if (alignGradient is not null && candidateGrad is not null && !candidateGrad.IsInvalid)
                    candidateGrad = alignGradient(referenceNames[i], candidateGrad);
                parameterComparisons[referenceNames[i]] = CompareGradient(referenceGrads[i + 1], candidateGrad, ignoreNaNPayloads);
            }

            return new ModuleComparison(
                Compare(referenceOutput, candidateOutput, ignoreNaNPayloads),
                CompareGradient(referenceGrads[0], candidateGrads[0], ignoreNaNPayloads),
                parameterComparisons);
        }

        /// <summary>Compares real and imaginary parts as floats, and counts an element once if either part differs.</summary>
        private static TensorComparison CompareComplex(Tensor expected, Tensor actual, bool ignoreNaNPayloads)
        {
            using var scope = NewDisposeScope();
            Tensor expectedParts = view_as_real(expected.detach().resolve_conj());
            Tensor actualParts = view_as_real(actual.detach().resolve_conj());
            var (expectedBits, expectedValues, width) = Read(expectedParts, nameof(expected));
            var (actualBits, actualValues, _) = Read(actualParts, nameof(actual));
            long differing = 0, maxUlp = 0;
            double maxAbs = 0;
            for (int i = 0; i < expectedBits.Length; i += 2)
            {
                bool differs = false;
                for (int part = i; part < i + 2; part++)
                {
                    if (expectedBits[part] == actualBits[part])
                        continue;
                    double e = expectedValues[part], a = actualValues[part];
                    if (double.IsNaN(e) && double.IsNaN(a))
                    {
                        differs |= !ignoreNaNPayloads;
                        continue;
                    }
                    differs = true;
                    if (double.IsNaN(e) || double.IsNaN(a))
                    {
                        maxUlp = long.MaxValue;
                        maxAbs = double.PositiveInfinity;
                        continue;
                    }
                    double abs = e == a ? 0 : Math.Abs(e - a);
                    maxAbs = Math.Max(maxAbs, double.IsNaN(abs) ? double.PositiveInfinity : abs);
                    maxUlp = Math.Max(maxUlp, UlpDistance(expectedBits[part], actualBits[part], width));
                }
                if (differs)
                    differing++;
            }
            return new TensorComparison(expected.shape, actual.shape, expected.dtype, actual.dtype, expectedBits.Length / 2, differing, maxAbs, maxUlp);
        }

        /// <summary>Exact comparison of integer or Bool tensors, computed by libtorch.</summary>
        private static TensorComparison CompareIntegers(Tensor expected, Tensor actual)
        {
            using var scope = NewDisposeScope();
            Tensor e = expected.detach().cpu().to(ScalarType.Int64);
            Tensor a = actual.detach().cpu().to(ScalarType.Int64);
            long count = e.numel();
            long differing = count == 0 ? 0 : e.ne(a).sum().item<long>();
            long maxDistance = differing == 0 ? 0 : (e - a).abs().max().item<long>();
            return new TensorComparison(expected.shape, actual.shape, expected.dtype, actual.dtype, count, differing, maxDistance, maxDistance);
        }

        private static (Tensor output, IList<Tensor> gradients) Run(nn.Module<Tensor, Tensor> module, Tensor input, List<Tensor> parameters, Tensor? gradOutput)
        {
            // A fresh leaf per module, so the two graphs share nothing but the input's values.
            Tensor leaf = input.detach().clone().requires_grad_(true);
            Tensor output;
            using (enable_grad())
            {
                output = module.forward(leaf);
                Tensor upstream = gradOutput ?? DefaultGradOutput(output);
                var wrt = new List<Tensor> { leaf };
                wrt.AddRange(parameters);
                IList<Tensor> gradients = autograd.grad(new[] { output }, wrt, new[] { upstream }, allow_unused: true);
                return (output.detach(), gradients);
            }
        }

        private static Tensor DefaultGradOutput(Tensor output)
        {
            using var generator = new Generator(0, output.device);
            return randn(output.shape, dtype: output.dtype, device: output.device, generator: generator);
        }

        private static TensorComparison CompareGradient(Tensor? expected, Tensor? actual, bool ignoreNaNPayloads)
        {
            // allow_unused yields an undefined gradient (zero handle) for a parameter the output does not use.
            bool expectedMissing = expected is null || expected.IsInvalid;
            bool actualMissing = actual is null || actual.IsInvalid;
            if (expectedMissing && actualMissing)
                return new TensorComparison(Array.Empty<long>(), Array.Empty<long>(), ScalarType.Float32, ScalarType.Float32, 0, 0, 0, 0);
            if (expectedMissing || actualMissing)
                throw new InvalidOperationException("Equivalence.CompareModules: one module's output depends on a parameter the other's does not.");
            return Compare(expected!, actual!, ignoreNaNPayloads);
        }

        private static (long[] bits, double[] values, int width) Read(Tensor tensor, string name)
        {
            using var scope = NewDisposeScope();
            Tensor host = tensor.detach().cpu().contiguous();
            if (host.numel() == 0 && (is_floating_point(tensor.dtype)))
                return (Array.Empty<long>(), Array.Empty<double>(), 0);
            switch (tensor.dtype)
            {
                case ScalarType.Float64:
                {
                    double[] values = host.data<double>().ToArray();
                    return (values.Select(BitConverter.DoubleToInt64Bits).ToArray(), values, 64);
                }
                case ScalarType.Float32:
                {
                    float[] values = host.data<float>().ToArray();
                    return (values.Select(v => (long)BitConverter.SingleToInt32Bits(v)).ToArray(), values.Select(v => (double)v).ToArray(), 32);
                }
                case ScalarType.Float16:
                {
                    Half[] values = host.data<Half>().ToArray();
                    return (values.Select(v => (long)BitConverter.HalfToInt16Bits(v)).ToArray(), values.Select(v => (double)v).ToArray(), 16);
                }
                case ScalarType.BFloat16:
                {
                    // Every bfloat16 is exactly a float32 whose low 16 bits are zero.
                    float[] values = host.to(ScalarType.Float32).data<float>().ToArray();
                    return (values.Select(v => (long)(short)(BitConverter.SingleToInt32Bits(v) >> 16)).ToArray(), values.Select(v => (double)v).ToArray(), 16);
                }
                default:
                    throw new ArgumentException($"Equivalence.Compare: {name} has dtype {tensor.dtype}; floating-point, complex, integer and Bool tensors are supported.", name);
            }
        }

        /// <summary>
        /// Distance in representable values between two finite or infinite floats of the given width, found by
        /// mapping each bit pattern onto a line where consecutive floats are consecutive integers.
        /// </summary>
        private static long UlpDistance(long a, long b, int width)
        {
            long magnitudeMask = width == 64 ? long.MaxValue : (1L << (width - 1)) - 1;
            long signBit = width == 64 ? long.MinValue : 1L << (width - 1);
            long Ordered(long bits) => (bits & signBit) != 0 ? -(bits & magnitudeMask) : bits & magnitudeMask;
            long oa = Ordered(a), ob = Ordered(b);
            // For Float64 the difference of two ordered values can exceed long's range; saturate.
            long difference = oa - ob;
            bool overflow = ((oa ^ ob) & (oa ^ difference)) < 0;
            return overflow || difference == long.MinValue ? long.MaxValue : Math.Abs(difference);
        }
    }
}
