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
    /// CustomLinear keeps its Wᵀ view between calls (that is where it beats nn.Linear on small layers). Each way a kept
    /// view could go wrong has a test here; every test compares against nn.Linear doing the same thing.
    /// </summary>
    public class CustomLinearCacheTests
    {
        private static (Linear builtIn, CustomLinear custom) Pair(long inFeatures, long outFeatures, int seed)
        {
            manual_seed(seed);
            var builtIn = nn.Linear(inFeatures, outFeatures);
            var custom = new CustomLinear(new Parameter(builtIn.weight.detach().clone()), new Parameter(builtIn.bias!.detach().clone()));
            return (builtIn, custom);
        }

        private static void TrainStep(nn.Module<Tensor, Tensor> layer, optim.Optimizer optimizer, Tensor x, Tensor y)
        {
            using var scope = NewDisposeScope();
            optimizer.zero_grad();
            nn.functional.mse_loss(layer.forward(x), y).backward();
            optimizer.step();
        }

        [Fact]
        public void ViewFirstMadeUnderNoGrad_StillCarriesTheGradientLater()
        {
            var (builtIn, custom) = Pair(6, 4, 1);
            using var _b = builtIn;
            using var _c = custom;
            using var x = randn(5, 6);
            using (no_grad())
            {
                custom.forward(x).Dispose();  // the view is made here, inside no_grad
                builtIn.forward(x).Dispose();
            }

            var comparison = Equivalence.CompareModules(builtIn, custom, x);

            Assert.True(comparison.BitExact, comparison.ToString());
            using (var loss = custom.forward(x).sum())
                loss.backward();
            Assert.NotNull(custom.weight.grad);
        }

        [Fact]
        public void InPlaceOptimizerUpdates_TrainExactlyLikeNnLinear()
        {
            var (builtIn, custom) = Pair(8, 3, 2);
            using var _b = builtIn;
            using var _c = custom;
            using var x = randn(16, 8);
            using var x3 = randn(2, 16, 8);
            using var y = randn(16, 3);
            using var y3 = randn(2, 16, 3);
            using var builtInOptimizer = optim.Adam(builtIn.parameters(), lr: 0.01);
            using var customOptimizer = optim.Adam(custom.parameters(), lr: 0.01);

            for (int step = 0; step < 50; step++)
            {
                // Alternate the addmm (2-D) and matmul (3-D) paths; both use the kept view.
                TrainStep(builtIn, builtInOptimizer, step % 2 == 0 ? x : x3, step % 2 == 0 ? y : y3);
                TrainStep(custom, customOptimizer, step % 2 == 0 ? x : x3, step % 2 == 0 ? y : y3);
            }

            Assert.True(Equivalence.Compare(builtIn.weight, custom.weight).BitExact);
            Assert.True(Equivalence.Compare(builtIn.bias!, custom.bias!).BitExact);
        }

        [Fact]
        public void ToAnotherDtype_AfterTheViewWasMade_UsesTheNewWeight()
        {
            var (builtIn, custom) = Pair(6, 4, 3);
            using var _b = builtIn;
            using var _c = custom;
            using var x = randn(5, 6);
            custom.forward(x).Dispose();

            builtIn.to(ScalarType.Float64);
            custom.to(ScalarType.Float64);
            using var x64 = x.to(ScalarType.Float64);

            Assert.True(Equivalence.CompareModules(builtIn, custom, x64).BitExact);
        }

        [Fact]
        public void WeightSetter_AfterTheViewWasMade_UsesTheNewWeight()
        {
            using var layer = new CustomLinear(3, 2, bias: false);
            using var x = ones(3);
            layer.forward(x).Dispose();

            layer.weight = new Parameter(tensor(new float[,] { { 1, 2, 3 }, { 4, 5, 6 } }));

            using var y = layer.forward(x);
            Assert.Equal(new float[] { 6, 15 }, y.data<float>().ToArray());
        }

        [Fact]
        public void LoadStateDict_AfterTheViewWasMade_IsSeenByTheNextCall()
        {
            using var layer = new CustomLinear(3, 2);
            using var x = ones(2, 3);
            layer.forward(x).Dispose();

            layer.load_state_dict(new Dictionary<string, Tensor>
            {
                ["weight"] = tensor(new float[,] { { 1, 2, 3 }, { 4, 5, 6 } }),
                ["bias"] = tensor(new float[] { 0, 1 }),
            });

            using var y = layer.forward(x);
            Assert.Equal(new float[] { 6, 16, 6, 16 }, y.data<float>().ToArray());
        }

        [Fact]
        public void CallersDisposeScope_DoesNotFreeTheKeptView()
        {
            var (builtIn, custom) = Pair(6, 4, 4);
            using var _b = builtIn;
            using var _c = custom;
            using var x = randn(5, 6);
            using (NewDisposeScope())
            {
                custom.forward(x);  // first call, inside a scope: the view is made here
            }

            using var expected = builtIn.forward(x);
            using var actual = custom.forward(x);
            Assert.True(Equivalence.Compare(expected, actual).BitExact);
        }

        [Fact]
        public void FreezingAndUnfreezingTheWeight_AfterTheViewWasMade_IsRespected()
        {
            var (builtIn, custom) = Pair(6, 4, 5);
            using var _b = builtIn;
            using var _c = custom;
            using var x = randn(5, 6);
            custom.forward(x).Dispose();  // view made while the weight requires grad

            custom.weight.requires_grad_(false);
            using (var loss = custom.forward(x).sum())
                loss.backward();
            Assert.Null(custom.weight.grad);          // a frozen weight gets no gradient
            Assert.NotNull(custom.bias!.grad);

            custom.weight.requires_grad_(true);
            builtIn.weight.requires_grad_(true);
            Assert.True(Equivalence.CompareModules(builtIn, custom, x).BitExact);
        }

        [Fact]
        public void FreezingAndUnfreezingEveryStep_KeepsAtMostTwoViews_AndTrainsLikeNnLinear()
        {
            // The layer used to keep every view it replaced until it was disposed: a loop that toggles requires_grad
            // each step grew by one tensor per toggle, without bound.
            var (builtIn, custom) = Pair(6, 4, seed: 9);
            using var _ = builtIn;
            using var __ = custom;
            using var x = randn(5, 6);
            using var y = randn(5, 4);
            using var sgdBuiltIn = optim.SGD(builtIn.parameters(), 0.1);
            using var sgdCustom = optim.SGD(custom.parameters(), 0.1);
            long live = 0;
            for (int step = 0; step < 200; step++)
            {
                bool frozen = step % 2 == 1;
                builtIn.weight.requires_grad_(!frozen);
                custom.weight.requires_grad_(!frozen);
                TrainStep(builtIn, sgdBuiltIn, x, y);
                TrainStep(custom, sgdCustom, x, y);
                if (step == 3)
                    live = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
            }
            Assert.Equal(live, DisposeScopeManager.Statistics.ThreadTotalLiveCount);
            Assert.True(Equivalence.Compare(builtIn.weight, custom.weight).BitExact);
            Assert.True(Equivalence.Compare(builtIn.bias!, custom.bias!).BitExact);
        }

        [Fact]
        public void WeightFrozenFromTheStart_ThenUnfrozen_Learns()
        {
            using var layer = new CustomLinear(4, 2);
            layer.weight.requires_grad_(false);
            using var x = randn(3, 4);
            layer.forward(x).Dispose();  // view made without gradient tracking

            layer.weight.requires_grad_(true);
            using (var loss = layer.forward(x).sum())
                loss.backward();

            Assert.NotNull(layer.weight.grad);
        }

        [Fact]
        public void Dispose_FreesTheKeptView()
        {
            using var x = randn(2, 3);
            var layer = new CustomLinear(3, 2);
            long withParameters = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
            layer.forward(x).Dispose();
            layer.weight.requires_grad_(false);
            layer.forward(x).Dispose();  // a second view; the first is retired
            Assert.Equal(withParameters + 2, DisposeScopeManager.Statistics.ThreadTotalLiveCount);

            layer.Dispose();

            // Weight, bias and both views are gone.
            Assert.Equal(withParameters - 2, DisposeScopeManager.Statistics.ThreadTotalLiveCount);
        }

        [Theory]
        [InlineData(new long[] { 1, 3 })]      // the fused addmm path
        [InlineData(new long[] { 2, 4, 3 })]   // the matmul path, with the input checked first
        [InlineData(new long[] { 3 })]
        public void ManagedAllocationPerCall_IsNoMoreThanNnLinears(long[] shape)
        {
            var (builtIn, custom) = Pair(3, 2, 6);
            using var _b = builtIn;
            using var _c = custom;
            using var x = randn(shape);
            using var _ = no_grad();
            long PerCall(nn.Module<Tensor, Tensor> layer)
            {
                for (int i = 0; i < 100; i++)
                    layer.forward(x).Dispose();
                long start = GC.GetAllocatedBytesForCurrentThread();
                for (int i = 0; i < 1000; i++)
                    layer.forward(x).Dispose();
                return (GC.GetAllocatedBytesForCurrentThread() - start) / 1000;
            }
            long builtInBytes = PerCall(builtIn);
            long customBytes = PerCall(custom);
            Assert.True(customBytes <= builtInBytes, $"CustomLinear allocates {customBytes} B per call, nn.Linear {builtInBytes} B");
        }
    }
}
