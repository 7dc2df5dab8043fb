using System;
using System.Collections.Concurrent;
using System.Diagnostics;
using System.Linq;
using System.Threading;
using TorchSharp;
using Xunit;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace TorchLinear.Tests.Robustness
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
            using var layer = new CustomLinear(64, 32);
            var inputs = Enumerable.Range(0, Inputs).Select(_ => randn(4, 64)).ToArray();
            float[][] sequential;
            using (no_grad())
                sequential = inputs.Select(x => { using var y = layer.forward(x); return y.data<float>().ToArray(); }).ToArray();

            long liveBefore = Tensor.TotalCount;
            var failures = new ConcurrentQueue<string>();
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
                    if (DisposeScopeManager.Statistics.ThreadTotalLiveCount != threadLive)
                        failures.Enqueue($"thread {t} left {DisposeScopeManager.Statistics.ThreadTotalLiveCount - threadLive} tensors alive");
                }
                catch (Exception e)
                {
                    failures.Enqueue($"thread {t} threw {e}");
                }
            })).ToList();

            workers.ForEach(w => w.Start());
            workers.ForEach(w => w.Join());

            Assert.True(failures.IsEmpty, string.Join(Environment.NewLine, failures.Take(10)));
            Assert.Equal(liveBefore, Tensor.TotalCount);
            foreach (var x in inputs)
                x.Dispose();
        }

        [Fact]
        public void HundredThousandTrainingSteps_LeakNoTensors_AndMemoryStaysFlat()
        {
            const int WarmUp = 5_000, Steps = 100_000;
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

            for (int i = 0; i < WarmUp; i++)
                Step();
            long liveAfterWarmUp = Tensor.TotalCount;
            long rssAfterWarmUp = Rss();
            var clock = Stopwatch.StartNew();
            for (int i = 0; i < Steps; i++)
                Step();
            clock.Stop();
            long rssAtEnd = Rss();

            double growth = (double)(rssAtEnd - rssAfterWarmUp) / rssAfterWarmUp;
            _output.WriteLine($"{Steps} steps in {clock.Elapsed.TotalSeconds:F1} s; live tensors {liveAfterWarmUp} → {Tensor.TotalCount}; RSS {rssAfterWarmUp / 1048576.0:F1} → {rssAtEnd / 1048576.0:F1} MiB ({growth:P2})");
            Assert.Equal(liveAfterWarmUp, Tensor.TotalCount);
            Assert.True(growth < 0.05, $"RSS grew {growth:P1} over {Steps} steps");
        }

        private static long Rss()
        {
            GC.Collect();
            GC.WaitForPendingFinalizers();
            GC.Collect();
            using var process = Process.GetCurrentProcess();
            return process.WorkingSet64;
        }
    }
}
