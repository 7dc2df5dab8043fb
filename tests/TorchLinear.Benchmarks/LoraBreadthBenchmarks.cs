using System;
using System.Linq;
using BenchmarkDotNet.Attributes;
using TorchLinear.Lora;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Benchmarks
{
    /// <summary>
    /// A 64-row batch whose rows use 8 different adapters (r = 8, on all four 512-wide layers of LoraModelBenchmarks'
    /// model; rows interleaved, row i using adapter i mod 8) through LoraModel.mixed_batch, against the same batch with
    /// one adapter (goal: at most 1.5×), and against what a service would do without mixed batches: one call per adapter
    /// on its 8 rows, with set_adapter before each. The control is the base model.
    /// </summary>
    [MemoryDiagnoser]
    public class MixedBatchBenchmarks : ThreadsBenchmark
    {
        private const int Rows = 64, Width = 512, Rank = 8, Alpha = 16, AdapterCount = 8;
        private Sequential _model = null!, _base = null!;
        private Tensor _x = null!;
        private string[] _names = null!, _rows = null!;

        [GlobalSetup]
        public void Setup()
        {
            UseThreads();
            _base = LoraModelBenchmarks.Model(Width);
            _base.eval();
            _model = LoraModelBenchmarks.Model(Width);
            _names = Enumerable.Range(0, AdapterCount).Select(i => i == 0 ? LoraModel.DefaultAdapter : $"adapter{i}").ToArray();
            manual_seed(1);
            foreach (string name in _names)
                LoraModel.Inject(_model, new LoraConfig { r = Rank, lora_alpha = Alpha, TargetModulesRegex = "all-linear" }, name);
            using (no_grad())
            {
                foreach (var (name, parameter) in _model.named_parameters().Where(p => p.name.Contains(".lora_B.", StringComparison.Ordinal)))
                    parameter.normal_(0, 0.01);
            }
            _model.eval();
            _rows = Enumerable.Range(0, Rows).Select(r => _names[r % AdapterCount]).ToArray();
            manual_seed(2);
            _x = randn(Rows, Width);
        }

        [GlobalCleanup]
        public void Cleanup()
        {
            _model.Dispose();
            _base.Dispose();
            _x.Dispose();
            RestoreThreads();
        }

        private static Tensor Forward(Sequential model, Tensor x)
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            return model.call(x).MoveToOuterDisposeScope();
        }

        [Benchmark(Baseline = true, Description = "one adapter, whole batch")]
        public void OneAdapter() => Forward(_model, _x).Dispose();

        [Benchmark(Description = "8 adapters, 8 rows each (mixed_batch)")]
        public void Mixed()
        {
            using (LoraModel.MixedBatch(_model, _rows))
                Forward(_model, _x).Dispose();
        }

        [Benchmark(Description = "8 adapters, one call each (set_adapter, 8 rows)")]
        public void CallPerAdapter()
        {
            for (int i = 0; i < AdapterCount; i++)
            {
                LoraModel.set_adapter(_model, _names[i]);
                using var rows = _x.narrow(0, i * (Rows / AdapterCount), Rows / AdapterCount);
                Forward(_model, rows).Dispose();
            }
            LoraModel.set_adapter(_model, _names[0]);
        }

        /// <summary>The base model: the adapters' share of the baseline.</summary>
        [Benchmark(Description = "base model (control)")]
        public void Base() => Forward(_base, _x).Dispose();
    }

    /// <summary>
    /// DoRA's unmerged cost against plain LoRA's on LoraModelBenchmarks' model (four 512-wide layers, r = 8, 64 rows):
    /// per layer DoRA adds B A, the rows' norm of W + scaling · B A, and the rescaling. Merged, DoRA costs the base
    /// model's forward.
    /// </summary>
    [MemoryDiagnoser]
    public class DoraBenchmarks : ThreadsBenchmark
    {
        private const int Rows = 64, Width = 512;
        private Sequential _lora = null!, _dora = null!, _merged = null!;
        private Tensor _x = null!;

        [GlobalSetup]
        public void Setup()
        {
            UseThreads();
            _lora = LoraModelBenchmarks.Adapted(Width);
            _dora = LoraModelBenchmarks.Adapted(Width, dora: true);
            _merged = LoraModelBenchmarks.Adapted(Width, dora: true);
            LoraModel.merge_and_unload(_merged);
            manual_seed(2);
            _x = randn(Rows, Width);
        }

        [GlobalCleanup]
        public void Cleanup()
        {
            _lora.Dispose();
            _dora.Dispose();
            _merged.Dispose();
            _x.Dispose();
            RestoreThreads();
        }

        private Tensor Forward(Sequential model)
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            return model.call(_x).MoveToOuterDisposeScope();
        }

        [Benchmark(Baseline = true, Description = "LoRA unmerged")]
        public void Lora() => Forward(_lora).Dispose();

        [Benchmark(Description = "DoRA unmerged")]
        public void Dora() => Forward(_dora).Dispose();

        [Benchmark(Description = "DoRA merged (merge_and_unload)")]
        public void DoraMerged() => Forward(_merged).Dispose();
    }
}
