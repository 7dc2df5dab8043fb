using System;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Tests
{
    /// <summary>The one leak check the forward tests share.</summary>
    internal static class Leaks
    {
        /// <summary>
        /// Calls <paramref name="call"/> once to warm up (a layer may keep state from its first call), then asserts that
        /// a call leaves exactly one more native tensor alive on this thread (its result) and none once that is disposed.
        /// </summary>
        public static void AssertOnlyTheResultStaysAlive(Func<Tensor> call)
        {
            call().Dispose();
            long before = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
            using (call())
                Assert.Equal(before + 1, DisposeScopeManager.Statistics.ThreadTotalLiveCount);
            Assert.Equal(before, DisposeScopeManager.Statistics.ThreadTotalLiveCount);
        }
    }
}
