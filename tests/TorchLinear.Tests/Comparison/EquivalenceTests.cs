using System.Collections.Generic;
using System;
using System.Linq;
using TorchSharp;
using TorchSharp.Modules;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Tests
{
    public class EquivalenceTests
    {
        [Fact]
        public void Compare_SameBits_IsBitExact()
        {
            using var a = tensor(new float[] { 1, -2.5f, 0, float.NaN, float.PositiveInfinity });
            using var b = a.clone();
            var result = Equivalence.Compare(a, b);
            Assert.True(result.BitExact);
            Assert.Equal(0, result.DifferingElements);
            Assert.Equal(5, result.ElementCount);
            Assert.Equal("bit-exact", result.ToString());
        }

        [Fact]
        public void Compare_NeighbouringFloats_AreOneUlpApart()
        {
            float one = 1f;
            float next = MathF.BitIncrement(one);
            using var a = tensor(new float[] { one, 3 });
            using var b = tensor(new float[] { next, 3 });
            var result = Equivalence.Compare(a, b);
            Assert.False(result.BitExact);
            Assert.Equal(1, result.DifferingElements);
            Assert.Equal(1, result.MaxUlp);
            Assert.Equal(Math.Pow(2, -23), result.MaxAbsDiff);
        }

        [Fact]
        public void Compare_CountsUlpAcrossZero()
        {
            // The smallest positive and negative subnormals are two steps apart (through ±0).
            using var a = tensor(new double[] { -double.Epsilon, 5 });
            using var b = tensor(new double[] { double.Epsilon, 5 });
            Assert.Equal(2, Equivalence.Compare(a, b).MaxUlp);

            using var lowest = tensor(new float[] { float.MinValue });
            using var highest = tensor(new float[] { float.MaxValue });
            Assert.Equal(2L * (0x7f7fffff), Equivalence.Compare(lowest, highest).MaxUlp);
        }

        [Fact]
        public void Compare_SignedZeros_DifferInBitsButNotInValue()
        {
            using var a = tensor(new float[] { 0f });
            using var b = tensor(new float[] { -0f });
            var result = Equivalence.Compare(a, b);
            Assert.False(result.BitExact);
            Assert.Equal(0, result.MaxUlp);
            Assert.Equal(0, result.MaxAbsDiff);
        }

        [Fact]
        public void Compare_NaNAgainstANumber_IsInfinitelyFar()
        {
            using var a = tensor(new float[] { float.NaN });
            using var b = tensor(new float[] { 1 });
            var result = Equivalence.Compare(a, b);
            Assert.Equal(long.MaxValue, result.MaxUlp);
            Assert.Equal(double.PositiveInfinity, result.MaxAbsDiff);
        }

        [Fact]
        public void Compare_ShapeOrDtypeMismatch_IsNotComparable()
        {
            using var a = zeros(2, 3);
            using var b = zeros(3, 2);
            using var c = zeros(new long[] { 2, 3 }, dtype: ScalarType.Float64);
            Assert.False(Equivalence.Compare(a, b).Comparable);
            Assert.False(Equivalence.Compare(a, b).BitExact);
            Assert.Contains("shape differs", Equivalence.Compare(a, b).ToString());
            Assert.Contains("dtype differs", Equivalence.Compare(a, c).ToString());
        }

        [Fact]
        public void Compare_HalfAndBFloat16_AreSupported()
        {
            using var h = ones(new long[] { 3 }, dtype: ScalarType.Float16);
            using var h2 = full(new long[] { 3 }, 1.0009765625, dtype: ScalarType.Float16);  // 1 + 2^-10, the next half
            Assert.Equal(1, Equivalence.Compare(h, h2).MaxUlp);
            using var bf = ones(new long[] { 3 }, dtype: ScalarType.BFloat16);
            using var bf2 = full(new long[] { 3 }, 1.0078125, dtype: ScalarType.BFloat16);  // 1 + 2^-7, the next bfloat16
            Assert.Equal(1, Equivalence.Compare(bf, bf2).MaxUlp);
        }

        [Theory]
        [InlineData(ScalarType.Int64)]
        [InlineData(ScalarType.Int32)]
        [InlineData(ScalarType.Int8)]
        [InlineData(ScalarType.Byte)]
        [InlineData(ScalarType.Bool)]
        public void Compare_IntegerAndBoolTensors_AreComparedExactly(ScalarType dtype)
        {
            using var a = tensor(new long[] { 0, 1, 1, 0 }).to(dtype);
            using var b = tensor(new long[] { 0, 1, 0, 0 }).to(dtype);
            Assert.True(Equivalence.Compare(a, a).BitExact);
            var comparison = Equivalence.Compare(a, b);
            Assert.Equal(4, comparison.ElementCount);
            Assert.Equal(1, comparison.DifferingElements);
            Assert.Equal(1, comparison.MaxAbsDiff);
            Assert.Equal(1, comparison.MaxUlp);  // one integer apart
        }

        [Fact]
        public void Compare_ComplexTensors_CountAnElementOnce_AndMeasureBothParts()
        {
            using var a = complex(tensor(new float[] { 1, 2, 3 }), tensor(new float[] { 1, 1, 1 }));
            using var b = complex(tensor(new float[] { 1, 2, MathF.BitIncrement(3) }), tensor(new float[] { 1, 1.5f, 1 }));
            Assert.True(Equivalence.Compare(a, a).BitExact);
            var comparison = Equivalence.Compare(a, b);
            Assert.Equal(3, comparison.ElementCount);
            Assert.Equal(2, comparison.DifferingElements);
            Assert.Equal(0.5, comparison.MaxAbsDiff);
            Assert.Equal(1L << 22, comparison.MaxUlp);  // 1 and 1.5 are 2^22 floats apart
            using var c = a.to(ScalarType.ComplexFloat64);
            Assert.False(Equivalence.Compare(a, c).Comparable);
        }

        [Fact]
        public void CompareModules_SameParameters_IsBitExact_AndLeavesGradsAlone()
        {
            manual_seed(1);
            using var a = nn.Linear(4, 3);
            using var b = new CustomLinear(new Parameter(a.weight.detach().clone()), new Parameter(a.bias!.detach().clone()));
            using var x = randn(5, 4);

            Equivalence.CompareModules(a, b, x);  // CustomLinear keeps a Wᵀ view from its first call on
            long before = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
            var result = Equivalence.CompareModules(a, b, x);

            Assert.True(result.BitExact, result.ToString());
            Assert.Equal(new[] { "weight", "bias" }, result.ParameterGradients.Keys);
            Assert.Null(a.weight.grad);
            Assert.Null(b.weight.grad);
            Assert.False(x.requires_grad);
            Assert.Equal(before, DisposeScopeManager.Statistics.ThreadTotalLiveCount);
        }

        [Fact]
        public void CompareModules_PerturbedWeight_IsCaught()
        {
            manual_seed(2);
            using var a = nn.Linear(4, 3);
            using var w = a.weight.detach().clone();
            w[0, 0] = w[0, 0] + 1e-3f;
            using var b = new CustomLinear(new Parameter(w.clone()), new Parameter(a.bias!.detach().clone()));
            using var x = randn(5, 4);

            var result = Equivalence.CompareModules(a, b, x);

            Assert.False(result.BitExact);
            Assert.False(result.Output.BitExact);
            Assert.False(result.InputGradient!.BitExact);  // dL/dx = g W: the perturbed W shows here too
            Assert.True(result.ParameterGradients["weight"].BitExact);  // dL/dW = gᵀ x does not involve W
            Assert.Contains("output:", result.ToString());
        }

        [Fact]
        public void CompareModules_DifferentParameterNames_AreRefused()
        {
            using var a = nn.Linear(4, 3);
            using var b = new CustomLinear(4, 3, bias: false);
            using var x = randn(2, 4);
            var error = Assert.Throws<ArgumentException>(() => Equivalence.CompareModules(a, b, x));
            Assert.Contains("[weight, bias]", error.Message);
            Assert.Contains("[weight]", error.Message);
        }

        // ---- AssertClose: torch.testing.assert_close's semantics and words ------------------------------------------

        public static IEnumerable<object[]> RecordedCases() =>
            System.Text.Json.JsonDocument.Parse(System.IO.File.ReadAllText(AssertCloseCases("cases.json")))
                .RootElement.GetProperty("cases").EnumerateArray().Select(c => new object[] { c.GetProperty("name").GetString()! });

        private static string AssertCloseCases(string file) => System.IO.Path.Combine(AppContext.BaseDirectory, "ReferenceData", "AssertClose", file);

        [Theory]
        [MemberData(nameof(RecordedCases))]
        public void AssertClose_GivesPyTorchsVerdictAndMessage(string name)
        {
            // make_assert_close.py recorded what PyTorch 1.13's assert_close said for each case; our message is PyTorch's,
            // followed by one line of our own with the greatest distance in ULP (floating-point tensors only).
            using var scope = NewDisposeScope();
            var record = System.Text.Json.JsonDocument.Parse(System.IO.File.ReadAllText(AssertCloseCases("cases.json")))
                .RootElement.GetProperty("cases").EnumerateArray().Single(c => c.GetProperty("name").GetString() == name);
            var tensors = StateDicts.ReadPyTorchFile(AssertCloseCases("cases.safetensors"));
            Tensor actual = tensors[name + "/actual"], expected = tensors[name + "/expected"];
            if (record.GetProperty("complex").GetBoolean())
                (actual, expected) = (view_as_complex(actual), view_as_complex(expected));
            var options = record.GetProperty("options");
            double? Option(string key) => options.TryGetProperty(key, out var v) && v.ValueKind == System.Text.Json.JsonValueKind.Number ? v.GetDouble() : null;
            bool Flag(string key, bool fallback) => options.TryGetProperty(key, out var v) ? v.GetBoolean() : fallback;
            void Act() => Equivalence.AssertClose(actual, expected, Option("rtol"), Option("atol"), Flag("equal_nan", false),
                                                  check_dtype: Flag("check_dtype", true));

            var message = record.GetProperty("message");
            if (message.ValueKind == System.Text.Json.JsonValueKind.Null)
            {
                Act();
                return;
            }
            string pytorch = message.GetString()!;
            string ours = Assert.Throws<TensorMismatchException>(Act).Message;
            Assert.StartsWith(pytorch, ours);
            string rest = ours[pytorch.Length..];
            Assert.Matches(@"^(|\n(Greatest ULP distance: (\d+|unbounded \(NaN against a number\)) at index \([\d, ]+\)|ULP distance: \d+))$", rest);
        }

        [Fact]
        public void AssertClose_OneToleranceAlone_IsRefusedAsInPyTorch()
        {
            using var a = ones(2);
            var error = Assert.Throws<ArgumentException>(() => Equivalence.AssertClose(a, a, rtol: 0.1));
            Assert.Contains("Both 'rtol' and 'atol' must be either specified or omitted, but got no atol.", error.Message);
            Assert.Contains("but got no rtol", Assert.Throws<ArgumentException>(() => Equivalence.AssertClose(a, a, atol: 0.1)).Message);
        }

        [Fact]
        public void AssertClose_NamesTheWorstElementInUlp()
        {
            using var expected = tensor(new float[] { 1, 2, 4 });
            using var actual = tensor(new float[] { 1, MathF.BitIncrement(MathF.BitIncrement(2)), 4.5f });
            string message = Assert.Throws<TensorMismatchException>(() => Equivalence.AssertClose(actual, expected, rtol: 0, atol: 0)).Message;
            Assert.Contains("Mismatched elements: 2 / 3 (66.7%)", message);
            Assert.Contains("Greatest ULP distance: 1048576 at index (2,)", message);  // 4 → 4.5 is 2^20 floats
            Assert.Contains("Greatest absolute difference: 0.5 at index (2,)", message);
        }

        [Fact]
        public void AssertClose_DeviceMismatch_IsReported_UnlessDisabled()
        {
            using var cpu = ones(2);
            using var meta = empty(2, device: new Device(DeviceType.META));
            Assert.Contains("The values for attribute 'device' do not match", Assert.Throws<TensorMismatchException>(() => Equivalence.AssertClose(meta, cpu)).Message);
        }

        [Fact]
        public void AssertClose_CustomMessage_ReplacesTheGeneratedOne()
        {
            using var a = ones(2);
            using var b = zeros(2);
            Assert.Equal("the port drifted", Assert.Throws<TensorMismatchException>(() => Equivalence.AssertClose(a, b, msg: "the port drifted")).Message);
        }

        // ---- Compare reads native memory: its managed allocation does not grow with the tensor ----------------------

        [Fact]
        public void Compare_AllocatesTheSameManagedMemory_ForAThousandAndAMillionElements()
        {
            long Allocated(long n)
            {
                using var scope = NewDisposeScope();
                var a = randn(n);
                var b = a + 1e-3f;
                Equivalence.Compare(a, b);  // warm-up
                long before = GC.GetAllocatedBytesForCurrentThread();
                var comparison = Equivalence.Compare(a, b);
                long bytes = GC.GetAllocatedBytesForCurrentThread() - before;
                Assert.Equal(n, comparison.ElementCount);
                Assert.True(comparison.DifferingElements > n / 2);
                return bytes;
            }
            long small = Allocated(1_000), large = Allocated(1_000_000);
            Assert.True(large <= small + 1024, $"Compare allocated {small} bytes for 1,000 elements and {large} for 1,000,000");
            Assert.True(large < 16 * 1024, $"Compare allocated {large} managed bytes");
        }

        [Fact]
        public void Compare_NonContiguousAndComplexAndHalf_AgreeWithElementByElementBits()
        {
            using var scope = NewDisposeScope();
            var a = randn(30, 40).t();                       // not contiguous
            var b = a.clone();
            b[3, 7] = b[3, 7] + 1;
            var comparison = Equivalence.Compare(a, b);
            Assert.Equal(1, comparison.DifferingElements);
            Assert.Equal(1200, comparison.ElementCount);
            var h = randn(50, dtype: ScalarType.Float16);
            var h2 = h.clone();
            h2[10] = tensor(float.NaN).to(ScalarType.Float16);
            var halves = Equivalence.Compare(h, h2);
            Assert.Equal(1, halves.DifferingElements);
            Assert.Equal(long.MaxValue, halves.MaxUlp);
        }

        // ---- CompareModules: parameters by mapping, or outputs only ---------------------------------------------------

        private sealed class WB : nn.Module<Tensor, Tensor>
        {
            private readonly Parameter W, b;

            public WB(Tensor weight, Tensor bias) : base(nameof(WB))
            {
                W = new Parameter(weight.detach().clone());
                b = new Parameter(bias.detach().clone());
                RegisterComponents();
            }

            public override Tensor forward(Tensor input) => LinearFunctional.linear(input, W, b);
        }

        [Fact]
        public void CompareModules_ParameterMap_PairsWAndBWithWeightAndBias()
        {
            using var scope = NewDisposeScope();
            manual_seed(3);
            var reference = nn.Linear(4, 3);
            var candidate = new WB(reference.weight, reference.bias!);
            var x = randn(5, 4);
            Assert.Contains("Pair them with parameterMap", Assert.Throws<ArgumentException>(() => Equivalence.CompareModules(reference, candidate, x)).Message);

            var comparison = Equivalence.CompareModules(reference, candidate, x, parameterMap: new Dictionary<string, string> { ["weight"] = "W", ["bias"] = "b" });
            Assert.True(comparison.BitExact, comparison.ToString());
            Assert.Equal(new[] { "weight", "bias" }, comparison.ParameterGradients.Keys);
            Assert.Contains("has no parameter 'w'", Assert.Throws<ArgumentException>(() =>
                Equivalence.CompareModules(reference, candidate, x, parameterMap: new Dictionary<string, string> { ["weight"] = "w" })).Message);
        }

        [Fact]
        public void CompareModules_OutputOnly_ComparesALoraLayerWithItsBase()
        {
            using var scope = NewDisposeScope();
            manual_seed(4);
            var pretrained = new CustomLinear(6, 5);
            var lora = TorchLinear.Samples.LoraLinear.FromLinear(pretrained, r: 2);   // B = 0: the same function
            var x = randn(3, 6);
            var comparison = Equivalence.CompareModules(pretrained, lora, x, outputOnly: true);
            Assert.True(comparison.BitExact, comparison.ToString());
            Assert.Null(comparison.InputGradient);
            Assert.Empty(comparison.ParameterGradients);
            // The LoRA layer's frozen weight pairs with the base's trainable one only by output; a map says so.
            Assert.Contains("requires a gradient in the reference", Assert.Throws<ArgumentException>(() =>
                Equivalence.CompareModules(pretrained, lora, x, parameterMap: new Dictionary<string, string> { ["weight"] = "weight" })).Message);
        }

        [Fact]
        public void Compare_GivesTheSameNumbersEitherWayRound_OnlyTheSidesNamesFollowTheOrder()
        {
            // The documented rule that lets Compare keep (expected, actual) beside AssertClose's (actual, expected).
            using var scope = NewDisposeScope();
            manual_seed(40);
            var a = randn(50, 7);
            var b = a + randn(50, 7) * 1e-6f;
            b[3, 4] = tensor(float.NaN);
            b[5, 1] = tensor(float.PositiveInfinity);
            var one = Equivalence.Compare(a, b);
            var other = Equivalence.Compare(b, a);
            Assert.Equal((one.DifferingElements, one.MaxAbsDiff, one.MaxUlp, one.BitExact), (other.DifferingElements, other.MaxAbsDiff, other.MaxUlp, other.BitExact));
            var named = Equivalence.Compare(actual: b, expected: a);
            Assert.Equal((one.DifferingElements, one.MaxAbsDiff, one.MaxUlp), (named.DifferingElements, named.MaxAbsDiff, named.MaxUlp));
            var shapes = Equivalence.Compare(expected: zeros(2), actual: zeros(3));
            Assert.Equal("shape differs: expected [2], actual [3]", shapes.ToString());
        }

        /// <summary>A layer whose forward hook adds one: what a model computes through call(x).</summary>
        [Fact]
        public void CompareModules_InvokesTheModulesAsAModelDoes_SoTheirHooksRun()
        {
            // CompareModules ran forward(x), Parity call(x): a forward hook counted in one and not the other.
            using var scope = NewDisposeScope();
            manual_seed(41);
            using var reference = nn.Linear(4, 3);
            using var candidate = new CustomLinear(reference.weight.detach().clone().AsParameter(), reference.bias!.detach().clone().AsParameter());
            var x = randn(2, 4);
            Assert.True(Equivalence.CompareModules(reference, candidate, x).BitExact);
            candidate.register_forward_hook((module, input, output) => output + 1);
            var comparison = Equivalence.CompareModules(reference, candidate, x);
            Assert.False(comparison.Output.BitExact);
            Assert.Equal(1, comparison.Output.MaxAbsDiff, 5);
            Assert.False(Equivalence.CompareModules(reference, candidate, x, outputOnly: true).BitExact);
        }
    }
}
