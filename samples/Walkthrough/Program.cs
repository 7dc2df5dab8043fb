// The walkthrough: nn.Linear, Parameters, the (out, in) weight, matmul and F.linear, retold in C#.
// Run it with:  dotnet run --project samples/Walkthrough
using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.Globalization;
using System.Linq;
using TorchLinear;
using TorchLinear.Samples;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

var clock = Stopwatch.StartNew();

// ---------------------------------------------------------------------------------------------------
Title("1. The mathematics: y = W x + b");
// A linear layer maps a vector x with in_features entries to a vector y with out_features entries.
// The weight W therefore has out_features rows and in_features columns; b has out_features entries.
var W = tensor(new float[,] { { 1, 2, 3 }, { 4, 5, 6 } });
var x = tensor(new float[] { 1, 2, 3 });
var b = tensor(new float[] { 0, 1 });
Console.WriteLine($"W = {Show(W)}   shape {Shape(W)}  (out_features = 2, in_features = 3)");
Console.WriteLine($"x = {Show(x)}   b = {Show(b)}");
for (int row = 0; row < 2; row++)
{
    float[] w = W[row].data<float>().ToArray();
    float[] v = x.data<float>().ToArray();
    float dot = w.Zip(v, (p, q) => p * q).Sum();
    float bias = b[row].item<float>();
    string terms = string.Join(" + ", w.Zip(v, (p, q) => $"{p}×{q}"));
    Console.WriteLine($"y[{row}] = row {row} · x + b[{row}] = {terms} + {bias} = {dot} + {bias} = {dot + bias}");
}

// ---------------------------------------------------------------------------------------------------
Title("2. nn.Linear(3, 2) makes W (2×3) and b (2) itself");
manual_seed(0);
var builtIn = nn.Linear(3, 2);
Console.WriteLine($"nn.Linear(3, 2).weight: shape {Shape(builtIn.weight)} = {Show(builtIn.weight)}");
Console.WriteLine($"nn.Linear(3, 2).bias:   shape {Shape(builtIn.bias!)} = {Show(builtIn.bias!)}");
Console.WriteLine($"nn.Linear(3, 2)(x)    = {Show(builtIn.forward(x))}");

// ---------------------------------------------------------------------------------------------------
Title("3. The same layer built from Parameters: CustomLinear");
// A Parameter is a tensor that a module registers, so parameters(), state_dict() and optimizers see it.
var custom = new CustomLinear(new Parameter(W.clone()), new Parameter(b.clone()));
Console.WriteLine($"{custom} with the article's W and b: y = {Show(custom.forward(x))}   (the article says [14, 33])");
manual_seed(0);
var seeded = new CustomLinear(3, 2);
Console.WriteLine($"new CustomLinear(3, 2) under manual_seed(0) holds nn.Linear's numbers: " +
                  $"weight {Verdict(Equivalence.Compare(builtIn.weight, seeded.weight))}, bias {Verdict(Equivalence.Compare(builtIn.bias!, seeded.bias!))}");
Console.WriteLine($"and computes the same output: {Verdict(Equivalence.Compare(builtIn.forward(x), seeded.forward(x)))}");
Console.WriteLine($"state_dict keys: {string.Join(", ", seeded.state_dict().Select(kv => $"{kv.Key} {Shape(kv.Value)}"))}");

// ---------------------------------------------------------------------------------------------------
Title("4. Why the weight is (out_features, in_features)");
// It is W in y = W x: one row per output. A layer could store Wᵀ, (in, out), and compute x W instead;
// the values would be the same, but its state_dict no longer fits nn.Linear or CustomLinear.
var transposed = new InOutLinear(W.t().contiguous(), b.clone());
Console.WriteLine($"A layer storing (in, out) = {Shape(transposed.weight)} computes x W + b = {Show(transposed.forward(x))}: the same values.");
try
{
    seeded.load_state_dict(transposed.state_dict());
}
catch (InvalidOperationException error)
{
    Console.WriteLine($"But loading its state_dict into CustomLinear(3, 2) is refused:{Environment.NewLine}  {error.Message}");
}

// ---------------------------------------------------------------------------------------------------
Title("5. Why matmul(x, W.T) and not matmul(W, x)");
// A batch puts one sample per row: x is (batch, in_features), so W (out, in) cannot multiply it from the left.
var batch = tensor(new float[,] { { 1, 2, 3 }, { 4, 5, 6 }, { 7, 8, 9 }, { 1, 0, 0 } });
Console.WriteLine($"batch x: shape {Shape(batch)}, W: shape {Shape(W)}");
try
{
    // Shown with mm, which reports the error as an exception. (TorchSharp 0.107's matmul entry point does
    // not catch libtorch errors: the same mistake with matmul terminates the process.)
    W.mm(batch);
}
catch (Exception error)
{
    Console.WriteLine($"W · x fails: {error.Message.Split('\n')[0]}");
}
var viaTranspose = matmul(batch, W.t()) + b;
Console.WriteLine($"x · Wᵀ + b: ({Shape(batch)} × {Shape(W.t())}) → {Shape(viaTranspose)} = {Show(viaTranspose)}");

// ---------------------------------------------------------------------------------------------------
Title("6. torch.matmul(a, b) and a.matmul(b) are one operation");
// Python writes a @ b; C# has no @ operator, but the function and the method call the same kernel.
var viaFunction = matmul(batch, W.t());
var viaMethod = batch.matmul(W.t());
Console.WriteLine($"torch.matmul(x, W.t()) vs x.matmul(W.t()): {Verdict(Equivalence.Compare(viaFunction, viaMethod))}");

// ---------------------------------------------------------------------------------------------------
Title("7. functional.linear: the layer without the module");
Console.WriteLine($"nn.functional.linear(x, W, b)   = {Show(nn.functional.linear(x, W, b))}");
Console.WriteLine($"LinearFunctional.linear(x, W, b) = {Show(LinearFunctional.linear(x, W, b))}");

// ---------------------------------------------------------------------------------------------------
Title("8. Exactly the same? Each formulation against nn.Linear on this machine");
// nn.Linear sends a 2-D input with a bias to the fused addmm(b, x, Wᵀ) and everything else to matmul
// then add. The article's formula always does matmul then add; the flattened variant always does addmm.
// Where a formulation takes the other path, the rounding can differ in the last bits.
var formulations = new (string Name, Func<Linear, Tensor, Tensor> Run)[]
{
    ("nn.Linear", (layer, input) => layer.forward(input)),
    ("functional.linear", (layer, input) => nn.functional.linear(input, layer.weight, layer.bias)),
    ("CustomLinear", (layer, input) => new CustomLinear(new Parameter(layer.weight.detach().clone()), new Parameter(layer.bias!.detach().clone())).forward(input)),
    ("LinearFunctional.linear", (layer, input) => LinearFunctional.linear(input, layer.weight, layer.bias)),
    ("matmul(x, W.T) + b", (layer, input) => LinearFormulas.Article(input, layer.weight, layer.bias)),
    ("flatten → addmm → view", (layer, input) => LinearFormulas.FlattenedAddmm(input, layer.weight, layer.bias)),
};
var inputs = new (string Name, long[] Shape, long In, long Out)[]
{
    ("1-D 512→256", new long[] { 512 }, 512, 256),
    ("8×3→2", new long[] { 8, 3 }, 3, 2),
    ("64×512→256", new long[] { 64, 512 }, 512, 256),
    ("4×16×512→256", new long[] { 4, 16, 512 }, 512, 256),
};
var cells = new Dictionary<(string, string), string>();
foreach (var input in inputs)
{
    using var scope = NewDisposeScope();
    manual_seed(1);
    var layer = nn.Linear(input.In, input.Out);
    var data = randn(input.Shape);
    var expected = layer.forward(data);
    foreach (var formulation in formulations)
        cells[(formulation.Name, input.Name)] = Verdict(Equivalence.Compare(expected, formulation.Run(layer, data)));
}
int nameWidth = formulations.Max(f => f.Name.Length) + 2;
int cellWidth = Math.Max(inputs.Max(i => i.Name.Length), cells.Values.Max(v => v.Length)) + 2;
Console.WriteLine("".PadRight(nameWidth) + string.Concat(inputs.Select(i => i.Name.PadRight(cellWidth))));
foreach (var formulation in formulations)
    Console.WriteLine(formulation.Name.PadRight(nameWidth) + string.Concat(inputs.Select(i => cells[(formulation.Name, i.Name)].PadRight(cellWidth))));
Console.WriteLine();
Console.WriteLine("'bit-exact': every output bit equals nn.Linear's. Otherwise: the largest absolute difference, and the");
Console.WriteLine("largest distance in units in the last place (large where an output is close to zero).");
Console.WriteLine($"Done in {clock.Elapsed.TotalSeconds:F1} s.");

static void Title(string text) => Console.WriteLine($"{Environment.NewLine}== {text}");

static string Shape(Tensor t) => "(" + string.Join(", ", t.shape) + ")";

static string Show(Tensor t)
{
    var values = t.detach().contiguous().data<float>().ToArray().Select(v => v.ToString("G6", CultureInfo.InvariantCulture)).ToArray();
    if (t.dim() < 2)
        return "[" + string.Join(", ", values) + "]";
    int columns = (int)t.shape[^1];
    return "[" + string.Join(", ", values.Chunk(columns).Select(row => "[" + string.Join(", ", row) + "]")) + "]";
}

static string Verdict(TensorComparison comparison) =>
    comparison.BitExact ? "bit-exact" : $"{comparison.MaxAbsDiff:G2} ({comparison.MaxUlp} ULP)";

/// <summary>A layer that stores its weight as (in_features, out_features) and computes x W + b.</summary>
sealed class InOutLinear : nn.Module<Tensor, Tensor>
{
    public InOutLinear(Tensor weightInOut, Tensor bias) : base(nameof(InOutLinear))
    {
        weight = new Parameter(weightInOut);
        this.bias = new Parameter(bias);
        register_parameter("weight", weight);
        register_parameter("bias", this.bias);
    }

    public Parameter weight { get; }

    public Parameter bias { get; }

    public override Tensor forward(Tensor input) => matmul(input, weight) + bias;
}
