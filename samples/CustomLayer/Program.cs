// Writing your own layer from Parameters, and proving it against a reference.
// Run it with:  dotnet run --project samples/CustomLayer
using System;
using System.Linq;
using TorchLinear;
using TorchLinear.Samples;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

Console.WriteLine("== 1. The layer registers its parameters under the keys you chose");
manual_seed(0);
var layer = new InOutLinear(in_features: 64, out_features: 32);
Console.WriteLine(layer);
foreach (var (name, tensor) in layer.state_dict())
    Console.WriteLine($"  {name}: ({string.Join(", ", tensor.shape)}) {tensor.dtype}, requires_grad={tensor.requires_grad}");
Console.WriteLine($"parameters(): {layer.parameters().Count()} tensors, {layer.parameters().Sum(p => p.numel())} values");

Console.WriteLine();
Console.WriteLine("== 2. .to(Float64) replaces the parameters through the setters; the keys stay");
layer.to(ScalarType.Float64);
Console.WriteLine(string.Join(", ", layer.state_dict().Select(kv => $"{kv.Key} {kv.Value.dtype}")));
layer.to(ScalarType.Float32);

Console.WriteLine();
Console.WriteLine("== 3. Prove it against nn.Linear holding the same numbers (weight transposed)");
// Equivalence.CompareModules runs both on the same input and compares the output and every gradient.
// The weight gradient of InOutLinear is (in, out); alignGradient transposes it into nn.Linear's (out, in).
var reference = nn.Linear(
    new Parameter(layer.weight.detach().t().contiguous()),
    new Parameter(layer.bias!.detach().clone()));
foreach (var shape in new[] { new long[] { 64 }, new long[] { 16, 64 }, new long[] { 4, 8, 64 } })
{
    using var scope = NewDisposeScope();
    var x = randn(shape);
    var verdict = Equivalence.CompareModules(reference, layer, x,
        alignGradient: (name, gradient) => name == "weight" ? gradient.t() : gradient);
    Console.WriteLine($"input ({string.Join(", ", shape)}): {(verdict.BitExact ? "bit-exact" : "not bit-exact")}");
    foreach (string line in verdict.ToString().Split(Environment.NewLine))
        Console.WriteLine($"  {line}");
}
Console.WriteLine();
Console.WriteLine("Same mathematics, different memory layout: BLAS may sum in another order, so a few results can");
Console.WriteLine("differ in the last bits. That is what the verdict measures; CustomLinear keeps nn.Linear's layout and dispatch.");
