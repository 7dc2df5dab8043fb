// A model trained in PyTorch, run in .NET: load the checkpoint, replay PyTorch's inputs, compare the answers.
// Run it with:  dotnet run --project samples/PyTorchInterop
using System;
using System.IO;
using System.Linq;
using TorchLinear;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

string folder = Path.Combine(AppContext.BaseDirectory, "pytorch");

// The same architecture as the PyTorch model: Linear(8, 16) → ReLU → Linear(16, 4), with PyTorch's key names.
var first = new CustomLinear(8, 16);
var second = new CustomLinear(16, 4);
var model = nn.Sequential(("0", first), ("1", nn.ReLU()), ("2", second));

// Every key, shape and dtype is checked before anything is copied.
StateDicts.LoadPyTorchFile(model, Path.Combine(folder, "mlp.pt"));
model.eval();
Console.WriteLine($"loaded mlp.pt (torch.save from PyTorch 1.13): {string.Join(", ", model.state_dict().Select(kv => $"{kv.Key} ({string.Join(", ", kv.Value.shape)})"))}");
Console.WriteLine();

var cases = StateDicts.ReadPyTorchFile(Path.Combine(folder, "cases.safetensors"));
const int Bound = 4;  // ULP of the output's largest magnitude; PyTorch 1.13 and libtorch 2.10 use different GEMM kernels
Console.WriteLine("Two distances per row, in units in the last place (ULP):");
Console.WriteLine("  'max N ULP' (in the verdict) counts the floats between PyTorch's and our value of the worst element. Near zero,");
Console.WriteLine("  floats are dense, so one rounding step of a sum of magnitude ~1 can be dozens of ULP there.");
Console.WriteLine($"  'ULP at scale' is the largest |difference| divided by one ULP of the largest |output|: the rounding step of the");
Console.WriteLine($"  computation's own magnitude. That is the measure the bound ({Bound}) applies to.");
Console.WriteLine();
Console.WriteLine($"{"case",-14} {"dispatch",-11} {"verdict",-60} {"ULP at scale",12}  within {Bound}?");
using (no_grad())
{
    foreach (string key in new[] { "int/rank1", "int/rank2", "int/rank3", "random/rank1", "random/rank2", "random/rank3" })
    {
        var input = cases[$"mlp/{key}/input"];
        var expected = cases[$"mlp/{key}/output"];
        foreach (var dispatch in new[] { LinearDispatch.TorchSharp, LinearDispatch.PyTorch })
        {
            first.Dispatch = second.Dispatch = dispatch;
            using var actual = model.forward(input);
            var comparison = Equivalence.Compare(expected, actual);
            float scale = expected.abs().max().item<float>();
            double ulps = comparison.MaxAbsDiff / (MathF.BitIncrement(scale) - scale);
            Console.WriteLine($"{key,-14} {dispatch,-11} {comparison,-60} {ulps,12:F2}  {(ulps <= Bound ? "yes" : "NO")}");
        }
    }
}
Console.WriteLine();
Console.WriteLine("'bit-exact' rows are identical to PyTorch's output; the others differ only in the last bits, because");
Console.WriteLine("PyTorch 1.13 (Debian) and libtorch 2.10 (TorchSharp) use different matrix-multiply kernels.");
