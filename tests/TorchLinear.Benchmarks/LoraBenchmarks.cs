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
    /// What a LoRA adapter costs at inference: the frozen base layer (baseline), LoraLinear unmerged (r = 8: two small
    /// extra products per call) and merged (one linear with W + Δ), and the unmerged forward's adapter work alone.
    /// </summary>
    [MemoryDiagnoser]
    [GroupBenchmarksBy(BenchmarkLogicalGroupRule.ByCategory, BenchmarkLogicalGroupRule.ByParams)]
    [CategoriesColumn]
    public class LoraBenchmarks : ThreadsBenchmark
    {
        private CustomLinear _base = null!;
        private LoraLinear _unmerged = null!, _merged = null!;
        private Tensor _input = null!, _output = null!;

        [Params(Shape.Batch_64x1024to1024, Shape.Sequence_8x128x768to768)]
        public Shape Shape { get; set; }

        [GlobalSetup]
        public void Setup()
        {
            UseThreads();
            var (input, inFeatures, outFeatures) = Shapes.Of(Shape);
            manual_seed(0);
            _base = new CustomLinear(inFeatures, outFeatures);
            _unmerged = LoraLinear.FromLinear(_base, r: 8, lora_alpha: 16);
            _merged = LoraLinear.FromLinear(_base, r: 8, lora_alpha: 16);
            using (no_grad())
            {
                // A trained-looking adapter: B is not zero.
                _unmerged.lora_B.normal_(0, 0.01);
                _merged.lora_B.copy_(_unmerged.lora_B);
            }
            _merged.merge();
            _unmerged.eval();
            _merged.eval();
            _input = randn(input);
            _output = zeros(input[..^1].Append(outFeatures).ToArray());
        }

        [GlobalCleanup]
        public void Cleanup()
        {
            _input.Dispose();
            _output.Dispose();
            _base.Dispose();
            _unmerged.Dispose();
            _merged.Dispose();
            RestoreThreads();
        }

        [BenchmarkCategory("LoRA inference"), Benchmark(Baseline = true, Description = "base CustomLinear")]
        public void Base() => Infer(_base);

        [BenchmarkCategory("LoRA inference"), Benchmark(Description = "LoraLinear r=8, unmerged")]
        public void Unmerged() => Infer(_unmerged);

        [BenchmarkCategory("LoRA inference"), Benchmark(Description = "LoraLinear r=8, merged")]
        public void Merged() => Infer(_merged);

        [BenchmarkCategory("LoRA inference"), Benchmark(Description = "adapter work alone")]
        public void AdapterAlone()
        {
            // What the unmerged forward does beyond the base layer: (x Aᵀ Bᵀ) · scaling, added to an output.
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            _output.add_(_input.matmul(_unmerged.lora_A.t()).matmul(_unmerged.lora_B.t()).mul_(_unmerged.scaling));
        }

        private void Infer(nn.Module<Tensor, Tensor> layer)
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            layer.forward(_input);
        }
    }
}
