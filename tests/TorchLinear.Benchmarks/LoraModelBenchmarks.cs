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
    /// its adapters unmerged (goal: at most 1.15×) — in nn.Linear layers (a forward hook) and in CustomLinear layers (the
    /// Adapter slot) — the adapters' own work without the model around it (two thin GEMMs per layer, as the hook runs
    /// them), and a training step of the adapters alone with Adam. pytorch/lora_model.py times the same model and
    /// adapters in PyTorch. LoraMergeBenchmarks times merge_and_unload itself.
    /// </summary>
    [MemoryDiagnoser]
    public class LoraModelBenchmarks : ThreadsBenchmark
    {
        private const int Rows = 64, Rank = 8, Alpha = 16;
        private Sequential _base = null!, _control = null!, _merged = null!, _unmerged = null!, _custom = null!, _trained = null!;
        private optim.Optimizer _adam = null!;
        private Tensor _x = null!, _y = null!, _output = null!;
        private (Tensor A, Tensor B)[] _adapters = null!;

        [Params(512, 1024)]
        public int Width { get; set; }

        internal static Sequential Model(int width = 512)
        {
            manual_seed(0);
            return nn.Sequential(("0", nn.Linear(width, width)), ("1", nn.ReLU()), ("2", nn.Linear(width, width)), ("3", nn.ReLU()),
                                 ("4", nn.Linear(width, width)), ("5", nn.ReLU()), ("6", nn.Linear(width, width)));
        }

        /// <summary>The same model of CustomLinear layers (whose adapters run in their Adapter slot).</summary>
        internal static Sequential CustomModel(int width = 512)
        {
            manual_seed(0);
            return nn.Sequential(("0", new CustomLinear(width, width)), ("1", nn.ReLU()), ("2", new CustomLinear(width, width)), ("3", nn.ReLU()),
                                 ("4", new CustomLinear(width, width)), ("5", nn.ReLU()), ("6", new CustomLinear(width, width)));
        }

        internal static Sequential Adapted(int width = 512, bool custom = false, bool dora = false)
        {
            var model = custom ? CustomModel(width) : Model(width);
            manual_seed(1);
            LoraModel.Inject(model, new LoraConfig { r = Rank, lora_alpha = Alpha, TargetModulesRegex = "all-linear", use_dora = dora });
            using (no_grad())
            {
                foreach (var (name, parameter) in model.named_parameters().Where(p => p.name.EndsWith("lora_B.default.weight", StringComparison.Ordinal)))
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
            _custom = Adapted(Width, custom: true);
            _trained = Adapted(Width);
            _trained.train();
            // Only the adapters require grad after inject.
            _adam = optim.Adam(_trained.parameters().Where(p => p.requires_grad), lr: 1e-3);
            manual_seed(2);
            _x = randn(Rows, Width);
            _y = randn(Rows, Width);
            _output = zeros(Rows, Width);
            var weights = _unmerged.named_parameters().ToDictionary(p => p.name, p => (Tensor)p.parameter);
            _adapters = new[] { "0", "2", "4", "6" }.Select(layer => (weights[layer + ".lora_A.default.weight"], weights[layer + ".lora_B.default.weight"])).ToArray();
        }

        [GlobalCleanup]
        public void Cleanup()
        {
            foreach (var model in new[] { _base, _control, _merged, _unmerged, _custom, _trained })
                model.Dispose();
            _adam.Dispose();
            _x.Dispose();
            _y.Dispose();
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

        [Benchmark(Description = "adapters unmerged, CustomLinear layers")]
        public void UnmergedCustom() => Forward(_custom).Dispose();

        /// <summary>zero_grad, forward, MSE loss, backward and an Adam step over the adapters' parameters only.</summary>
        [Benchmark(Description = "adapters-only Adam step")]
        public void AdamStep()
        {
            using var scope = NewDisposeScope();
            _adam.zero_grad();
            nn.functional.mse_loss(_trained.call(_x), _y).backward();
            _adam.step();
        }

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
