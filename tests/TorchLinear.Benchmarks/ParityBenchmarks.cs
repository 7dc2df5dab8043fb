using System;
using System.IO;
using BenchmarkDotNet.Attributes;
using TorchLinear.Samples.ParityCheck;
using static TorchSharp.torch;

namespace TorchLinear.Benchmarks
{
    /// <summary>
    /// What a replay costs: Parity.Replay of the ParityCheck sample's recording on its port (load the recorded state,
    /// forward with hooks capturing 28 calls, backward, compare 67 tensors) against a plain forward and backward of the
    /// same port on the same input. Goal: at most 3×. The recording is read once (ParityRecording.Load), as a test that
    /// replays it repeatedly would.
    /// </summary>
    [MemoryDiagnoser]
    public class ParityBenchmarks : ThreadsBenchmark
    {
        private TinyTransformer _port = null!;
        private ParityRecording _recording = null!;
        private Tensor _input = null!, _gradOutput = null!;

        [GlobalSetup]
        public void Setup()
        {
            UseThreads();
            string path = Path.Combine(AppContext.BaseDirectory, "pytorch", "tiny_transformer.parity.pt");
            _recording = ParityRecording.Load(path);
            _port = new TinyTransformer();
            _port.eval();
            Parity.Replay(_port, _recording);  // leaves the recorded weights in the port
            _input = randn(2, 6, 8);
            _gradOutput = ones(2, 6, 4);
        }

        [GlobalCleanup]
        public void Cleanup()
        {
            _port.Dispose();
            _recording.Dispose();
            _input.Dispose();
            _gradOutput.Dispose();
            RestoreThreads();
        }

        [Benchmark(Baseline = true, Description = "forward + backward")]
        public void ForwardBackward()
        {
            using var scope = NewDisposeScope();
            Tensor leaf = _input.detach().requires_grad_(true);
            Tensor output = _port.call(leaf);
            var parameters = new System.Collections.Generic.List<Tensor> { leaf };
            foreach (var (_, p) in _port.named_parameters())
                parameters.Add(p);
            autograd.grad(new[] { output }, parameters, new[] { _gradOutput }, allow_unused: true);
        }

        [Benchmark(Description = "Parity.Replay")]
        public ParityReport Replay() => Parity.Replay(_port, _recording);
    }
}
