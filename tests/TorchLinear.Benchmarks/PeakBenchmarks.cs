using BenchmarkDotNet.Attributes;
using static TorchSharp.torch;

namespace TorchLinear.Benchmarks
{
    /// <summary>This CPU's measured matrix-multiply peak: a plain large torch.mm, in the same run as the layers.</summary>
    [MemoryDiagnoser]
    public class PeakBenchmarks : ThreadsBenchmark
    {
        public const long Size = 2048;
        private Tensor _a = null!, _b = null!;

        [GlobalSetup]
        public void Setup()
        {
            UseThreads();
            manual_seed(0);
            _a = randn(Size, Size);
            _b = randn(Size, Size);
        }

        [GlobalCleanup]
        public void Cleanup()
        {
            _a.Dispose();
            _b.Dispose();
            RestoreThreads();
        }

        [Benchmark(Description = "torch.mm 2048×2048×2048")]
        public void MatrixMultiply()
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            _a.mm(_b);
        }
    }
}
