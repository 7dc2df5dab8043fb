using System;
using System.IO;
using BenchmarkDotNet.Attributes;
using TorchLinear.Samples.TrainingParity;
using static TorchSharp.torch;

namespace TorchLinear.Benchmarks
{
    /// <summary>
    /// What a training replay costs: Parity.ReplayTraining of the TrainingParity sample's 20 recorded steps on its port
    /// (per step: the recorded weights and AdamW state forced into the port, the port's own training step with hooks
    /// capturing 25 calls, the comparisons of the forward, loss, 29 gradients and 29 updates), against the port's own 20
    /// training steps on the same batches. Goal: at most 3×. The recording is read once (TrainingRecording.Load).
    /// </summary>
    [MemoryDiagnoser]
    public class TrainingParityBenchmarks : ThreadsBenchmark
    {
        private TrainingRecording _recording = null!;
        private TinyGptTraining _training = null!;

        [GlobalSetup]
        public void Setup()
        {
            UseThreads();
            _recording = TrainingRecording.Load(Path.Combine(AppContext.BaseDirectory, "pytorch", "tiny_gpt.training.pt"));
            _training = new TinyGptTraining();
            Parity.ReplayTraining(_training.Model, _recording, _training.Optimizer, _training.Step);  // the recorded weights, and warm
        }

        [GlobalCleanup]
        public void Cleanup()
        {
            _training.Dispose();
            _recording.Dispose();
            RestoreThreads();
        }

        [Benchmark(Baseline = true, Description = "20 training steps")]
        public void TrainingSteps()
        {
            for (int s = 0; s < _recording.StepCount; s++)
            {
                using var scope = NewDisposeScope();
                var (input, target) = _recording.Batch(s);
                _training.Step(input, target);
            }
        }

        [Benchmark(Description = "Parity.ReplayTraining, 20 steps")]
        public TrainingParityReport Replay() => Parity.ReplayTraining(_training.Model, _recording, _training.Optimizer, _training.Step);
    }
}
