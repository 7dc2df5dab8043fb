using System;
using System.Collections.Generic;
using System.Linq;
using TorchSharp;
using TorchSharp.Modules;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Tests
{
    /// <summary>transformers' Conv1D as a library layer: its formula, its operations, its state_dict and its refusals.</summary>
    public class Conv1DTests
    {
        [Fact]
        public void WorkedExample_IsXTimesWPlusB_WithTheWeightStoredInByOut()
        {
            // W (nx=3, nf=2) = [[1,4],[2,5],[3,6]]: x W for x = [1,2,3] is [14, 32]; plus b = [0, 1] gives [14, 33].
            using var layer = new Conv1D(nf: 2, nx: 3);
            using (no_grad())
            {
                layer.weight.copy_(tensor(new float[,] { { 1, 4 }, { 2, 5 }, { 3, 6 } }));
                layer.bias.copy_(tensor(new float[] { 0, 1 }));
            }
            using var x = tensor(new float[] { 1, 2, 3 });
            using var y = layer.forward(x);
            Assert.Equal(new long[] { 2 }, y.shape);
            Assert.Equal(new float[] { 14, 33 }, y.data<float>().ToArray());
        }

        [Theory]
        [InlineData(1)]
        [InlineData(2)]
        [InlineData(3)]
        [InlineData(4)]
        public void Forward_IsTransformersAddmmComposition_BitForBit_AndCloseToLinearOfWTransposed(int rank)
        {
            using var scope = NewDisposeScope();
            manual_seed(7 + rank);
            var layer = new Conv1D(nf: 12, nx: 8);
            using (no_grad())
                layer.bias.normal_();
            long[] shape = new long[] { 3, 2, 5, 8 }[(4 - rank)..];
            var x = randn(shape);

            var y = layer.forward(x);
            // transformers' lines, written here independently: size_out = x.size()[:-1] + (nf,); addmm(bias, x.view(-1, nx), W); view(size_out).
            var sizeOut = shape[..^1].Append(12L).ToArray();
            var expected = layer.bias.addmm(x.view(-1, 8), layer.weight).view(sizeOut);
            Assert.Equal(sizeOut, y.shape);
            Assert.True(Equivalence.Compare(expected, y).BitExact);
            // The formula, through another operation: linear(x, Wᵀ, b).
            Equivalence.AssertClose(y, nn.functional.linear(x, layer.weight.t(), layer.bias));
        }

        [Fact]
        public void Forward_OnEmptyBatches_GivesEmptyOutputsOfTheRightShape()
        {
            using var scope = NewDisposeScope();
            var layer = new Conv1D(nf: 4, nx: 3);
            Assert.Equal(new long[] { 0, 4 }, layer.forward(zeros(0, 3)).shape);
            Assert.Equal(new long[] { 2, 0, 4 }, layer.forward(zeros(2, 0, 3)).shape);
        }

        [Fact]
        public void Backward_ReachesWeightBiasAndInput_AsTheFormulasGradients()
        {
            using var scope = NewDisposeScope();
            manual_seed(3);
            var layer = new Conv1D(nf: 5, nx: 4);
            var x = randn(2, 3, 4).requires_grad_(true);
            layer.forward(x).sum().backward();
            // d/dW sum(x W + b) = Σ_rows xᵀ 1, d/db = row count, d/dx = W summed over outputs.
            Equivalence.AssertClose(layer.weight.grad!, x.detach().view(-1, 4).sum(0L).unsqueeze(1).expand(4, 5));
            Equivalence.AssertClose(layer.bias.grad!, full(5, 6f));
            Equivalence.AssertClose(x.grad!, layer.weight.detach().sum(1L).expand(2, 3, 4));
        }

        [Fact]
        public void StateDict_HasTransformersKeysAndShapes_AndTheSizesAreReadable()
        {
            using var layer = new Conv1D(nf: 96, nx: 32);
            var state = layer.state_dict();
            Assert.Equal(new[] { "weight", "bias" }, state.Keys);
            Assert.Equal(new long[] { 32, 96 }, state["weight"].shape);
            Assert.Equal(new long[] { 96 }, state["bias"].shape);
            Assert.Equal((96L, 32L), (layer.nf, layer.nx));
            Assert.Equal("Conv1D(nf=96, nx=32)", layer.ToString());
            Assert.All(layer.parameters(), p => Assert.True(p.requires_grad));
        }

        [Fact]
        public void Initialisation_IsTransformers_NormalStd002WeightAndZeroBias()
        {
            manual_seed(11);
            using var layer = new Conv1D(nf: 64, nx: 48);
            manual_seed(11);
            using var expected = empty(48, 64).normal_(0, 0.02);
            Assert.True(Equivalence.Compare(expected, layer.weight.detach()).BitExact);
            Assert.All(layer.bias.data<float>().ToArray(), v => Assert.Equal(0f, v));
        }

        [Fact]
        public void Parameters_AreSettable_AndModuleToConvertsBoth()
        {
            using var scope = NewDisposeScope();
            var layer = new Conv1D(nf: 3, nx: 2);
            var newWeight = new Parameter(ones(2, 3));
            layer.weight = newWeight;
            Assert.Same(newWeight, layer.weight);
            Assert.Same(newWeight, layer.named_parameters().Single(p => p.name == "weight").parameter);
            var newBias = new Parameter(full(3, 2f));
            layer.bias = newBias;
            Assert.Same(newBias, layer.bias);
            Assert.Equal(newBias.Handle, layer.named_parameters().Single(p => p.name == "bias").parameter.Handle);

            layer.to(ScalarType.Float64);
            Assert.Equal(ScalarType.Float64, layer.weight.dtype);
            Assert.Equal(ScalarType.Float64, layer.bias.dtype);
            Assert.Equal(new double[] { 4, 4, 4 }, layer.forward(ones(1, 2, dtype: ScalarType.Float64)).data<double>().ToArray());
        }

        [Fact]
        public void Refusals_NameTheShapesAndDtypes()
        {
            using var scope = NewDisposeScope();
            var layer = new Conv1D(nf: 6, nx: 4);
            var shape = Assert.Throws<ArgumentException>(() => layer.forward(zeros(2, 5)));
            Assert.Contains("nx = 4", shape.Message);
            Assert.Contains("[2, 5]", shape.Message);
            Assert.Contains("Conv1D(nf=6, nx=4)", shape.Message);
            var scalar = Assert.Throws<ArgumentException>(() => layer.forward(tensor(1f)));
            Assert.Contains("0-d", scalar.Message);
            var dtype = Assert.Throws<ArgumentException>(() => layer.forward(zeros(2, 4, dtype: ScalarType.Float64)));
            Assert.Contains("Float64", dtype.Message);
            Assert.Contains("Float32", dtype.Message);
            var layout = Assert.Throws<ArgumentException>(() => layer.forward(zeros(4, 3, 2).transpose(0, 2)));
            Assert.Contains("contiguous", layout.Message);

            var weight = Assert.Throws<ArgumentException>(() => layer.weight = new Parameter(zeros(6, 4)));
            Assert.Contains("[4, 6]", weight.Message);
            Assert.Contains("[6, 4]", weight.Message);
            var bias = Assert.Throws<ArgumentException>(() => layer.bias = new Parameter(zeros(4)));
            Assert.Contains("[6]", bias.Message);
            var biasDtype = Assert.Throws<ArgumentException>(() => layer.bias = new Parameter(zeros(6, dtype: ScalarType.Float64)));
            Assert.Contains("Float64", biasDtype.Message);

            Assert.Throws<ArgumentOutOfRangeException>(() => new Conv1D(-1, 3));
            Assert.Throws<ArgumentOutOfRangeException>(() => new Conv1D(3, -1));
            Assert.Throws<ArgumentException>(() => new Conv1D(3, 2, dtype: ScalarType.Int64));

            // A (nf, nx) weight in a checkpoint is refused by name before anything is copied, even when it would broadcast.
            var square = new Conv1D(nf: 1, nx: 3);
            var before = square.weight.detach().clone();
            var load = Assert.ThrowsAny<InvalidOperationException>(() => square.load_state_dict(new Dictionary<string, Tensor> { ["weight"] = zeros(1, 3), ["bias"] = zeros(1) }));
            Assert.Contains("weight", load.Message);
            Assert.True(Equivalence.Compare(before, square.weight.detach()).BitExact);
        }

        [Fact]
        public void AdapterSlot_RunsThroughCallAndForwardAlike_AndAnEmptySlotChangesNothing()
        {
            using var scope = NewDisposeScope();
            manual_seed(31);
            var layer = new Conv1D(nf: 3, nx: 5);
            var x = randn(2, 4, 5);
            var plain = layer.forward(x);
            Assert.Null(layer.Adapter);

            int calls = 0;
            layer.Adapter = (input, output) =>
            {
                calls++;
                Assert.Same(x, input);
                return output.add_(1);
            };
            var expected = plain + 1;
            Assert.True(Equivalence.Compare(expected, layer.forward(x)).BitExact);
            Assert.True(Equivalence.Compare(expected, layer.call(x)).BitExact);
            Assert.Equal(2, calls);
            layer.Adapter = null;
            Assert.True(Equivalence.Compare(plain, layer.call(x)).BitExact);
        }

        [Fact]
        public void Forward_AndAnAdapterThatReturnsANewTensorOrThrows_LeaveNoTensorBehind()
        {
            using var layer = new Conv1D(nf: 3, nx: 5);
            using var x = randn(2, 4, 5);
            Leaks.AssertOnlyTheResultStaysAlive(() => layer.forward(x));
            layer.Adapter = (input, output) => output * 2;
            Leaks.AssertOnlyTheResultStaysAlive(() => layer.forward(x));
            layer.Adapter = (input, output) => throw new InvalidTimeZoneException("planted");
            long before = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
            Assert.Throws<InvalidTimeZoneException>(() => layer.forward(x));
            Assert.Equal(before, DisposeScopeManager.Statistics.ThreadTotalLiveCount);
        }

        [Fact]
        public void Dispose_ThenUse_Throws()
        {
            var layer = new Conv1D(nf: 3, nx: 2);
            layer.Dispose();
            Assert.Throws<ObjectDisposedException>(() => layer.weight);
            Assert.Throws<ObjectDisposedException>(() => layer.forward(zeros(1, 2)));
            Assert.Throws<ObjectDisposedException>(() => layer.state_dict());
        }
    }
}
