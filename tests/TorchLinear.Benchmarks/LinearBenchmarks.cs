using System.Linq;
using BenchmarkDotNet.Attributes;
using BenchmarkDotNet.Configs;
using TorchLinear.Samples;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Benchmarks
{
    /// <summary>
    /// CustomLinear and the other formulations against nn.Linear (the baseline of every group, so the Ratio column
    /// is the figure), for inference under no_grad and for training (forward + backward), on 1 and 2 threads.
    /// Every call runs in its own dispose scope, so nothing accumulates across the run.
    /// </summary>
    [MemoryDiagnoser]
    [GroupBenchmarksBy(BenchmarkLogicalGroupRule.ByCategory, BenchmarkLogicalGroupRule.ByParams)]
    [CategoriesColumn]
    public class LinearBenchmarks : ThreadsBenchmark
    {
        private Linear _builtIn = null!;
        private CustomLinear _custom = null!;
        private Parameter _weight = null!, _bias = null!;
        private Tensor _input = null!, _gradOutput = null!;

        [Params(Shape.Tiny_1x3to2, Shape.Small_32x128to128, Shape.Batch_64x1024to1024, Shape.Sequence_8x128x768to768, Shape.Large_512x2048to2048)]
        public Shape Shape { get; set; }

        [GlobalSetup]
        public void Setup()
        {
            UseThreads();
            var (input, inFeatures, outFeatures) = Shapes.Of(Shape);
            manual_seed(0);
            _builtIn = nn.Linear(inFeatures, outFeatures);
            _custom = new CustomLinear(new Parameter(_builtIn.weight.detach().clone()), new Parameter(_builtIn.bias!.detach().clone()));
            _weight = new Parameter(_builtIn.weight.detach().clone());
            _bias = new Parameter(_builtIn.bias!.detach().clone());
            _input = randn(input);
            _gradOutput = ones(input[..^1].Append(outFeatures).ToArray());
        }

        [GlobalCleanup]
        public void Cleanup()
        {
            foreach (var t in new Tensor[] { _weight, _bias, _input, _gradOutput })
                t.Dispose();
            _builtIn.Dispose();
            _custom.Dispose();
            RestoreThreads();
        }

        // ---- Inference: forward under no_grad ----------------------------------------------------------

        [BenchmarkCategory("Inference"), Benchmark(Baseline = true, Description = "nn.Linear")]
        public void Inference_NnLinear() => Infer(() => _builtIn.forward(_input));

        [BenchmarkCategory("Inference"), Benchmark(Description = "functional.linear")]
        public void Inference_FunctionalLinear() => Infer(() => nn.functional.linear(_input, _weight, _bias));

        [BenchmarkCategory("Inference"), Benchmark(Description = "CustomLinear")]
        public void Inference_CustomLinear() => Infer(() => _custom.forward(_input));

        [BenchmarkCategory("Inference"), Benchmark(Description = "LinearFunctional.linear")]
        public void Inference_LinearFunctional() => Infer(() => LinearFunctional.linear(_input, _weight, _bias));

        [BenchmarkCategory("Inference"), Benchmark(Description = "matmul(x, W.T) + b")]
        public void Inference_Article() => Infer(() => LinearFormulas.Article(_input, _weight, _bias));

        // ---- Training: forward and backward ------------------------------------------------------------

        [BenchmarkCategory("Training"), Benchmark(Baseline = true, Description = "nn.Linear")]
        public void Training_NnLinear() => Train(() => _builtIn.forward(_input));

        [BenchmarkCategory("Training"), Benchmark(Description = "functional.linear")]
        public void Training_FunctionalLinear() => Train(() => nn.functional.linear(_input, _weight, _bias));

        [BenchmarkCategory("Training"), Benchmark(Description = "CustomLinear")]
        public void Training_CustomLinear() => Train(() => _custom.forward(_input));

        [BenchmarkCategory("Training"), Benchmark(Description = "LinearFunctional.linear")]
        public void Training_LinearFunctional() => Train(() => LinearFunctional.linear(_input, _weight, _bias));

        [BenchmarkCategory("Training"), Benchmark(Description = "matmul(x, W.T) + b")]
        public void Training_Article() => Train(() => LinearFormulas.Article(_input, _weight, _bias));

        private static void Infer(System.Func<Tensor> forward)
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            forward();
        }

        private void Train(System.Func<Tensor> forward)
        {
            // Gradients accumulate into .grad in place; every contender pays the same for that.
            using var scope = NewDisposeScope();
            forward().backward(new[] { _gradOutput });
        }
    }
}
