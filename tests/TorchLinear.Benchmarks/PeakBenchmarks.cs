using BenchmarkDotNet.Attributes;
using static TorchSharp.torch;

namespace TorchLinear.Benchmarks
{
    /// <summary>This CPU's measured matrix-multiply peak: a plain large torch.mm, in the same run as the layers.</summary>
    [MemoryDiagnoser]
    public class PeakBenchmarks : RoundsBenchmark
    {
        public const long Size = 2048;
        private Tensor _a = null!, _b = null!;
        private int _threadsBefore;

        [Params(1, 2)]
        public int Threads { get; set; }

        [GlobalSetup]
        public void Setup()
        {
            _threadsBefore = get_num_threads();
            set_num_threads(Threads);
            manual_seed(0);
            _a = randn(Size, Size);
            _b = randn(Size, Size);
        }

        [GlobalCleanup]
        public void Cleanup()
        {
            _a.Dispose();
            _b.Dispose();
            set_num_threads(_threadsBefore);
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
