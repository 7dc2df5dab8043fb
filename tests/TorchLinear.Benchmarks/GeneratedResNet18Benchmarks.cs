#if GENERATED_RESNET18
using System;
using BenchmarkDotNet.Attributes;
using TorchSharp;
using static TorchSharp.torch;

namespace TorchLinear.Benchmarks
{
    /// <summary>
    /// A generated port against a hand-written one: the forward of torchvision's resnet18 as tools/pytorch/export_port.py
    /// writes it (Ports/generate_resnet18.sh, not committed: this class exists only when the generated file does) against
    /// TorchVision.NET's <c>torchvision.models.resnet18()</c>, with the same weights (TorchVision.NET's state_dict loaded
    /// into the generated port, strictly), eval mode, no_grad, 224 × 224 images in batches of 1 and 8. Goal: the generated
    /// port at most 1.05× TorchVision.NET (the control, a second TorchVision.NET model, shows the run's noise). The PyTorch column: pytorch/resnet18.py (docs/benchmarks.md).
    /// </summary>
    [MemoryDiagnoser]
    public class GeneratedResNet18Benchmarks : ThreadsBenchmark
    {
        private nn.Module<Tensor, Tensor> _handWritten = null!, _control = null!, _generated = null!;
        private Tensor _input = null!;

        [Params(1, 8)]
        public int Batch { get; set; }

        [GlobalSetup]
        public void Setup()
        {
            UseThreads();
            manual_seed(0);
            _handWritten = torchvision.models.resnet18();
            _control = torchvision.models.resnet18();
            _generated = new Ports.Generated.ResNet18();
            // Strict: every key of the generated port is one of TorchVision.NET's and the other way round.
            _generated.load_state_dict(_handWritten.state_dict());
            _control.load_state_dict(_handWritten.state_dict());
            _handWritten.eval();
            _control.eval();
            _generated.eval();
            _input = randn(Batch, 3, 224, 224);
            // Both compute the same function, or the comparison would mean nothing.
            using var noGrad = no_grad();
            using Tensor a = _handWritten.call(_input), b = _generated.call(_input);
            Equivalence.AssertClose(b, a);
        }

        [GlobalCleanup]
        public void Cleanup()
        {
            _handWritten.Dispose();
            _control.Dispose();
            _generated.Dispose();
            _input.Dispose();
            RestoreThreads();
        }

        [Benchmark(Baseline = true, Description = "TorchVision.NET resnet18")]
        public void HandWritten()
        {
            using var noGrad = no_grad();
            using var scope = NewDisposeScope();
            _handWritten.call(_input);
        }

        /// <summary>The same hand-written model again: its ratio to the baseline is the noise of the run.</summary>
        [Benchmark(Description = "TorchVision.NET resnet18 again (control)")]
        public void HandWrittenAgain()
        {
            using var noGrad = no_grad();
            using var scope = NewDisposeScope();
            _control.call(_input);
        }

        [Benchmark(Description = "generated resnet18")]
        public void Generated()
        {
            using var noGrad = no_grad();
            using var scope = NewDisposeScope();
            _generated.call(_input);
        }
    }
}
#endif
