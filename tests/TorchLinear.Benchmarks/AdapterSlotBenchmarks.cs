using BenchmarkDotNet.Attributes;
using TorchSharp;
using static TorchSharp.torch;

namespace TorchLinear.Benchmarks
{
    /// <summary>
    /// What CustomLinear's Adapter slot costs on the smallest layer, where a per-call cost shows most (1×3→2, inference):
    /// nn.Linear (baseline), functional.linear (the control: the same native call, so its ratio is this machine's noise),
    /// CustomLinear with its slot empty (every CustomLinear: goal, within the control's noise of what it cost before the
    /// slot), and with a no-op adapter in the slot (the delegate's call).
    /// </summary>
    [MemoryDiagnoser]
    public class AdapterSlotBenchmarks : ThreadsBenchmark
    {
        private TorchSharp.Modules.Linear _linear = null!;
        private CustomLinear _empty = null!, _occupied = null!;
        private Tensor _x = null!;

        [GlobalSetup]
        public void Setup()
        {
            UseThreads();
            manual_seed(0);
            _linear = nn.Linear(3, 2);
            _empty = new CustomLinear(3, 2);
            _occupied = new CustomLinear(3, 2) { Adapter = (input, output) => output };
            _x = randn(1, 3);
        }

        [GlobalCleanup]
        public void Cleanup()
        {
            _linear.Dispose();
            _empty.Dispose();
            _occupied.Dispose();
            _x.Dispose();
            RestoreThreads();
        }

        [Benchmark(Baseline = true, Description = "nn.Linear")]
        public void Linear() => Infer(() => _linear.forward(_x));

        [Benchmark(Description = "functional.linear (control)")]
        public void Functional() => Infer(() => nn.functional.linear(_x, _linear.weight, _linear.bias));

        [Benchmark(Description = "CustomLinear, empty slot")]
        public void Empty() => Infer(() => _empty.forward(_x));

        [Benchmark(Description = "CustomLinear, no-op adapter")]
        public void Occupied() => Infer(() => _occupied.forward(_x));

        // As LinearBenchmarks' inference cases, so that the CustomLinear ratios compare.
        private static void Infer(System.Func<Tensor> forward)
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            forward();
        }
    }
}
