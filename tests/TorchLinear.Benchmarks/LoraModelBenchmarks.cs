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
    /// LoraModel on a model of four square Linear layers (ReLU between; 512 wide as the goals are set, and 1024 wide to
    /// show how the adapters' share changes with the layer), with an r = 8 adapter on every one, on a 64-row batch: the
    /// base model, the model after merge_and_unload (goal: the base model's cost), and the model with
    /// its adapters unmerged (goal: at most 1.15×), and the adapters' own work without the model around it (two thin
    /// GEMMs per layer, as the hook runs them). LoraMergeBenchmarks times merge_and_unload itself.
    /// </summary>
    [MemoryDiagnoser]
    public class LoraModelBenchmarks : ThreadsBenchmark
    {
        private const int Rows = 64, Rank = 8, Alpha = 16;
        private Sequential _base = null!, _control = null!, _merged = null!, _unmerged = null!;
        private Tensor _x = null!, _output = null!;
        private (Tensor A, Tensor B)[] _adapters = null!;

        [Params(512, 1024)]
        public int Width { get; set; }

        internal static Sequential Model(int width = 512)
        {
            manual_seed(0);
            return nn.Sequential(("0", nn.Linear(width, width)), ("1", nn.ReLU()), ("2", nn.Linear(width, width)), ("3", nn.ReLU()),
                                 ("4", nn.Linear(width, width)), ("5", nn.ReLU()), ("6", nn.Linear(width, width)));
        }

        internal static Sequential Adapted(int width = 512)
        {
            var model = Model(width);
            manual_seed(1);
            LoraModel.inject(model, new LoraConfig { r = Rank, lora_alpha = Alpha, target_modules_regex = "all-linear" });
            using (no_grad())
            {
                foreach (var (name, parameter) in model.named_parameters().Where(p => p.name.EndsWith("lora_B.weight", StringComparison.Ordinal)))
                    parameter.normal_(0, 0.01);
            }
            model.eval();
            return model;
        }

        [GlobalSetup]
        public void Setup()
        {
            UseThreads();
            _base = Model(Width);
            _base.eval();
            _control = Model(Width);
            _control.eval();
            _unmerged = Adapted(Width);
            _merged = Adapted(Width);
            LoraModel.merge_and_unload(_merged);
            manual_seed(2);
            _x = randn(Rows, Width);
            _output = zeros(Rows, Width);
            var weights = _unmerged.named_parameters().ToDictionary(p => p.name, p => (Tensor)p.parameter);
            _adapters = new[] { "0", "2", "4", "6" }.Select(layer => (weights[layer + ".lora_A.weight"], weights[layer + ".lora_B.weight"])).ToArray();
        }

        [GlobalCleanup]
        public void Cleanup()
        {
            foreach (var model in new[] { _base, _control, _merged, _unmerged })
                model.Dispose();
            _x.Dispose();
            _output.Dispose();
            RestoreThreads();
        }

        private Tensor Forward(Sequential model)
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            return model.call(_x).MoveToOuterDisposeScope();
        }

        [Benchmark(Baseline = true, Description = "base model")]
        public void Base() => Forward(_base).Dispose();

        /// <summary>The same base model again: its ratio measures nothing but this machine's noise.</summary>
        [Benchmark(Description = "base model again (control)")]
        public void Control() => Forward(_control).Dispose();

        [Benchmark(Description = "merge_and_unload'ed")]
        public void Merged() => Forward(_merged).Dispose();

        [Benchmark(Description = "adapters unmerged")]
        public void Unmerged() => Forward(_unmerged).Dispose();

        /// <summary>
        /// What the four hooks add to the base model's work, without the model: for each adapter, the hook's two GEMMs on
        /// the 64-row input, the second accumulating into an output with the adapters' scaling.
        /// </summary>
        [Benchmark(Description = "the adapters' work alone")]
        public void AdaptersAlone()
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            foreach (var (a, b) in _adapters)
                _output.addmm_(_x.mm(a.t()), b.t(), 1, (float)Alpha / Rank);
        }
    }

    /// <summary>
    /// merge_and_unload of the four-adapter model (512 wide) against one forward of the base model on a 64-row batch (goal: less
    /// time). Each measured call needs a freshly adapted model, built before it (IterationSetup): one call per iteration.
    /// </summary>
    [MemoryDiagnoser]
    [InvocationCount(1)]
    public class LoraMergeBenchmarks : ThreadsBenchmark
    {
        private Sequential _base = null!;
        private Sequential? _fresh, _done;
        private Tensor _x = null!;

        [GlobalSetup]
        public void Setup()
        {
            UseThreads();
            _base = LoraModelBenchmarks.Model();
            _base.eval();
            manual_seed(2);
            _x = randn(64, 512);
        }

        [GlobalCleanup]
        public void Cleanup()
        {
            _base.Dispose();
            _x.Dispose();
            RestoreThreads();
        }

        [IterationSetup(Target = nameof(MergeAndUnload))]
        public void Prepare() => _fresh = LoraModelBenchmarks.Adapted();

        [IterationCleanup(Target = nameof(MergeAndUnload))]
        public void Release()
        {
            _done?.Dispose();
            _done = null;
        }

        [Benchmark(Baseline = true, Description = "one forward of the base model")]
        public void Forward()
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            _base.call(_x);
        }

        [Benchmark(Description = "merge_and_unload, 4 adapters")]
        public void MergeAndUnload()
        {
            // Without IterationSetup (a test calling the method directly), the model is built and freed here.
            var model = _fresh ?? LoraModelBenchmarks.Adapted();
            bool prepared = _fresh is not null;
            _fresh = null;
            LoraModel.merge_and_unload(model);
            if (prepared)
                _done = model;
            else
                model.Dispose();
        }
    }
}
