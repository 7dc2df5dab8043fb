using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Reflection;
using TorchLinear.Tests;
using TorchSharp;
using TorchSharp.Modules;
using Xunit;
using static TorchLinear.Lora.Tests.Ports;
using static TorchSharp.torch;

namespace TorchLinear.Lora.Tests
{
    /// <summary>
    /// Adapters in ports written every way: each either runs (PyTorch's numbers, training that trains) or is refused by
    /// name at the first model call. Then disabling, merging, unloading, freezing and counting, as PEFT does them.
    /// </summary>
    public class LoraModelTests
    {
        private static string AttentionAdapter => Path.Combine(Folder, "attention");

        private static readonly string[] AttentionPaths =
        {
            "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj",
            "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.self_attn.o_proj",
        };

        // ---- Ports that can run an adapter run it -------------------------------------------------------------------

        [Theory]
        [InlineData(PortStyle.LinearCall)]
        [InlineData(PortStyle.ModuleForward)]
        [InlineData(PortStyle.CustomForward)]
        public void APeftAdapter_RunsInThePort_WhateverWayItIsWritten_GivingPyTorchsNumbers(PortStyle style)
        {
            // Guards: the old sample's adapters did nothing, silently, in ports that call forward(x) (ModuleForward,
            // CustomForward gave the base model's output bit for bit).
            using var scope = NewDisposeScope();
            var cases = Cases("attention");
            using var model = Pretrained("attention", style);
            var baseKeys = model.state_dict().Keys.ToList();
            Equivalence.AssertClose(Run(model, cases["input"]), cases["base_output"]);

            var adapted = LoraModel.load_adapter(model, AttentionAdapter);

            Assert.Equal(AttentionPaths, adapted);
            Equivalence.AssertClose(Run(model, cases["input"]), cases["adapted_output"]);
            using (LoraModel.disable_adapter(model))
                Equivalence.AssertClose(Run(model, cases["input"]), cases["disabled_output"]);
            Equivalence.AssertClose(Run(model, cases["input"]), cases["adapted_output"]);
            // The base model's keys are all still there, with PEFT's adapter keys beside them.
            var keys = model.state_dict().Keys.ToList();
            Assert.Equal(baseKeys, keys.Where(k => !k.Contains(".lora_")).ToList());
            Assert.Contains("model.layers.0.self_attn.q_proj.weight", keys);
            Assert.Contains("model.layers.0.self_attn.q_proj.lora_A.default.weight", keys);

            // PEFT's merge_adapter() of the same folder.
            LoraModel.merge_adapter(model);
            Equivalence.AssertClose(Run(model, cases["input"]), cases["merged_output"]);
            LoraModel.unmerge_adapter(model);
            Equivalence.AssertClose(Run(model, cases["input"]), cases["adapted_output"]);
        }

        [Fact]
        public void AModuleTypedField_IsWrapped_AndGetsItsLinearBackOnUnload()
        {
            using var scope = NewDisposeScope();
            using var model = Pretrained("attention", PortStyle.ModuleForward);
            var attention = model.named_modules().Single(m => m.name == "model.layers.0.self_attn").module;
            var field = attention.GetType().GetField("q_proj", BindingFlags.Instance | BindingFlags.NonPublic)!;
            var original = field.GetValue(attention);
            Assert.IsType<Linear>(original);

            LoraModel.load_adapter(model, AttentionAdapter);
            var wrapper = Assert.IsType<LoraWrapper>(field.GetValue(attention));
            Assert.Same(wrapper, attention.named_children().Single(c => c.name == "q_proj").module);
            Assert.Same(original, wrapper.base_layer);
            // Not targeted: still the Linear.
            Assert.IsType<Linear>(attention.GetType().GetField("k_proj", BindingFlags.Instance | BindingFlags.NonPublic)!.GetValue(attention));

            LoraModel.unload(model);
            Assert.Same(original, field.GetValue(attention));
            Assert.Same(original, attention.named_children().Single(c => c.name == "q_proj").module);
            Assert.Equal(new[] { "q_proj", "k_proj", "v_proj", "o_proj" }, attention.named_children().Select(c => c.name));
        }

        /// <summary>Linear layers in a ModuleList typed for any module, invoked with forward(x).</summary>
        private sealed class Stack : nn.Module<Tensor, Tensor>
        {
            private readonly ModuleList<nn.Module<Tensor, Tensor>> layers = new(nn.Linear(6, 6), nn.Linear(6, 6));

            public Stack() : base(nameof(Stack)) => RegisterComponents();

            public override Tensor forward(Tensor x)
            {
                foreach (var layer in layers)
                    x = layer.forward(x).relu();
                return x;
            }
        }

        [Fact]
        public void LayersOfAModuleListTypedForAnyModule_AreWrappedInPlace()
        {
            using var scope = NewDisposeScope();
            manual_seed(3);
            using var model = new Stack();
            var x = randn(4, 6);
            var before = Run(model, x);
            LoraModel.Inject(model, new LoraConfig { r = 2, lora_alpha = 4, target_modules = new[] { "1" } });
            Assert.IsType<LoraWrapper>(model.named_children().Single().module.named_children().ElementAt(1).module);
            using (no_grad())
                model.named_parameters().Single(p => p.name == "layers.1.lora_B.default.weight").parameter.fill_(0.5);
            var after = Run(model, x);
            Assert.False(Equivalence.Compare(before, after).BitExact);
            var state = model.state_dict();
            var h = LinearFunctional.linear(x, state["layers.0.weight"], state["layers.0.bias"]).relu();
            var expected = (LinearFunctional.linear(h, state["layers.1.weight"], state["layers.1.bias"]) + h.matmul(state["layers.1.lora_A.default.weight"].t()).matmul(state["layers.1.lora_B.default.weight"].t()) * 2).relu();
            Equivalence.AssertClose(after, expected);
            LoraModel.merge_and_unload(model);
            Assert.IsType<Linear>(model.named_children().Single().module.named_children().ElementAt(1).module);
            Equivalence.AssertClose(Run(model, x), expected, rtol: 1e-5, atol: 1e-6);
        }

        // ---- A port that cannot run an adapter says so: see AdaptedModelTests ------------------------------------------

        // ---- Training in every port ----------------------------------------------------------------------------------

        [Theory]
        [InlineData(PortStyle.LinearCall)]
        [InlineData(PortStyle.ModuleForward)]
        [InlineData(PortStyle.CustomForward)]
        public void TrainingInEveryPort_TrainsTheAdapters_AndSavesWhatWasTrained(PortStyle style)
        {
            // Guards: in forward(x) ports the old sample's adapters got no gradient, and save_adapter wrote zeros.
            using var scope = NewDisposeScope();
            var cases = Cases("attention");
            using var model = Pretrained("attention", style);
            var baseOutput = Run(model, cases["input"]);
            LoraModel.Inject(model, new LoraConfig { r = 4, lora_alpha = 8, target_modules = new[] { "q_proj", "v_proj" }, modules_to_save = new[] { "classifier" } });
            Assert.True(Equivalence.Compare(baseOutput, Run(model, cases["input"])).BitExact, "a fresh adapter changes nothing");
            var frozen = TensorText.Bits(model.state_dict()["model.layers.0.self_attn.q_proj.weight"]);

            model.train();
            using (var optimizer = optim.Adam(model.parameters().Where(p => p.requires_grad), lr: 0.01))
            {
                for (int step = 0; step < 5; step++)
                {
                    using var stepScope = NewDisposeScope();
                    optimizer.zero_grad();
                    model.call(cases["input"]).square().mean().backward();
                    var grad = model.named_parameters().Single(p => p.name == "model.layers.1.self_attn.v_proj.lora_B.default.weight").parameter.grad;
                    Assert.NotNull(grad);
                    Assert.True(grad!.abs().sum().item<float>() > 0);
                    optimizer.step();
                }
            }
            model.eval();
            Assert.Equal(frozen, TensorText.Bits(model.state_dict()["model.layers.0.self_attn.q_proj.weight"]));
            var trained = Run(model, cases["input"]);
            Assert.False(Equivalence.Compare(baseOutput, trained).BitExact);

            string folder = Directory.CreateTempSubdirectory("torchlinear-trained-").FullName;
            try
            {
                LoraModel.save_pretrained(model, folder);
                var saved = StateDicts.ReadPyTorchFile(Path.Combine(folder, "adapter_model.safetensors"));
                Assert.True(saved["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].abs().sum().item<float>() > 0, "the trained B is saved, not the initial zeros");
                using var reloaded = Pretrained("attention", style);
                LoraModel.load_adapter(reloaded, folder);
                Assert.True(Equivalence.Compare(trained, Run(reloaded, cases["input"])).BitExact);
            }
            finally
            {
                Directory.Delete(folder, recursive: true);
            }
        }

        [Fact]
        public void Inject_DrawsPeftsNumbersUnderTheSameSeed()
        {
            // make_peft_adapters.py records lora_A as PEFT 0.18.1's get_peft_model draws it after torch.manual_seed(123):
            // lora_A and lora_B made as nn.Linear layers, then lora_A reset (kaiming-uniform) and lora_B zeroed.
            using var scope = NewDisposeScope();
            var recorded = StateDicts.ReadPyTorchFile(Path.Combine(Folder, "seeded_init.safetensors"));
            using var model = Pretrained("attention");
            manual_seed(123);
            LoraModel.Inject(model, new LoraConfig { r = 4, lora_alpha = 8, target_modules = new[] { "q_proj", "v_proj" } });
            var state = model.state_dict();
            Assert.Equal(4, recorded.Count);
            // Recorded under PEFT's in-memory keys without the adapter name; the model's have it (lora_A.default.weight).
            // PyTorch's bits with kernels that round kaiming_uniform_'s from + u · (to − from) once, as PyTorch's did (AVX2,
            // AVX-512); the portable kernels round twice: then within that one rounding (bound 1/√in_features).
            foreach (var (key, tensor) in recorded)
            {
                var ours = state[key.Replace(".weight", ".default.weight")];
                if (KernelFacts.FusesMultiplyAdd)
                    Assert.True(Equivalence.Compare(tensor, ours).BitExact, key);
                else
                    Assert.True(KernelFacts.WithinUniformRounding(tensor.data<float>().ToArray(), ours.data<float>().ToArray(), 1 / Math.Sqrt(tensor.size(1))), key);
            }
        }

        // ---- Disabling, merging, unloading -----------------------------------------------------------------------------

        /// <summary>An encoder and a nested head, head.classifier: the head named in modules_to_save by its last part.</summary>
        private sealed class NestedHead : nn.Module<Tensor, Tensor>
        {
            private readonly Linear encoder = nn.Linear(6, 6);
            private readonly Head head = new();

            public NestedHead() : base(nameof(NestedHead)) => RegisterComponents();

            public override Tensor forward(Tensor x)
            {
                using var h = encoder.call(x);
                return head.call(h);
            }

            internal sealed class Head : nn.Module<Tensor, Tensor>
            {
                private readonly Linear classifier = nn.Linear(6, 3);

                public Head() : base(nameof(Head)) => RegisterComponents();

                public override Tensor forward(Tensor x) => classifier.call(x);
            }
        }

        [Fact]
        public void ANestedModuleToSave_IsTrainedSavedRestoredAndKept_AsPeftDoes()
        {
            // Guards: the old sample matched modules_to_save by suffix when targeting but by top-level prefix everywhere
            // else: head.classifier was excluded from targeting but never trained, saved or restored.
            using var scope = NewDisposeScope();
            manual_seed(5);
            using var model = new NestedHead();
            var x = randn(4, 6);
            var original = TensorText.Bits(model.state_dict()["head.classifier.weight"]);
            var config = new LoraConfig { r = 2, target_modules = new[] { "encoder", "classifier" }, modules_to_save = new[] { "classifier" } };
            Assert.Equal(new[] { "encoder" }, LoraModel.Inject(model, config));
            Assert.True(model.named_parameters().Single(p => p.name == "head.classifier.weight").parameter.requires_grad);
            Assert.False(model.named_parameters().Single(p => p.name == "encoder.weight").parameter.requires_grad);

            using (var optimizer = optim.SGD(model.parameters().Where(p => p.requires_grad), 0.5))
            {
                optimizer.zero_grad();
                model.call(x).square().sum().backward();
                optimizer.step();
            }
            var trained = TensorText.Bits(model.state_dict()["head.classifier.weight"]);
            Assert.NotEqual(original, trained);

            string folder = Directory.CreateTempSubdirectory("torchlinear-nested-").FullName;
            try
            {
                LoraModel.save_pretrained(model, folder);
                var saved = StateDicts.ReadPyTorchFile(Path.Combine(folder, "adapter_model.safetensors"));
                Assert.Equal(trained, TensorText.Bits(saved["base_model.model.head.classifier.weight"]));
                Assert.Contains("base_model.model.head.classifier.bias", saved.Keys);
            }
            finally
            {
                Directory.Delete(folder, recursive: true);
            }
            using (LoraModel.disable_adapter(model))
                Assert.Equal(original, TensorText.Bits(model.state_dict()["head.classifier.weight"]));
            Assert.Equal(trained, TensorText.Bits(model.state_dict()["head.classifier.weight"]));
            LoraModel.unload(model);
            Assert.Equal(original, TensorText.Bits(model.state_dict()["head.classifier.weight"]));

            // merge_and_unload keeps the trained head: the fine-tuned model.
            using var other = new NestedHead();
            LoraModel.Inject(other, config);
            using (no_grad())
                other.named_parameters().Single(p => p.name == "head.classifier.bias").parameter.add_(1);
            var tuned = TensorText.Bits(other.state_dict()["head.classifier.bias"]);
            LoraModel.merge_and_unload(other);
            Assert.Equal(tuned, TensorText.Bits(other.state_dict()["head.classifier.bias"]));
        }

        [Fact]
        public void DisablingAMergedModel_GivesTheBaseModel_AndMergesBackToTheSameBits()
        {
            using var scope = NewDisposeScope();
            var cases = Cases("mlp");
            using var model = Pretrained("mlp");
            LoraModel.load_adapter(model, Path.Combine(Folder, "mlp"));
            LoraModel.merge_adapter(model);
            var merged = Bits(model);
            using (LoraModel.disable_adapter(model))
                Equivalence.AssertClose(Run(model, cases["input"]), cases["disabled_output"]);
            Assert.Equal(merged.Keys, Bits(model).Keys);
            foreach (var (key, bits) in Bits(model))
                Assert.Equal(merged[key], bits);
        }

        [Fact]
        public void MergeAndUnload_LeavesAPlainModelOfItsOwnTypes_AndUnloadTheBaseWeights()
        {
            using var scope = NewDisposeScope();
            var cases = Cases("attention");
            using var model = Pretrained("attention");
            var baseKeys = model.state_dict().Keys.ToList();
            var baseWeight = TensorText.Bits(model.state_dict()["model.layers.0.self_attn.q_proj.weight"]);
            LoraModel.load_adapter(model, AttentionAdapter);

            LoraModel.merge_and_unload(model);

            Assert.Equal(baseKeys, model.state_dict().Keys);
            Assert.DoesNotContain(model.named_modules(), m => m.module is LoraLayer or LoraProjection or LoraWrapper);
            Assert.All(model.named_modules().Where(m => m.name.EndsWith("_proj", StringComparison.Ordinal)), m => Assert.IsType<Linear>(m.module));
            // PEFT's merge_and_unload() of the same folder.
            Equivalence.AssertClose(Run(model, cases["input"]), cases["unloaded_output"]);
            Assert.Throws<InvalidOperationException>(() => LoraModel.merge_adapter(model));

            using var other = Pretrained("attention");
            var baseClassifier = TensorText.Bits(other.state_dict()["classifier.weight"]);
            LoraModel.load_adapter(other, AttentionAdapter);
            LoraModel.merge_adapter(other);
            LoraModel.unload(other);
            Assert.Equal(baseWeight, TensorText.Bits(other.state_dict()["model.layers.0.self_attn.q_proj.weight"]));
            Assert.Equal(baseClassifier, TensorText.Bits(other.state_dict()["classifier.weight"]));
            Assert.Equal(baseKeys, other.state_dict().Keys);
        }

        [Fact]
        public void ASecondAdapterUnderATakenName_IsRefusedNamingIt_AndChangesNothing()
        {
            // Guards: the old sample accepted a second adapter and then saved a folder whose config described it alone.
            using var scope = NewDisposeScope();
            using var model = Pretrained("attention");
            LoraModel.Inject(model, new LoraConfig { r = 2, target_modules = new[] { "q_proj" } });
            var before = Bits(model);
            var error = Assert.Throws<ArgumentException>(() => LoraModel.Inject(model, new LoraConfig { r = 2, target_modules = new[] { "v_proj" } }));
            Assert.Contains("the model has an adapter named 'default' already (its adapters: default)", error.Message);
            Assert.Contains("'default' already", Assert.Throws<ArgumentException>(() => LoraModel.load_adapter(model, AttentionAdapter)).Message);
            Assert.Equal(before.Keys, Bits(model).Keys);
            Assert.All(before, kv => Assert.Equal(kv.Value, Bits(model)[kv.Key]));
        }

        [Fact]
        public void ASecondAdapterWithABias_IsRefusedAsPeftRefusesIt_NamingBoth_AndChangesNothing()
        {
            // PEFT 0.18.1 (BaseTuner._check_new_adapter_config, measured): at most one adapter of a model has bias != "none".
            using var scope = NewDisposeScope();
            using var model = Pretrained("mlp");
            LoraModel.load_adapter(model, Path.Combine(Folder, "mlp"));   // bias "all"
            var before = Bits(model);

            var injected = Assert.Throws<ArgumentException>(() => LoraModel.Inject(model, new LoraConfig { r = 2, target_modules = new[] { "0" }, bias = "lora_only" }, "second"));
            Assert.Contains("'second' has bias \"lora_only\", and 'default' has bias \"all\" already", injected.Message);
            Assert.Contains("supports only 1 adapter with bias", injected.Message);
            var loaded = Assert.Throws<ArgumentException>(() => LoraModel.load_adapter(model, Path.Combine(Folder, "mlp"), "again"));
            Assert.Contains("'again' has bias \"all\", and 'default' has bias \"all\" already", loaded.Message);
            // A combination copies its first adapter's config, bias too: a second adapter with a bias (PEFT refuses it too).
            var combined = Assert.Throws<ArgumentException>(() => LoraModel.add_weighted_adapter(model, new[] { "default" }, new[] { 1.0 }, "combined", "cat"));
            Assert.Contains("'combined' has bias \"all\", and 'default' has bias \"all\" already", combined.Message);
            Assert.Equal(new[] { "default" }, LoraModel.peft_config(model).Keys.ToArray());
            Assert.Equal(before.Keys, Bits(model).Keys);
            Assert.All(before, kv => Assert.Equal(kv.Value, Bits(model)[kv.Key]));

            // An adapter without a bias is taken beside it, as PEFT takes it.
            LoraModel.Inject(model, new LoraConfig { r = 2, target_modules = new[] { "0" } }, "plain");
            Assert.Equal(new[] { "default", "plain" }, LoraModel.peft_config(model).Keys.OrderBy(k => k, StringComparer.Ordinal).ToArray());
        }

        [Fact]
        public void DisableAdapters_FreezesEveryAdapterTensor_AndGivesEachItsRequiresGradBack()
        {
            // PEFT's enable_adapters(False) turns requires_grad off on the adapters' layers, and set_adapter turns it back on.
            using var scope = NewDisposeScope();
            using var mlp = Pretrained("mlp");
            LoraModel.Inject(mlp, new LoraConfig { r = 2, target_modules = new[] { "0", "2" }, bias = "all" });          // trains
            LoraModel.Inject(mlp, new LoraConfig { r = 2, target_modules = new[] { "0" }, use_dora = true }, "dora");  // inactive: frozen
            using var embed = Pretrained("embedding");
            LoraModel.Inject(embed, new LoraConfig { r = 2, target_modules = new[] { "emb", "fc" } });
            // Loaded for inference: frozen before, and after (PEFT's re-enabling makes an active adapter trainable).
            using var loaded = Pretrained("mlp");
            LoraModel.load_adapter(loaded, Path.Combine(Folder, "mlp"));
            using (LoraModel.disable_adapter(loaded)) { }
            Assert.DoesNotContain(loaded.parameters(), p => p.requires_grad);
            foreach (var model in new nn.Module[] { mlp, embed })
            {
                var flags = model.named_parameters().ToDictionary(p => p.name, p => p.parameter.requires_grad);
                Assert.Contains(flags, f => f.Value && f.Key.Contains(".lora_", StringComparison.Ordinal));
                if (model == mlp)
                    Assert.Contains(flags, f => !f.Value && f.Key.Contains(".lora_", StringComparison.Ordinal));
                using (LoraModel.disable_adapter(model))
                {
                    foreach (var (name, parameter) in model.named_parameters())
                    {
                        bool adapter = name.Contains(".lora_", StringComparison.Ordinal);
                        // The adapters' tensors (A, B, DoRA's magnitude, an embedding's A and B) are frozen; the rest as it was.
                        Assert.True(adapter ? !parameter.requires_grad : parameter.requires_grad == flags[name], name);
                    }
                    Assert.Contains(model.named_parameters(), p => p.name.EndsWith(".lora_magnitude_vector.dora.weight", StringComparison.Ordinal) || p.name.EndsWith(".lora_embedding_A.default", StringComparison.Ordinal));
                }
                Assert.Equal(flags, model.named_parameters().ToDictionary(p => p.name, p => p.parameter.requires_grad));
            }
        }

        // ---- Values that would give NaN, and the scaling in the layer's dtype ------------------------------------------

        [Fact]
        public void AnUpdateThatOverflowsTheLayersDtype_IsRefusedAtLoadInjectAndCombination_NamingTheKeys_AndChangesNothing()
        {
            // Guards: lora_alpha 1e39 with r 4 is a scaling of 2.5e38, finite in float32, and scaling · B A overflowed:
            // the adapter loaded and the model gave infinity.
            using var scope = NewDisposeScope();
            string folder = PeftFolderTests.Mutated("mlp",
                s => s.ToDictionary(kv => kv.Key, kv => kv.Key.EndsWith("0.lora_B.weight", StringComparison.Ordinal) ? kv.Value.abs() + 1 : kv.Key.EndsWith("0.lora_A.weight", StringComparison.Ordinal) ? kv.Value.abs() + 1 : kv.Value),
                c => c["lora_alpha"] = 1e39);
            try
            {
                using var model = Pretrained("mlp");
                var before = Bits(model);
                var error = Assert.Throws<InvalidOperationException>(() => LoraModel.load_adapter(model, folder));
                Assert.Contains("scaling · B A of 0 ('base_model.model.0.lora_A.weight', 'base_model.model.0.lora_B.weight') is not finite in Float32 (lora_alpha 1E+39, r 4, scaling 2.5E+38)", error.Message);
                Assert.Contains("nothing was changed", error.Message);
                Assert.Equal(before, Bits(model));
                Assert.Throws<InvalidOperationException>(() => LoraModel.active_adapters(model));

                // A weighted combination can overflow the same way: weight 1e38 on an adapter whose B A holds 4.
                LoraModel.Inject(model, new LoraConfig { r = 4, lora_alpha = 4, target_modules = new[] { "0" } });
                using (no_grad())
                {
                    foreach (var (_, parameter) in model.named_parameters().Where(p => p.name.Contains(".lora_")))
                        parameter.fill_(1);
                }
                var adapted = Bits(model);
                var combined = Assert.Throws<ArgumentException>(() => LoraModel.add_weighted_adapter(model, new[] { "default" }, new[] { 1e38 }, "huge", "linear"));
                Assert.Contains("the combination scaling · B A of 0 ('base_model.model.0.lora_A.weight', 'base_model.model.0.lora_B.weight') is not finite in Float32", combined.Message);
                Assert.Equal(new[] { "default" }, LoraModel.peft_config(model).Keys.ToArray());
                Assert.Equal(adapted, Bits(model));
                // inject with init_lora_weights false draws B too (kaiming-uniform): with r 64 on a layer of one input,
                // scaling 3.3e38 times some of the 4,000 rows of B A overflows float32 under this seed.
                manual_seed(0);
                using var wide = nn.Sequential(("fc", nn.Linear(1, 4000)));
                var drawn = Assert.Throws<ArgumentException>(() => LoraModel.Inject(wide, new LoraConfig { r = 64, lora_alpha = 64 * 3.3e38, target_modules = new[] { "fc" }, init_lora_weights = "false" }));
                Assert.Contains("lora_alpha: scaling · B A of fc ('base_model.model.fc.lora_A.weight', 'base_model.model.fc.lora_B.weight') is not finite in Float32", drawn.Message);
                Assert.DoesNotContain(wide.state_dict().Keys, k => k.Contains("lora_", StringComparison.Ordinal));
                // In float64 the same adapter is finite, and loads.
                using var doubles = Pretrained("mlp").to(ScalarType.Float64);
                LoraModel.load_adapter(doubles, folder);
            }
            finally
            {
                Directory.Delete(folder, recursive: true);
            }
        }


        [Theory]
        [InlineData(0, 8.0, 0.0, "r")]
        [InlineData(4, double.PositiveInfinity, 0.0, "lora_alpha")]
        [InlineData(4, 8.0, 1.0, "lora_dropout")]
        public void AConfigWithAValueOutOfRange_IsRefusedAtInject_NamingTheKey(int r, double alpha, double dropout, string key)
        {
            using var model = Mlp();
            var error = Assert.Throws<ArgumentException>(() => LoraModel.Inject(model, new LoraConfig { r = r, lora_alpha = alpha, lora_dropout = dropout, target_modules = new[] { "0" } }));
            Assert.Contains($"{key}: ", error.Message);
            Assert.DoesNotContain(model.named_modules(), m => m.module is LoraLayer);
            var pattern = Assert.Throws<ArgumentException>(() => LoraModel.Inject(model, new LoraConfig { target_modules = new[] { "0" }, rank_pattern = new() { ["0"] = 0 } }));
            Assert.Contains("rank_pattern.0: the rank must be 1 or more", pattern.Message);
        }

        [Fact]
        public void AnAlphaFiniteAsADoubleButNotAsAFloat_IsRefusedForAFloatLayer_AndTakenByADoubleOne()
        {
            // Guards: lora_alpha 1e39 loaded and gave NaN in a float32 model (its float scaling, infinity, times B = 0).
            var config = new LoraConfig { r = 1, lora_alpha = 1e39, target_modules = new[] { "0" } };
            using var floats = Mlp();
            var error = Assert.Throws<ArgumentException>(() => LoraModel.Inject(floats, config));
            Assert.Contains("lora_alpha", error.Message);
            Assert.Contains("not finite in the layer's dtype Float32", error.Message);
            using var doubles = Mlp().to(ScalarType.Float64);
            LoraModel.Inject(doubles, config);
        }

        /// <summary>One Linear of small integers: every product is exact, so the only rounding is the scaling's.</summary>
        private static (Sequential Model, Tensor A, Tensor B) IntegerModel(ScalarType dtype)
        {
            var model = nn.Sequential(("fc", nn.Linear(4, 3, dtype: dtype)));
            using (no_grad())
            {
                model.named_parameters().Single(p => p.name == "fc.weight").parameter.copy_(arange(12, dtype: dtype).reshape(3, 4) - 5);
                model.named_parameters().Single(p => p.name == "fc.bias").parameter.copy_(tensor(new double[] { 1, -2, 3 }).to(dtype));
            }
            LoraModel.Inject(model, new LoraConfig { r = 3, lora_alpha = 1, target_modules = new[] { "fc" } });   // scaling 1/3
            var state = model.state_dict();
            using (no_grad())
            {
                state["fc.lora_A.default.weight"].copy_(arange(12, dtype: dtype).reshape(3, 4) % 5 - 2);
                state["fc.lora_B.default.weight"].copy_(arange(9, dtype: dtype).reshape(3, 3) % 4 - 1);
            }
            return (model, state["fc.lora_A.default.weight"], state["fc.lora_B.default.weight"]);
        }

        /// <summary>
        /// How far a computation of the integer model's output may be from another, whatever order its GEMMs sum in: the
        /// products are exact (small integers, and B's entries 0, ±1, 2), so only the sum of the base and the three scaled
        /// terms rounds, each within γ_4 · (|base| + Σ_k |(x Aᵀ)_k · scaling · B_k|) of the exact value (γ_k = k·u / (1 − k·u),
        /// u the dtype's unit roundoff); two computations within twice that of each other. Which order a kernel takes is its
        /// own business: in float32, 10 of the 18 outputs depend on it, in float64 11.
        /// </summary>
        private static Tensor IntegerModelBound(Tensor x, Tensor weight, Tensor bias, Tensor a, Tensor b, double scaling, double u)
        {
            using var scope = NewDisposeScope();
            Tensor X = x.abs().to(ScalarType.Float64), W = weight.abs().to(ScalarType.Float64), A = a.abs().to(ScalarType.Float64), B = b.abs().to(ScalarType.Float64);
            Tensor magnitude = X.matmul(W.t()) + bias.abs().to(ScalarType.Float64) + (X.matmul(A.t()) * scaling).matmul(B.t());
            double gamma = 4 * u / (1 - 4 * u);
            return (2 * gamma * magnitude).MoveToOuterDisposeScope();
        }

        [Fact]
        public void AFloat64Layer_AppliesItsScalingInFloat64_For2DAnd3DInput()
        {
            // Guards: the old 2-D path rounded the scaling to float (an error of 3e-8 where 1e-16 is due), the 3-D path did not.
            using var scope = NewDisposeScope();
            var (model, a, b) = IntegerModel(ScalarType.Float64);
            using var _ = model;
            var x3 = (arange(24, dtype: ScalarType.Float64).reshape(2, 3, 4) % 7) - 3;
            double[] xs = x3.data<double>().ToArray(), A = a.data<double>().ToArray(), B = b.data<double>().ToArray();
            var state = model.state_dict();
            double[] W = state["fc.weight"].data<double>().ToArray(), bias = state["fc.bias"].data<double>().ToArray();
            // The expected output, in C# doubles: the base an exact integer; x Aᵀ exact integers, each times 1/3 rounded once
            // (the scaling applies to the r-wide product), then times B (0 or a power of two: exact) summed in order, and
            // the sum added to the base. The layer's GEMM may sum in another order: within IntegerModelBound of it.
            var expected = new double[6 * 3];
            for (int row = 0; row < 6; row++)
            {
                for (int o = 0; o < 3; o++)
                {
                    double baseValue = bias[o], update = 0;
                    for (int i = 0; i < 4; i++)
                        baseValue += xs[row * 4 + i] * W[o * 4 + i];
                    for (int k = 0; k < 3; k++)
                    {
                        double ax = 0;
                        for (int i = 0; i < 4; i++)
                            ax += xs[row * 4 + i] * A[k * 4 + i];
                        update += ax * (1.0 / 3) * B[o * 3 + k];
                    }
                    expected[row * 3 + o] = baseValue + update;
                }
            }
            var expected3 = tensor(expected, new long[] { 2, 3, 3 }, ScalarType.Float64);
            var bound = IntegerModelBound(x3, state["fc.weight"], state["fc.bias"], a, b, 1.0 / 3, Math.Pow(2, -53));
            // The bound is about 1e-14 here; the scaling rounded to float32 would be off by about 1e-7.
            Assert.InRange(bound.max().item<double>(), 1e-15, 1e-13);
            void AssertWithinBound(Tensor expectedOutput, Tensor actual, Tensor allowed, string input)
            {
                double excess = ((actual - expectedOutput).abs() - allowed).max().item<double>();
                Assert.True(excess <= 0, $"{input}: beyond the rounding bound by {excess:G3}; {Equivalence.Compare(expectedOutput, actual)}");
            }
            AssertWithinBound(expected3, Run(model, x3), bound, "3-D input");
            AssertWithinBound(expected3.reshape(6, 3), Run(model, x3.reshape(6, 4)), bound.reshape(6, 3), "2-D input");
            AssertWithinBound(expected3[0, 1], Run(model, x3[0, 1]), bound[0, 1], "1-D input");
        }

        [Fact]
        public void AFloat32Layer_GivesTheSameAnswerForEveryInputRank_WithinRounding()
        {
            using var scope = NewDisposeScope();
            var (model, a, b) = IntegerModel(ScalarType.Float32);
            using var _ = model;
            var x3 = (arange(24, dtype: ScalarType.Float32).reshape(2, 3, 4) % 7) - 3;
            var threeD = Run(model, x3).reshape(6, 3);
            var twoD = Run(model, x3.reshape(6, 4));
            var state = model.state_dict();
            var bound = IntegerModelBound(x3.reshape(6, 4), state["fc.weight"], state["fc.bias"], a, b, 1.0 / 3, Math.Pow(2, -24));
            double excess = ((threeD - twoD).abs().to(ScalarType.Float64) - bound).max().item<double>();
            Assert.True(excess <= 0, $"beyond the rounding bound by {excess:G3}: {Equivalence.Compare(threeD, twoD)}");
        }

        [Fact]
        public void TorchSharpsLinear_DoesNotConvertItsChildren_SoAConvertedModelIsRefusedByName()
        {
            using var scope = NewDisposeScope();
            using var model = Mlp();
            LoraModel.Inject(model, new LoraConfig { r = 2, target_modules = new[] { "0" } });
            model.to(ScalarType.Float64);
            var error = Assert.Throws<InvalidOperationException>(() => Run(model, randn(new long[] { 2, 16 }, dtype: ScalarType.Float64)));
            Assert.Contains("0: the adapter is Float32", error.Message);
            Assert.Contains("does not pass .to(...) on to its children", error.Message);

            // A CustomLinear or a wrapper passes it on.
            using var custom = nn.Sequential(("0", new CustomLinear(16, 4)));
            LoraModel.Inject(custom, new LoraConfig { r = 2, target_modules = new[] { "0" } });
            custom.to(ScalarType.Float64);
            Assert.All(custom.parameters(), p => Assert.Equal(ScalarType.Float64, p.dtype));
            Assert.Equal(ScalarType.Float64, Run(custom, randn(new long[] { 2, 16 }, dtype: ScalarType.Float64)).dtype);
        }

        // ---- Freezing and counting ---------------------------------------------------------------------------------------

        [Fact]
        public void LoadAdapter_FreezesTheModelForInference_UnlessAskedToTrain()
        {
            // Guards: after the old load_adapter every base weight still required grad.
            using var scope = NewDisposeScope();
            using var inference = Pretrained("attention");
            LoraModel.load_adapter(inference, AttentionAdapter);
            Assert.All(inference.parameters(), p => Assert.False(p.requires_grad));

            using var training = Pretrained("attention");
            LoraModel.load_adapter(training, AttentionAdapter, is_trainable: true);
            var trainable = training.named_parameters().Where(p => p.parameter.requires_grad).Select(p => p.name).ToList();
            // 6 adapters × (A, B), the classifier (modules_to_save) and, for bias = lora_only, the adapted layers' biases.
            Assert.Equal(12 + 2 + 6, trainable.Count);
            Assert.All(trainable, name => Assert.True(name.Contains(".lora_") || name.StartsWith("classifier.") || AttentionPaths.Any(p => name == p + ".bias"), name));
        }

        [Fact]
        public void TrainableParameters_AreCountedAndPrintedAsPeftDoes()
        {
            using var model = Mlp();   // 16·32 + 32 + 32·8 + 8 = 808 parameters
            LoraModel.Inject(model, new LoraConfig { r = 4, lora_alpha = 8, target_modules = new[] { "0", "2" } });
            // Adapters: 4·16 + 32·4 + 4·32 + 8·4 = 352.
            Assert.Equal((352L, 1160L), LoraModel.get_nb_trainable_parameters(model));
            var output = new StringWriter();
            var console = Console.Out;
            Console.SetOut(output);
            try
            {
                LoraModel.print_trainable_parameters(model);
            }
            finally
            {
                Console.SetOut(console);
            }
            Assert.Equal("trainable params: 352 || all params: 1,160 || trainable%: 30.3448" + Environment.NewLine, output.ToString());
        }

        // ---- Nothing left alive ----------------------------------------------------------------------------------------

        [Fact]
        public void InjectMergeDisableUnload_AndDisposingAnAdaptedModel_LeaveNoTensorAlive()
        {
            static long Live() => DisposeScopeManager.Statistics.ThreadTotalLiveCount;
            var config = new LoraConfig { r = 2, TargetModulesRegex = "all-linear", modules_to_save = new[] { "2" } };
            long before = Live();
            using (var model = Mlp())
            {
                LoraModel.Inject(model, config);
                LoraModel.merge_adapter(model);
                LoraModel.unmerge_adapter(model);
                using (LoraModel.disable_adapter(model)) { }
                LoraModel.unload(model);
            }
            using (var model = Mlp())
            {
                LoraModel.Inject(model, config);
                LoraModel.merge_and_unload(model);
            }
            // Disposed while adapted and merged, with modules_to_save originals kept: the adapters' state goes with the model.
            foreach (var style in new[] { PortStyle.LinearCall, PortStyle.ModuleForward, PortStyle.CustomForward })
            {
                using var model = Port("attention", style);
                LoraModel.Inject(model, new LoraConfig { r = 2, target_modules = new[] { "q_proj", "v_proj" }, modules_to_save = new[] { "classifier" } });
                LoraModel.merge_adapter(model);
            }
            Assert.Equal(before, Live());
        }

        [Fact]
        public void ARefusedInject_ForATargetOfAnotherKind_NamesIt()
        {
            using var model = new NestedHead();
            var error = Assert.Throws<ArgumentException>(() => LoraModel.Inject(model, new LoraConfig { target_modules = new[] { "head" } }));
            Assert.Contains("matches no nn.Linear, CustomLinear, Conv1D, nn.Embedding, nn.Conv1d or nn.Conv2d", error.Message);
            using var sequential = nn.Sequential(("act", nn.ReLU()), ("fc", nn.Linear(2, 2)));
            Assert.Contains("act is a ReLU, neither nn.Linear, CustomLinear, Conv1D, nn.Embedding, nn.Conv1d nor nn.Conv2d", Assert.Throws<ArgumentException>(() => LoraModel.Inject(sequential, new LoraConfig { target_modules = new[] { "act" } })).Message);
            Assert.Contains("the model has no adapters", Assert.Throws<InvalidOperationException>(() => LoraModel.save_pretrained(sequential, "nowhere")).Message);
        }

        /// <summary>One layer registered under two names (TorchSharp's named_modules lists it twice, PyTorch's once): an
        /// adapter would go into it twice, so the second name is refused naming both, and nothing changes.</summary>
        private sealed class Shared : nn.Module<Tensor, Tensor>
        {
            private readonly CustomLinear p;
            private readonly CustomLinear p2;

            public Shared() : base(nameof(Shared))
            {
                p = new CustomLinear(4, 4);
                p2 = p;
                RegisterComponents();
            }

            public override Tensor forward(Tensor x) => p2.forward(p.forward(x));
        }

        [Fact]
        public void ALayerRegisteredUnderTwoNames_IsRefusedNamingBoth_AndNothingChanges()
        {
            using var model = new Shared();
            var keys = model.state_dict().Keys.ToList();
            var error = Assert.Throws<ArgumentException>(() => LoraModel.Inject(model, new LoraConfig { r = 2, target_modules = new[] { "p", "p2" } }));
            Assert.Contains("p2 is the module p is, registered under two names", error.Message);
            Assert.Equal(keys, model.state_dict().Keys.ToList());
            Assert.Null(((CustomLinear)model.named_modules().First(m => m.name == "p").module).Adapter);
        }
    }
}
