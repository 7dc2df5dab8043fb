using System;
using System.Collections.Generic;
using System.Linq;
using TorchSharp;
using TorchSharp.Modules;
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
    /// <param name="InputGradient">Gradients with respect to the input; null when only outputs were compared.</param>
    /// <param name="ParameterGradients">Gradients of each parameter, by state_dict name.</param>
    public sealed record ModuleComparison(
        TensorComparison Output,
        TensorComparison? InputGradient,
        IReadOnlyDictionary<string, TensorComparison> ParameterGradients)
    {
        /// <summary>True when the output and every gradient compared are bit-exact.</summary>
        public bool BitExact => Output.BitExact && (InputGradient?.BitExact ?? true) && ParameterGradients.Values.All(c => c.BitExact);

        /// <summary>One line per compared quantity.</summary>
        public override string ToString() =>
            string.Join(Environment.NewLine,
                new[] { $"output: {Output}" }
                    .Concat(InputGradient is null ? Array.Empty<string>() : new[] { $"input gradient: {InputGradient}" })
                    .Concat(ParameterGradients.Select(p => $"{p.Key} gradient: {p.Value}")));
    }

    /// <summary>
    /// A small toolkit to prove that two computations agree bit for bit, or to measure by how much they do not.
    /// </summary>
    /// <remarks>
    /// <para>The order of the arguments, one rule: <see cref="AssertClose"/> takes <c>(actual, expected)</c>, as
    /// <c>torch.testing.assert_close</c> does, because its tolerance is relative to <c>expected</c>. <see cref="Compare"/>
    /// keeps the <c>(expected, actual)</c> it has always had, and its order cannot change a result: its measures are
    /// symmetric (the differing bits, the largest absolute difference, the distance in ULP are the same either way round;
    /// a test says so), and only the names it gives the two sides in a dtype or shape message follow the order.
    /// <see cref="CompareModules"/> takes <c>(reference, candidate)</c>. Named arguments leave no doubt, for example
    /// <c>Equivalence.Compare(expected: y, actual: x)</c>.</para>
    /// <para>NaN: every method spells it <c>equal_nan</c>, torch's word (<see cref="ParityOptions.EqualNan"/> is the same
    /// option on an options object).</para>
    /// </remarks>
    public static class Equivalence
    {
        /// <summary>
        /// Compares two tensors element by element: bit patterns, absolute difference and distance in ULP.
        /// Floating-point tensors (Float16, BFloat16, Float32, Float64): <c>-0.0</c> and <c>+0.0</c> are 0 ULP apart
        /// but differ in bits; two NaNs with the same payload are equal in bits. Complex tensors: an element differs
        /// when its real or imaginary part does, and the distances are the largest over both parts. Integer and Bool
        /// tensors: exact comparison; the distance in ULP is the distance in integers (one unit each).
        /// </summary>
        /// <remarks>
        /// Computed on the tensors' own memory (on the CPU; other devices are copied there first): no element is copied
        /// into a managed array, so managed allocation does not grow with the tensors. Measured in
        /// <c>tests/TorchLinear.Benchmarks</c> (<c>CompareBenchmarks</c>).
        /// </remarks>
        /// <param name="expected">The tensor taken as the truth.</param>
        /// <param name="actual">The tensor under test.</param>
        /// <param name="equal_nan">When true, any two NaNs count as equal, whatever their payload and sign bits (kernels may
        /// produce different NaN bit patterns for the same invalid operation), as <see cref="AssertClose"/>'s
        /// <c>equal_nan</c> lets two NaNs be close.</param>
        /// <exception cref="ArgumentException">A tensor is of a quantized dtype.</exception>
        public static TensorComparison Compare(Tensor expected, Tensor actual, bool equal_nan = false)
        {
            ArgumentNullException.ThrowIfNull(expected);
            ArgumentNullException.ThrowIfNull(actual);
            long[] expectedShape = expected.shape;
            long[] actualShape = actual.shape;
            if (expected.dtype != actual.dtype || !expectedShape.SequenceEqual(actualShape))
                return new TensorComparison(expectedShape, actualShape, expected.dtype, actual.dtype, 0, 0, double.NaN, 0);
            var scan = TensorScan.Scan(actual, expected, new TensorScan.Options(0, 0, false, equal_nan, Closeness: false));
            return new TensorComparison(expectedShape, actualShape, expected.dtype, actual.dtype, scan.Count, scan.BitsDiffering, scan.MaxAbs, scan.MaxUlp);
        }

        /// <summary>
        /// The default tolerances of <c>torch.testing.assert_close</c> for a dtype, as <c>(rtol, atol)</c>: Float16
        /// (1e-3, 1e-5), BFloat16 (1.6e-2, 1e-5), Float32 and ComplexFloat32 (1.3e-6, 1e-5), Float64 and ComplexFloat64
        /// (1e-7, 1e-7); integers and Bool (0, 0), that is, exact.
        /// </summary>
        public static (double rtol, double atol) DefaultTolerances(ScalarType dtype) => dtype switch
        {
            ScalarType.Float16 => (1e-3, 1e-5),
            ScalarType.BFloat16 => (1.6e-2, 1e-5),
            ScalarType.Float32 or ScalarType.ComplexFloat32 => (1.3e-6, 1e-5),
            ScalarType.Float64 or ScalarType.ComplexFloat64 => (1e-7, 1e-7),
            _ => (0, 0),
        };

        /// <summary>
        /// Asserts that <paramref name="actual"/> and <paramref name="expected"/> are close, with the semantics of
        /// PyTorch's <c>torch.testing.assert_close</c>: same shape (and, unless disabled, dtype and device), and every
        /// element satisfies <c>|actual − expected| ≤ atol + rtol · |expected|</c>; infinities are close only to
        /// themselves, NaNs only to NaNs and only with <paramref name="equal_nan"/>. Default tolerances by dtype are
        /// <see cref="DefaultTolerances"/>; integer and Bool tensors are compared exactly.
        /// </summary>
        /// <remarks>
        /// The failure message has assert_close's form — "Tensor-likes are not close!", the mismatched element count
        /// and share, the greatest absolute and relative differences with their indices and what was allowed — plus the
        /// greatest distance in ULP. It throws <see cref="TensorMismatchException"/>, which any test framework reports
        /// as a failure. Computed without copying elements into managed memory.
        /// <code>
        /// Equivalence.AssertClose(portOutput, pytorchOutput);                     // float32: rtol 1.3e-6, atol 1e-5
        /// Equivalence.AssertClose(portOutput, pytorchOutput, rtol: 0, atol: 0);   // exact
        /// </code>
        /// </remarks>
        /// <param name="actual">The tensor under test.</param>
        /// <param name="expected">The tensor taken as the truth.</param>
        /// <param name="rtol">Relative tolerance; give both or neither of <paramref name="rtol"/> and <paramref name="atol"/>.</param>
        /// <param name="atol">Absolute tolerance; give both or neither.</param>
        /// <param name="equal_nan">Whether two NaNs are close.</param>
        /// <param name="check_device">Whether the devices must match; if not, both are compared on the CPU.</param>
        /// <param name="check_dtype">Whether the dtypes must match; if not, both are promoted to a common dtype.</param>
        /// <param name="msg">A message to use instead of the generated one when the values are not close.</param>
        /// <exception cref="ArgumentException">Only one of <paramref name="rtol"/> and <paramref name="atol"/> was given, or a tolerance is negative.</exception>
        /// <exception cref="TensorMismatchException">The tensors differ in an attribute or are not close.</exception>
        public static void AssertClose(Tensor actual, Tensor expected, double? rtol = null, double? atol = null, bool equal_nan = false,
                                       bool check_device = true, bool check_dtype = true, string? msg = null)
        {
            string? failure = CheckClose(actual, expected, rtol, atol, equal_nan, check_device, check_dtype, out _);
            if (failure is not null)
                throw new TensorMismatchException(msg ?? failure);
        }

        /// <summary>
        /// What <see cref="AssertClose"/> decides, without throwing: null when close, else its failure message.
        /// <paramref name="scan"/> holds the measurements (default when an attribute differs).
        /// </summary>
        internal static string? CheckClose(Tensor actual, Tensor expected, double? rtol, double? atol, bool equal_nan,
                                           bool check_device, bool check_dtype, out TensorScan.Result scan)
        {
            ArgumentNullException.ThrowIfNull(actual);
            ArgumentNullException.ThrowIfNull(expected);
            scan = default;
            if (rtol.HasValue != atol.HasValue)
                throw new ArgumentException($"Both 'rtol' and 'atol' must be either specified or omitted, but got no {(rtol.HasValue ? "atol" : "rtol")}.", rtol.HasValue ? nameof(atol) : nameof(rtol));
            if (rtol < 0 || atol < 0)
                throw new ArgumentException($"Tolerances must not be negative, but got rtol={rtol}, atol={atol}.", rtol < 0 ? nameof(rtol) : nameof(atol));

            if (!TensorFacts.SameShape(actual, expected))
                return $"The values for attribute 'shape' do not match: {Size(actual.shape)} != {Size(expected.shape)}.";
            if (check_device && !TensorFacts.SameDevice(actual, expected))
                return $"The values for attribute 'device' do not match: {actual.device} != {expected.device}.";
            if (check_dtype && actual.dtype != expected.dtype)
                return $"The values for attribute 'dtype' do not match: {DTypeName(actual.dtype)} != {DTypeName(expected.dtype)}.";

            var (defaultRtol, defaultAtol) = (Math.Max(DefaultTolerances(actual.dtype).rtol, DefaultTolerances(expected.dtype).rtol),
                                              Math.Max(DefaultTolerances(actual.dtype).atol, DefaultTolerances(expected.dtype).atol));
            double r = rtol ?? defaultRtol, a = atol ?? defaultAtol;
            using var scope = NewDisposeScope();
            Tensor left = actual, right = expected;
            if (actual.dtype != expected.dtype)
            {
                ScalarType common = promote_types(actual.dtype, expected.dtype);
                (left, right) = (actual.to(common), expected.to(common));
            }
            scan = TensorScan.Scan(left, right, new TensorScan.Options(r, a, equal_nan, IgnoreNaNPayloads: true));
            return scan.Mismatched == 0 ? null : MismatchMessage(scan, actual.shape, left.dtype, r, a);
        }

        /// <summary>
        /// assert_close's message, built in one place and worded as PyTorch words it (its own lines are checked against
        /// messages recorded from PyTorch 1.13), with the greatest distance in ULP added for floating-point tensors.
        /// </summary>
        private static string MismatchMessage(TensorScan.Result scan, long[] shape, ScalarType dtype, double rtol, double atol)
        {
            bool equality = rtol == 0 && atol == 0;
            // PyTorch compares integers (and Bool) as int64: their absolute difference prints as an integer, and their
            // relative difference is an int64 division, which gives the default float32.
            bool integral = is_integral(dtype);
            string Absolute(double value) => integral && double.IsFinite(value) ? ((long)value).ToString(System.Globalization.CultureInfo.InvariantCulture) : Number(value);
            double relative = integral ? (float)scan.MismatchMaxRel : scan.MismatchMaxRel;
            string Allowed(double tolerance) => equality ? "" : $" (up to {Number(tolerance)} allowed)";
            var text = new System.Text.StringBuilder();
            if (shape.Length == 0)
            {
                text.Append($"Scalars are not {(equality ? "equal" : "close")}!\n\n");
                text.Append($"Absolute difference: {Absolute(scan.MismatchMaxAbs)}{Allowed(atol)}\n");
                text.Append($"Relative difference: {Number(relative)}{Allowed(rtol)}");
                if (!integral)
                    text.Append($"\nULP distance: {Ulps(scan.MismatchMaxUlp)}");
                return text.ToString();
            }
            text.Append($"Tensor-likes are not {(equality ? "equal" : "close")}!\n\n");
            double share = (double)scan.Mismatched / scan.Count;
            text.Append($"Mismatched elements: {scan.Mismatched} / {scan.Count} ({share.ToString("0.0%", System.Globalization.CultureInfo.InvariantCulture)})\n");
            text.Append($"Greatest absolute difference: {Absolute(scan.MismatchMaxAbs)} at index {Index(scan.MismatchMaxAbsIndex, shape)}{Allowed(atol)}\n");
            text.Append($"Greatest relative difference: {Number(relative)} at index {Index(scan.MismatchMaxRelIndex, shape)}{Allowed(rtol)}");
            if (!integral)
                text.Append($"\nGreatest ULP distance: {Ulps(scan.MismatchMaxUlp)} at index {Index(scan.MismatchMaxUlpIndex, shape)}");
            return text.ToString();
        }

        private static string Ulps(long ulps) => ulps == long.MaxValue ? "unbounded (NaN against a number)" : ulps.ToString(System.Globalization.CultureInfo.InvariantCulture);

        /// <summary>A flat index as the tuple PyTorch prints: <c>(1, 2)</c>, or <c>(3,)</c> for one dimension.</summary>
        internal static string Index(long flat, long[] shape)
        {
            var index = new long[shape.Length];
            for (int d = shape.Length - 1; d >= 0; d--)
            {
                index[d] = shape[d] == 0 ? 0 : flat % shape[d];
                flat = shape[d] == 0 ? 0 : flat / shape[d];
            }
            return index.Length == 1 ? $"({index[0]},)" : $"({string.Join(", ", index)})";
        }

        /// <summary>A float as Python's repr writes it: 1.0, 0.5, 1e-05, inf, nan.</summary>
        internal static string Number(double value)
        {
            if (double.IsNaN(value))
                return "nan";
            if (double.IsInfinity(value))
                return value > 0 ? "inf" : "-inf";
            string text = value.ToString("R", System.Globalization.CultureInfo.InvariantCulture).Replace("E", "e");
            if (text.Contains('e'))
            {
                // Python writes a two-digit exponent with its sign: 1e-05, 1.5e+20.
                int e = text.IndexOf('e');
                string exponent = text[(e + 1)..];
                string sign = exponent.StartsWith('-') ? "-" : "+";
                return text[..e] + "e" + sign + exponent.TrimStart('+', '-').PadLeft(2, '0');
            }
            return text.Contains('.') ? text : text + ".0";
        }

        private static string Size(long[] shape) => $"torch.Size([{string.Join(", ", shape)}])";

        private static string DTypeName(ScalarType dtype) => "torch." + dtype switch
        {
            ScalarType.Float16 => "float16",
            ScalarType.BFloat16 => "bfloat16",
            ScalarType.Float32 => "float32",
            ScalarType.Float64 => "float64",
            ScalarType.ComplexFloat32 => "complex64",
            ScalarType.ComplexFloat64 => "complex128",
            ScalarType.Int64 => "int64",
            ScalarType.Int32 => "int32",
            ScalarType.Int16 => "int16",
            ScalarType.Int8 => "int8",
            ScalarType.Byte => "uint8",
            ScalarType.Bool => "bool",
            _ => dtype.ToString(),
        };

        /// <summary>
        /// Runs both modules on <paramref name="input"/> — invoked with <c>call(x)</c>, as a model invokes its layers, so
        /// that their forward hooks run (the rule Parity.Replay follows too) — and compares the outputs, the
        /// gradients with respect to
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
        /// <param name="equal_nan">Passed to every <see cref="Compare"/>: any two NaNs count as equal.</param>
        /// <param name="parameterMap">
        /// Pairs parameters whose names differ: each entry maps a reference parameter's name to the candidate's, for
        /// example <c>{ ["weight"] = "W", ["bias"] = "b" }</c>. Only the mapped pairs are compared (parameters left out,
        /// such as a LoRA layer's <c>lora_A</c>, are not); a pair in which neither side requires a gradient is compared
        /// by output only. Without a map, the trainable parameters must have the same names on both sides. The names in
        /// the result are the reference's.
        /// </param>
        /// <param name="outputOnly">Compare the outputs only: no backward pass, no gradients (for modules whose
        /// parameters cannot be paired, or that have none).</param>
        /// <exception cref="ArgumentException">The parameters cannot be paired: names differ, a mapped name does not
        /// exist, or one side of a mapped pair requires a gradient and the other does not.</exception>
        public static ModuleComparison CompareModules(
            nn.Module<Tensor, Tensor> reference, nn.Module<Tensor, Tensor> candidate, Tensor input, Tensor? gradOutput = null,
            Func<string, Tensor, Tensor>? alignGradient = null, bool equal_nan = false,
            IReadOnlyDictionary<string, string>? parameterMap = null, bool outputOnly = false)
        {
            ArgumentNullException.ThrowIfNull(reference);
            ArgumentNullException.ThrowIfNull(candidate);
            ArgumentNullException.ThrowIfNull(input);

            using var scope = NewDisposeScope();
            if (outputOnly)
            {
                using var _ = no_grad();
                Tensor expected = reference.call(input), actual = candidate.call(input);
                return new ModuleComparison(Compare(expected, actual, equal_nan), null, new Dictionary<string, TensorComparison>());
            }

            var pairs = Pair(reference, candidate, parameterMap);
            var (referenceOutput, referenceGrads) = Run(reference, input, pairs.Select(p => (Tensor)p.Reference).ToList(), gradOutput);
            var (candidateOutput, candidateGrads) = Run(candidate, input, pairs.Select(p => (Tensor)p.Candidate).ToList(), gradOutput);

            var parameterComparisons = new Dictionary<string, TensorComparison>();
            for (int i = 0; i < pairs.Count; i++)
            {
                Tensor? candidateGrad = candidateGrads[i + 1];
                if (alignGradient is not null && candidateGrad is not null && !candidateGrad.IsInvalid)
                    candidateGrad = alignGradient(pairs[i].Name, candidateGrad);
                parameterComparisons[pairs[i].Name] = CompareGradient(referenceGrads[i + 1], candidateGrad, equal_nan);
            }

            return new ModuleComparison(
                Compare(referenceOutput, candidateOutput, equal_nan),
                CompareGradient(referenceGrads[0], candidateGrads[0], equal_nan),
                parameterComparisons);
        }

        /// <summary>The parameter pairs whose gradients are compared, named by the reference.</summary>
        private static List<(string Name, Parameter Reference, Parameter Candidate)> Pair(
            nn.Module reference, nn.Module candidate, IReadOnlyDictionary<string, string>? map)
        {
            if (map is null)
            {
                var referenceParameters = reference.named_parameters().Where(p => p.parameter.requires_grad).ToList();
                var candidateParameters = candidate.named_parameters().Where(p => p.parameter.requires_grad).ToList();
                var referenceNames = referenceParameters.Select(p => p.name).ToList();
                var candidateNames = candidateParameters.Select(p => p.name).ToList();
                if (!referenceNames.SequenceEqual(candidateNames))
                    throw new ArgumentException(
                        $"Equivalence.CompareModules: the modules' trainable parameters differ: reference has [{string.Join(", ", referenceNames)}], candidate has [{string.Join(", ", candidateNames)}]. Pair them with parameterMap, or compare outputs only.",
                        nameof(candidate));
                return referenceParameters.Zip(candidateParameters, (r, c) => (r.name, r.parameter, c.parameter)).ToList();
            }

            var referenceByName = reference.named_parameters().ToDictionary(p => p.name, p => p.parameter);
            var candidateByName = candidate.named_parameters().ToDictionary(p => p.name, p => p.parameter);
            var pairs = new List<(string, Parameter, Parameter)>();
            foreach (var (referenceName, candidateName) in map)
            {
                if (!referenceByName.TryGetValue(referenceName, out Parameter? r))
                    throw new ArgumentException($"Equivalence.CompareModules: the reference has no parameter '{referenceName}' (it has [{string.Join(", ", referenceByName.Keys)}]).", nameof(map));
                if (!candidateByName.TryGetValue(candidateName, out Parameter? c))
                    throw new ArgumentException($"Equivalence.CompareModules: the candidate has no parameter '{candidateName}' (it has [{string.Join(", ", candidateByName.Keys)}]).", nameof(map));
                if (r.requires_grad != c.requires_grad)
                    throw new ArgumentException($"Equivalence.CompareModules: '{referenceName}' {(r.requires_grad ? "requires" : "does not require")} a gradient in the reference, '{candidateName}' {(c.requires_grad ? "does" : "does not")} in the candidate.", nameof(map));
                if (r.requires_grad)
                    pairs.Add((referenceName, r, c));
            }
            return pairs;
        }

        private static (Tensor output, IList<Tensor> gradients) Run(nn.Module<Tensor, Tensor> module, Tensor input, List<Tensor> parameters, Tensor? gradOutput)
        {
            // A fresh leaf per module, so the two graphs share nothing but the input's values.
            Tensor leaf = input.detach().clone().requires_grad_(true);
            Tensor output;
            using (enable_grad())
            {
                output = module.call(leaf);
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

        private static TensorComparison CompareGradient(Tensor? expected, Tensor? actual, bool equal_nan)
        {
            // allow_unused yields an undefined gradient (zero handle) for a parameter the output does not use.
            bool expectedMissing = expected is null || expected.IsInvalid;
            bool actualMissing = actual is null || actual.IsInvalid;
            if (expectedMissing && actualMissing)
                return new TensorComparison(Array.Empty<long>(), Array.Empty<long>(), ScalarType.Float32, ScalarType.Float32, 0, 0, 0, 0);
            if (expectedMissing || actualMissing)
                throw new InvalidOperationException("Equivalence.CompareModules: one module's output depends on a parameter the other's does not.");
            return Compare(expected!, actual!, equal_nan);
        }
    }
}
