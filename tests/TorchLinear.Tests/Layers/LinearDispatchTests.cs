using System;
using System.Collections.Generic;
using System.Linq;
using TorchSharp;
using TorchSharp.Modules;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Tests
{
    /// <summary>
    /// LinearDispatch.PyTorch against the primitive sequences PyTorch's at::linear runs, written out here from its
    /// rules (not taken from the implementation): forward and all gradients, bit for bit.
    /// </summary>
    public class LinearDispatchTests
    {
        private readonly Xunit.Abstractions.ITestOutputHelper _output;

        public LinearDispatchTests(Xunit.Abstractions.ITestOutputHelper output) => _output = output;

        // The three sequences of aten/src/ATen/native/Linear.cpp, spelled out.
        private static Tensor Addmm(Tensor x, Tensor w, Tensor? b) => b!.addmm(x, w.t());

        private static Tensor FlattenAddmmView(Tensor x, Tensor w, Tensor? b)
        {
            long[] leading = x.shape[..^1];
            long rows = leading.Aggregate(1L, (product, size) => product * size);
            return b!.addmm(x.view(rows, x.shape[^1]), w.t()).view(leading.Append(w.shape[0]).ToArray());
        }

        private static Tensor MatmulThenAdd(Tensor x, Tensor w, Tensor? b)
        {
            Tensor y = x.matmul(w.t());
            return b is null ? y : y.add_(b);
        }

        public static IEnumerable<object[]> Cases()
        {
            foreach (int rank in new[] { 1, 2, 3, 4, 5 })
            foreach (bool contiguous in rank == 1 ? new[] { true } : new[] { true, false })
            foreach (bool bias in new[] { true, false })
                yield return new object[] { rank, contiguous, bias };
        }

        [Theory]
        [MemberData(nameof(Cases))]
        public void PyTorchDispatch_FollowsAtLinearsRules_BitForBit(int rank, bool contiguous, bool bias)
        {
            using var scope = NewDisposeScope();
            using var generator = new Generator((ulong)(100 * rank + (contiguous ? 10 : 0) + (bias ? 1 : 0)));
            // in_features 512: at this size flatten→addmm and matmul→add round differently on typical CPUs
            // whenever there is more than one row, so a wrong rule shows up as a failure.
            long[] shape = new long[] { 3, 4, 2, 5, 512 }[^rank..];
            Tensor x = contiguous
                ? randn(shape, generator: generator)
                : randn(shape[..^2].Append(shape[^1]).Append(shape[^2]).ToArray(), generator: generator).transpose(-1, -2);
            Assert.Equal(contiguous, x.is_contiguous());
            var weight = randn(new long[] { 256, 512 }, generator: generator);
            var biasTensor = bias ? randn(new long[] { 256 }, generator: generator) : null;

            // The rule, from the documentation of LinearDispatch.PyTorch.
            Func<Tensor, Tensor, Tensor?, Tensor> expected =
                bias && rank == 2 ? Addmm
                : bias && contiguous ? FlattenAddmmView
                : MatmulThenAdd;

            var reference = new FunctionalLayer(expected, new Parameter(weight.clone()), bias ? new Parameter(biasTensor!.clone()) : null);
            var candidate = new FunctionalLayer((i, w, b) => LinearFunctional.linear(i, w, b, LinearDispatch.PyTorch),
                new Parameter(weight.clone()), bias ? new Parameter(biasTensor!.clone()) : null);
            var custom = new CustomLinear(new Parameter(weight.clone()), bias ? new Parameter(biasTensor!.clone()) : null) { Dispatch = LinearDispatch.PyTorch };

            var functional = Equivalence.CompareModules(reference, candidate, x);
            var module = Equivalence.CompareModules(reference, custom, x);
            Assert.True(functional.BitExact, functional.ToString());
            Assert.True(module.BitExact, module.ToString());

            // How sharp the check is on this CPU: does the sequence not chosen give other bits?
            if (bias && rank != 2 && contiguous)
            {
                var other = expected == FlattenAddmmView ? MatmulThenAdd(x, weight, biasTensor) : FlattenAddmmView(x, weight, biasTensor);
                _output.WriteLine($"rank {rank}, contiguous={contiguous}: the other sequence is {Equivalence.Compare(reference.forward(x), other)}");
            }
        }

        [Fact]
        public void PyTorchDispatch_BiasThatSqueezesToOneDimension_IsFlattened_NonContiguousBiasIsNot()
        {
            using var scope = NewDisposeScope();
            using var generator = new Generator(7);
            var x = randn(new long[] { 4, 6, 64 }, generator: generator);
            var w = randn(new long[] { 32, 64 }, generator: generator);
            var rowBias = randn(new long[] { 1, 32 }, generator: generator);        // squeezes to (32): fusable
            var strided = randn(new long[] { 64 }, generator: generator)[TensorIndex.Slice(step: 2)];  // (32), not contiguous
            Assert.False(strided.is_contiguous());

            Assert.True(Equivalence.Compare(FlattenAddmmView(x, w, rowBias.squeeze()).view(4, 6, 32),
                LinearFunctional.linear(x, w, rowBias, LinearDispatch.PyTorch)).BitExact);
            Assert.True(Equivalence.Compare(MatmulThenAdd(x, w, strided),
                LinearFunctional.linear(x, w, strided, LinearDispatch.PyTorch)).BitExact);
        }

        [Fact]
        public void PyTorchDispatch_EmptyLeadingDimension_IsFlattenedWithoutMinusOne()
        {
            using var scope = NewDisposeScope();
            var x = randn(5, 0, 8);
            var w = randn(3, 8);
            var b = randn(3);
            using var y = LinearFunctional.linear(x, w, b, LinearDispatch.PyTorch);
            Assert.Equal(new long[] { 5, 0, 3 }, y.shape);
        }

        [Fact]
        public void TorchSharpDispatch_IsTheDefault_AndEqualsNnLinear()
        {
            manual_seed(9);
            using var layer = new CustomLinear(64, 32);
            Assert.Equal(LinearDispatch.TorchSharp, layer.Dispatch);
            using var builtIn = nn.Linear(new Parameter(layer.weight.detach().clone()), new Parameter(layer.bias!.detach().clone()));
            using var x = randn(4, 6, 64);
            Assert.True(Equivalence.CompareModules(builtIn, layer, x).BitExact);
            using var y = LinearFunctional.linear(x, layer.weight, layer.bias, LinearDispatch.TorchSharp);
            using var z = nn.functional.linear(x, layer.weight, layer.bias);
            Assert.True(Equivalence.Compare(z, y).BitExact);
        }

        [Fact]
        public void PyTorchDispatch_RefusesBadInputBeforeAnyMatmul()
        {
            using var layer = new CustomLinear(3, 2) { Dispatch = LinearDispatch.PyTorch };
            using var wrong = randn(2, 4, 5);
            var error = Assert.Throws<ArgumentException>(() => layer.forward(wrong));
            Assert.Contains("in_features = 3", error.Message);
            using var scalar = tensor(1f);
            Assert.Contains("0-d", Assert.Throws<ArgumentException>(() => layer.forward(scalar)).Message);
        }

        [Fact]
        public void PyTorchDispatch_LeavesOnlyTheReturnedTensorAlive()
        {
            using var w = randn(4, 6);
            using var b = randn(4);
            using var x = randn(2, 3, 6);
            Leaks.AssertOnlyTheResultStaysAlive(() => LinearFunctional.linear(x, w, b, LinearDispatch.PyTorch));
        }
    }
}
