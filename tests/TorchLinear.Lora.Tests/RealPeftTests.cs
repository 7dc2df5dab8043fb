using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using TorchLinear.Tests;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.PyBridge;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Lora.Tests
{
    /// <summary>
    /// Adapters with trained biases made by real PEFT 0.18.1 (ReferenceData/RealPeft, make_bias.py), and adapters written
    /// here that real PEFT loaded (check_from_dotnet.py, WayBackTests): the bias of an adapted layer is PEFT's
    /// <c>&lt;path&gt;.base_layer.bias</c> both ways, the bias of a layer no adapter adapts its plain key.
    /// </summary>
    public class RealPeftTests
    {
        private static readonly string Folder = Path.Combine(AppContext.BaseDirectory, "ReferenceData", "RealPeft");

        /// <summary>The tests' Mlp port (paths 0 and 2) with make_bias.py's base weights, in eval mode.</summary>
        private static Sequential Base()
        {
            var model = Ports.Mlp();
            StateDicts.LoadPyTorchFile(model, Path.Combine(Folder, "base.safetensors"));
            model.eval();
            return model;
        }

        private static Dictionary<string, Tensor> Cases() => StateDicts.ReadPyTorchFile(Path.Combine(Folder, "cases.safetensors"));

        [Theory]
        [InlineData("bias_all", new[] { "base_model.model.0.base_layer.bias", "base_model.model.0.lora_A.weight", "base_model.model.0.lora_B.weight", "base_model.model.2.bias" })]
        [InlineData("bias_lora_only", new[] { "base_model.model.0.lora_A.weight", "base_model.model.0.lora_B.weight" })]
        // modules_to_save ["2"]: PEFT's bias = "all" also saves its wrapper's copy and original of 2's bias.
        [InlineData("bias_all_saved", new[] { "base_model.model.0.base_layer.bias", "base_model.model.0.lora_A.weight", "base_model.model.0.lora_B.weight",
                                              "base_model.model.2.bias", "base_model.model.2.modules_to_save.bias", "base_model.model.2.original_module.bias", "base_model.model.2.weight" })]
        public void PeftsFolder_WithTrainedBiases_LoadsAndGivesPeftsOutput(string name, string[] keys)
        {
            using var scope = NewDisposeScope();
            var cases = Cases();
            string folder = Path.Combine(Folder, name);
            // The keys PEFT 0.18.1 wrote: the adapted layer's bias under base_layer (bias = "all"); with "lora_only" none at all.
            Assert.Equal(keys, StateDicts.ReadPyTorchFile(Path.Combine(folder, "adapter_model.safetensors")).Keys.OrderBy(k => k, StringComparer.Ordinal));
            using var model = Base();

            LoraModel.load_adapter(model, folder);

            // PEFT's output after its own PeftModel.from_pretrained of the folder.
            Equivalence.AssertClose(Ports.Run(model, cases["input"]), cases[$"{name}_loaded"]);
            if (name != "bias_lora_only")
            {
                var file = StateDicts.ReadPyTorchFile(Path.Combine(folder, "adapter_model.safetensors"));
                Assert.True(Equivalence.Compare(file["base_model.model.0.base_layer.bias"], model.state_dict()["0.bias"]).BitExact);
                Assert.True(Equivalence.Compare(file["base_model.model.2.bias"], model.state_dict()["2.bias"]).BitExact);
                Equivalence.AssertClose(Ports.Run(model, cases["input"]), cases[$"{name}_trained"]);
            }
            else
            {
                // PEFT's own lora_only save drops the biases it trained: its reloaded model is not the one it trained.
                Assert.True(Equivalence.Compare(cases[$"{name}_loaded"], cases[$"{name}_trained"]).MaxAbsDiff > 0.05);
            }
        }

        [Fact]
        public void LoadingPeftsFolder_ThenSaving_GivesItsKeysAndBytesBack()
        {
            using var scope = NewDisposeScope();
            using var model = Base();
            LoraModel.load_adapter(model, Path.Combine(Folder, "bias_all"));
            string output = Directory.CreateTempSubdirectory("torchlinear-realpeft-").FullName;
            try
            {
                LoraModel.save_pretrained(model, output);
                var before = StateDicts.ReadPyTorchFile(Path.Combine(Folder, "bias_all", "adapter_model.safetensors"));
                var after = StateDicts.ReadPyTorchFile(Path.Combine(output, "adapter_model.safetensors"));
                Assert.Equal(before.Keys.OrderBy(k => k, StringComparer.Ordinal), after.Keys.OrderBy(k => k, StringComparer.Ordinal));
                foreach (var (key, tensor) in before)
                    Assert.True(Equivalence.Compare(tensor, after[key]).BitExact, key);
            }
            finally
            {
                Directory.Delete(output, recursive: true);
            }
        }

        [Theory]
        [InlineData("bias_all", "base_model.model.0.bias", "'base_model.model.0.base_layer.bias' and 'base_model.model.0.bias' are both 0.bias")]
        [InlineData("bias_all_saved", "base_model.model.2.modules_to_save.bias",
                    "'base_model.model.2.modules_to_save.bias' is PEFT's copy of 'base_model.model.2.bias' in 2's modules_to_save wrapper, but holds other values")]
        [InlineData("bias_all_saved", "base_model.model.2.original_module.bias",
                    "'base_model.model.2.original_module.bias' is the original of 2.bias, which PEFT loads into the module's original, but it differs from this model's 2.bias")]
        public void AFolderWhoseBiasesDisagree_IsRefusedNamingTheKeys_AndChangesNothing(string adapter, string key, string problem)
        {
            using var scope = NewDisposeScope();
            string folder = Directory.CreateTempSubdirectory("torchlinear-realpeft-bias-").FullName;
            try
            {
                File.Copy(Path.Combine(Folder, adapter, "adapter_config.json"), Path.Combine(folder, "adapter_config.json"));
                var tensors = StateDicts.ReadPyTorchFile(Path.Combine(Folder, adapter, "adapter_model.safetensors"));
                // One bias under both keys, or a wrapper's copy that is not the value beside it.
                tensors[key] = (tensors.TryGetValue(key, out var existing) ? existing : tensors["base_model.model.0.base_layer.bias"]) + 1;
                Safetensors.SaveStateDict(Path.Combine(folder, "adapter_model.safetensors"), tensors);
                using var model = Base();
                var before = Ports.Bits(model);
                var error = Assert.Throws<InvalidOperationException>(() => LoraModel.load_adapter(model, folder));
                Assert.Contains(problem, error.Message);
                Assert.Equal(before, Ports.Bits(model));
            }
            finally
            {
                Directory.Delete(folder, recursive: true);
            }
        }

        [Fact]
        public void ABaseLayersWeightInAFolder_IsRefused_NeverLoadedOverThePretrainedWeight()
        {
            using var scope = NewDisposeScope();
            string folder = Directory.CreateTempSubdirectory("torchlinear-realpeft-weight-").FullName;
            try
            {
                File.Copy(Path.Combine(Folder, "bias_all", "adapter_config.json"), Path.Combine(folder, "adapter_config.json"));
                var tensors = StateDicts.ReadPyTorchFile(Path.Combine(Folder, "bias_all", "adapter_model.safetensors"));
                tensors["base_model.model.0.base_layer.weight"] = zeros(32, 16);
                Safetensors.SaveStateDict(Path.Combine(folder, "adapter_model.safetensors"), tensors);
                using var model = Base();
                var before = Ports.Bits(model);
                var error = Assert.Throws<InvalidOperationException>(() => LoraModel.load_adapter(model, folder));
                Assert.Contains("'base_model.model.0.base_layer.weight' names no parameter or buffer", error.Message);
                Assert.Equal(before, Ports.Bits(model));
            }
            finally
            {
                Directory.Delete(folder, recursive: true);
            }
        }

        [Fact]
        public void ABiasAdapterSavedBesideAnotherAdapter_KeepsThePlainKeyOfALayerOnlyTheOtherAdapts_AndLoadsIntoAFreshModel()
        {
            using var scope = NewDisposeScope();
            string folder = Directory.CreateTempSubdirectory("torchlinear-realpeft-two-").FullName;
            try
            {
                using var model = Base();
                // Another adapter, without a bias, wraps layer 2; the saved adapter adapts layer 0 and trains every bias.
                LoraModel.Inject(model, new LoraConfig { r = 2, target_modules = new[] { "2" } }, "other");
                LoraModel.Inject(model, new LoraConfig { r = 4, lora_alpha = 8, target_modules = new[] { "0" }, bias = "all" });
                using (no_grad())
                {
                    foreach (var (key, parameter) in model.named_parameters().Where(p => p.name.EndsWith("bias", StringComparison.Ordinal) || p.name.Contains(".default.", StringComparison.Ordinal)))
                        parameter.add_(0.25);
                }
                LoraModel.set_adapter(model, LoraModel.DefaultAdapter);
                LoraModel.save_pretrained(model, folder, new[] { LoraModel.DefaultAdapter });
                var keys = StateDicts.ReadPyTorchFile(Path.Combine(folder, "adapter_model.safetensors")).Keys.OrderBy(k => k, StringComparer.Ordinal);
                // PEFT's from_pretrained on a fresh base model wraps layer 0 only: 0's bias under base_layer, 2's plain.
                Assert.Equal(new[] { "base_model.model.0.base_layer.bias", "base_model.model.0.lora_A.weight", "base_model.model.0.lora_B.weight", "base_model.model.2.bias" }, keys);
                using var fresh = Base();
                LoraModel.load_adapter(fresh, folder);
                using var x = Cases()["input"];
                using (LoraModel.disable_adapter(model))
                using (LoraModel.disable_adapter(fresh))
                    Assert.True(Equivalence.Compare(Ports.Run(model, x), Ports.Run(fresh, x)).BitExact, "the trained biases came back");
                LoraModel.delete_adapter(model, "other");
                Assert.True(Equivalence.Compare(Ports.Run(model, x), Ports.Run(fresh, x)).BitExact, "the adapter came back");
            }
            finally
            {
                Directory.Delete(folder, recursive: true);
            }
        }

        // ---- The way back: folders written here, loaded by real PEFT (WayBackTests has PEFT's verdict) ---------------

        [Fact]
        public void TrainedBiases_AreSavedUnderPeftsKeys()
        {
            using var scope = NewDisposeScope();
            string fresh = Directory.CreateTempSubdirectory("torchlinear-realpeft-from-dotnet-").FullName;
            try
            {
                WayBackTests.Write(fresh);
                // PEFT's keys: the adapted layer's bias under base_layer, the other layer's under its own name.
                var expected = new Dictionary<string, string[]>
                {
                    ["bias_all"] = new[] { "base_model.model.0.base_layer.bias", "base_model.model.0.lora_A.weight", "base_model.model.0.lora_B.weight", "base_model.model.2.bias" },
                    ["bias_lora_only"] = new[] { "base_model.model.0.base_layer.bias", "base_model.model.0.lora_A.weight", "base_model.model.0.lora_B.weight" },
                };
                foreach (var (name, keys) in expected)
                {
                    var written = StateDicts.ReadPyTorchFile(Path.Combine(fresh, name, "adapter_model.safetensors"));
                    Assert.Equal(keys, written.Keys.OrderBy(k => k, StringComparer.Ordinal));
                    // Ours reads it back to the same model.
                    var outputs = StateDicts.ReadPyTorchFile(Path.Combine(fresh, "outputs.safetensors"));
                    using var again = Base();
                    LoraModel.load_adapter(again, Path.Combine(fresh, name));
                    Assert.True(Equivalence.Compare(outputs[name], Ports.Run(again, outputs["input/mlp"])).BitExact, name);
                }
            }
            finally
            {
                Directory.Delete(fresh, recursive: true);
            }
        }
    }
}
