using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Text.Json.Nodes;
using TorchLinear.Tests;
using TorchSharp;
using TorchSharp.PyBridge;
using Xunit;
using static TorchLinear.Lora.Tests.Ports;
using static TorchSharp.torch;

namespace TorchLinear.Lora.Tests
{
    /// <summary>
    /// Adapter folders written by real PEFT 0.18.1 (ReferenceData/Peft, make_peft_adapters.py: get_peft_model, training,
    /// save_pretrained) loaded into .NET ports of the same models: the outputs PEFT computes from the same folder
    /// (PeftModel.from_pretrained), unmerged, disabled, merged (merge_adapter) and folded (merge_and_unload); written back
    /// with the same keys, dtypes and bytes; and files that do not fit refused with every problem named and the model
    /// unchanged.
    /// </summary>
    public class PeftFolderTests
    {
        [Theory]
        [InlineData("mlp", new[] { "0", "2" })]
        [InlineData("attention", new[] { "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj",
                                          "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.self_attn.o_proj" })]
        [InlineData("attention_bf16_bin", new[] { "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                                                   "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj" })]
        [InlineData("attention_excluded", new[] { "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj" })]
        public void PeftAdapter_GivesPyTorchsAdaptedOutput_UnmergedAndMerged(string adapter, string[] paths)
        {
            using var scope = NewDisposeScope();
            var cases = Cases(adapter);
            using var model = Pretrained(adapter);
            Equivalence.AssertClose(Run(model, cases["input"]), cases["base_output"]);

            var adapted = LoraModel.load_adapter(model, Path.Combine(Folder, adapter));

            Assert.Equal(paths, adapted);
            Equivalence.AssertClose(Run(model, cases["input"]), cases["adapted_output"]);
            // Disabled as PEFT's disable_adapter(): no updates, modules_to_save as they were (the recorded disabled output).
            using (LoraModel.disable_adapter(model))
                Equivalence.AssertClose(Run(model, cases["input"]), cases["disabled_output"]);
            Equivalence.AssertClose(Run(model, cases["input"]), cases["adapted_output"]);

            // Merged: W + Δ, one linear per layer, as PEFT's merge_adapter() computed it from the folder.
            LoraModel.merge_adapter(model);
            Equivalence.AssertClose(Run(model, cases["input"]), cases["merged_output"]);
            using var fresh = Pretrained(adapter);
            LoraModel.load_adapter(fresh, Path.Combine(Folder, adapter), merge: true);
            Equivalence.AssertClose(Run(fresh, cases["input"]), cases["merged_output"]);
            // Folded: PEFT's merge_and_unload().
            LoraModel.merge_and_unload(fresh);
            Assert.DoesNotContain(fresh.state_dict().Keys, k => k.Contains("lora_", StringComparison.Ordinal));
            Equivalence.AssertClose(Run(fresh, cases["input"]), cases["unloaded_output"]);
        }

        [Theory]
        [InlineData("mlp")]
        [InlineData("attention")]
        [InlineData("attention_bf16_bin")]
        [InlineData("attention_excluded")]
        [InlineData("named")]
        [InlineData("named/other")]
        [InlineData("named/third")]
        [InlineData("dora")]
        [InlineData("embedding")]
        [InlineData("../RealPeft/bias_all")]
        [InlineData("../RealPeft/bias_lora_only")]
        [InlineData("../RealPeft/bias_all_saved")]
        public void EveryReferenceFolder_WasWrittenByRealPeft0181(string adapter)
        {
            // save_pretrained writes its version into the config; the project's own writer (LoraConfig.save) does not
            // write this key, so a folder written here or by hand would fail.
            var json = JsonNode.Parse(File.ReadAllText(Path.Combine(Folder, adapter, "adapter_config.json")))!.AsObject();
            Assert.Equal("0.18.1", (string?)json["peft_version"]);
            Assert.False(File.Exists(Path.Combine(Folder, adapter, "README.md")), "PEFT's model card is removed by the script");
        }

        [Fact]
        public void PeftsLoraOnlyFolder_HoldsNoBias_AndPeftsReloadedModelIsNotTheOneItTrained()
        {
            // PEFT 0.18.1 trains the adapted layers' biases with bias = "lora_only" but saves none (docs/lora.md): the
            // folder has no bias key, its outputs are those of the pretrained biases, and PEFT's model before saving
            // (trained_output) gave other numbers. With bias = "all" PEFT saves <path>.base_layer.bias and its reloaded
            // model is the one it trained.
            using var scope = NewDisposeScope();
            Assert.DoesNotContain(StateDicts.ReadPyTorchFile(Path.Combine(Folder, "attention", "adapter_model.safetensors")).Keys,
                                  k => k.StartsWith("base_model.model.model.", StringComparison.Ordinal) && k.EndsWith("bias", StringComparison.Ordinal));
            var attention = Cases("attention");
            Assert.True(Equivalence.Compare(attention["adapted_output"], attention["trained_output"]).MaxAbsDiff > 1e-2);
            var mlp = Cases("mlp");
            Assert.Contains("base_model.model.0.base_layer.bias", StateDicts.ReadPyTorchFile(Path.Combine(Folder, "mlp", "adapter_model.safetensors")).Keys);
            Equivalence.AssertClose(mlp["adapted_output"], mlp["trained_output"]);
        }

        [Theory]
        [InlineData("mlp")]
        [InlineData("attention")]
        [InlineData("attention_bf16_bin")]
        public void LoadingThenSaving_GivesTheSameKeysShapesAndBytesBack(string adapter)
        {
            using var scope = NewDisposeScope();
            using var model = Pretrained(adapter);
            var adapted = LoraModel.load_adapter(model, Path.Combine(Folder, adapter));
            string output = Directory.CreateTempSubdirectory("torchlinear-peft-").FullName;
            try
            {
                LoraModel.save_pretrained(model, output);
                string original = Path.Combine(Folder, adapter, File.Exists(Path.Combine(Folder, adapter, "adapter_model.safetensors")) ? "adapter_model.safetensors" : "adapter_model.bin");
                var before = StateDicts.ReadPyTorchFile(original);
                var after = StateDicts.ReadPyTorchFile(Path.Combine(output, "adapter_model.safetensors"));
                // PEFT's folder, key for key and bit for bit. With bias = "lora_only" PEFT 0.18.1 saves no bias; this
                // library saves the biases that mode trains, under PEFT's key <path>.base_layer.bias (a difference listed
                // in docs/lora.md): here the pretrained ones, as nothing trained them.
                var peftConfig = LoraConfig.from_pretrained(Path.Combine(Folder, adapter));
                var added = peftConfig.bias == "lora_only" ? adapted.Select(p => $"base_model.model.{p}.base_layer.bias").ToArray() : Array.Empty<string>();
                Assert.Equal(before.Keys.Concat(added).OrderBy(k => k, StringComparer.Ordinal), after.Keys.OrderBy(k => k, StringComparer.Ordinal));
                foreach (var (key, tensor) in before)
                {
                    Assert.Equal(tensor.dtype, after[key].dtype);
                    Assert.True(Equivalence.Compare(tensor, after[key]).BitExact, key);
                }
                var pretrained = StateDicts.ReadPyTorchFile(Path.Combine(Folder, adapter, "base.safetensors"));
                foreach (string key in added)
                    Assert.True(Equivalence.Compare(pretrained[key["base_model.model.".Length..].Replace(".base_layer.bias", ".bias")], after[key]).BitExact, key);
                // The config reads back to the same adapter.
                var config = LoraConfig.from_pretrained(output);
                var source = LoraConfig.from_pretrained(Path.Combine(Folder, adapter));
                Assert.Equal(source.r, config.r);
                Assert.Equal(source.rank_pattern, config.rank_pattern);
                Assert.Equal(source.alpha_pattern, config.alpha_pattern);
                Assert.Equal(source.target_modules, config.target_modules);
                Assert.Equal(source.TargetModulesRegex, config.TargetModulesRegex);
                // And a fresh port loads what was saved to PyTorch's numbers.
                using var again = Pretrained(adapter);
                LoraModel.load_adapter(again, output);
                var cases = Cases(adapter);
                Equivalence.AssertClose(Run(again, cases["input"]), cases["adapted_output"]);
            }
            finally
            {
                Directory.Delete(output, recursive: true);
            }
        }

        [Fact]
        public void ABiasReadUnderItsOldPlainKey_IsSavedUnderPeftsKey_InTheFilesDtype()
        {
            using var scope = NewDisposeScope();
            // PEFT's folder with its biases under the plain key <path>.bias, as PEFT wrote them before its layers held the
            // Linear as base_layer (and as this library wrote them before), in bfloat16.
            string folder = Mutated("mlp", s => s.ToDictionary(kv => kv.Key.Replace(".base_layer.bias", ".bias"), kv => kv.Value.to(ScalarType.BFloat16)));
            string output = Directory.CreateTempSubdirectory("torchlinear-peft-").FullName;
            try
            {
                using var model = Pretrained("mlp");
                LoraModel.load_adapter(model, folder);
                LoraModel.save_pretrained(model, output);
                var before = StateDicts.ReadPyTorchFile(Path.Combine(folder, "adapter_model.safetensors"));
                var after = StateDicts.ReadPyTorchFile(Path.Combine(output, "adapter_model.safetensors"));
                foreach (string path in new[] { "0", "2" })
                {
                    var saved = after[$"base_model.model.{path}.base_layer.bias"];
                    Assert.Equal(ScalarType.BFloat16, saved.dtype);
                    Assert.True(Equivalence.Compare(before[$"base_model.model.{path}.bias"], saved).BitExact, path);
                }
            }
            finally
            {
                Directory.Delete(folder, recursive: true);
                Directory.Delete(output, recursive: true);
            }
        }

        [Fact]
        public void AnAttentionFolder_WithLoraOnlyBiasesUnderTheOldPlainKey_LoadsThem_AndGivesTheBiasedOutput()
        {
            using var scope = NewDisposeScope();
            // PEFT 0.18.1 saves no bias with bias = "lora_only", so PEFT's attention folder cannot show that trained
            // lora_only biases load. Here they are put into PEFT's folder as this library wrote them before: under the
            // plain key <path>.bias of each adapted layer, moved away from the pretrained values.
            var pretrained = StateDicts.ReadPyTorchFile(Path.Combine(Folder, "attention", "base.safetensors"));
            var adapted = new[] { "q_proj", "v_proj", "o_proj" }.SelectMany(p => new[] { 0, 1 }.Select(l => $"model.layers.{l}.self_attn.{p}")).ToArray();
            string folder = Mutated("attention", s =>
            {
                var tensors = new Dictionary<string, Tensor>(s);
                foreach (string path in adapted)
                {
                    var bias = pretrained[$"{path}.bias"];
                    tensors[$"base_model.model.{path}.bias"] = bias + (arange(bias.numel()) * 5 % 7 - 3).to(bias.dtype) / 16;
                }
                return tensors;
            });
            try
            {
                Assert.Equal("lora_only", (string?)JsonNode.Parse(File.ReadAllText(Path.Combine(folder, "adapter_config.json")))!["bias"]);
                var cases = Cases("attention");
                // The hand computation is PEFT's: on PEFT's own folder it gives PEFT's recorded output.
                Equivalence.AssertClose(ByHand(Path.Combine(Folder, "attention"), cases["input"]), cases["adapted_output"]);

                using var model = Pretrained("attention");
                LoraModel.load_adapter(model, folder);
                var output = Run(model, cases["input"]);

                Equivalence.AssertClose(output, ByHand(folder, cases["input"]), msg: "the biases under <path>.bias were not loaded as they are in the file");
                Assert.True(Equivalence.Compare(output, cases["adapted_output"]).MaxAbsDiff > 1e-2, "the moved biases do not show in the output");
            }
            finally
            {
                Directory.Delete(folder, recursive: true);
            }
        }

        /// <summary>
        /// The attention classifier with an adapter folder applied by hand, in float64, without this library: each adapted
        /// layer's weight W + s·B·A (rsLoRA: s = alpha/√r, r = lora_A's rows, alpha from alpha_pattern by the path's
        /// suffix, else lora_alpha), and every parameter the file holds under its plain key (the saved classifier head, the
        /// biases) copied in.
        /// </summary>
        private static Tensor ByHand(string folder, Tensor input)
        {
            using var scope = NewDisposeScope();
            const string prefix = "base_model.model.";
            var file = StateDicts.ReadPyTorchFile(Path.Combine(folder, "adapter_model.safetensors"));
            var config = JsonNode.Parse(File.ReadAllText(Path.Combine(folder, "adapter_config.json")))!.AsObject();
            Assert.True((bool)config["use_rslora"]! && !(bool)config["use_dora"]!, "ByHand computes rsLoRA without DoRA");
            var alphas = config["alpha_pattern"]!.AsObject().ToDictionary(kv => kv.Key, kv => (double)kv.Value!);
            using var model = Pretrained("attention");
            model.to(ScalarType.Float64);
            using (no_grad())
            {
                foreach (var (name, parameter) in model.named_parameters())
                {
                    string path = name[..name.LastIndexOf('.')];
                    if (name.EndsWith(".weight", StringComparison.Ordinal) && file.TryGetValue($"{prefix}{path}.lora_A.weight", out var a))
                    {
                        var b = file[$"{prefix}{path}.lora_B.weight"];
                        var pattern = alphas.Where(kv => path == kv.Key || path.EndsWith("." + kv.Key, StringComparison.Ordinal)).ToList();
                        double alpha = pattern.Count == 1 ? pattern[0].Value : (double)config["lora_alpha"]!;
                        parameter.add_(b.to(ScalarType.Float64).matmul(a.to(ScalarType.Float64)) * (alpha / Math.Sqrt(a.shape[0])));
                    }
                    if (file.TryGetValue(prefix + name, out var saved))
                        parameter.copy_(saved);
                }
            }
            return Run(model, input.to(ScalarType.Float64)).to(ScalarType.Float32).MoveToOuterDisposeScope();
        }

        // ---- Files that do not fit: refused, every problem named, the model unchanged ---------------------------------

        /// <summary>A copy of a reference folder with its tensors and config changed.</summary>
        internal static string Mutated(string adapter, Func<Dictionary<string, Tensor>, Dictionary<string, Tensor>>? tensors = null, Action<JsonObject>? config = null)
        {
            string folder = Directory.CreateTempSubdirectory("torchlinear-peft-mutant-").FullName;
            var json = JsonNode.Parse(File.ReadAllText(Path.Combine(Folder, adapter, "adapter_config.json")))!.AsObject();
            config?.Invoke(json);
            File.WriteAllText(Path.Combine(folder, "adapter_config.json"), json.ToJsonString());
            var state = StateDicts.ReadPyTorchFile(Path.Combine(Folder, adapter, "adapter_model.safetensors"));
            Safetensors.SaveStateDict(Path.Combine(folder, "adapter_model.safetensors"), tensors is null ? state : tensors(state));
            return folder;
        }

        private static Dictionary<string, Tensor> With(Dictionary<string, Tensor> state, string suffix, Func<Tensor, Tensor> change) =>
            state.ToDictionary(kv => kv.Key, kv => kv.Key.EndsWith(suffix, StringComparison.Ordinal) ? change(kv.Value) : kv.Value);

        public static IEnumerable<object[]> Mutations() => new (string, Func<Dictionary<string, Tensor>, Dictionary<string, Tensor>>?, Action<JsonObject>?, string[])[]
        {
            ("wrong key prefix", s => s.ToDictionary(kv => kv.Key.Replace("base_model.model.", "model."), kv => kv.Value), null,
                new[] { "'model.model.layers.0.self_attn.q_proj.lora_A.weight' does not start with 'base_model.model.'", "missing 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'" }),
            ("transposed lora_B", s => With(s, "layers.0.self_attn.v_proj.lora_B.weight", t => t.t().contiguous()), null,
                new[] { "'base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight' has shape [4, 8], model.layers.0.self_attn.v_proj needs [8, 4] (r = 4)" }),
            ("missing tensor", s => s.Where(kv => !kv.Key.EndsWith("layers.1.self_attn.o_proj.lora_A.weight")).ToDictionary(kv => kv.Key, kv => kv.Value), null,
                new[] { "missing 'base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight' for the targeted model.layers.1.self_attn.o_proj" }),
            ("rank of another config", null, c => c["rank_pattern"] = new JsonObject(),
                new[] { "'base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight' has shape [2, 8], model.layers.0.self_attn.o_proj needs [4, 8] (r = 4)" }),
            ("LoRA inside a saved module", s => s.Append(KeyValuePair.Create("base_model.model.classifier.modules_to_save.lora_A.weight", ones(2, 24))).ToDictionary(kv => kv.Key, kv => kv.Value), null,
                new[] { "'base_model.model.classifier.modules_to_save.lora_A.weight' puts LoRA or weights inside a saved module's wrapper" }),
            // Guards: an adapter of NaN loaded silently in the old sample.
            ("NaN in an adapter", s => With(s, "layers.1.self_attn.q_proj.lora_B.weight", t => t.clone().index_put_(tensor(float.NaN), new[] { TensorIndex.Single(0), TensorIndex.Single(0) })), null,
                new[] { "'base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight' holds NaN or infinity" }),
            ("infinity in a saved head", s => With(s, "classifier.bias", t => t.clone().fill_(float.PositiveInfinity)), null,
                new[] { "'base_model.model.classifier.bias' holds NaN or infinity" }),
            // A trained head for a module the model lacks would be dropped silently: refused.
            ("a head the model lacks", s => s.Append(KeyValuePair.Create("base_model.model.score.weight", ones(3, 24))).ToDictionary(kv => kv.Key, kv => kv.Value),
                c => c["modules_to_save"] = new JsonArray("classifier", "score"),
                new[] { "'base_model.model.score.weight' names no parameter or buffer of the model ('score.weight')" }),
            ("a bias on lora_B", s => s.Append(KeyValuePair.Create("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", zeros(24))).ToDictionary(kv => kv.Key, kv => kv.Value), null,
                new[] { "'base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias' is an adapter tensor TorchLinear.Lora does not read" }),
        }.Select(m => new object[] { m.Item1, m.Item2!, m.Item3!, m.Item4 });

        [Theory]
        [MemberData(nameof(Mutations))]
        public void AFileThatDoesNotFit_IsRefusedWithTheProblemNamed_AndTheModelUnchanged(
            string mutation, Func<Dictionary<string, Tensor>, Dictionary<string, Tensor>>? tensors, Action<JsonObject>? config, string[] problems)
        {
            using var scope = NewDisposeScope();
            string folder = Mutated("attention", tensors, config);
            try
            {
                foreach (bool merge in new[] { false, true })
                {
                    using var model = Pretrained("attention");
                    var before = Bits(model);
                    var error = Assert.Throws<InvalidOperationException>(() => LoraModel.load_adapter(model, folder, merge: merge));
                    foreach (string problem in problems)
                        Assert.Contains(problem, error.Message);
                    Assert.Contains("nothing was changed", error.Message);
                    AssertUnchanged(before, model);
                }
                _ = mutation;
            }
            finally
            {
                Directory.Delete(folder, recursive: true);
            }
        }

        private static void AssertUnchanged(Dictionary<string, string[]> before, nn.Module model)
        {
            var after = Bits(model);
            Assert.Equal(before.Keys, after.Keys);
            foreach (var (key, bits) in after)
                Assert.Equal(before[key], bits);
            Assert.DoesNotContain(model.named_modules(), m => m.module is LoraLayer or LoraProjection or LoraWrapper);
            Assert.All(model.parameters(), p => Assert.True(p.requires_grad));
        }

        [Fact]
        public void AMergeThatWouldOverflow_IsRefusedBeforeTheAdapterIsPutIn()
        {
            // Guards: the old sample refused the merge but left the adapters attached (the state_dict had changed).
            using var scope = NewDisposeScope();
            // The update itself is finite (scaling · B A is refused at load otherwise); the weight it is added to is near
            // float32's largest value.
            string folder = Mutated("attention", s => With(s, "layers.0.self_attn.q_proj.lora_B.weight", t => t.clone().fill_(1e37f)));
            try
            {
                using var model = Pretrained("attention");
                using (no_grad())
                    model.named_parameters().Single(p => p.name == "model.layers.0.self_attn.q_proj.weight").parameter.fill_(3.3e38f);
                var before = Bits(model);
                var error = Assert.Throws<InvalidOperationException>(() => LoraModel.load_adapter(model, folder, merge: true));
                Assert.Contains("merging it would put NaN or infinity into the weights of model.layers.0.self_attn.q_proj", error.Message);
                AssertUnchanged(before, model);
                // Unmerged, it loads; a merge then is refused with no weight written.
                LoraModel.load_adapter(model, folder);
                var loaded = Bits(model);
                Assert.Contains("no weight was changed", Assert.Throws<InvalidOperationException>(() => LoraModel.merge_adapter(model)).Message);
                foreach (var (key, bits) in Bits(model))
                    Assert.Equal(loaded[key], bits);
            }
            finally
            {
                Directory.Delete(folder, recursive: true);
            }
        }

        [Fact]
        public void AnAlphaNotFiniteInTheLayersDtype_IsRefusedNamingTheConfigFileAndKey()
        {
            string folder = Mutated("attention", config: c => c["alpha_pattern"] = new JsonObject { ["layers.1.self_attn.v_proj"] = 1e39 });
            try
            {
                using var model = Pretrained("attention");
                var before = Bits(model);
                var error = Assert.Throws<CheckpointFormatException>(() => LoraModel.load_adapter(model, folder));
                Assert.Equal(Path.Combine(folder, "adapter_config.json"), error.Path);
                Assert.Equal("alpha_pattern.layers.1.self_attn.v_proj", error.Key);
                Assert.Contains("not finite in the layer's dtype Float32", error.Message);
                AssertUnchanged(before, model);
            }
            finally
            {
                Directory.Delete(folder, recursive: true);
            }
        }

        [Fact]
        public void AnFp16Adapter_ArrivesInTheLayersDtype_AndModulesTheModelLacks_AreSkipped()
        {
            // Published adapters come in fp16 too, and list modules_to_save the model does not have.
            string folder = Mutated("attention",
                tensors: s => s.ToDictionary(kv => kv.Key, kv => kv.Key.Contains("lora_") ? kv.Value.to(ScalarType.Float16) : kv.Value),
                config: c => c["modules_to_save"] = new JsonArray("classifier", "score", "classifier"));
            try
            {
                using var scope = NewDisposeScope();
                using var model = Pretrained("attention");
                LoraModel.load_adapter(model, folder);
                var file = StateDicts.ReadPyTorchFile(Path.Combine(folder, "adapter_model.safetensors"));
                var loaded = model.state_dict()["model.layers.0.self_attn.q_proj.lora_B.default.weight"];
                Assert.Equal(ScalarType.Float32, loaded.dtype);
                Assert.True(Equivalence.Compare(file["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].to(ScalarType.Float32), loaded).BitExact);
            }
            finally
            {
                Directory.Delete(folder, recursive: true);
            }
        }

        [Fact]
        public void AConfigWhoseTargetsMatchNothing_IsRefused()
        {
            string folder = Mutated("attention", config: c => c["target_modules"] = new JsonArray("query", "value"));
            try
            {
                using var model = Pretrained("attention");
                var error = Assert.Throws<ArgumentException>(() => LoraModel.load_adapter(model, folder));
                Assert.Contains("target_modules [query, value] matches no nn.Linear, CustomLinear, Conv1D, nn.Embedding, nn.Conv1d or nn.Conv2d", error.Message);
                Assert.DoesNotContain(model.state_dict().Keys, k => k.Contains("lora_"));
            }
            finally
            {
                Directory.Delete(folder, recursive: true);
            }
        }
    }
}
