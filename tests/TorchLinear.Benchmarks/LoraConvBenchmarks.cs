using BenchmarkDotNet.Attributes;
using TorchLinear.Lora;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Benchmarks
{
    /// <summary>
    /// LoRA on Conv2d layers (LoraConvLayer, PEFT's lora.Conv2d): a small conv net — stem Conv2d(3, 32, 3, padding 1), down
    /// Conv2d(32, 64, 3, stride 2, padding 1, no bias), block Conv2d(64, 64, 3, padding 1), mix Conv2d(64, 64, 1), ReLU
    /// between, the mean over the plane, head Linear(64, 10) — on a batch of 16 images 3×32×32, with an r = 8, alpha = 16
    /// adapter on each convolution (lora_B not zero, init_lora_weights false). stem and block are fields of TorchSharp's
    /// sealed Conv2d type (the adapter runs in a forward hook), down and mix fields typed nn.Module&lt;Tensor, Tensor&gt;
    /// (wrapped by a LoraConvWrapper). Cases: the base model, the base model again (the control: its ratio is this
    /// machine's noise), the model after merge_and_unload, and the adapters unmerged. pytorch/lora_conv.py times the same
    /// net with real PEFT.
    /// </summary>
    [MemoryDiagnoser]
    public class LoraConvBenchmarks : ThreadsBenchmark
    {
        private const int Batch = 16, Rank = 8, Alpha = 16;
        private ConvNet _base = null!, _control = null!, _merged = null!, _unmerged = null!;
        private Tensor _x = null!;

        /// <summary>The benchmark's conv net (lora_conv.py's ConvNet).</summary>
        internal sealed class ConvNet : nn.Module<Tensor, Tensor>
        {
            public Conv2d stem = nn.Conv2d(3, 32, 3, padding: 1);
            public nn.Module<Tensor, Tensor> down = nn.Conv2d(32, 64, 3, stride: 2, padding: 1, bias: false);
            public Conv2d block = nn.Conv2d(64, 64, 3, padding: 1);
            public nn.Module<Tensor, Tensor> mix = nn.Conv2d(64, 64, 1);
            public nn.Module<Tensor, Tensor> head = nn.Linear(64, 10);

            public ConvNet() : base(nameof(ConvNet)) => RegisterComponents();

            public override Tensor forward(Tensor x)
            {
                using var scope = NewDisposeScope();
                x = nn.functional.relu(stem.call(x));
                x = nn.functional.relu(down.call(x));
                x = nn.functional.relu(block.call(x));
                x = mix.call(x);
                return head.call(x.mean(new long[] { 2, 3 })).MoveToOuterDisposeScope();
            }
        }

        internal static ConvNet Model()
        {
            manual_seed(0);
            var model = new ConvNet();
            model.eval();
            return model;
        }

        internal static ConvNet Adapted()
        {
            var model = Model();
            manual_seed(1);
            LoraModel.Inject(model, new LoraConfig { r = Rank, lora_alpha = Alpha, target_modules = new[] { "stem", "down", "block", "mix" }, init_lora_weights = "false" });
            model.eval();
            return model;
        }

        [GlobalSetup]
        public void Setup()
        {
            UseThreads();
            _base = Model();
            _control = Model();
            _unmerged = Adapted();
            _merged = Adapted();
            LoraModel.merge_and_unload(_merged);
            manual_seed(2);
            _x = randn(Batch, 3, 32, 32);
        }

        [GlobalCleanup]
        public void Cleanup()
        {
            foreach (var model in new[] { _base, _control, _merged, _unmerged })
                model.Dispose();
            _x.Dispose();
            RestoreThreads();
        }

        private Tensor Forward(ConvNet model)
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
    }
}
