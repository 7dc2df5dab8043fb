using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Text;
using System.Text.Json;
using TorchLinear.Tests.RealModels;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Tests
{
    /// <summary>
    /// The hand-written port of transformers' LlamaForCausalLM (RealModels/TinyLlama.cs) against
    /// ReferenceData/Parity/RealModels/tiny_llama.parity.pt, recorded from transformers' own modeling_llama.py on PyTorch
    /// 1.13 (make_real_models.py beside it): the port's state_dict is transformers', its logits and every module's output
    /// match the recording, and planted porting mistakes are caught where they are.
    /// </summary>
    public class TinyLlamaParityTests
    {
        private static readonly string RecordingPath =
            Path.Combine(AppContext.BaseDirectory, "ReferenceData", "Parity", "RealModels", "tiny_llama.parity.pt");

        /// <summary>The recorded model's configuration (make_real_models.py's tiny_llama).</summary>
        private static LlamaConfig Config(double rms_norm_eps = 1e-6) => new()
        {
            vocab_size = 64,
            hidden_size = 16,
            intermediate_size = 32,
            num_hidden_layers = 2,
            num_attention_heads = 4,
            num_key_value_heads = 2,
            rms_norm_eps = rms_norm_eps,
        };

        /// <summary>Every tensor of the recording, by key; disposes them.</summary>
        private sealed class Recorded : IDisposable
        {
            public Dictionary<string, Tensor> Tensors { get; } = StateDicts.ReadPyTorchFile(RecordingPath);

            public Tensor this[string key] =>
                Tensors.TryGetValue(key, out var t) ? t : throw new KeyNotFoundException($"{RecordingPath} has no tensor '{key}'.");

            public JsonElement Metadata
            {
                get
                {
                    using var document = JsonDocument.Parse(Encoding.UTF8.GetString(this["metadata"].bytes));
                    return document.RootElement.Clone();
                }
            }

            /// <summary>The recorded state_dict, without the "state/" prefix, in the file's order.</summary>
            public Dictionary<string, Tensor> State() =>
                Tensors.Where(kv => kv.Key.StartsWith("state/", StringComparison.Ordinal)).ToDictionary(kv => kv.Key["state/".Length..], kv => kv.Value);

            public Tensor Input(string call, int j) => this[$"call/{call}/input/{j}"];
            public Tensor Output(string call, int k) => this[$"call/{call}/output/{k}"];

            public void Dispose()
            {
                foreach (var t in Tensors.Values)
                    t.Dispose();
            }
        }

        /// <summary>A port with the recorded weights, in eval mode as the recording (its training flags are all false).</summary>
        private static LlamaForCausalLM LoadedPort(Recorded recorded, LlamaConfig? config = null, LlamaPortMistakes mistakes = LlamaPortMistakes.None)
        {
            var port = new LlamaForCausalLM(config ?? Config(), mistakes);
            Assert.Empty(StateDicts.LoadChecked(port, recorded.State()));
            port.eval();
            return port;
        }

        /// <summary>A copy of <paramref name="t"/> that outlives the forward's dispose scopes (for a hook to keep).</summary>
        private static Tensor Kept(Tensor t) => t.detach().clone().DetachFromDisposeScope();

        private static T Submodule<T>(nn.Module root, string path) where T : nn.Module =>
            root.named_modules().Single(m => m.name == path).module as T
            ?? throw new InvalidOperationException($"{path} is not a {typeof(T).Name}.");

        [Fact]
        public void StateDict_IsTransformers_KeyForKey_AndInvFreqIsNotInIt()
        {
            using var recorded = new Recorded();
            using var port = new LlamaForCausalLM(Config());
            var expected = recorded.State();
            var actual = port.state_dict();
            Assert.Equal(expected.Keys, actual.Keys);
            Assert.All(expected, kv => Assert.Equal(kv.Value.shape, actual[kv.Key].shape));
            Assert.Equal(recorded.Metadata.GetProperty("parameters").EnumerateArray().Select(e => e.GetString()),
                         port.named_parameters().Select(p => p.name));
            // inv_freq is a buffer (persistent=False in transformers): not saved, and converted with the module (which
            // TorchSharp's Module.to does not do for a non-persistent buffer by itself), still not saved then.
            var rotary = Submodule<LlamaRotaryEmbedding>(port, "model.rotary_emb");
            Assert.Equal(ScalarType.Float32, rotary.inv_freq.dtype);
            port.to(ScalarType.Float64);
            Assert.Equal(ScalarType.Float64, rotary.inv_freq.dtype);
            Assert.DoesNotContain("model.rotary_emb.inv_freq", port.state_dict().Keys);
        }

        [Fact]
        public void InvFreq_IsOneOverThetaToTheEvenFeaturesOverHeadDim()
        {
            using var rotary = new LlamaRotaryEmbedding(Config());
            // head_dim 4: 1 / 10000^(0/4), 1 / 10000^(2/4) in float32 (float32 tolerances: libtorch's vectorised pow
            // need not be correctly rounded on every CPU).
            Equivalence.AssertClose(rotary.inv_freq, torch.tensor(new float[] { 1f, 0.01f }));
        }

        [Fact]
        public void RmsNorm_PrintsAsTransformersExtraRepr()
        {
            using var norm = new LlamaRMSNorm(16, 1e-6);
            Assert.Equal("LlamaRMSNorm((16,), eps=1e-06)", norm.ToString());
        }

        [Fact]
        public void Logits_MatchTheRecordedOutput()
        {
            using var recorded = new Recorded();
            using var port = LoadedPort(recorded);
            using var logits = port.call(recorded["input/0"]);
            Equivalence.AssertClose(logits, recorded.Output("", 0));
        }

        [Fact]
        public void InTheWholeForward_EveryAttentionDecoderLayerAndTheRotaryEmbedding_MatchTheirRecordedCalls()
        {
            using var recorded = new Recorded();
            using var port = LoadedPort(recorded);
            var seen = new Dictionary<string, Tensor[]>();
            var rotary = Submodule<LlamaRotaryEmbedding>(port, "model.rotary_emb");
            var removers = new List<Action>();
            removers.Add(rotary.register_forward_hook((m, x, ids, output) =>
            {
                seen["model.rotary_emb"] = new[] { Kept(output.cos), Kept(output.sin) };
                return output;
            }).remove);
            for (int i = 0; i < 2; i++)
            {
                string layerPath = $"model.layers.{i}";
                removers.Add(Submodule<LlamaDecoderLayer>(port, layerPath).register_forward_hook((m, h, mask, ids, cache, pe, output) =>
                {
                    seen[layerPath] = new[] { Kept(output), Kept(mask), Kept(ids), Kept(cache) };
                    return output;
                }).remove);
                removers.Add(Submodule<LlamaAttention>(port, layerPath + ".self_attn").register_forward_hook((m, h, mask, ids, cache, pe, output) =>
                {
                    seen[layerPath + ".self_attn"] = new[] { Kept(output) };
                    return output;
                }).remove);
            }
            using (var logits = port.call(recorded["input/0"])) { }
            foreach (var remove in removers)
                remove();

            Equivalence.AssertClose(seen["model.rotary_emb"][0], recorded.Output("model.rotary_emb", 0));
            Equivalence.AssertClose(seen["model.rotary_emb"][1], recorded.Output("model.rotary_emb", 1));
            for (int i = 0; i < 2; i++)
            {
                string layerPath = $"model.layers.{i}";
                Equivalence.AssertClose(seen[layerPath + ".self_attn"][0], recorded.Output(layerPath + ".self_attn", 0));
                Equivalence.AssertClose(seen[layerPath][0], recorded.Output(layerPath, 0));
                // The causal mask, position_ids and cache_position are transformers', bit for bit.
                Equivalence.AssertClose(seen[layerPath][1], recorded.Input(layerPath, 1), rtol: 0, atol: 0);
                Equivalence.AssertClose(seen[layerPath][2], recorded.Input(layerPath, 2), rtol: 0, atol: 0);
                Equivalence.AssertClose(seen[layerPath][3], recorded.Input(layerPath, 3), rtol: 0, atol: 0);
            }
            foreach (var t in seen.Values.SelectMany(ts => ts))
                t.Dispose();
        }

        /// <summary>Each module run on PyTorch's recorded inputs gives PyTorch's recorded output (no upstream drift).</summary>
        [Theory]
        [InlineData("model.rotary_emb")]
        [InlineData("model.layers.0.input_layernorm")]
        [InlineData("model.layers.0.self_attn")]
        [InlineData("model.layers.0.mlp")]
        [InlineData("model.layers.0")]
        [InlineData("model.layers.1.self_attn")]
        [InlineData("model.layers.1")]
        [InlineData("model.norm")]
        [InlineData("model")]
        public void GivenPyTorchsInputs_AModuleGivesPyTorchsOutput(string path)
        {
            using var recorded = new Recorded();
            using var port = LoadedPort(recorded);
            foreach (var (actual, expected) in RunOnRecordedInputs(port, recorded, path))
            {
                Equivalence.AssertClose(actual, expected);
                actual.Dispose();
            }
        }

        /// <summary>The module at <paramref name="path"/> called on its recorded inputs: (its outputs, the recorded ones).</summary>
        private static List<(Tensor Actual, Tensor Expected)> RunOnRecordedInputs(LlamaForCausalLM port, Recorded recorded, string path)
        {
            Tensor In(int j) => recorded.Input(path, j);
            Tensor Out(int k) => recorded.Output(path, k);
            var module = port.named_modules().Single(m => m.name == path).module;
            switch (module)
            {
                case LlamaRotaryEmbedding rotary:
                    var (cos, sin) = rotary.call(In(0), In(1));
                    return new() { (cos, Out(0)), (sin, Out(1)) };
                case LlamaAttention attention:
                    return new() { (attention.call(In(0), In(1), In(2), In(3), (In(4), In(5))), Out(0)) };
                case LlamaDecoderLayer layer:
                    return new() { (layer.call(In(0), In(1), In(2), In(3), (In(4), In(5))), Out(0)) };
                case nn.Module<Tensor, Tensor> single:
                    return new() { (single.call(In(0)), Out(0)) };
                default:
                    throw new InvalidOperationException($"{path} is a {module.GetType().Name}, which this test cannot call.");
            }
        }

        [Fact]
        public void AWrongRmsNormEps_ChangesTheFirstInputLayernormsOutput()
        {
            using var recorded = new Recorded();
            using var port = LoadedPort(recorded, Config(rms_norm_eps: 1e-5));
            var (actual, expected) = RunOnRecordedInputs(port, recorded, "model.layers.0.input_layernorm").Single();
            Assert.Throws<TensorMismatchException>(() => Equivalence.AssertClose(actual, expected));
            actual.Dispose();
        }

        [Theory]
        [InlineData(LlamaPortMistakes.RotateHalfSwapped)]
        [InlineData(LlamaPortMistakes.AttentionScaledByHeadDim)]
        public void AnAttentionMistake_ChangesTheFirstAttentionsOutput_NotTheSeconds(LlamaPortMistakes mistake)
        {
            using var recorded = new Recorded();
            using var port = LoadedPort(recorded, mistakes: mistake);
            var (first, firstExpected) = RunOnRecordedInputs(port, recorded, "model.layers.0.self_attn").Single();
            Assert.Throws<TensorMismatchException>(() => Equivalence.AssertClose(first, firstExpected));
            var (second, secondExpected) = RunOnRecordedInputs(port, recorded, "model.layers.1.self_attn").Single();
            Equivalence.AssertClose(second, secondExpected);
            first.Dispose();
            second.Dispose();
        }

        // ---- Parity.Replay against the recording ----

        /// <summary>The modules of several tensors in and out: the rows that must have been compared, not skipped.</summary>
        private static readonly string[] MultiTensorCalls =
        {
            "model.rotary_emb", "model.layers.0.self_attn", "model.layers.0", "model.layers.1.self_attn", "model.layers.1",
        };

        [Fact]
        public void Replay_FaithfulPort_NoDivergence_ForwardAndBackward_WithAttentionDecoderLayersAndRotaryCompared()
        {
            using var recorded = new Recorded();
            using var port = new LlamaForCausalLM(Config());
            port.eval();
            var report = Parity.Replay(port, RecordingPath);

            Assert.True(report.AllClose, report.ToString());
            Assert.Null(report.FirstDivergence);
            // Every recorded call, in PyTorch's order, compared and close: none unseen, none without a tensor.
            var callOrder = recorded.Metadata.GetProperty("call_order").EnumerateArray().Select(e => e.GetString() is "" ? "(model)" : e.GetString()).ToList();
            Assert.Equal(32, callOrder.Count);
            Assert.Equal(callOrder, report.Modules.Select(r => r.Path));
            Assert.All(report.Modules, r => Assert.True(r.IsClose, $"{r.Path}: {r.Status} {r.Detail}"));
            foreach (string path in MultiTensorCalls)
            {
                var row = report.Modules.Single(r => r.Path == path);
                Assert.True(row.Status is ParityStatus.BitExact or ParityStatus.Close or ParityStatus.WithinRounding, $"{path}: {row.Status} {row.Detail}");
                // Their keyword inputs (attention_mask, position_ids, cache_position, cos and sin) were compared too.
                Assert.True(row.InputsMatch, $"{path}: inputs not compared or not matching: {row.Detail}");
            }
            // The keyword tensors transformers passes were recorded under their names, and are what the rows compared.
            var calls = recorded.Metadata.GetProperty("calls");
            Assert.Equal(new[] { "hidden_states", "attention_mask", "position_ids", "cache_position", "position_embeddings.0", "position_embeddings.1" },
                         calls.GetProperty("model.layers.0.self_attn").GetProperty("inputs").EnumerateArray().Select(e => e.GetString()));
            Assert.Equal(new[] { "0", "attention_mask", "position_ids", "cache_position", "position_embeddings.0", "position_embeddings.1" },
                         calls.GetProperty("model.layers.1").GetProperty("inputs").EnumerateArray().Select(e => e.GetString()));
            Assert.Equal(new[] { "0", "1" }, calls.GetProperty("model.rotary_emb").GetProperty("outputs").EnumerateArray().Select(e => e.GetString()));
            Assert.Equal(new[] { "LlamaRotaryEmbedding", "LlamaAttention", "LlamaDecoderLayer" },
                         MultiTensorCalls.Take(3).Select(p => report.Modules.Single(r => r.Path == p).ModuleType));
            // Backward: every parameter's gradient, all close.
            Assert.Equal(21, report.Gradients.Count(r => r.Path != "input 0"));
            Assert.All(report.Gradients, r => Assert.True(r.IsClose, $"{r.Path}: {r.Status} {r.Detail}"));
        }

        [Fact]
        public void Replay_RmsNormEps1e5_IsNamedAtTheFirstInputLayernorm()
        {
            using var port = new LlamaForCausalLM(Config(rms_norm_eps: 1e-5));
            port.eval();
            var report = Parity.Replay(port, RecordingPath);
            Assert.False(report.AllClose);
            Assert.Equal("model.layers.0.input_layernorm", report.FirstDivergence);
            Assert.True(report.FirstDivergenceRow!.InputsMatch);
        }

        [Theory]
        [InlineData(LlamaPortMistakes.AttentionScaledByHeadDim)]
        [InlineData(LlamaPortMistakes.RotateHalfSwapped)]
        public void Replay_AnAttentionMistake_IsNamedAtTheFirstSelfAttn(LlamaPortMistakes mistake)
        {
            using var port = new LlamaForCausalLM(Config(), mistake);
            port.eval();
            var report = Parity.Replay(port, RecordingPath);
            Assert.False(report.AllClose);
            Assert.Equal("model.layers.0.self_attn", report.FirstDivergence);
            Assert.True(report.FirstDivergenceRow!.InputsMatch);
            // Its projections, called before the mistake, are still close.
            Assert.All(new[] { "q_proj", "k_proj", "v_proj" }, p => Assert.True(report.Modules.Single(r => r.Path == $"model.layers.0.self_attn.{p}").IsClose));
        }

        [Fact]
        public void Replay_ComparesEveryTensorOfATupleOutput_TheRotaryEmbeddingsSinAloneWrongIsNamed()
        {
            using var port = new LlamaForCausalLM(Config());
            port.eval();
            // cos stays right; only the second tensor of the (cos, sin) tuple is off, by 1e-3.
            var remover = Submodule<LlamaRotaryEmbedding>(port, "model.rotary_emb")
                .register_forward_hook((m, x, position_ids, output) => (output.cos, (output.sin + 1e-3).MoveToOuterDisposeScope()));
            var report = Parity.Replay(port, RecordingPath);
            remover.remove();
            Assert.Equal("model.rotary_emb", report.FirstDivergence);
            Assert.True(report.FirstDivergenceRow!.InputsMatch);
            Assert.Contains("model.rotary_emb output 1", report.FirstDivergenceRow.Detail);
        }

        [Fact]
        public void Replay_ComparesKeywordInputs_AnAttentionMaskOfOtherWidthIsSeenAlthoughTheOutputIsTheSame()
        {
            using var port = new LlamaForCausalLM(Config());
            port.eval();
            // The first layer's attention gets the mask cut to the 7 keys it uses: its output is the same, its
            // attention_mask input is not transformers' (2, 1, 7, 8).
            var remover = Submodule<LlamaAttention>(port, "model.layers.0.self_attn").register_forward_pre_hook(
                (m, hidden_states, attention_mask, position_ids, cache_position, position_embeddings) =>
                    (hidden_states, attention_mask[TensorIndex.Colon, TensorIndex.Colon, TensorIndex.Colon, TensorIndex.Slice(null, 7)].MoveToOuterDisposeScope(),
                     position_ids, cache_position, position_embeddings));
            var report = Parity.Replay(port, RecordingPath);
            remover.remove();
            var attention = report.Modules.Single(r => r.Path == "model.layers.0.self_attn");
            Assert.True(attention.IsClose, $"{attention.Status} {attention.Detail}");
            Assert.False(attention.InputsMatch);
            Assert.True(report.Modules.Single(r => r.Path == "model.layers.0").InputsMatch);
        }
    }
}
