using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Tests
{
    /// <summary>
    /// Ports of transformers models (the real modeling code, tiny random configurations) that tools/pytorch/export_port.py
    /// generated (Ports/make_ports.py), compiled into this project: each builds, loads every key of its exported
    /// state_dict, and replays its recordings at the example shape and at another batch and sequence length with no
    /// divergence, forward and backward, under the replay's default options.
    /// </summary>
    public class GeneratedTransformerPortTests
    {
        private static readonly string PortsFolder = Path.Combine(Snapshots.RepositoryRoot, "tests", "TorchLinear.Tests", "Ports");

        private static string PortFile(string folder, string file) => Path.Combine(PortsFolder, folder, file);

        private static string Rows(ParityReport report) =>
            string.Join(Environment.NewLine, report.Modules.Concat(report.Gradients).Where(r => !r.IsClose).Select(r => $"{r.Path}: {r.Status} {r.Detail}"));

        private static long[] InputShape(string recordingPath)
        {
            var tensors = StateDicts.ReadPyTorchFile(recordingPath);
            long[] shape = tensors["input/0"].shape;
            foreach (var t in tensors.Values)
                t.Dispose();
            return shape;
        }

        /// <summary>
        /// Every recorded call was compared with a port call under the same path, with the same tensor inputs (keyword
        /// arguments included, in the recorder's order) and outputs (a tuple's every tensor); nothing diverged, and every
        /// parameter's gradient is close.
        /// </summary>
        private static void AssertNoDivergence(nn.Module port, string recordingPath)
        {
            using var recording = ParityRecording.Load(recordingPath);
            var report = Parity.Replay(port, recording);
            Assert.True(report.AllClose, Rows(report));
            Assert.Null(report.FirstDivergence);
            Assert.Equal(recording.CallOrder.Select(k => k.Length == 0 ? "(model)" : k), report.Modules.Select(r => r.Path));
            Assert.All(report.Modules, r => Assert.True(r.Status is ParityStatus.BitExact or ParityStatus.Close or ParityStatus.WithinRounding,
                                                        $"{r.Path}: {r.Status} {r.Detail}"));
            Assert.All(report.Modules, r => Assert.True(r.InputsMatch, $"{r.Path}: inputs not compared or differing: {r.Detail}"));
            Assert.Equal(port.named_parameters().Count(), report.Gradients.Count(r => !r.Path.StartsWith("input ", StringComparison.Ordinal)));
            Assert.All(report.Gradients, r => Assert.True(r.IsClose, $"{r.Path}: {r.Status} {r.Detail}"));
        }

        private static T Loaded<T>(T port, string folder, string name) where T : nn.Module
        {
            port.eval();
            // Strict: every key of the port's state_dict is in the file, and no other.
            Assert.Empty(StateDicts.LoadPyTorchFile(port, PortFile(folder, $"{name}.safetensors")));
            return port;
        }

        [Fact]
        public void GeneratedLlama_LoadsEveryKey_AndReplaysWithNoDivergence_AtBothShapes()
        {
            using var port = Loaded(new Ports.Llama.LlamaForCausalLM(), "Llama", "LlamaForCausalLM");
            using (var recording = ParityRecording.Load(PortFile("Llama", "LlamaForCausalLM.parity.pt")))
            {
                Assert.Equal(recording.StateDict().Keys.OrderBy(k => k, StringComparer.Ordinal),
                             port.state_dict().Keys.OrderBy(k => k, StringComparer.Ordinal));
                // The rotary embedding's inv_freq is transformers' non-persistent buffer: in neither.
                Assert.DoesNotContain("model.rotary_emb.inv_freq", port.state_dict().Keys);
            }
            string first = PortFile("Llama", "LlamaForCausalLM.parity.pt"), second = PortFile("Llama", "LlamaForCausalLM.second.parity.pt");
            Assert.NotEqual(InputShape(first)[0], InputShape(second)[0]);
            Assert.NotEqual(InputShape(first)[1], InputShape(second)[1]);
            AssertNoDivergence(port, first);
            AssertNoDivergence(port, second);
        }

        /// <summary>
        /// The attention's settings are named as modeling_llama.py names them and read everywhere the value was used
        /// (docs/porting.md): built with 2 heads of 16 instead of 4 of 8 (the same q_proj and k_proj widths), the views,
        /// rotate_half, repeat_kv's expand and reshape and the size check of modeling_llama.py:306 all follow, and it
        /// runs; a head count that disagrees with the widths is caught by that size check, which reads num_heads.
        /// </summary>
        [Fact]
        public void GeneratedLlamaAttention_BuiltWithOtherHeadSettings_RunsShapeConsistently_AndChecksItsOwnHeadCount()
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            const long batch = 2, time = 5, headDim = 16;
            var hidden = randn(batch, time, 32);
            var mask = zeros(batch, 1, time, time);
            var positions = arange(time, dtype: ScalarType.Int64).expand(batch, time);
            var cachePosition = arange(time, dtype: ScalarType.Int64);
            var cos = randn(batch, time, headDim);
            var sin = randn(batch, time, headDim);

            using var attention = new Ports.Llama.LlamaAttention(head_dim: headDim, sqrt_head_dim: Math.Sqrt(headDim),
                                                                 attention_dropout: 0.0, num_heads: 2);
            attention.eval();
            var output = attention.call(hidden, mask, positions, cachePosition, cos, sin);
            Assert.Equal(new long[] { batch, time, 32 }, output.shape);
            Assert.False(output.isnan().any().item<bool>());

            using var wrongHeads = new Ports.Llama.LlamaAttention(head_dim: headDim, sqrt_head_dim: Math.Sqrt(headDim),
                                                                  attention_dropout: 0.0, num_heads: 4);
            wrongHeads.eval();
            var thrown = Assert.Throws<InvalidOperationException>(() => wrongHeads.call(hidden, mask, positions, cachePosition, cos, sin));
            Assert.Contains("modeling_llama.py:306", thrown.Message, StringComparison.Ordinal);
        }

        /// <summary>
        /// The structure the issue asks for, held on the generated classes: one class for both decoder layers, the
        /// modules transformers calls with keyword arguments taking every tensor argument (hidden_states,
        /// attention_mask, position_ids, cache_position, and the (cos, sin) pair), the rotary embedding returning its
        /// tuple, and every linear layer a CustomLinear (which takes a LoRA adapter however it is called).
        /// </summary>
        [Fact]
        public void GeneratedLlama_HasOneDecoderLayerClass_KeywordInputsAsParameters_AndCustomLinearsOnly()
        {
            using var port = new Ports.Llama.LlamaForCausalLM();
            var modules = port.named_modules().ToDictionary(m => m.name, m => m.module);
            Assert.Same(modules["model.layers.0"].GetType(), modules["model.layers.1"].GetType());
            Assert.IsAssignableFrom<nn.Module<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>>(modules["model.layers.0"]);
            Assert.IsAssignableFrom<nn.Module<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>>(modules["model.layers.0.self_attn"]);
            Assert.IsAssignableFrom<nn.Module<Tensor, Tensor, (Tensor, Tensor)>>(modules["model.rotary_emb"]);
            var linears = modules.Where(m => m.Key.EndsWith("_proj", StringComparison.Ordinal) || m.Key == "lm_head").ToList();
            Assert.Equal(2 * 7 + 1, linears.Count);
            Assert.All(linears, m => Assert.IsType<CustomLinear>(m.Value));
        }

        [Fact]
        public void GeneratedGpt2_LoadsEveryKey_AndReplaysWithNoDivergence_AtBothShapes()
        {
            using var port = Loaded(new Ports.Gpt2.GPT2LMHeadModel(), "Gpt2", "GPT2LMHeadModel");
            using (var recording = ParityRecording.Load(PortFile("Gpt2", "GPT2LMHeadModel.parity.pt")))
                Assert.Equal(recording.StateDict().Keys.OrderBy(k => k, StringComparer.Ordinal),
                             port.state_dict().Keys.OrderBy(k => k, StringComparer.Ordinal));
            string first = PortFile("Gpt2", "GPT2LMHeadModel.parity.pt"), second = PortFile("Gpt2", "GPT2LMHeadModel.second.parity.pt");
            Assert.NotEqual(InputShape(first)[0], InputShape(second)[0]);
            Assert.NotEqual(InputShape(first)[1], InputShape(second)[1]);
            AssertNoDivergence(port, first);
            AssertNoDivergence(port, second);
        }

        /// <summary>
        /// GPT-2's Conv1D layers are TorchLinear's <see cref="Conv1D"/> (the generator constructs transformers' Conv1D as
        /// the library layer), which keeps PyTorch's layout (weight (in, out), addmm(bias, x, weight)), so the state_dict
        /// keys and shapes are transformers'; the LM head is tied to the token embedding as in transformers (one Parameter
        /// under both names, so its gradient is the sum of both uses, as PyTorch's).
        /// </summary>
        [Fact]
        public void GeneratedGpt2_Conv1DKeepsTheInOutLayout_AndTheLmHeadIsTiedToTheTokenEmbedding()
        {
            using var port = new Ports.Gpt2.GPT2LMHeadModel();
            var modules = port.named_modules().ToDictionary(m => m.name, m => m.module);
            foreach (string layer in new[] { "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj" })
                Assert.IsType<Conv1D>(modules[$"transformer.h.1.{layer}"]);
            Assert.Equal((96L, 32L), (((Conv1D)modules["transformer.h.0.attn.c_attn"]).nf, ((Conv1D)modules["transformer.h.0.attn.c_attn"]).nx));
            var state = port.state_dict();
            Assert.Equal(new long[] { 32, 96 }, state["transformer.h.0.attn.c_attn.weight"].shape);
            Assert.Equal(new long[] { 96 }, state["transformer.h.0.attn.c_attn.bias"].shape);
            Assert.Equal(new long[] { 32, 128 }, state["transformer.h.0.mlp.c_fc.weight"].shape);
            Assert.Equal(new long[] { 128, 32 }, state["transformer.h.0.mlp.c_proj.weight"].shape);
            var parameters = port.named_parameters().ToDictionary(p => p.name, p => p.parameter);
            using (no_grad())
                parameters["transformer.wte.weight"].fill_(0.25);   // one tensor: the head sees the write
            Assert.True(parameters["lm_head.weight"].eq(0.25).all().item<bool>());
            Assert.DoesNotContain("transformer.h.0.attn.bias", state.Keys);   // the causal mask: a non-persistent buffer
        }

        [Fact]
        public void GeneratedBert_LoadsEveryKey_AndReplaysWithNoDivergence_AtBothShapes()
        {
            using var port = Loaded(new Ports.Bert.BertForMaskedLM(), "Bert", "BertForMaskedLM");
            using (var recording = ParityRecording.Load(PortFile("Bert", "BertForMaskedLM.parity.pt")))
                Assert.Equal(recording.StateDict().Keys.OrderBy(k => k, StringComparer.Ordinal),
                             port.state_dict().Keys.OrderBy(k => k, StringComparer.Ordinal));
            string first = PortFile("Bert", "BertForMaskedLM.parity.pt"), second = PortFile("Bert", "BertForMaskedLM.second.parity.pt");
            Assert.NotEqual(InputShape(first)[0], InputShape(second)[0]);
            Assert.NotEqual(InputShape(first)[1], InputShape(second)[1]);
            AssertNoDivergence(port, first);
            AssertNoDivergence(port, second);
        }

        /// <summary>BERT's two ties, as in transformers: the decoder's weight is the word embeddings', its bias is
        /// cls.predictions.bias (a parameter of the translated BertLMPredictionHead itself).</summary>
        [Fact]
        public void GeneratedBert_TiesTheDecoderToTheWordEmbeddings_AndItsBiasToThePredictionHeads()
        {
            using var port = new Ports.Bert.BertForMaskedLM();
            var parameters = port.named_parameters().ToDictionary(p => p.name, p => p.parameter);
            using (no_grad())
            {
                parameters["bert.embeddings.word_embeddings.weight"].fill_(0.25);
                parameters["cls.predictions.bias"].fill_(-0.5);
            }
            Assert.True(parameters["cls.predictions.decoder.weight"].eq(0.25).all().item<bool>());
            Assert.True(parameters["cls.predictions.decoder.bias"].eq(-0.5).all().item<bool>());
        }

        /// <summary>
        /// End to end with real PEFT: an adapter made by PEFT 0.18.1 on transformers' Llama (make_ports.py's
        /// peft_llama_adapter: r 4 on all seven projections of both layers, B drawn by PEFT) loads into the generated
        /// port with TorchLinear.Lora and gives PEFT's logits, unmerged and merged into the weights (float32 default
        /// tolerances); with the adapters disabled or unloaded, the base model's logits.
        /// </summary>
        [Fact]
        public void APeftAdapterOnTransformersLlama_LoadsIntoTheGeneratedPort_AndGivesPeftsLogits_UnmergedAndMerged()
        {
            string folder = PortFile("Llama", "peft-adapter");
            using var port = Loaded(new Ports.Llama.LlamaForCausalLM(), "Llama", "LlamaForCausalLM");
            var cases = StateDicts.ReadPyTorchFile(Path.Combine(folder, "cases.pt"));
            try
            {
                using var noGrad = no_grad();
                using Tensor baseLogits = port.call(cases["input"]);
                var adapted = Lora.LoraModel.load_adapter(port, folder);
                Assert.Equal(2 * 7, adapted.Count);
                Assert.Contains("model.layers.1.mlp.down_proj.lora_B.default.weight", port.state_dict().Keys);
                using (Tensor unmerged = port.call(cases["input"]))
                {
                    Equivalence.AssertClose(unmerged, cases["adapted_output"]);
                    Assert.True((unmerged - baseLogits).abs().max().item<float>() > 1e-2f, "the adapter changes the logits");
                }
                using (Lora.LoraModel.disable_adapter(port))
                {
                    using Tensor disabled = port.call(cases["input"]);
                    Assert.Equal(0, Equivalence.Compare(baseLogits, disabled).DifferingElements);
                }
                Lora.LoraModel.merge_adapter(port);
                using (Tensor merged = port.call(cases["input"]))
                    Equivalence.AssertClose(merged, cases["adapted_output"]);
                Lora.LoraModel.unmerge_adapter(port);
                Lora.LoraModel.unload(port);
                using Tensor unloaded = port.call(cases["input"]);
                Equivalence.AssertClose(unloaded, baseLogits);
            }
            finally
            {
                foreach (var t in cases.Values)
                    t.Dispose();
            }
        }

        /// <summary>
        /// End to end with real PEFT on GPT-2's Conv1D layers: an adapter made by PEFT 0.18.1 on transformers' GPT-2
        /// (make_ports.py's peft_gpt2_adapters: r 4 on c_attn, c_proj and c_fc of both layers, B drawn by PEFT, the config's
        /// fan_in_fan_out left False so that PEFT set it True, as its saved config says) loads into the generated port with
        /// TorchLinear.Lora (PeftModel.from_pretrained) and gives PEFT's logits unmerged, merged (against PEFT's own merged
        /// logits) and after unmerge (the weights bit for bit as before); disabled, the base logits.
        /// </summary>
        [Fact]
        public void APeftAdapterOnTransformersGpt2Conv1D_LoadsIntoTheGeneratedPort_AndGivesPeftsLogits_UnmergedMergedAndUnmerged()
        {
            string folder = PortFile("Gpt2", "peft-adapter");
            Assert.Contains("\"fan_in_fan_out\": true", File.ReadAllText(Path.Combine(folder, "adapter_config.json")));
            using var port = Loaded(new Ports.Gpt2.GPT2LMHeadModel(), "Gpt2", "GPT2LMHeadModel");
            var cases = StateDicts.ReadPyTorchFile(Path.Combine(folder, "cases.pt"));
            try
            {
                using var noGrad = no_grad();
                using Tensor baseLogits = port.call(cases["input"]);
                var weights = port.named_parameters().ToDictionary(p => p.name, p => p.parameter.detach().clone());
                var peft = Lora.PeftModel.from_pretrained(port, folder);
                Assert.Equal(new[] { "c_attn", "c_fc", "c_proj" }, peft.peft_config["default"].target_modules!.OrderBy(t => t, StringComparer.Ordinal));
                Assert.True(peft.peft_config["default"].fan_in_fan_out);
                var state = port.state_dict();
                Assert.Equal(new long[] { 4, 32 }, state["transformer.h.1.attn.c_attn.lora_A.default.weight"].shape);
                Assert.Equal(new long[] { 96, 4 }, state["transformer.h.1.attn.c_attn.lora_B.default.weight"].shape);
                Assert.Equal(new long[] { 4, 128 }, state["transformer.h.0.mlp.c_proj.lora_A.default.weight"].shape);
                Assert.Equal(2 * 4 * 2, state.Keys.Count(k => k.Contains(".lora_", StringComparison.Ordinal)));
                using (Tensor unmerged = port.call(cases["input"]))
                {
                    Equivalence.AssertClose(unmerged, cases["adapted_output"]);
                    Assert.True((unmerged - baseLogits).abs().max().item<float>() > 1e-2f, "the adapter changes the logits");
                }
                using (peft.disable_adapter())
                {
                    using Tensor disabled = port.call(cases["input"]);
                    Assert.Equal(0, Equivalence.Compare(baseLogits, disabled).DifferingElements);
                }
                peft.merge_adapter();
                using (Tensor merged = port.call(cases["input"]))
                {
                    Equivalence.AssertClose(merged, cases["merged_output"]);
                    Equivalence.AssertClose(merged, cases["adapted_output"]);
                }
                peft.unmerge_adapter();
                foreach (var (name, parameter) in port.named_parameters().Where(p => weights.ContainsKey(p.name)))
                    Assert.True(Equivalence.Compare(weights[name], parameter.detach()).BitExact, name);
                using (Tensor again = port.call(cases["input"]))
                    Equivalence.AssertClose(again, cases["adapted_output"]);
            }
            finally
            {
                foreach (var t in cases.Values)
                    t.Dispose();
            }
        }

        /// <summary>
        /// DoRA on GPT-2's Conv1D layers against real PEFT (peft_gpt2_adapters: r 2 on c_attn and c_fc, B drawn, the
        /// magnitudes scaled away from the rows' norms): PEFT's logits unmerged and merged (PEFT's merged logits), and after
        /// unmerge the weights as before (PEFT 0.18.1's own DoRA unmerge raises on a non-square Conv1D and gives another weight on a square one; this one
        /// restores the kept weight).
        /// </summary>
        [Fact]
        public void APeftDoraAdapterOnTransformersGpt2Conv1D_GivesPeftsLogits_UnmergedAndMerged()
        {
            string folder = PortFile("Gpt2", "peft-dora");
            using var port = Loaded(new Ports.Gpt2.GPT2LMHeadModel(), "Gpt2", "GPT2LMHeadModel");
            var cases = StateDicts.ReadPyTorchFile(Path.Combine(folder, "cases.pt"));
            try
            {
                using var noGrad = no_grad();
                using Tensor baseLogits = port.call(cases["input"]);
                var weights = port.named_parameters().ToDictionary(p => p.name, p => p.parameter.detach().clone());
                var adapted = Lora.LoraModel.load_adapter(port, folder);
                Assert.Equal(2 * 2, adapted.Count);
                Assert.Equal(new long[] { 96 }, port.state_dict()["transformer.h.0.attn.c_attn.lora_magnitude_vector.default.weight"].shape);
                using (Tensor unmerged = port.call(cases["input"]))
                {
                    Equivalence.AssertClose(unmerged, cases["adapted_output"]);
                    Assert.True((unmerged - baseLogits).abs().max().item<float>() > 1e-2f, "the adapter changes the logits");
                }
                Lora.LoraModel.merge_adapter(port);
                using (Tensor merged = port.call(cases["input"]))
                    Equivalence.AssertClose(merged, cases["merged_output"]);
                Lora.LoraModel.unmerge_adapter(port);
                foreach (var (name, parameter) in port.named_parameters().Where(p => weights.ContainsKey(p.name)))
                    Assert.True(Equivalence.Compare(weights[name], parameter.detach()).BitExact, name);
            }
            finally
            {
                foreach (var t in cases.Values)
                    t.Dispose();
            }
        }

        /// <summary>
        /// The way out: an adapter injected into the generated GPT-2 port and saved has PEFT's keys and shapes — those of
        /// the folder real PEFT saved for the same targets — and PEFT's fan_in_fan_out (true), though the config given said
        /// false.
        /// </summary>
        [Fact]
        public void AnAdapterInjectedIntoTheGeneratedGpt2_SavesPeftsKeysShapesAndFanInFanOut()
        {
            string peftFolder = PortFile("Gpt2", "peft-adapter");
            using var port = Loaded(new Ports.Gpt2.GPT2LMHeadModel(), "Gpt2", "GPT2LMHeadModel");
            var peft = Lora.LoraModel.get_peft_model(port, new Lora.LoraConfig { r = 4, lora_alpha = 8, target_modules = new[] { "c_attn", "c_proj", "c_fc" } });
            string folder = Path.Combine(Path.GetTempPath(), $"torchlinear-gpt2-{Guid.NewGuid():N}");
            try
            {
                peft.save_pretrained(folder);
                var ours = StateDicts.ReadPyTorchFile(Path.Combine(folder, "adapter_model.safetensors"));
                var theirs = StateDicts.ReadPyTorchFile(Path.Combine(peftFolder, "adapter_model.safetensors"));
                Assert.Equal(theirs.Keys.OrderBy(k => k, StringComparer.Ordinal), ours.Keys.OrderBy(k => k, StringComparer.Ordinal));
                foreach (var (key, value) in theirs)
                    Assert.Equal(value.shape, ours[key].shape);
                Assert.Contains("\"fan_in_fan_out\": true", File.ReadAllText(Path.Combine(folder, "adapter_config.json")));
                foreach (var t in ours.Values.Concat(theirs.Values))
                    t.Dispose();
            }
            finally
            {
                if (Directory.Exists(folder))
                    Directory.Delete(folder, recursive: true);
            }
        }
    }
}
