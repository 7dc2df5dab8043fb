// Check a TorchSharp port's training against PyTorch, step by step: replay a training run recorded in Python with the
// port's own training step, and read where (step, phase, parameter) it departs, and why.
// Run it with:  dotnet run --project samples/TrainingParity
using System;
using System.IO;
using TorchLinear;
using TorchLinear.Samples.TrainingParity;

// 1. In Python (once): record_training (tools/pytorch/record_parity.py) ran 20 steps of TinyGpt's training with
//    PyTorch 1.13 and recorded each step's batch, loss, module outputs, gradients, learning rate, parameters and AdamW
//    state (pytorch/record.py).
string recording = Path.Combine(AppContext.BaseDirectory, "pytorch", "tiny_gpt.training.pt");

// 2. In .NET: the port, its optimizer and scheduler, and its training step — the replay calls the step as training
//    would, so that what it checks is the port's training code, not a copy of it.
using (var training = new TinyGptTraining())
{
    TrainingParityReport report = Parity.ReplayTraining(training.Model, recording, training.Optimizer, training.Step);
    Console.WriteLine(report);
    report.AssertAllClose();
    Console.WriteLine("AssertAllClose passed: every step's forward, loss, gradients and updates are PyTorch's, within assert_close's tolerances.");
}

// 3. Free-running: the port trains on its own from the recorded initial weights; the two loss curves side by side.
using (var training = new TinyGptTraining())
{
    var report = Parity.ReplayTraining(training.Model, recording, training.Optimizer, training.Step, new TrainingParityOptions { TeacherForcing = false });
    Console.WriteLine();
    Console.WriteLine(report);
}

// 4. The same port with a mistake in its training code: one parameter group, decaying every parameter.
using (var training = new TinyGptTraining(TrainingMistakes.WeightDecayEverywhere))
{
    var report = Parity.ReplayTraining(training.Model, recording, training.Optimizer, training.Step);
    Console.WriteLine($"With weight decay on every parameter: first divergence {report.FirstDivergence}");
}
