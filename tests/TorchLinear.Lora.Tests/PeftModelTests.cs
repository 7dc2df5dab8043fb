using System;
using System.IO;
using System.Linq;
using TorchLinear.Tests;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Lora.Tests
{
    /// <summary>
    /// The adapted model's object, <see cref="PeftModel"/> (PEFT's PeftModel role): made by get_peft_model and
    /// from_pretrained, found again from the model, the same operations as the static LoraModel calls, which it serves.
    /// </summary>
    public class PeftModelTests
    {
        private static nn.Module<Tensor, Tensor> Mlp(long seed)
        {
            manual_seed(seed);
            var model = nn.Sequential(("0", nn.Linear(8, 16)), ("1", nn.ReLU()), ("2", nn.Linear(16, 4)));
            model.eval();
            return model;
        }

        private static LoraConfig Config(int r) => new() { r = r, lora_alpha = 2 * r, target_modules = new[] { "0", "2" }, init_lora_weights = "false" };

        private static bool Same(Tensor a, Tensor b) => Equivalence.Compare(a, b).BitExact;

        [Fact]
        public void GetPeftModel_GivesTheObjectOfTheModel_AndOfFindsTheSameOne()
        {
            using var model = Mlp(1);
            var peft = LoraModel.get_peft_model(model, Config(2));
            Assert.Same(model, peft.Model);
            Assert.Same(model, peft.get_base_model());
            Assert.Same(peft, PeftModel.Of(model));
            Assert.Equal(new[] { "default" }, peft.active_adapters);
            Assert.Equal(2, peft.peft_config["default"].r);
            peft.add_adapter("second", Config(4));
            Assert.Equal(new[] { "default", "second" }, peft.peft_config.Keys.ToArray());
            Assert.Equal(new[] { "default" }, peft.active_adapters);
            peft.set_adapter("second");
            Assert.Equal(new[] { "second" }, LoraModel.active_adapters(model));  // the static call reads the object's state
            LoraModel.set_adapter(model, "default", "second");
            Assert.Equal(new[] { "default", "second" }, peft.active_adapters);
        }

        [Fact]
        public void EveryStaticCall_AndItsInstanceMethod_GiveTheSameModelAndFiles()
        {
            using var scope = NewDisposeScope();
            string root = Path.Combine(Path.GetTempPath(), $"peftmodel-{Guid.NewGuid():N}");
            try
            {
                var x = randn(5, 8);
                using var a = Mlp(7);
                using var b = Mlp(7);
                // The same seed before each, so both draw the same adapters.
                manual_seed(11);
                LoraModel.Inject(a, Config(2));
                manual_seed(12);
                LoraModel.Inject(a, Config(3), "other");
                manual_seed(11);
                var peft = LoraModel.get_peft_model(b, Config(2));
                manual_seed(12);
                peft.add_adapter("other", Config(3));
                Assert.True(Same(a.call(x), b.call(x)), "after inject / get_peft_model and add_adapter");

                LoraModel.set_adapter(a, "default", "other");
                peft.set_adapter("default", "other");
                Assert.True(Same(a.call(x), b.call(x)), "set_adapter");

                LoraModel.merge_adapter(a);
                peft.merge_adapter();
                Assert.True(Same(a.call(x), b.call(x)), "merge / merge_adapter");
                using (LoraModel.disable_adapter(a))
                using (peft.disable_adapter())
                    Assert.True(Same(a.call(x), b.call(x)), "disable_adapters / disable_adapter");
                LoraModel.unmerge_adapter(a);
                peft.unmerge_adapter();
                Assert.True(Same(a.call(x), b.call(x)), "unmerge / unmerge_adapter");

                LoraModel.add_weighted_adapter(a, new[] { "default", "other" }, new[] { 0.5, 1.5 }, "mix", "cat");
                peft.add_weighted_adapter(new[] { "default", "other" }, new[] { 0.5, 1.5 }, "mix", "cat");
                LoraModel.set_adapter(a, "mix");
                peft.set_adapter("mix");
                Assert.True(Same(a.call(x), b.call(x)), "add_weighted_adapter");

                var rows = new[] { "default", "other", LoraModel.BaseModel, "mix", "default" };
                Tensor fromStatic, fromObject;
                using (LoraModel.MixedBatch(a, rows))
                    fromStatic = a.call(x);
                using (peft.MixedBatch(rows))
                    fromObject = b.call(x);
                Assert.True(Same(fromStatic, fromObject), "mixed_batch / MixedBatch");

                Assert.Equal(LoraModel.get_nb_trainable_parameters(a), peft.get_nb_trainable_parameters());

                LoraModel.save_pretrained(a, Path.Combine(root, "a"));
                peft.save_pretrained(Path.Combine(root, "b"));
                foreach (string file in new[] { "adapter_model.safetensors", "other/adapter_model.safetensors", "mix/adapter_config.json" })
                    Assert.Equal(File.ReadAllBytes(Path.Combine(root, "a", file)), File.ReadAllBytes(Path.Combine(root, "b", file)));

                LoraModel.delete_adapter(a, "mix");
                peft.delete_adapter("mix");
                Assert.Equal(LoraModel.peft_config(a).Keys, peft.peft_config.Keys);

                LoraModel.merge_and_unload(a);
                peft.merge_and_unload();
                Assert.True(Same(a.call(x), b.call(x)), "merge_and_unload");
            }
            finally
            {
                if (Directory.Exists(root))
                    Directory.Delete(root, recursive: true);
            }
        }

        [Fact]
        public void FromPretrained_AndLoadAdapter_ReadWhatSavePretrainedWrote()
        {
            using var scope = NewDisposeScope();
            string root = Path.Combine(Path.GetTempPath(), $"peftmodel-{Guid.NewGuid():N}");
            try
            {
                var x = randn(3, 8);
                using var trained = Mlp(3);
                var peft = LoraModel.get_peft_model(trained, Config(2));
                peft.add_adapter("other", Config(2));
                peft.save_pretrained(root);
                var expected = trained.call(x);

                using var fresh = Mlp(3);
                var loaded = PeftModel.from_pretrained(fresh, root);
                Assert.Same(loaded, PeftModel.Of(fresh));
                Assert.True(Same(expected, fresh.call(x)), "from_pretrained gives the saved model's output");
                loaded.load_adapter(Path.Combine(root, "other"), "other");
                Assert.Equal(new[] { "default", "other" }, loaded.peft_config.Keys.ToArray());
                Assert.All(fresh.named_parameters(), p => Assert.False(p.parameter.requires_grad));  // loaded for inference, as PEFT
            }
            finally
            {
                if (Directory.Exists(root))
                    Directory.Delete(root, recursive: true);
            }
        }

        [Fact]
        public void AnUnloadedModel_HasNoAdaptersForItsOldObject_UntilAnotherIsPutIn()
        {
            using var model = Mlp(5);
            var peft = LoraModel.get_peft_model(model, Config(2));
            peft.unload();
            Assert.Contains("the model has no adapters", Assert.Throws<InvalidOperationException>(() => peft.set_adapter("default")).Message);
            Assert.Contains("the model has no adapters", Assert.Throws<InvalidOperationException>(() => PeftModel.Of(model)).Message);
            LoraModel.Inject(model, Config(4), "again");
            Assert.Equal(new[] { "again" }, peft.active_adapters);  // the old object follows the model
            Assert.Equal(4, PeftModel.Of(model).peft_config["again"].r);
        }

        [Fact]
        public void Of_AModelThatHoldsTheAdaptedOne_SaysWhereTheAdaptersAre()
        {
            using var inner = Mlp(6);
            LoraModel.Inject(inner, Config(2));
            using var outer = nn.Sequential(("inner", inner));
            var error = Assert.Throws<InvalidOperationException>(() => PeftModel.Of(outer));
            Assert.Contains("the adapters were put into a Sequential, not into this Sequential", error.Message);
            Assert.Contains("the adapters were put into", Assert.Throws<InvalidOperationException>(() => LoraModel.set_adapter(outer, "default")).Message);
        }
    }
}
