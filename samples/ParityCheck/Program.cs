// Check a TorchSharp port against PyTorch, module by module: replay a run recorded in Python and read the report.
// Run it with:  dotnet run --project samples/ParityCheck
using System;
using System.IO;
using TorchLinear;
using TorchLinear.Samples.ParityCheck;
using static TorchSharp.torch;

// 1. In Python (once): tools/pytorch/record_parity.py recorded the PyTorch model's state_dict, its input, every module's
//    output and the gradients, with PyTorch 1.13 (pytorch/record.py).
string recording = Path.Combine(AppContext.BaseDirectory, "pytorch", "tiny_transformer.parity.pt");

// 2. In .NET: build the port, replay the recording on it (the recorded weights are loaded, checked), read the report.
using var port = new TinyTransformer();
port.eval();
ParityReport report = Parity.Replay(port, recording);
Console.WriteLine(report);

// 3. In a test, one line makes it an assertion that names the first module that diverges:
report.AssertAllClose();
Console.WriteLine();
Console.WriteLine("AssertAllClose passed: the port computes what PyTorch computed, within assert_close's float32 tolerances.");

// The same port with a porting mistake: GELU's tanh approximation where PyTorch's nn.GELU() is exact.
using var mistaken = new TinyTransformer(mistakes: PortingMistakes.GeluTanh);
mistaken.eval();
var broken = Parity.Replay(mistaken, recording);
Console.WriteLine();
Console.WriteLine($"With GELU's tanh approximation planted: first divergence {broken.FirstDivergence}");
try
{
    broken.AssertAllClose();
}
catch (TensorMismatchException error)
{
    Console.WriteLine(error.Message);
}
