using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Lora.Tests
{
    /// <summary>
    /// The <c>Adapter</c> slot of a <see cref="CustomLinear"/> or a <see cref="Conv1D"/> that hosts its adapters, set by
    /// code outside the library after the adapters went in (to null, or to another delegate): every operation on the
    /// adapters refuses by the layer's path and changes nothing; the queries still answer; <c>unload</c> takes the adapters
    /// out and leaves the slot as that code set it; putting the library's delegate back makes everything work again.
    /// </summary>
    public class SlotTests
    {
        /// <summary>Two slot layers p (6 → 5) and q (5 → 4) of one kind, invoked with forward(x).</summary>
        private sealed class Pair : nn.Module<Tensor, Tensor>
        {
            public readonly nn.Module<Tensor, Tensor> p;
            public readonly nn.Module<Tensor, Tensor> q;

            public Pair(string kind) : base(nameof(Pair))
            {
                p = kind == "Conv1D" ? new Conv1D(5, 6) : new CustomLinear(6, 5);
                q = kind == "Conv1D" ? new Conv1D(4, 5) : new CustomLinear(5, 4);
                RegisterComponents();
            }

            public override Tensor forward(Tensor x) => q.forward(p.forward(x));
        }

        private static Func<Tensor, Tensor, Tensor>? GetSlot(nn.Module layer) => layer is Conv1D conv ? conv.Adapter : ((CustomLinear)layer).Adapter;

        private static void SetSlot(nn.Module layer, Func<Tensor, Tensor, Tensor>? value)
        {
            if (layer is Conv1D conv)
                conv.Adapter = value;
            else
                ((CustomLinear)layer).Adapter = value;
        }

        private static LoraConfig Config(params string[] targets) => new() { r = 2, lora_alpha = 4, target_modules = targets, init_lora_weights = "false" };

        private static Pair Adapted(string kind)
        {
            manual_seed(21);
            var model = new Pair(kind);
            model.eval();
            LoraModel.Inject(model, Config("p", "q"));
            LoraModel.Inject(model, Config("p", "q"), "other");
            return model;
        }

        /// <summary>Everything a refused operation must leave as it was: every state_dict value bit for bit, the adapters, the active ones, the slots.</summary>
        private static Action Snapshot(Pair model)
        {
            var values = model.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone());
            var adapters = LoraModel.peft_config(model).Keys.ToList();
            var active = LoraModel.active_adapters(model).ToList();
            var (slotP, slotQ) = (GetSlot(model.p), GetSlot(model.q));
            return () =>
            {
                var now = model.state_dict();
                Assert.Equal(values.Keys.OrderBy(k => k, StringComparer.Ordinal), now.Keys.OrderBy(k => k, StringComparer.Ordinal));
                foreach (var (key, value) in values)
                    Assert.True(Equivalence.Compare(value, now[key]).BitExact, key);
                Assert.Equal(adapters, LoraModel.peft_config(model).Keys);
                Assert.Equal(active, LoraModel.active_adapters(model));
                Assert.Same(slotP, GetSlot(model.p));
                Assert.Same(slotQ, GetSlot(model.q));
            };
        }

        [Theory]
        [InlineData("CustomLinear", false)]
        [InlineData("CustomLinear", true)]
        [InlineData("Conv1D", false)]
        [InlineData("Conv1D", true)]
        public void ASlotSetOutsideTheLibrary_IsRefusedByEveryOperation_NamingTheLayer_AndNothingChanges(string kind, bool foreign)
        {
            using var scope = NewDisposeScope();
            var model = Adapted(kind);
            string folder = Path.Combine(Path.GetTempPath(), $"torchlinear-slot-{Guid.NewGuid():N}");
            try
            {
                LoraModel.save_pretrained(model, folder);
                LoraModel.merge_adapter(model);   // an adapter merged: unmerge and the rest have something to do
                var peft = PeftModel.Of(model);
                SetSlot(model.q, foreign ? (input, output) => output : null);
                var unchanged = Snapshot(model);
                var x = randn(3, 6);
                var operations = new (string Name, Action Run)[]
                {
                    ("Inject", () => LoraModel.Inject(model, Config("q"), "third")),
                    ("Inject", () => LoraModel.Inject(model, Config("p"), "third")),   // another layer's adapter: the model is refused as a whole
                    ("add_adapter", () => peft.add_adapter("third", Config("q"))),
                    ("load_adapter", () => LoraModel.load_adapter(model, folder, "loaded")),
                    ("load_adapter", () => peft.load_adapter(folder, "loaded")),
                    ("merge_adapter", () => LoraModel.merge_adapter(model, new[] { "other" })),
                    ("unmerge_adapter", () => LoraModel.unmerge_adapter(model)),
                    ("set_adapter", () => LoraModel.set_adapter(model, "other")),
                    ("merge_and_unload", () => LoraModel.merge_and_unload(model)),
                    ("delete_adapter", () => LoraModel.delete_adapter(model, "other")),
                    ("add_weighted_adapter", () => LoraModel.add_weighted_adapter(model, new[] { "default", "other" }, new[] { 1.0, 1.0 }, "mix", CombinationType.Cat)),
                    ("disable_adapter", () => LoraModel.disable_adapter(model).Dispose()),
                    ("MixedBatch", () => LoraModel.MixedBatch(model, new[] { "other", "other", "other" }).Dispose()),
                    ("mark_only_lora_as_trainable", () => LoraModel.mark_only_lora_as_trainable(model)),
                    ("CheckAdaptersRun", () => LoraModel.CheckAdaptersRun(model, x)),
                };
                foreach (var (name, run) in operations)
                {
                    var error = Assert.Throws<InvalidOperationException>(run);
                    Assert.StartsWith($"LoraModel.{name}: the Adapter slot of q (a {kind} with adapters 'default', 'other'; its slot holds {(foreign ? "another delegate" : "null")}) no longer holds the adapter TorchLinear.Lora put there", error.Message);
                    Assert.DoesNotContain("p (a", error.Message);
                    Assert.Contains("nothing changed", error.Message);
                    unchanged();
                }
                // Saving reads only the adapters' tensors: allowed, so trained adapters can be kept before unload, and the
                // files are those saved before the slot was lost.
                LoraModel.save_pretrained(model, Path.Combine(folder, "again"));
                unchanged();
                Assert.Equal(File.ReadAllBytes(Path.Combine(folder, "adapter_model.safetensors")), File.ReadAllBytes(Path.Combine(folder, "again", "adapter_model.safetensors")));
                Assert.False(Directory.Exists(Path.Combine(folder, "mix")));
                // The queries still answer.
                Assert.Equal(new[] { "default", "other" }, LoraModel.peft_config(model).Keys);
                Assert.Equal(new[] { "default" }, LoraModel.active_adapters(model));
            }
            finally
            {
                if (Directory.Exists(folder))
                    Directory.Delete(folder, recursive: true);
            }
        }

        [Theory]
        [InlineData("CustomLinear")]
        [InlineData("Conv1D")]
        public void AModelCall_WhoseSlotLostItsAdapter_SaysSo(string kind)
        {
            using var scope = NewDisposeScope();
            var model = Adapted(kind);
            SetSlot(model.p, null);
            var error = Assert.Throws<InvalidOperationException>(() => model.call(randn(3, 6)));
            Assert.Contains("did not run in this call of Pair, so its output lacks their updates: p (a layer's own Adapter slot no longer holds the adapter TorchLinear.Lora put there", error.Message);
        }

        [Theory]
        [InlineData("CustomLinear", false)]
        [InlineData("CustomLinear", true)]
        [InlineData("Conv1D", false)]
        [InlineData("Conv1D", true)]
        public void Unload_TakesTheAdaptersOut_AndLeavesASlotSetOutsideTheLibraryAsItWasSet(string kind, bool foreign)
        {
            using var scope = NewDisposeScope();
            var x = randn(3, 6);
            manual_seed(21);
            var plain = new Pair(kind);
            plain.eval();
            Tensor before;
            using (no_grad())
                before = plain.forward(x);
            var model = Adapted(kind);
            LoraModel.merge_adapter(model);
            Func<Tensor, Tensor, Tensor>? theirs = foreign ? (input, output) => output : null;
            SetSlot(model.q, theirs);
            LoraModel.unload(model);
            Assert.Same(theirs, GetSlot(model.q));   // not nulled: it is that code's
            Assert.Null(GetSlot(model.p));           // the library's own delegate is taken out
            Assert.DoesNotContain(model.state_dict().Keys, k => k.Contains("lora_", StringComparison.Ordinal));
            using (no_grad())
                Assert.True(Equivalence.Compare(before, model.forward(x)).BitExact);   // the merged adapter restored bit for bit
            Assert.Throws<InvalidOperationException>(() => LoraModel.peft_config(model));   // no adapters left
            // A fresh adapter: accepted where the slot is empty, refused (as before any adapter) where that code's delegate is.
            if (foreign)
                Assert.Contains("q already has an adapter in its Adapter slot", Assert.Throws<ArgumentException>(() => LoraModel.Inject(model, Config("p", "q"))).Message);
            else
                Assert.Equal(new[] { "p", "q" }, LoraModel.Inject(model, Config("p", "q")));
        }

        [Theory]
        [InlineData("CustomLinear")]
        [InlineData("Conv1D")]
        public void TheLibrarysDelegatePutBack_MakesEveryOperationWorkAgain(string kind)
        {
            using var scope = NewDisposeScope();
            var model = Adapted(kind);
            var x = randn(3, 6);
            Tensor adapted;
            using (no_grad())
                adapted = model.forward(x);
            var ours = GetSlot(model.q);
            SetSlot(model.q, null);
            Assert.Throws<InvalidOperationException>(() => LoraModel.merge_adapter(model));
            SetSlot(model.q, ours);
            LoraModel.merge_adapter(model);
            LoraModel.unmerge_adapter(model);
            using (no_grad())
                Assert.True(Equivalence.Compare(adapted, model.forward(x)).BitExact);
            LoraModel.Inject(model, Config("q"), "third");
            LoraModel.unload(model);
            Assert.Null(GetSlot(model.p));
            Assert.Null(GetSlot(model.q));
        }
    }
}
