using System;
using System.Collections.Generic;
using System.Linq;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Tests
{
    public class LinearFunctionalTests
    {
        /// <summary>One row of the exactness grid: an input shape, a layer size, and how the input is laid out.</summary>
        public sealed record GridCase(string Name, long[] InputShape, long In, long Out, bool Transposed = false)
        {
            /// <summary>The input, from its own seeded generator; a transposed case builds a non-contiguous view.</summary>
            public Tensor MakeInput(ScalarType dtype, long seed)
            {
                using var generator = new Generator((ulong)seed);
                if (!Transposed)
                    return randn(InputShape, dtype: dtype, generator: generator);
                // Allocate with the last two dimensions swapped, then transpose them back: same shape, not contiguous.
                long[] swapped = InputShape.ToArray();
                (swapped[^1], swapped[^2]) = (swapped[^2], swapped[^1]);
                using var storage = randn(swapped, dtype: dtype, generator: generator);
                return storage.transpose(-1, -2);
            }
        }

        public static readonly GridCase[] Grid =
        {
            new("1-D 3→2", new long[] { 3 }, 3, 2),
            new("1-D 1024→1000", new long[] { 1024 }, 1024, 1000),
            new("2-D 1×3→2", new long[] { 1, 3 }, 3, 2),
            new("2-D 7×33→17", new long[] { 7, 33 }, 33, 17),
            new("2-D 64×512→256", new long[] { 64, 512 }, 512, 256),
            new("2-D 300×1024→1000", new long[] { 300, 1024 }, 1024, 1000),
            new("3-D 4×5×32→16", new long[] { 4, 5, 32 }, 32, 16),
            new("3-D 8×16×128→96", new long[] { 8, 16, 128 }, 128, 96),
            new("4-D 2×3×4×16→8", new long[] { 2, 3, 4, 16 }, 16, 8),
            new("5-D 2×2×3×2×10→7", new long[] { 2, 2, 3, 2, 10 }, 10, 7),
            new("empty batch 0×8→4", new long[] { 0, 8 }, 8, 4),
            new("empty 5×0×8→4", new long[] { 5, 0, 8 }, 8, 4),
            new("no features 4×0→3", new long[] { 4, 0 }, 0, 3),
            new("transposed 2-D 6×9→5", new long[] { 6, 9 }, 9, 5, Transposed: true),
            new("transposed 3-D 3×7×12→4", new long[] { 3, 7, 12 }, 12, 4, Transposed: true),
        };

        /// <summary>Every dtype nn.Linear accepts: the four floating-point types libtorch's CPU kernels run, and complex.</summary>
        public static readonly ScalarType[] GridDtypes =
        {
            ScalarType.Float32, ScalarType.Float64, ScalarType.BFloat16, ScalarType.Float16, ScalarType.ComplexFloat32, ScalarType.ComplexFloat64,
        };

        [Fact]
        public void Grid_CustomLinearAndLinearFunctional_MatchBuiltInsBitForBit_ForwardAndBackward()
        {
            var verdicts = new List<object>();
            var failures = new List<string>();
            int seed = 0;
            foreach (var dtype in GridDtypes)
            foreach (bool bias in new[] { true, false })
            foreach (var c in Grid)
            {
                seed++;
                string name = $"{c.Name} {dtype} bias={bias}";
                using var scope = NewDisposeScope();
                // Parameters from a seeded generator, handed to nn.Linear(weight, bias): TorchSharp's nn.Linear
                // cannot initialise itself with in_features = 0 (see CustomLinearTests).
                using var generator = new Generator((ulong)(1000 + seed));
                var builtIn = nn.Linear(
                    new Parameter(randn(new[] { c.Out, c.In }, dtype: dtype, generator: generator)),
                    bias ? new Parameter(randn(new[] { c.Out }, dtype: dtype, generator: generator)) : null);
                var custom = new CustomLinear(Copy(builtIn.weight), bias ? Copy(builtIn.bias!) : null);
                var builtInFunctional = new FunctionalLayer(nn.functional.linear, Copy(builtIn.weight), bias ? Copy(builtIn.bias!) : null);
                var ourFunctional = new FunctionalLayer(LinearFunctional.linear, Copy(builtIn.weight), bias ? Copy(builtIn.bias!) : null);
                Tensor x = c.MakeInput(dtype, seed);

                var module = Equivalence.CompareModules(builtIn, custom, x);
                var functional = Equivalence.CompareModules(builtInFunctional, ourFunctional, x);

                if (!module.BitExact)
                    failures.Add($"CustomLinear vs nn.Linear, {name}:{Environment.NewLine}{module}");
                if (!functional.BitExact)
                    failures.Add($"LinearFunctional.linear vs functional.linear, {name}:{Environment.NewLine}{functional}");
                Assert.Equal(c.InputShape.SkipLast(1).Append(c.Out), custom.forward(x).shape);
                verdicts.Add(new
                {
                    @case = name,
                    customLinear = Verdict(module),
                    linearFunctional = Verdict(functional),
                    gradients = module.ParameterGradients.Keys.Prepend("input").ToArray(),
                });
                custom.Dispose();
                builtIn.Dispose();
                builtInFunctional.Dispose();
                ourFunctional.Dispose();
            }

            Assert.True(failures.Count == 0, string.Join(Environment.NewLine, failures));
            Assert.Equal(Grid.Length * GridDtypes.Length * 2, verdicts.Count);
            Snapshots.Match(verdicts);
        }

        /// <summary>The integer dtypes of PyTorch's OpInfo for nn.functional.linear on CPU, which TorchSharp's functional.linear computes.</summary>
        public static readonly ScalarType[] IntegerDtypes = { ScalarType.Int64, ScalarType.Int32, ScalarType.Int16, ScalarType.Int8, ScalarType.Byte };

        [Fact]
        public void IntegerGrid_LinearFunctional_MatchesFunctionalLinearExactly_ForEveryRankAndLayout()
        {
            // Integers have no gradients, so this is the forward only; small values keep every sum inside Int8's range
            // for the small cases, and the wide cases check that both wrap around identically.
            var failures = new List<string>();
            int checkedCases = 0, seed = 0;
            foreach (var dtype in IntegerDtypes)
            foreach (bool bias in new[] { true, false })
            foreach (var c in Grid)
            {
                seed++;
                using var scope = NewDisposeScope();
                using var generator = new Generator((ulong)(5000 + seed));
                long low = dtype == ScalarType.Byte ? 0 : -3;
                Tensor weight = randint(low, 4, new[] { c.Out, c.In }, dtype: dtype, generator: generator);
                Tensor? b = bias ? randint(low, 4, new[] { c.Out }, dtype: dtype, generator: generator) : null;
                Tensor x = c.Transposed
                    ? randint(low, 4, c.InputShape.SkipLast(2).Append(c.InputShape[^1]).Append(c.InputShape[^2]).ToArray(), dtype: dtype, generator: generator).transpose(-1, -2)
                    : randint(low, 4, c.InputShape, dtype: dtype, generator: generator);

                var comparison = Equivalence.Compare(nn.functional.linear(x, weight, b), LinearFunctional.linear(x, weight, b));
                if (!comparison.BitExact)
                    failures.Add($"{c.Name} {dtype} bias={bias}: {comparison}");
                checkedCases++;
            }
            Assert.True(failures.Count == 0, string.Join(Environment.NewLine, failures));
            Assert.Equal(Grid.Length * IntegerDtypes.Length * 2, checkedCases);
        }

        [Fact]
        public void Linear_IntegerTensors_GiveTheExactIntegerResult()
        {
            // The article's worked example in Int64: W = [[1, 2, 3], [4, 5, 6]], b = [0, 1], x = [1, 2, 3] → [14, 33].
            foreach (var dtype in IntegerDtypes)
            {
                using var scope = NewDisposeScope();
                var weight = tensor(new long[,] { { 1, 2, 3 }, { 4, 5, 6 } }).to(dtype);
                var bias = tensor(new long[] { 0, 1 }).to(dtype);
                Assert.Equal(new long[] { 14, 33 }, LinearFunctional.linear(tensor(new long[] { 1, 2, 3 }).to(dtype), weight, bias).to(ScalarType.Int64).data<long>().ToArray());
                Assert.Equal(new long[] { 14, 33, 14, 33 }, LinearFunctional.linear(tensor(new long[,] { { 1, 2, 3 }, { 1, 2, 3 } }).to(dtype), weight, bias).to(ScalarType.Int64).data<long>().ToArray());
            }
        }

        [Fact]
        public void Linear_BoolTensors_AreRefusedWithTheReason_WhereFunctionalLinearFailsInsideLibtorch()
        {
            using var scope = NewDisposeScope();
            var weight = ones(2, 3, dtype: ScalarType.Bool);
            var x = ones(4, 3, dtype: ScalarType.Bool);
            var error = Assert.Throws<ArgumentException>(() => LinearFunctional.linear(x, weight));
            Assert.Equal("weight", error.ParamName);
            Assert.Contains("weight dtype Bool is not supported", error.Message);
            // The anchor: libtorch has no Bool matrix multiply.
            Assert.Contains("not implemented for 'Bool'", Assert.ThrowsAny<Exception>(() => nn.functional.linear(x, weight)).Message);
        }

        [Fact]
        public void Linear_Errors_NameTheArgumentAtFault()
        {
            using var scope = NewDisposeScope();
            var weight = randn(2, 3);
            var x = randn(4, 3);
            var x3 = randn(2, 4, 3);

            // The weight is the reference: a bias that does not agree with it is the bias's fault.
            Assert.Equal("bias", Assert.Throws<ArgumentException>(() => LinearFunctional.linear(x3, weight, randn(2, dtype: ScalarType.Float64))).ParamName);
            Assert.Equal("bias", Assert.Throws<ArgumentException>(() => LinearFunctional.linear(x3, weight, randn(3))).ParamName);
            Assert.Equal("weight", Assert.Throws<ArgumentException>(() => LinearFunctional.linear(x3, randn(2, 2, 3))).ParamName);
            Assert.Equal("weight", Assert.Throws<ArgumentException>(() => LinearFunctional.linear(x3, ones(2, 3, dtype: ScalarType.Bool))).ParamName);
            // A wrong input is the input's fault, on the fused path too (where it is diagnosed after libtorch refuses).
            Assert.Equal("input", Assert.Throws<ArgumentException>(() => LinearFunctional.linear(randn(4, 5), weight, randn(2))).ParamName);
            Assert.Equal("input", Assert.Throws<ArgumentException>(() => LinearFunctional.linear(x.to(ScalarType.Float64), weight)).ParamName);
        }

        [Fact]
        public void TwoDimensionalInputWithBias_TakesTheFusedAddmmPath()
        {
            // The dispatch, shown on values rather than assumed: our 2-D result is exactly addmm's, and our
            // 3-D result is exactly matmul-then-add's, whatever this CPU's kernels round to.
            using var scope = NewDisposeScope();
            using var generator = new Generator(17);
            var weight = randn(new long[] { 256, 512 }, generator: generator);
            var bias = randn(new long[] { 256 }, generator: generator);
            var x2 = randn(new long[] { 64, 512 }, generator: generator);
            var x3 = randn(new long[] { 4, 16, 512 }, generator: generator);

            Assert.True(Equivalence.Compare(bias.addmm(x2, weight.t()), LinearFunctional.linear(x2, weight, bias)).BitExact);
            Assert.True(Equivalence.Compare(x3.matmul(weight.t()) + bias, LinearFunctional.linear(x3, weight, bias)).BitExact);
        }

        [Theory]
        [InlineData(new long[] { 3 })]
        [InlineData(new long[] { 4, 3 })]
        [InlineData(new long[] { 2, 4, 3 })]
        public void Linear_LeavesOnlyTheReturnedTensorAlive(long[] shape)
        {
            using var weight = randn(2, 3);
            using var bias = randn(2);
            using var x = randn(shape);
            Leaks.AssertOnlyTheResultStaysAlive(() => LinearFunctional.linear(x, weight, bias));
        }

        [Fact]
        public void Linear_RefusedInput_LeavesNothingAlive()
        {
            using var weight = randn(2, 3);
            using var bias = randn(2);
            using var x = randn(4, 5);
            long before = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
            Assert.ThrowsAny<ArgumentException>(() => LinearFunctional.linear(x, weight, bias));
            Assert.Equal(before, DisposeScopeManager.Statistics.ThreadTotalLiveCount);
        }

        [Fact]
        public void Linear_BadInput_IsExplained()
        {
            using var weight = randn(2, 3);
            using var bias = randn(2);

            using var scalar = tensor(2f);
            Assert.Contains("0-d tensor", Assert.Throws<ArgumentException>(() => LinearFunctional.linear(scalar, weight, bias)).Message);

            using var wide = randn(4, 5);
            var shape = Assert.Throws<ArgumentException>(() => LinearFunctional.linear(wide, weight, bias));
            Assert.StartsWith("LinearFunctional.linear: ", shape.Message);
            Assert.Contains("in_features = 3", shape.Message);
            Assert.Contains("[4, 5]", shape.Message);

            using var doubles = randn(4, 3, dtype: ScalarType.Float64);
            var dtype = Assert.Throws<ArgumentException>(() => LinearFunctional.linear(doubles, weight, bias));
            Assert.Contains("input dtype Float64 does not match weight dtype Float32", dtype.Message);

            using var longBias = randn(3);
            using var x = randn(4, 3);
            var biasShape = Assert.Throws<ArgumentException>(() => LinearFunctional.linear(x, weight, longBias));
            Assert.Contains("bias of shape [3]", biasShape.Message);

            using var cube = randn(2, 2, 3);
            var weightShape = Assert.Throws<ArgumentException>(() => LinearFunctional.linear(x, cube));
            Assert.Contains("weight must be 2-D", weightShape.Message);
        }

        private static string Verdict(ModuleComparison comparison) => comparison.BitExact ? "bit-exact" : "DIFFERS";

        private static Parameter Copy(Tensor tensor) => new(tensor.detach().clone());
    }
}
