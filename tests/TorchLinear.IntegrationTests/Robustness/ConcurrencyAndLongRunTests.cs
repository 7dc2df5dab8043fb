using System;
using System.Runtime.InteropServices;
using System.Collections.Concurrent;
using System.Diagnostics;
using System.Linq;
using System.Threading;
using TorchSharp;
using Xunit;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace TorchLinear.IntegrationTests.Robustness
{
    public class ConcurrencyAndLongRunTests
    {
        private readonly ITestOutputHelper _output;

        public ConcurrencyAndLongRunTests(ITestOutputHelper output) => _output = output;

        [Fact]
        public void OneModule_EightThreads_GiveTheSequentialResultsBitForBit_AndLeakNothing()
        {
            const int Threads = 8, Calls = 2000, Inputs = 256;
            manual_seed(31);
            using var reference = new CustomLinear(64, 32);
            // The layer under test has never run: its threads race to make its kept Wᵀ view.
            using var layer = new CustomLinear(new TorchSharp.Modules.Parameter(reference.weight.detach().clone()), new TorchSharp.Modules.Parameter(reference.bias!.detach().clone()));
            var inputs = Enumerable.Range(0, Inputs).Select(_ => randn(4, 64)).ToArray();
            float[][] sequential;
            using (no_grad())
                sequential = inputs.Select(x => { using var y = reference.forward(x); return y.data<float>().ToArray(); }).ToArray();

            long mainThreadLive = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
            var failures = new ConcurrentQueue<string>();
            var leftPerThread = new long[Threads];
            var workers = Enumerable.Range(0, Threads).Select(t => new Thread(() =>
            {
                try
                {
                    using var _ = no_grad();  // grad mode is per thread in libtorch
                    long threadLive = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
                    for (int i = 0; i < Calls; i++)
                    {
                        int which = (t * 37 + i) % Inputs;  // each thread walks the inputs in its own order
                        using var scope = NewDisposeScope();
                        float[] result = layer.forward(inputs[which]).data<float>().ToArray();
                        if (!result.Select(BitConverter.SingleToInt32Bits).SequenceEqual(sequential[which].Select(BitConverter.SingleToInt32Bits)))
                            failures.Enqueue($"thread {t}, call {i}, input {which}: differs from the sequential result");
                    }
                    leftPerThread[t] = DisposeScopeManager.Statistics.ThreadTotalLiveCount - threadLive;
                }
                catch (Exception e)
                {
                    failures.Enqueue($"thread {t} threw {e}");
                }
            })).ToList();

            workers.ForEach(w => w.Start());
            workers.ForEach(w => w.Join());

            Assert.True(failures.IsEmpty, string.Join(Environment.NewLine, failures.Take(10)));
            // Nothing is left alive but the layer's kept Wᵀ view, made once, by whichever thread came first.
            // (Counted per thread: other tests' tensors finalized meanwhile do not disturb these counts.)
            Assert.Equal(1, leftPerThread.Sum());
            Assert.Equal(mainThreadLive, DisposeScopeManager.Statistics.ThreadTotalLiveCount);
            foreach (var x in inputs)
                x.Dispose();
        }

        [Fact]
        public void HundredThousandTrainingSteps_LeakNoTensors_AndMemoryStaysFlat()
        {
            const int WarmUp = 5_000, Settle = 50_000, Steps = 100_000;
            manual_seed(32);
            using var layer = new CustomLinear(8, 4);
            using var optimizer = optim.SGD(layer.parameters(), 0.01);
            using var x = randn(16, 8);
            using var y = randn(16, 4);

            void Step()
            {
                using var scope = NewDisposeScope();
                optimizer.zero_grad();
                var loss = nn.functional.mse_loss(layer.forward(x), y);
                loss.backward();
                optimizer.step();
            }

            // Counted on this thread: tensors of other tests finalized meanwhile do not disturb the count.
            for (int i = 0; i < WarmUp; i++)
                Step();
            long liveAfterWarmUp = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
            // Memory is judged by what is allocated, not by the resident set: the process's RSS moves by ±2% from run to
            // run with nothing leaking (glibc returning and reusing pages; measured), which hid nothing and failed once.
            // The native heap in use (glibc's count of malloc'd bytes, where libtorch's CPU allocator takes tensors) and
            // the managed heap are counted after a settling stretch.
            for (int i = 0; i < Settle; i++)
                Step();
            long heapSettled = NativeHeapInUse(), managedSettled = GC.GetTotalMemory(forceFullCollection: true);
            var clock = Stopwatch.StartNew();
            for (int i = 0; i < Steps; i++)
                Step();
            clock.Stop();
            long heapAtEnd = NativeHeapInUse(), managedAtEnd = GC.GetTotalMemory(forceFullCollection: true);

            _output.WriteLine($"{Steps} steps in {clock.Elapsed.TotalSeconds:F1} s; live tensors {liveAfterWarmUp} → {DisposeScopeManager.Statistics.ThreadTotalLiveCount}; " +
                              $"native heap in use {heapSettled / 1048576.0:F2} → {heapAtEnd / 1048576.0:F2} MiB; managed {managedSettled / 1048576.0:F2} → {managedAtEnd / 1048576.0:F2} MiB");
            Assert.Equal(liveAfterWarmUp, DisposeScopeManager.Statistics.ThreadTotalLiveCount);
            // A leak of 10 bytes a step, native or managed, would add 1 MB.
            Assert.True(heapAtEnd - heapSettled < 1_000_000, $"the native heap grew by {heapAtEnd - heapSettled:N0} bytes over {Steps} steps");
            Assert.True(managedAtEnd - managedSettled < 1_000_000, $"the managed heap grew by {managedAtEnd - managedSettled:N0} bytes over {Steps} steps");
        }

        /// <summary>glibc's mallinfo2: the native heap's bytes in use (uordblks, small blocks) plus mmapped blocks (hblkhd).</summary>
        [StructLayout(LayoutKind.Sequential)]
        private struct MallInfo2
        {
            public nuint arena, ordblks, smblks, hblks, hblkhd, usmblks, fsmblks, uordblks, fordblks, keepcost;
        }

        [DllImport("libc", EntryPoint = "mallinfo2")]
        private static extern MallInfo2 mallinfo2();

        private static long NativeHeapInUse()
        {
            GC.Collect();
            GC.WaitForPendingFinalizers();
            GC.Collect();
            var info = mallinfo2();
            return (long)(info.uordblks + info.hblkhd);
        }
    }
}
