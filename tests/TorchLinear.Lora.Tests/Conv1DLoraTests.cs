using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Text.Json.Nodes;
using TorchSharp;
using TorchSharp.Modules;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Lora.Tests
{
    /// <summary>
    /// LoRA on TorchLinear's <see cref="Conv1D"/> (transformers' Conv1D, weight (in, out)), as PEFT 0.18.1 adapts it: a
    /// <c>lora.Linear</c> with <c>fan_in_fan_out=True</c>. The oracle is a twin model of <see cref="CustomLinear"/> layers
    /// holding the transposed weights (what a Conv1D computes, in a Linear's layout), adapted with the same draws: every
    /// output, merged weight, DoRA magnitude and combined adapter of the Conv1D model must be the twin's, transposed where
    /// the layout says. (Real PEFT's own numbers on GPT-2's Conv1D layers: GeneratedTransformerPortTests.)
    /// </summary>
    public class Conv1DLoraTests
    {
        /// <summary>Two Conv1D layers (16 → 24 → 8) invoked with forward(x): the adapters run in the layers' own slot.</summary>
        private sealed class ConvNet : nn.Module<Tensor, Tensor>
        {
            public readonly Conv1D c_fc;
            public readonly Conv1D c_proj;

            public ConvNet() : base(nameof(ConvNet))
            {
                c_fc = new Conv1D(24, 16);
                c_proj = new Conv1D(8, 24);
                RegisterComponents();
            }

            public override Tensor forward(Tensor x)
            {
                using var scope = NewDisposeScope();
                return c_proj.forward(nn.functional.relu(c_fc.forward(x))).MoveToOuterDisposeScope();
            }
        }

        /// <summary>The same network of CustomLinear layers, weights (out, in).</summary>
        private sealed class LinearNet : nn.Module<Tensor, Tensor>
        {
            public readonly CustomLinear c_fc;
            public readonly CustomLinear c_proj;

            public LinearNet() : base(nameof(LinearNet))
            {
                c_fc = new CustomLinear(16, 24);
                c_proj = new CustomLinear(24, 8);
                RegisterComponents();
            }

            public override Tensor forward(Tensor x)
            {
                using var scope = NewDisposeScope();
                return c_proj.forward(nn.functional.relu(c_fc.forward(x))).MoveToOuterDisposeScope();
            }
        }

        /// <summary>A Conv1D network with weights far from zero, and its CustomLinear twin (weights transposed, biases equal).</summary>
        private static (ConvNet Conv, LinearNet Twin) Nets(int seed)
        {
            manual_seed(seed);
            var conv = new ConvNet();
            var twin = new LinearNet();
            using var noGrad = no_grad();
            foreach (var (convLayer, twinLayer) in new[] { (conv.c_fc, twin.c_fc), (conv.c_proj, twin.c_proj) })
            {
                convLayer.weight.normal_(0, 0.3);
                convLayer.bias.normal_(0, 0.1);
                twinLayer.weight.copy_(convLayer.weight.t());
                twinLayer.bias!.copy_(convLayer.bias);
            }
            conv.eval();
            twin.eval();
            return (conv, twin);
        }

        private static LoraConfig Config(bool dora = false, string init = "false") => new()
        {
            r = 4, lora_alpha = 8, target_modules = new[] { "c_fc", "c_proj" }, init_lora_weights = init, use_dora = dora,
        };

        /// <summary>Injects the same config into both under the same seed: the draws are the same numbers, in the same shapes.</summary>
        private static void InjectBoth(ConvNet conv, LinearNet twin, LoraConfig config, string name = LoraModel.DefaultAdapter, int seed = 5)
        {
            manual_seed(seed);
            LoraModel.Inject(conv, config, name);
            manual_seed(seed);
            LoraModel.Inject(twin, config, name);
        }

        private static Tensor Run(nn.Module<Tensor, Tensor> model, Tensor x)
        {
            using var noGrad = no_grad();
            return model.forward(x);
        }

        [Fact]
        public void AnAdapterOnConv1D_HasPeftsShapesAndKeys_AndGivesTheTwinLinearsOutput_UnmergedMergedAndUnmerged()
        {
            using var scope = NewDisposeScope();
            var (conv, twin) = Nets(1);
            var x = randn(3, 5, 16);
            var baseOutput = Run(conv, x);
            var weightBefore = conv.c_fc.weight.detach().clone();
            InjectBoth(conv, twin, Config());

            // PEFT's lora.Linear with fan_in_fan_out: in = weight.shape[0], out = weight.shape[1]; the base keys stay.
            var state = conv.state_dict();
            Assert.Equal(new long[] { 4, 16 }, state["c_fc.lora_A.default.weight"].shape);
            Assert.Equal(new long[] { 24, 4 }, state["c_fc.lora_B.default.weight"].shape);
            Assert.Equal(new long[] { 4, 24 }, state["c_proj.lora_A.default.weight"].shape);
            Assert.Equal(new long[] { 8, 4 }, state["c_proj.lora_B.default.weight"].shape);
            Assert.Equal(new long[] { 16, 24 }, state["c_fc.weight"].shape);
            Assert.IsType<Conv1D>(conv.c_fc);   // kept in place: the slot hosts the adapter
            var twinState = twin.state_dict();
            foreach (var key in state.Keys.Where(k => k.Contains(".lora_", StringComparison.Ordinal)))
                Assert.True(Equivalence.Compare(twinState[key], state[key]).BitExact, key);   // the same draws

            var unmerged = Run(conv, x);
            Equivalence.AssertClose(unmerged, Run(twin, x));
            Assert.True((unmerged - baseOutput).abs().max().item<float>() > 1e-2f, "the adapter changes the output");
            var adapter = (LoraLayer)conv.c_fc.named_modules().Select(m => m.module).OfType<LoraLayer>().Single();
            Assert.True(adapter.fan_in_fan_out);

            LoraModel.merge_adapter(conv);
            LoraModel.merge_adapter(twin);
            // The merged (in, out) weight is W + (B A)ᵀ · scaling, PEFT's transpose(B @ A, fan_in_fan_out) * scaling.
            var a = state["c_fc.lora_A.default.weight"];
            var b = state["c_fc.lora_B.default.weight"];
            Equivalence.AssertClose(conv.c_fc.weight.detach(), weightBefore + b.matmul(a).t() * 2.0);
            Equivalence.AssertClose(conv.c_fc.weight.detach(), twin.c_fc.weight.detach().t());
            Equivalence.AssertClose(Run(conv, x), unmerged);

            LoraModel.unmerge_adapter(conv);
            Assert.True(Equivalence.Compare(weightBefore, conv.c_fc.weight.detach()).BitExact);
            Equivalence.AssertClose(Run(conv, x), unmerged);

            using (LoraModel.disable_adapter(conv))
                Assert.True(Equivalence.Compare(baseOutput, Run(conv, x)).BitExact);
            LoraModel.unload(conv);
            Assert.Null(conv.c_fc.Adapter);
            Assert.True(Equivalence.Compare(baseOutput, Run(conv, x)).BitExact);
        }

        [Fact]
        public void GetDeltaWeight_IsInTheWeightsInOutLayout_AsPefts()
        {
            using var scope = NewDisposeScope();
            var (conv, twin) = Nets(2);
            InjectBoth(conv, twin, Config());
            var convAdapter = conv.c_fc.named_modules().Select(m => m.module).OfType<LoraLayer>().Single();
            var twinAdapter = twin.c_fc.named_modules().Select(m => m.module).OfType<LoraLayer>().Single();
            var delta = convAdapter.get_delta_weight();
            Assert.Equal(new long[] { 16, 24 }, delta.shape);
            Assert.True(delta.is_contiguous());
            Assert.True(Equivalence.Compare(twinAdapter.get_delta_weight().t(), delta).BitExact);
        }

        [Fact]
        public void DoraOnConv1D_GivesTheTwinLinearsMagnitudesAndOutputs_UnmergedAndMerged()
        {
            using var scope = NewDisposeScope();
            var (conv, twin) = Nets(3);
            var x = randn(4, 16);
            var weightBefore = conv.c_proj.weight.detach().clone();
            InjectBoth(conv, twin, Config(dora: true));
            var state = conv.state_dict();
            var twinState = twin.state_dict();
            Assert.Equal(new long[] { 24 }, state["c_fc.lora_magnitude_vector.default.weight"].shape);
            Equivalence.AssertClose(state["c_fc.lora_magnitude_vector.default.weight"], twinState["c_fc.lora_magnitude_vector.default.weight"]);
            using (no_grad())
            {
                // Magnitudes away from the rows' norms, the same in both: the rescaling shows in the output.
                foreach (var key in state.Keys.Where(k => k.Contains("lora_magnitude_vector", StringComparison.Ordinal)))
                {
                    state[key].mul_(1.25);
                    twinState[key].mul_(1.25);
                }
            }
            var unmerged = Run(conv, x);
            Equivalence.AssertClose(unmerged, Run(twin, x));
            LoraModel.merge_adapter(conv);
            LoraModel.merge_adapter(twin);
            Equivalence.AssertClose(conv.c_proj.weight.detach(), twin.c_proj.weight.detach().t());
            Equivalence.AssertClose(Run(conv, x), unmerged);
            LoraModel.unmerge_adapter(conv);
            Assert.True(Equivalence.Compare(weightBefore, conv.c_proj.weight.detach()).BitExact);
        }

        /// <summary>
        /// A DoRA and a plain adapter on the same Conv1D, both active, in each order: merged (all at once, in the active
        /// order, DoRA's norm from the (in, out) weight before the merge, through its transpose) the model gives what it
        /// gave unmerged, and the twin Linear's merged weight transposed; unmerge restores the weight bit for bit.
        /// </summary>
        [Fact]
        public void DoraBesideAPlainAdapterOnOneConv1D_MergesAsItRanUnmerged_InBothOrders()
        {
            using var scope = NewDisposeScope();
            var (conv, twin) = Nets(4);
            var x = randn(4, 16);
            var weightBefore = conv.c_fc.weight.detach().clone();
            InjectBoth(conv, twin, Config(dora: true));
            InjectBoth(conv, twin, new LoraConfig { r = 2, lora_alpha = 4, target_modules = new[] { "c_fc" }, init_lora_weights = "false" }, "plain", seed: 6);
            using (no_grad())
            {
                foreach (var model in new nn.Module[] { conv, twin })
                    foreach (var (name, parameter) in model.named_parameters())
                        if (name.Contains("lora_magnitude_vector", StringComparison.Ordinal))
                            parameter.mul_(1.25);
            }
            foreach (var order in new[] { new[] { "default", "plain" }, new[] { "plain", "default" } })
            {
                LoraModel.set_adapter(conv, order);
                LoraModel.set_adapter(twin, order);
                var unmerged = Run(conv, x);
                Equivalence.AssertClose(unmerged, Run(twin, x));
                LoraModel.merge_adapter(conv);
                LoraModel.merge_adapter(twin);
                Equivalence.AssertClose(conv.c_fc.weight.detach(), twin.c_fc.weight.detach().t());
                Equivalence.AssertClose(Run(conv, x), unmerged);
                LoraModel.unmerge_adapter(conv);
                LoraModel.unmerge_adapter(twin);
                Assert.True(Equivalence.Compare(weightBefore, conv.c_fc.weight.detach()).BitExact);
            }
        }

        [Fact]
        public void SvdCombination_OnConv1D_GivesTheTwinLinearsUpdate()
        {
            using var scope = NewDisposeScope();
            var (conv, twin) = Nets(4);
            InjectBoth(conv, twin, Config(), seed: 5);
            var second = Config();
            second.r = 2;
            InjectBoth(conv, twin, second, "second", seed: 6);
            foreach (var model in new nn.Module[] { conv, twin })
                LoraModel.add_weighted_adapter(model, new[] { "default", "second" }, new[] { 0.7, 0.4 }, "mix", CombinationType.Svd);
            var convState = conv.state_dict();
            var twinState = twin.state_dict();
            foreach (string layer in new[] { "c_fc", "c_proj" })
            {
                Assert.Equal(twinState[$"{layer}.lora_A.mix.weight"].shape, convState[$"{layer}.lora_A.mix.weight"].shape);
                Assert.Equal(twinState[$"{layer}.lora_B.mix.weight"].shape, convState[$"{layer}.lora_B.mix.weight"].shape);
                // The factors of an svd are defined up to signs: their product, the update, is what must agree.
                var convUpdate = convState[$"{layer}.lora_B.mix.weight"].matmul(convState[$"{layer}.lora_A.mix.weight"]);
                var twinUpdate = twinState[$"{layer}.lora_B.mix.weight"].matmul(twinState[$"{layer}.lora_A.mix.weight"]);
                Equivalence.AssertClose(convUpdate, twinUpdate, rtol: 1e-4, atol: 1e-5);
            }
            var x = randn(2, 16);
            LoraModel.set_adapter(conv, "mix");
            LoraModel.set_adapter(twin, "mix");
            Equivalence.AssertClose(Run(conv, x), Run(twin, x), rtol: 1e-4, atol: 1e-5);
        }

        [Fact]
        public void AMixedBatch_OnConv1D_GivesEachRowItsAdaptersOutput()
        {
            using var scope = NewDisposeScope();
            var (conv, _) = Nets(5);
            manual_seed(7);
            LoraModel.Inject(conv, Config());
            LoraModel.Inject(conv, Config(), "second");
            var x = randn(4, 3, 16);
            var rows = new[] { "second", LoraModel.BaseModel, "default", "second" };
            Tensor mixed;
            using (LoraModel.MixedBatch(conv, rows))
                mixed = Run(conv, x);
            for (int row = 0; row < rows.Length; row++)
            {
                Tensor alone;
                if (rows[row] == LoraModel.BaseModel)
                {
                    using (LoraModel.disable_adapter(conv))
                        alone = Run(conv, x[row].unsqueeze(0));
                }
                else
                {
                    LoraModel.set_adapter(conv, rows[row]);
                    alone = Run(conv, x[row].unsqueeze(0));
                }
                Equivalence.AssertClose(mixed[row].unsqueeze(0), alone);
            }
        }

        [Fact]
        public void FanInFanOut_InTheKeptAndSavedConfig_IsWhatPeftSetsIt_AndTheCallersConfigIsUnchanged()
        {
            using var scope = NewDisposeScope();
            var (conv, twin) = Nets(6);
            var given = Config();
            Assert.False(given.fan_in_fan_out);
            var convPeft = LoraModel.get_peft_model(conv, given);
            // PEFT 0.18.1 (measured: Ports/Gpt2/peft-adapter/adapter_config.json) warns and sets True for a Conv1D target.
            Assert.True(convPeft.peft_config[LoraModel.DefaultAdapter].fan_in_fan_out);
            Assert.False(given.fan_in_fan_out);
            var linearConfig = Config();
            linearConfig.fan_in_fan_out = true;
            var twinPeft = LoraModel.get_peft_model(twin, linearConfig);
            // ... and False for an nn.Linear target (dispatch_default: "Setting fan_in_fan_out to False").
            Assert.False(twinPeft.peft_config[LoraModel.DefaultAdapter].fan_in_fan_out);

            string folder = Path.Combine(Path.GetTempPath(), $"torchlinear-conv1d-{Guid.NewGuid():N}");
            try
            {
                convPeft.save_pretrained(folder);
                var json = JsonNode.Parse(File.ReadAllText(Path.Combine(folder, "adapter_config.json")))!;
                Assert.True((bool)json["fan_in_fan_out"]!);
            }
            finally
            {
                if (Directory.Exists(folder))
                    Directory.Delete(folder, recursive: true);
            }
        }

        /// <summary>Two layers a then b (8 → 8), each a CustomLinear (PEFT's nn.Linear case) or a Conv1D, as measure.py builds them.</summary>
        private sealed class Pair : nn.Module<Tensor, Tensor>
        {
            public readonly nn.Module<Tensor, Tensor> a;
            public readonly nn.Module<Tensor, Tensor> b;

            public Pair(string first, string second) : base(nameof(Pair))
            {
                a = first == "Linear" ? new CustomLinear(8, 8) : new Conv1D(8, 8);
                b = second == "Linear" ? new CustomLinear(8, 8) : new Conv1D(8, 8);
                RegisterComponents();
            }

            public override Tensor forward(Tensor x) => b.forward(a.forward(x));
        }

        /// <summary>
        /// With Linear and Conv1D layers both targeted, the kept config's fan_in_fan_out is what PEFT 0.18.1 keeps, step by
        /// step: the last layer in model order adapted for the first time decides; a later adapter on the same layers keeps
        /// the value it was given; an add_weighted_adapter takes its first adapter's. Expected values measured with real
        /// PEFT 0.18.1 and transformers' Conv1D (ReferenceData/RealPeft/fan_in_fan_out/measure.py, which wrote
        /// fan_in_fan_out.json); each case is replayed here with the same calls.
        /// </summary>
        [Fact]
        public void FanInFanOut_WithLinearAndConv1DTargeted_IsWhatPeft0181KeepsAtEachStep()
        {
            using var scope = NewDisposeScope();
            string file = Path.Combine(AppContext.BaseDirectory, "ReferenceData", "RealPeft", "fan_in_fan_out", "fan_in_fan_out.json");
            var measured = JsonNode.Parse(File.ReadAllText(file))!;
            Assert.Equal("0.18.1", (string)measured["peft"]!);
            var cases = measured["cases"]!.AsArray();
            Assert.Equal(8, cases.Count);
            int checkedSteps = 0;
            foreach (var measuredCase in cases)
            {
                var layers = measuredCase!["layers"]!.AsArray().Select(l => (string)l!).ToArray();
                var model = new Pair(layers[0], layers[1]);
                foreach (var step in measuredCase["steps"]!.AsArray())
                {
                    string op = (string)step!["op"]!, name = (string)step["name"]!;
                    if (op is "get_peft_model" or "add_adapter")
                    {
                        var config = new LoraConfig
                        {
                            r = 2, target_modules = step["targets"]!.AsArray().Select(t => (string)t!).ToArray(), fan_in_fan_out = (bool)step["given"]!,
                        };
                        LoraModel.Inject(model, config, name);
                    }
                    else
                    {
                        var adapters = step["adapters"]!.AsArray().Select(a => (string)a!).ToArray();
                        LoraModel.add_weighted_adapter(model, adapters, new[] { 1.0, 1.0 }, name, op);
                    }
                    bool expected = (bool)step["fan_in_fan_out"]!;
                    Assert.True(expected == LoraModel.peft_config(model)[name].fan_in_fan_out,
                        $"[{string.Join(", ", layers)}] {op} '{name}': PEFT 0.18.1 keeps fan_in_fan_out {expected}");
                    checkedSteps++;
                }
            }
            Assert.Equal(32, checkedSteps);
        }

        /// <summary>
        /// Training mode on Conv1D: dropout (0.5) and DoRA's dropout branch run as on the CustomLinear twin (weights
        /// transposed) under the same seeds — the same dropout masks, outputs within float32 rounding, and the same lora_A
        /// and lora_B gradients.
        /// </summary>
        [Theory]
        [InlineData(false)]
        [InlineData(true)]
        public void TrainingMode_DropoutAndDora_GiveTheTwinLinearsOutputsAndGradients(bool dora)
        {
            using var scope = NewDisposeScope();
            var (conv, twin) = Nets(9);
            var config = Config(dora);
            config.lora_dropout = 0.5;
            InjectBoth(conv, twin, config);
            conv.train();
            twin.train();
            var x = randn(5, 16);
            manual_seed(11);
            var convOut = conv.forward(x);
            manual_seed(11);
            var twinOut = twin.forward(x);
            Equivalence.AssertClose(convOut, twinOut);
            // Dropout ran: the output differs from the same model in eval mode (no dropout).
            conv.eval();
            Assert.True(Equivalence.Compare(Run(conv, x), convOut.detach()).MaxAbsDiff > 1e-3);
            conv.train();
            convOut.sum().backward();
            twinOut.sum().backward();
            var convGrads = conv.named_parameters().Where(p => p.name.Contains(".lora_", StringComparison.Ordinal)).ToDictionary(p => p.name, p => p.parameter.grad);
            var twinGrads = twin.named_parameters().Where(p => p.name.Contains(".lora_", StringComparison.Ordinal)).ToDictionary(p => p.name, p => p.parameter.grad);
            Assert.Equal(twinGrads.Keys.OrderBy(k => k), convGrads.Keys.OrderBy(k => k));
            Assert.Equal(dora ? 6 : 4, convGrads.Count);
            foreach (var (key, grad) in convGrads)
            {
                Assert.NotNull(grad);
                Equivalence.AssertClose(grad!, twinGrads[key]!);
            }
        }

        [Fact]
        public void AllLinear_TakesConv1D_AsPeftsLinearClasses()
        {
            using var scope = NewDisposeScope();
            var (conv, _) = Nets(7);
            var adapted = LoraModel.Inject(conv, new LoraConfig { r = 2, TargetModulesRegex = "all-linear" });
            Assert.Equal(new[] { "c_fc", "c_proj" }, adapted);
        }

        [Fact]
        public void AConv1DWhoseSlotIsTaken_IsRefusedByName()
        {
            using var scope = NewDisposeScope();
            var (conv, _) = Nets(8);
            conv.c_proj.Adapter = (input, output) => output;
            var error = Assert.Throws<ArgumentException>(() => LoraModel.Inject(conv, Config()));
            Assert.Contains("c_proj already has an adapter in its Adapter slot", error.Message);
            Assert.Null(conv.c_fc.Adapter);   // nothing changed
        }
    }
}
