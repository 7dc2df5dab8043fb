using System.Linq;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Lora.Tests
{
    /// <summary>
    /// Which parameters set_adapter and delete_adapter touch: the adapters' own (their tensors, their modules_to_save,
    /// the biases their bias mode names), never a base parameter — as PEFT 0.18.1, measured: a base weight unfrozen after
    /// get_peft_model still requires grad after set_adapter and delete_adapter, and is frozen again by add_adapter
    /// (inject_adapter calls _mark_only_adapters_as_trainable).
    /// </summary>
    public class TrainableFlagsTests
    {
        [Fact]
        public void ABaseParameterTheUserUnfroze_StaysUnfrozen_BySetAdapterAndDeleteAdapter_AsPeft()
        {
            manual_seed(3);
            using var model = nn.Sequential(("0", nn.Linear(8, 16)), ("1", nn.ReLU()), ("2", nn.Linear(16, 4)));
            LoraModel.Inject(model, new LoraConfig { r = 2, target_modules = new[] { "0", "2" } });
            LoraModel.Inject(model, new LoraConfig { r = 2, target_modules = new[] { "0", "2" } }, "other");
            bool Grad(string name) => model.named_parameters().Single(p => p.name == name).parameter.requires_grad;
            Assert.False(Grad("0.weight"));
            model.named_parameters().Single(p => p.name == "0.weight").parameter.requires_grad_(true);

            LoraModel.set_adapter(model, "other");
            Assert.True(Grad("0.weight"), "set_adapter left the unfrozen base weight alone");
            Assert.False(Grad("0.bias"));
            Assert.True(Grad("0.lora_A.other.weight"));      // the active adapter made to train trains
            Assert.False(Grad("0.lora_A.default.weight"));   // the inactive one is frozen

            LoraModel.delete_adapter(model, "default");
            Assert.True(Grad("0.weight"), "delete_adapter left the unfrozen base weight alone");
            Assert.True(Grad("2.lora_B.other.weight"));

            // Putting an adapter in freezes the base again, as PEFT's add_adapter does.
            LoraModel.Inject(model, new LoraConfig { r = 2, target_modules = new[] { "0" } }, "third");
            Assert.False(Grad("0.weight"));
        }
    }
}
