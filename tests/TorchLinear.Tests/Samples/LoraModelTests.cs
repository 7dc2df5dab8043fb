using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Text.Json.Nodes;
using TorchLinear.Samples;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.PyBridge;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Tests.Samples
{
    /// <summary>
    /// PEFT adapters made with real PyTorch (ReferenceData/Peft, by make_peft_adapters.py in PEFT's layout) loaded into
    /// .NET ports of the same models: PyTorch's adapted outputs, merged and unmerged; files that do not fit are refused
    /// with every problem named and the model unchanged.
    /// </summary>
    public class LoraModelTests
    {
        private static readonly string Folder = Path.Combine(AppContext.BaseDirectory, "ReferenceData", "Peft");

        // ---- The ports of make_peft_adapters.py's models ----------------------------------------------------------

        private static Sequential Mlp() => nn.Sequential(("0", nn.Linear(16, 32)), ("1", nn.ReLU()), ("2", nn.Linear(32, 8)));

        /// <summary>q/k/v/o projections in fields of TorchSharp's sealed Linear, called with call(x) unless told otherwise.</summary>
        internal sealed class SelfAttention : nn.Module<Tensor, Tensor>
        {
            private readonly Linear q_proj = nn.Linear(24, 24), k_proj = nn.Linear(24, 8), v_proj = nn.Linear(24, 8), o_proj = nn.Linear(8, 24);
            private readonly bool _viaForward;

            public SelfAttention(bool viaForward) : base(nameof(SelfAttention))
            {
                _viaForward = viaForward;
                RegisterComponents();
            }

            private Tensor Run(Linear layer, Tensor x) => _viaForward ? layer.forward(x) : layer.call(x);

            public override Tensor forward(Tensor x)
            {
                using var scope = NewDisposeScope();
                var q = Run(q_proj, x)[TensorIndex.Ellipsis, TensorIndex.Slice(0, 8)];
                var k = Run(k_proj, x);
                var v = Run(v_proj, x);
                var weights = (q.matmul(k.transpose(-2, -1)) / Math.Sqrt(8)).softmax(-1);
                return Run(o_proj, weights.matmul(v)).MoveToOuterDisposeScope();
            }
        }

        internal sealed class Layer : nn.Module<Tensor, Tensor>
        {
            private readonly SelfAttention self_attn;

            public Layer(bool viaForward) : base(nameof(Layer))
            {
                self_attn = new SelfAttention(viaForward);
                RegisterComponents();
            }

            public override Tensor forward(Tensor x) => x + self_attn.call(x);
        }

        internal sealed class Inner : nn.Module<Tensor, Tensor>
        {
            private readonly ModuleList<Layer> layers;

            public Inner(bool viaForward) : base(nameof(Inner))
            {
                layers = new ModuleList<Layer>(new Layer(viaForward), new Layer(viaForward));
                RegisterComponents();
            }

            public override Tensor forward(Tensor x)
            {
                foreach (var layer in layers)
                    x = layer.call(x);
                return x;
            }
        }

        internal sealed class Classifier : nn.Module<Tensor, Tensor>
        {
            private readonly Inner model;
            private readonly Linear classifier = nn.Linear(24, 3);

            public Classifier(bool viaForward = false) : base(nameof(Classifier))
            {
                model = new Inner(viaForward);
                RegisterComponents();
            }

            public override Tensor forward(Tensor x) => classifier.call(model.call(x).mean(new long[] { -2 }));
        }

        private static nn.Module<Tensor, Tensor> Port(string adapter, bool viaForward = false) =>
            adapter == "mlp" ? Mlp() : new Classifier(viaForward);

        /// <summary>The port with the pretrained weights make_peft_adapters.py started from.</summary>
        private static nn.Module<Tensor, Tensor> Pretrained(string adapter, bool viaForward = false)
        {
            var model = Port(adapter, viaForward);
            StateDicts.LoadPyTorchFile(model, Path.Combine(Folder, adapter, "base.safetensors"));
            model.eval();
            return model;
        }

        private static Dictionary<string, Tensor> Cases(string adapter) => StateDicts.ReadPyTorchFile(Path.Combine(Folder, adapter, "cases.safetensors"));

        private static Tensor Run(nn.Module<Tensor, Tensor> model, Tensor x)
        {
            using var _ = no_grad();
            return model.call(x);
        }

        // ---- PyTorch's numbers -------------------------------------------------------------------------------------

        [Theory]
        [InlineData("mlp", new[] { "0", "2" })]
        [InlineData("attention", new[] { "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj",
                                          "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.self_attn.o_proj" })]
        [InlineData("attention_bf16_bin", new[] { "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                                                   "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj" })]
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
            using (LoraModel.disable_adapters(model))
                Equivalence.AssertClose(Run(model, cases["input"]), cases["disabled_output"]);
            Equivalence.AssertClose(Run(model, cases["input"]), cases["adapted_output"]);

            // Merged: W + Δ, one linear per layer; the same numbers up to the merge's rounding.
            LoraModel.merge(model);
            Equivalence.AssertClose(Run(model, cases["input"]), cases["adapted_output"], rtol: 1e-5, atol: 1e-5);
            using var fresh = Pretrained(adapter);
            LoraModel.load_adapter(fresh, Path.Combine(Folder, adapter), merge: true);
            Equivalence.AssertClose(Run(fresh, cases["input"]), cases["adapted_output"], rtol: 1e-5, atol: 1e-5);
        }

        [Fact]
        public void APortThatCallsItsLayersWithForward_RunsNoUnmergedAdapter_ButAMergedOne()
        {
            using var scope = NewDisposeScope();
            var cases = Cases("attention");
            using var unmerged = Pretrained("attention", viaForward: true);
            LoraModel.load_adapter(unmerged, Path.Combine(Folder, "attention"));
            // TorchSharp runs hooks only through call(x): the projections' adapters never run. Only the classifier (a
            // modules_to_save head loaded as plain weights) and the biases (bias = lora_only) differ from the base model.
            Assert.Throws<TensorMismatchException>(() => Equivalence.AssertClose(Run(unmerged, cases["input"]), cases["adapted_output"]));

            using var merged = Pretrained("attention", viaForward: true);
            LoraModel.load_adapter(merged, Path.Combine(Folder, "attention"), merge: true);
            Equivalence.AssertClose(Run(merged, cases["input"]), cases["adapted_output"], rtol: 1e-5, atol: 1e-5);
        }

        [Fact]
        public void MergeAndUnload_LeavesAPlainModelOfItsOwnTypes_AndUnloadTheBaseWeights()
        {
            using var scope = NewDisposeScope();
            var cases = Cases("attention");
            using var model = Pretrained("attention");
            var baseKeys = model.state_dict().Keys.ToList();
            var baseWeight = TensorText.Bits(model.state_dict()["model.layers.0.self_attn.q_proj.weight"]);
            LoraModel.load_adapter(model, Path.Combine(Folder, "attention"));
            Assert.Contains("model.layers.0.self_attn.q_proj.lora_A.weight", model.state_dict().Keys);

            LoraModel.merge_and_unload(model);

            Assert.Equal(baseKeys, model.state_dict().Keys);
            Assert.All(model.named_modules().Where(m => m.name.EndsWith("_proj", StringComparison.Ordinal)), m => Assert.IsType<Linear>(m.module));
            Equivalence.AssertClose(Run(model, cases["input"]), cases["adapted_output"], rtol: 1e-5, atol: 1e-5);

            using var other = Pretrained("attention");
            var baseClassifier = TensorText.Bits(other.state_dict()["classifier.weight"]);
            LoraModel.load_adapter(other, Path.Combine(Folder, "attention"));
            LoraModel.merge(other);
            LoraModel.unload(other);
            Assert.Equal(baseWeight, TensorText.Bits(other.state_dict()["model.layers.0.self_attn.q_proj.weight"]));
            Assert.Equal(baseClassifier, TensorText.Bits(other.state_dict()["classifier.weight"]));
            Assert.Equal(baseKeys, other.state_dict().Keys);
        }

        // ---- Files written back --------------------------------------------------------------------------------------

        [Theory]
        [InlineData("mlp")]
        [InlineData("attention")]
        [InlineData("attention_bf16_bin")]
        public void LoadingThenSaving_GivesTheSameKeysShapesAndBytesBack(string adapter)
        {
            using var scope = NewDisposeScope();
            using var model = Pretrained(adapter);
            LoraModel.load_adapter(model, Path.Combine(Folder, adapter));
            string output = Directory.CreateTempSubdirectory("torchlinear-peft-").FullName;
            try
            {
                LoraModel.save_adapter(model, output);
                string original = Path.Combine(Folder, adapter, File.Exists(Path.Combine(Folder, adapter, "adapter_model.safetensors")) ? "adapter_model.safetensors" : "adapter_model.bin");
                var before = StateDicts.ReadPyTorchFile(original);
                var after = StateDicts.ReadPyTorchFile(Path.Combine(output, "adapter_model.safetensors"));
                Assert.Equal(before.Keys.OrderBy(k => k, StringComparer.Ordinal), after.Keys.OrderBy(k => k, StringComparer.Ordinal));
                foreach (var (key, tensor) in before)
                {
                    Assert.Equal(tensor.dtype, after[key].dtype);
                    Assert.True(Equivalence.Compare(tensor, after[key]).BitExact, key);
                }
                // The config reads back to the same adapter.
                var config = LoraConfig.load(output);
                var source = LoraConfig.load(Path.Combine(Folder, adapter));
                Assert.Equal(source.r, config.r);
                Assert.Equal(source.rank_pattern, config.rank_pattern);
                Assert.Equal(source.alpha_pattern, config.alpha_pattern);
                Assert.Equal(source.target_modules, config.target_modules);
                Assert.Equal(source.target_modules_regex, config.target_modules_regex);
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

        // ---- Files that do not fit: refused, every problem named, the model unchanged ---------------------------------

        private static string Mutated(string adapter, Func<Dictionary<string, Tensor>, Dictionary<string, Tensor>>? tensors = null, Action<JsonObject>? config = null)
        {
            string folder = Directory.CreateTempSubdirectory("torchlinear-peft-mutant-").FullName;
            var json = JsonNode.Parse(File.ReadAllText(Path.Combine(Folder, adapter, "adapter_config.json")))!.AsObject();
            config?.Invoke(json);
            File.WriteAllText(Path.Combine(folder, "adapter_config.json"), json.ToJsonString());
            var state = StateDicts.ReadPyTorchFile(Path.Combine(Folder, adapter, "adapter_model.safetensors"));
            Safetensors.SaveStateDict(Path.Combine(folder, "adapter_model.safetensors"), tensors is null ? state : tensors(state));
            return folder;
        }

        public static IEnumerable<object[]> Mutations() => new (string, Func<Dictionary<string, Tensor>, Dictionary<string, Tensor>>?, Action<JsonObject>?, string[])[]
        {
            ("wrong key prefix", s => s.ToDictionary(kv => kv.Key.Replace("base_model.model.", "model."), kv => kv.Value), null,
                new[] { "'model.model.layers.0.self_attn.q_proj.lora_A.weight' does not start with 'base_model.model.'", "missing 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'" }),
            ("transposed lora_B", s => s.ToDictionary(kv => kv.Key, kv => kv.Key.EndsWith("layers.0.self_attn.v_proj.lora_B.weight") ? kv.Value.t().contiguous() : kv.Value), null,
                new[] { "'base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight' has shape [4, 8], model.layers.0.self_attn.v_proj needs [8, 4] (r = 4)" }),
            ("missing tensor", s => s.Where(kv => !kv.Key.EndsWith("layers.1.self_attn.o_proj.lora_A.weight")).ToDictionary(kv => kv.Key, kv => kv.Value), null,
                new[] { "missing 'base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight' for the targeted model.layers.1.self_attn.o_proj" }),
            ("rank of another config", null, c => c["rank_pattern"] = new JsonObject(),
                new[] { "'base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight' has shape [2, 8], model.layers.0.self_attn.o_proj needs [4, 8] (r = 4)" }),
            ("LoRA inside a saved module", s => s.Append(KeyValuePair.Create("base_model.model.classifier.modules_to_save.lora_A.weight", ones(2, 24))).ToDictionary(kv => kv.Key, kv => kv.Value), null,
                new[] { "'base_model.model.classifier.modules_to_save.lora_A.weight' puts LoRA or weights inside a saved module's wrapper" }),
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
                using var model = Pretrained("attention");
                var before = model.state_dict().ToDictionary(kv => kv.Key, kv => TensorText.Bits(kv.Value));
                var error = Assert.Throws<InvalidOperationException>(() => LoraModel.load_adapter(model, folder));
                foreach (string problem in problems)
                    Assert.Contains(problem, error.Message);
                Assert.Contains("nothing was changed", error.Message);
                Assert.Equal(before.Keys, model.state_dict().Keys);
                foreach (var (key, tensor) in model.state_dict())
                    Assert.Equal(before[key], TensorText.Bits(tensor));
                _ = mutation;
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
                var loaded = model.state_dict()["model.layers.0.self_attn.q_proj.lora_B.weight"];
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
                Assert.Contains("target_modules [query, value] matches no nn.Linear or CustomLinear", error.Message);
                Assert.DoesNotContain(model.state_dict().Keys, k => k.Contains("lora_"));
            }
            finally
            {
                Directory.Delete(folder, recursive: true);
            }
        }

        [Fact]
        public void Merge_RefusesAnUpdateWithNaN_BeforeWritingAnyWeight()
        {
            using var scope = NewDisposeScope();
            using var model = Pretrained("mlp");
            LoraModel.load_adapter(model, Path.Combine(Folder, "mlp"));
            using (no_grad())
                ((Parameter)model.state_dict()["2.lora_B.weight"])[0, 0] = tensor(float.NaN);
            var before = TensorText.Bits(model.state_dict()["0.weight"]);
            var error = Assert.Throws<InvalidOperationException>(() => LoraModel.merge(model));
            Assert.Contains("merging the update of 2 would put NaN or infinity into its weight; no weight was changed", error.Message);
            Assert.Equal(before, TensorText.Bits(model.state_dict()["0.weight"]));
        }

        // ---- Injecting and training in .NET --------------------------------------------------------------------------

        [Fact]
        public void Inject_AFreshAdapterChangesNothing_AndOnlyTheAdapterTrains()
        {
            using var scope = NewDisposeScope();
            var cases = Cases("attention");
            using var model = Pretrained("attention");
            var baseOutput = Run(model, cases["input"]);
            var config = new LoraConfig { r = 4, lora_alpha = 8, target_modules = new[] { "q_proj", "v_proj" }, modules_to_save = new[] { "classifier" } };
            var adapted = LoraModel.inject(model, config);
            Assert.Equal(4, adapted.Count);
            Assert.True(Equivalence.Compare(baseOutput, Run(model, cases["input"])).BitExact);

            LoraModel.mark_only_lora_as_trainable(model);
            var trainable = model.named_parameters().Where(p => p.parameter.requires_grad).Select(p => p.name).ToList();
            Assert.Equal(10, trainable.Count);  // 4 layers × (lora_A, lora_B) + the classifier's weight and bias
            Assert.All(trainable, name => Assert.True(name.Contains(".lora_") || name.StartsWith("classifier."), name));

            var frozen = TensorText.Bits(model.state_dict()["model.layers.0.self_attn.q_proj.weight"]);
            model.train();
            using var optimizer = optim.Adam(model.parameters().Where(p => p.requires_grad), lr: 0.01);
            for (int step = 0; step < 5; step++)
            {
                using var stepScope = NewDisposeScope();
                optimizer.zero_grad();
                model.call(cases["input"]).square().mean().backward();
                optimizer.step();
            }
            Assert.Equal(frozen, TensorText.Bits(model.state_dict()["model.layers.0.self_attn.q_proj.weight"]));
            model.eval();
            Assert.False(Equivalence.Compare(baseOutput, Run(model, cases["input"])).BitExact);
        }

        /// <summary>CustomLinear heads in a ModuleDict, called with call(x).</summary>
        private sealed class Heads : nn.Module<Tensor, Tensor>
        {
            private readonly ModuleDict<CustomLinear> heads = nn.ModuleDict(("a", new CustomLinear(6, 4)), ("b", new CustomLinear(6, 4)));
            private readonly ReLU act = nn.ReLU();

            public Heads() : base(nameof(Heads)) => RegisterComponents();

            public override Tensor forward(Tensor x) => act.call(heads["a"].call(x)) + heads["b"].call(x);
        }

        [Fact]
        public void Inject_IntoCustomLinearLayersOfAModuleDict_AddsTheUpdateToTheirOutput()
        {
            using var scope = NewDisposeScope();
            manual_seed(21);
            var model = new Heads();
            var x = randn(5, 6);
            var adapted = LoraModel.inject(model, new LoraConfig { r = 2, lora_alpha = 4, target_modules = new[] { "a" } });
            Assert.Equal(new[] { "heads.a" }, adapted);
            var state = model.state_dict();
            using (no_grad())
                ((Parameter)state["heads.a.lora_B.weight"]).normal_();
            // The layer's output is W x + b + B A x · 2; the second head is untouched.
            var expected = (LinearFunctional.linear(x, state["heads.a.weight"], state["heads.a.bias"])
                            + x.matmul(state["heads.a.lora_A.weight"].t()).matmul(state["heads.a.lora_B.weight"].t()) * 2).relu()
                           + LinearFunctional.linear(x, state["heads.b.weight"], state["heads.b.bias"]);
            Equivalence.AssertClose(Run(model, x), expected);
            Assert.IsType<CustomLinear>(model.named_modules().Single(m => m.name == "heads.a").module);

            // A target that names a layer of another kind is refused by name.
            var error = Assert.Throws<ArgumentException>(() => LoraModel.inject(new Heads(), new LoraConfig { target_modules = new[] { "act" } }));
            Assert.Contains("act is a ReLU, neither nn.Linear nor CustomLinear", error.Message);
        }

        [Fact]
        public void InjectMergeDisableUnload_LeaveNoTensorAlive()
        {
            static long Live() => DisposeScopeManager.Statistics.ThreadTotalLiveCount;
            var config = new LoraConfig { r = 2, target_modules_regex = "all-linear", modules_to_save = new[] { "2" } };
            long before = Live();
            using (var model = Mlp())
            {
                LoraModel.inject(model, config);
                LoraModel.merge(model);
                LoraModel.unmerge(model);
                using (LoraModel.disable_adapters(model)) { }
                LoraModel.unload(model);
            }
            using (var model = Mlp())
            {
                LoraModel.inject(model, config);
                LoraModel.merge_and_unload(model);
            }
            Assert.Equal(before, Live());
        }

        // ---- LoraConfig: PEFT's files as they come -------------------------------------------------------------------

        private static LoraConfig Config(string json)
        {
            string file = Path.Combine(Path.GetTempPath(), $"torchlinear-config-{Guid.NewGuid():N}.json");
            File.WriteAllText(file, json);
            try
            {
                return LoraConfig.load(file);
            }
            finally
            {
                File.Delete(file);
            }
        }

        [Fact]
        public void Config_OfEveryGeneration_ReadsWithPeftsDefaults_AndIgnoresUnknownKeys()
        {
            // A 16-key config from an early PEFT (no use_rslora, rank_pattern, peft_version).
            var old = Config("""{"base_model_name_or_path": "gpt2", "bias": "none", "enable_lora": null, "fan_in_fan_out": true, "inference_mode": true, "init_lora_weights": true, "lora_alpha": 32, "lora_dropout": 0.1, "merge_weights": false, "modules_to_save": null, "peft_type": "LORA", "r": 16, "target_modules": ["c_attn"], "task_type": "CAUSAL_LM", "revision": null, "layers_to_transform": null}""");
            Assert.Equal(16, old.r);
            Assert.Equal(32, old.lora_alpha);
            Assert.True(old.fan_in_fan_out);
            Assert.False(old.use_rslora);
            Assert.Empty(old.rank_pattern);
            // A recent one with many new keys set to null or their defaults, and modules_to_save with a duplicate.
            var recent = Config("""{"alora_invocation_tokens": null, "alpha_pattern": {}, "arrow_config": null, "auto_mapping": null, "base_model_name_or_path": "Qwen/Qwen2-0.5B", "bias": "none", "corda_config": null, "ensure_weight_tying": false, "eva_config": null, "exclude_modules": null, "fan_in_fan_out": false, "inference_mode": true, "init_lora_weights": true, "layer_replication": null, "layers_pattern": null, "layers_to_transform": null, "loftq_config": {}, "lora_alpha": 16, "lora_bias": false, "lora_dropout": 0.05, "megatron_config": null, "megatron_core": "megatron.core", "modules_to_save": ["score", "score", "classifier"], "peft_type": "LORA", "peft_version": "0.17.1", "qalora_group_size": 16, "r": 8, "rank_pattern": {}, "revision": null, "target_modules": ["k_proj", "attn.c_attn"], "target_parameters": null, "task_type": "SEQ_CLS", "trainable_token_indices": null, "use_dora": false, "use_qalora": false, "use_rslora": true}""");
            Assert.Equal(new[] { "score", "classifier" }, recent.modules_to_save);
            Assert.True(recent.use_rslora);
            Assert.Equal(16 / Math.Sqrt(8), recent.ScalingFor("model.layers.0.self_attn.k_proj"));
            Assert.True(recent.Targets("transformer.h.0.attn.c_attn"));
            Assert.False(recent.Targets("transformer.h.0.c_attn"));
        }

        [Theory]
        [InlineData("\"use_dora\": true", "use_dora: true (DoRA)")]
        [InlineData("\"init_lora_weights\": \"pissa\"", "init_lora_weights: \"pissa\"")]
        [InlineData("\"layers_to_transform\": [0, 1]", "layers_to_transform: [0,1]")]
        [InlineData("\"peft_type\": \"IA3\"", "peft_type: \"IA3\"")]
        public void Config_WithAFeatureThisSampleDoesNotImplement_IsRefusedByName(string setting, string named)
        {
            var error = Assert.Throws<NotSupportedException>(() => Config($"{{\"r\": 4, \"target_modules\": [\"q\"], {setting}}}"));
            Assert.Contains(named, error.Message);
        }

        [Fact]
        public void Matching_FollowsPeft_SuffixesForLists_FullMatchForAString_AndPatterns()
        {
            var list = new LoraConfig { target_modules = new[] { "q_proj", "self_attn.o_proj" } };
            Assert.True(list.Targets("q_proj"));
            Assert.True(list.Targets("model.layers.0.self_attn.q_proj"));
            Assert.False(list.Targets("model.layers.0.self_attn.q_proj_extra"));
            Assert.False(list.Targets("model.layers.0.xq_proj"));
            Assert.True(list.Targets("model.layers.3.self_attn.o_proj"));
            Assert.False(list.Targets("model.layers.3.mlp.o_proj"));

            var regex = new LoraConfig { target_modules_regex = @".*\.(q|v)_proj" };
            Assert.True(regex.Targets("model.layers.0.self_attn.v_proj"));
            Assert.False(regex.Targets("model.layers.0.self_attn.v_proj.lora_A"));  // a full match, not a search

            var all = new LoraConfig { target_modules_regex = "all-linear" };
            Assert.True(all.Targets("model.layers.0.mlp.up_proj"));
            Assert.False(all.Targets("lm_head"));
            Assert.True(all.Targets("classifier"));
            Assert.False(new LoraConfig { target_modules_regex = "all-linear", task_type = "SEQ_CLS" }.Targets("classifier"));

            var patterns = new LoraConfig { r = 8, target_modules = new[] { "q_proj" }, rank_pattern = new() { ["layers.1.self_attn.q_proj"] = 2, ["q_proj"] = 4 } };
            Assert.Equal(2, patterns.RankFor("model.layers.1.self_attn.q_proj"));
            Assert.Equal(4, patterns.RankFor("model.layers.11.self_attn.q_proj"));   // "layers.1." does not match "layers.11."
            Assert.Equal(8, patterns.RankFor("model.layers.1.mlp.up_proj"));

            var excluded = new LoraConfig { target_modules = new[] { "q_proj" }, exclude_modules = new[] { "layers.0.self_attn.q_proj" }, modules_to_save = new[] { "head" } };
            Assert.False(excluded.Targets("model.layers.0.self_attn.q_proj"));
            Assert.True(excluded.Targets("model.layers.1.self_attn.q_proj"));
            Assert.False(new LoraConfig { target_modules = new[] { "q_proj" }, modules_to_save = new[] { "head" } }.Targets("head.q_proj"));
        }
    }
}
