// LoRA fine-tuning, start to finish: pretrain a layer, shift the task by a low-rank change, and adapt
// the frozen layer with a rank-4 LoraLinear. Run it with:  dotnet run --project samples/Lora
using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.IO;
using System.Linq;
using TorchLinear;
using TorchLinear.Samples;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

const int InFeatures = 128, OutFeatures = 64, Samples = 2048, Rank = 4;
const double Alpha = 8;
var clock = Stopwatch.StartNew();
manual_seed(0);

// ---------------------------------------------------------------------------------------------------
Console.WriteLine("== 1. Pretrain a CustomLinear on a synthetic regression task");
var x = randn(Samples, InFeatures);
var trueWeight = randn(OutFeatures, InFeatures) / Math.Sqrt(InFeatures);
var trueBias = randn(OutFeatures) * 0.1;
var y = Targets(x, trueWeight, trueBias);

var pretrained = new CustomLinear(InFeatures, OutFeatures);
Train(pretrained, pretrained.parameters(), x, y, steps: 400, learningRate: 0.02, reportEvery: 100);

// ---------------------------------------------------------------------------------------------------
Console.WriteLine();
Console.WriteLine($"== 2. The task shifts by a rank-{Rank} change of the weight");
var shift = randn(OutFeatures, Rank).matmul(randn(Rank, InFeatures)) * (0.5 / Math.Sqrt(InFeatures));
var shiftedY = Targets(x, trueWeight + shift, trueBias);
double before = Loss(pretrained, x, shiftedY);
Console.WriteLine($"pretrained layer on the shifted task: loss {before:F6}");

// ---------------------------------------------------------------------------------------------------
Console.WriteLine();
Console.WriteLine($"== 3. Wrap the frozen layer: LoraLinear.FromLinear(pretrained, r: {Rank}, lora_alpha: {Alpha})");
var lora = LoraLinear.FromLinear(pretrained, r: Rank, lora_alpha: Alpha);
LoraLinear.mark_only_lora_as_trainable(lora);
var trainable = lora.parameters().Where(p => p.requires_grad).ToList();
long loraCount = trainable.Sum(p => p.numel());
long fullCount = pretrained.parameters().Sum(p => p.numel());
Console.WriteLine($"{lora}");
Console.WriteLine($"trainable parameters: {loraCount} with LoRA, {fullCount} for full fine-tuning ({100.0 * loraCount / fullCount:F1}%)");
Console.WriteLine($"trainable: {string.Join(", ", lora.named_parameters().Where(p => p.parameter.requires_grad).Select(p => $"{p.name} ({string.Join(", ", p.parameter.shape)})"))}");
Console.WriteLine($"fresh adapter (B = 0) vs the pretrained layer: {Verdict(Equivalence.Compare(Predict(pretrained, x), Predict(lora, x)))}");

// ---------------------------------------------------------------------------------------------------
Console.WriteLine();
Console.WriteLine("== 4. Fine-tune the adapter only, with Adam");
double after = Train(lora, trainable, x, shiftedY, steps: 300, learningRate: 0.01, reportEvery: 50);
Console.WriteLine($"loss on the shifted task: before {before:F6}, after {after:F6} ({before / after:F0}x lower)");
Console.WriteLine($"frozen weight after training: {Verdict(Equivalence.Compare(pretrained.weight, lora.weight))}");
Console.WriteLine($"frozen bias after training: {Verdict(Equivalence.Compare(pretrained.bias!, lora.bias!))}");

// ---------------------------------------------------------------------------------------------------
Console.WriteLine();
Console.WriteLine("== 5. Merge for inference: W + B A · scaling, one linear per call");
lora.eval();
var unmergedPrediction = Predict(lora, x);
lora.merge();
var mergedPrediction = Predict(lora, x);
lora.unmerge();
var merging = Equivalence.Compare(unmergedPrediction, mergedPrediction);
const double MergeTolerance = 1e-5;
Console.WriteLine($"merged vs unmerged predictions: max |diff| {merging.MaxAbsDiff:G3} (tolerance {MergeTolerance:G1}): " +
                  (merging.MaxAbsDiff <= MergeTolerance ? "within tolerance" : "OUT OF TOLERANCE"));

// ---------------------------------------------------------------------------------------------------
Console.WriteLine();
Console.WriteLine("== 6. Save only the adapter, reload it over a fresh copy of the pretrained layer");
var adapter = LoraLinear.lora_state_dict(lora);
Console.WriteLine($"LoRA state_dict: {string.Join(", ", adapter.Select(kv => $"{kv.Key} ({string.Join(", ", kv.Value.shape)})"))}");
string file = Path.Combine(Path.GetTempPath(), $"lora-adapter-{Environment.ProcessId}.bin");
SaveTensors(adapter, file);
long adapterBytes = new FileInfo(file).Length;
long layerBytes = lora.state_dict().Values.Sum(t => t.numel() * t.element_size());
Console.WriteLine($"adapter file: {adapterBytes} bytes (the whole layer's tensors: {layerBytes} bytes)");

var reloaded = LoraLinear.FromLinear(pretrained, r: Rank, lora_alpha: Alpha);
var (missing, _) = reloaded.load_state_dict(LoadTensors(file), strict: false);
File.Delete(file);
reloaded.eval();
Console.WriteLine($"keys taken from the pretrained layer instead: {string.Join(", ", missing)}");
Console.WriteLine($"reloaded adapter predictions: {Verdict(Equivalence.Compare(unmergedPrediction, Predict(reloaded, x)))}");
Console.WriteLine();
Console.WriteLine($"Done in {clock.Elapsed.TotalSeconds:F1} s.");

// ---------------------------------------------------------------------------------------------------
static Tensor Targets(Tensor x, Tensor weight, Tensor bias)
{
    using var noise = randn(x.shape[0], weight.shape[0]) * 0.01;
    return x.matmul(weight.t()) + bias + noise;
}

static double Train(nn.Module<Tensor, Tensor> model, IEnumerable<Parameter> parameters, Tensor x, Tensor y, int steps, double learningRate, int reportEvery)
{
    model.train();
    using var optimizer = optim.Adam(parameters, lr: learningRate);
    double loss = double.NaN;
    for (int step = 0; step <= steps; step++)
    {
        using var scope = NewDisposeScope();
        optimizer.zero_grad();
        var output = nn.functional.mse_loss(model.forward(x), y);
        loss = output.item<float>();
        if (step % reportEvery == 0)
            Console.WriteLine($"  step {step,4}: loss {loss:F6}");
        if (step == steps)
            break;
        output.backward();
        optimizer.step();
    }
    return loss;
}

static double Loss(nn.Module<Tensor, Tensor> model, Tensor x, Tensor y)
{
    using var scope = NewDisposeScope();
    using var _ = no_grad();
    return nn.functional.mse_loss(model.forward(x), y).item<float>();
}

static Tensor Predict(nn.Module<Tensor, Tensor> model, Tensor x)
{
    using var _ = no_grad();
    return model.forward(x);
}

static string Verdict(TensorComparison comparison) =>
    comparison.BitExact ? "bit-exact"
    : comparison.Comparable && comparison.MaxAbsDiff == 0 && comparison.MaxUlp == 0 ? "equal in value (some zeros changed sign)"
    : $"differs: {comparison}";

// A tiny container: the entry count, then each name and tensor in TorchSharp's own tensor format.
static void SaveTensors(Dictionary<string, Tensor> tensors, string path)
{
    using var writer = new BinaryWriter(File.Create(path));
    writer.Write(tensors.Count);
    foreach (var (name, tensor) in tensors)
    {
        writer.Write(name);
        tensor.Save(writer);
    }
}

static Dictionary<string, Tensor> LoadTensors(string path)
{
    using var reader = new BinaryReader(File.OpenRead(path));
    int count = reader.ReadInt32();
    var tensors = new Dictionary<string, Tensor>();
    for (int i = 0; i < count; i++)
    {
        string name = reader.ReadString();
        tensors[name] = Tensor.Load(reader);
    }
    return tensors;
}
