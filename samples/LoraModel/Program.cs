// LoRA for a whole model, PEFT's way: load a pretrained model, load an adapter trained with PEFT in Python, fine-tune a
// new adapter in .NET, save it as PEFT files, reload it, and merge it away. Run it with:
//   dotnet run --project samples/LoraModel
using System;
using System.Diagnostics;
using System.IO;
using System.Linq;
using TorchLinear;
using TorchLinear.Lora;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

var clock = Stopwatch.StartNew();
string folder = Path.Combine(AppContext.BaseDirectory, "peft-adapter");
var cases = StateDicts.ReadPyTorchFile(Path.Combine(folder, "cases.safetensors"));
Tensor x = cases["input"];

// ---------------------------------------------------------------------------------------------------
Console.WriteLine("== 1. A pretrained model: the PyTorch model's port, with the weights PyTorch saved");
Classifier Pretrained()
{
    var model = new Classifier();
    StateDicts.LoadPyTorchFile(model, Path.Combine(folder, "base.safetensors"));
    model.eval();
    return model;
}
var model = Pretrained();
Console.WriteLine($"{model.parameters().Sum(p => p.numel())} parameters; against PyTorch's output: {Distance(Predict(model, x), cases["base_output"])}");

// ---------------------------------------------------------------------------------------------------
Console.WriteLine();
Console.WriteLine("== 2. An adapter trained with PEFT in Python: adapter_config.json + adapter_model.safetensors");
var config = LoraConfig.from_pretrained(folder);
Console.WriteLine($"r={config.r}, lora_alpha={config.lora_alpha}, use_rslora={config.use_rslora}, target_modules=[{string.Join(", ", config.target_modules!)}], " +
                  $"rank_pattern={{{string.Join(", ", config.rank_pattern.Select(kv => $"{kv.Key}: {kv.Value}"))}}}, modules_to_save=[{string.Join(", ", config.modules_to_save!)}]");
var adapted = LoraModel.load_adapter(model, folder);
Console.WriteLine($"adapted {adapted.Count} layers: {string.Join(", ", adapted)}");
Console.WriteLine($"against PyTorch's adapted output: {Distance(Predict(model, x), cases["adapted_output"])}");
using (LoraModel.disable_adapter(model))
    Console.WriteLine($"with adapters disabled, against PyTorch's disable_adapter(): {Distance(Predict(model, x), cases["disabled_output"])}");

// ---------------------------------------------------------------------------------------------------
Console.WriteLine();
Console.WriteLine("== 3. A new adapter, fine-tuned in .NET: only lora_A and lora_B train");
var tuned = Pretrained();
var ourConfig = new LoraConfig { r = 4, lora_alpha = 8, target_modules = new[] { "q_proj", "v_proj" }, task_type = "SEQ_CLS" };
var ours = LoraModel.Inject(tuned, ourConfig);
LoraModel.mark_only_lora_as_trainable(tuned);
long trainable = tuned.parameters().Where(p => p.requires_grad).Sum(p => p.numel());
Console.WriteLine($"injected into {ours.Count} layers; trainable: {trainable} of {tuned.parameters().Sum(p => p.numel())} parameters");
manual_seed(0);
var inputs = randn(256, 5, 24);
Tensor targets;
using (no_grad())
{
    // The task has shifted: the targets move by a smooth function of the input, plus a little noise.
    var shift = (inputs.mean(new long[] { -2 }).matmul(randn(24, 3))).tanh() * 0.5;
    targets = Predict(Pretrained(), inputs) + shift + 0.01 * randn(256, 3);
}
double before = Loss(tuned, inputs, targets);
tuned.train();
using (var optimizer = optim.Adam(tuned.parameters().Where(p => p.requires_grad), lr: 0.02))
{
    for (int step = 0; step < 150; step++)
    {
        using var scope = NewDisposeScope();
        optimizer.zero_grad();
        nn.functional.mse_loss(tuned.call(inputs), targets).backward();
        optimizer.step();
    }
}
tuned.eval();
double after = Loss(tuned, inputs, targets);
Console.WriteLine($"loss on the shifted task: before {before:F5}, after {after:F5} ({before / after:F1}x lower)");

// ---------------------------------------------------------------------------------------------------
Console.WriteLine();
Console.WriteLine("== 4. Saved as PEFT files, reloaded into a fresh copy of the pretrained model");
string saved = Path.Combine(Path.GetTempPath(), $"lora-model-sample-{Environment.ProcessId}");
LoraModel.save_pretrained(tuned, saved);
Console.WriteLine($"wrote {string.Join(", ", Directory.GetFiles(saved).Select(Path.GetFileName).OrderBy(f => f))} " +
                  $"({new FileInfo(Path.Combine(saved, "adapter_model.safetensors")).Length} bytes of adapter)");
var reloaded = Pretrained();
LoraModel.load_adapter(reloaded, saved);
Directory.Delete(saved, recursive: true);
var tunedPrediction = Predict(tuned, inputs);
Console.WriteLine($"reloaded predictions: {Distance(Predict(reloaded, inputs), tunedPrediction)}");

// ---------------------------------------------------------------------------------------------------
Console.WriteLine();
Console.WriteLine("== 5. merge_and_unload: W + B A · scaling in every adapted layer, adapters gone");
LoraModel.merge_and_unload(reloaded);
Console.WriteLine($"merged predictions: {Distance(Predict(reloaded, inputs), tunedPrediction)}");
Console.WriteLine($"state_dict keys with lora_: {reloaded.state_dict().Keys.Count(k => k.Contains("lora_"))}; " +
                  $"q_proj is still a {reloaded.named_modules().First(m => m.name.EndsWith("q_proj")).module.GetType().Name}");
Console.WriteLine();
Console.WriteLine($"Done in {clock.Elapsed.TotalSeconds:F1} s.");

static Tensor Predict(nn.Module<Tensor, Tensor> model, Tensor input)
{
    using var _ = no_grad();
    return model.call(input);
}

static double Loss(nn.Module<Tensor, Tensor> model, Tensor input, Tensor target)
{
    using var _ = no_grad();
    return nn.functional.mse_loss(model.call(input), target).item<float>();
}

static string Distance(Tensor actual, Tensor expected)
{
    var comparison = Equivalence.Compare(expected, actual);
    return comparison.BitExact ? "bit-exact" : $"max |diff| {comparison.MaxAbsDiff:G2}";
}

/// <summary>The port of make_peft_adapters.py's Classifier: model.layers.N.self_attn.{q,k,v,o}_proj and a classifier head.</summary>
internal sealed class Classifier : nn.Module<Tensor, Tensor>
{
    private readonly Inner model = new();
    private readonly Linear classifier = nn.Linear(24, 3);

    public Classifier() : base(nameof(Classifier)) => RegisterComponents();

    public override Tensor forward(Tensor x) => classifier.call(model.call(x).mean(new long[] { -2 }));

    internal sealed class Inner : nn.Module<Tensor, Tensor>
    {
        private readonly ModuleList<Layer> layers = new(new Layer(), new Layer());

        public Inner() : base(nameof(Inner)) => RegisterComponents();

        public override Tensor forward(Tensor x)
        {
            foreach (var layer in layers)
                x = layer.call(x);
            return x;
        }
    }

    internal sealed class Layer : nn.Module<Tensor, Tensor>
    {
        private readonly SelfAttention self_attn = new();

        public Layer() : base(nameof(Layer)) => RegisterComponents();

        public override Tensor forward(Tensor x) => x + self_attn.call(x);
    }

    /// <summary>Fields of TorchSharp's sealed Linear, called with call(x): the rule for a port that takes unmerged adapters.</summary>
    internal sealed class SelfAttention : nn.Module<Tensor, Tensor>
    {
        private readonly Linear q_proj = nn.Linear(24, 24), k_proj = nn.Linear(24, 8), v_proj = nn.Linear(24, 8), o_proj = nn.Linear(8, 24);

        public SelfAttention() : base(nameof(SelfAttention)) => RegisterComponents();

        public override Tensor forward(Tensor x)
        {
            using var scope = NewDisposeScope();
            var q = q_proj.call(x)[TensorIndex.Ellipsis, TensorIndex.Slice(0, 8)];
            var weights = (q.matmul(k_proj.call(x).transpose(-2, -1)) / Math.Sqrt(8)).softmax(-1);
            return o_proj.call(weights.matmul(v_proj.call(x))).MoveToOuterDisposeScope();
        }
    }
}
