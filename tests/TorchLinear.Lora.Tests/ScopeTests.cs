using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using TorchLinear.Tests;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Lora.Tests
{
    /// <summary>
    /// The two scopes, MixedBatch and disable_adapter, against the operations that would change under them what their end
    /// restores: merging, unmerging, adding and taking out adapters are refused while one is open, naming it; a mixed
    /// forward refuses merged adapters at every call, as PEFT's _check_forward_args does.
    /// </summary>
    public class ScopeTests
    {
        private static readonly string[] Rows = { "default", "other", LoraModel.BaseModel, "other" };

        /// <summary>Two 64-wide layers: r = 2 for both adapters goes the stacked way, r = 16 one adapter at a time.</summary>
        private static nn.Module<Tensor, Tensor> TwoAdapters(int r)
        {
            manual_seed(5);
            var model = nn.Sequential(("0", nn.Linear(64, 64)), ("1", nn.ReLU()), ("2", nn.Linear(64, 64)));
            model.eval();
            LoraModel.Inject(model, new LoraConfig { r = r, lora_alpha = 2 * r, target_modules = new[] { "0", "2" }, init_lora_weights = "false" });
            LoraModel.Inject(model, new LoraConfig { r = r, lora_alpha = r, target_modules = new[] { "0", "2" }, init_lora_weights = "false" }, "other");
            model.eval();
            return model;
        }

        private static bool Same(Tensor a, Tensor b) => Equivalence.Compare(a, b).BitExact;

        [Theory]
        [InlineData(2)]    // stacked
        [InlineData(16)]   // one adapter at a time
        public void AMixedForward_RefusesMergedAdapters_AtEveryCall_AsPeft(int r)
        {
            using var scope = NewDisposeScope();
            using var model = TwoAdapters(r);
            var x = randn(Rows.Length, 64);
            Tensor expected;
            using (LoraModel.MixedBatch(model, Rows))
                expected = model.call(x);
            LoraModel.merge_adapter(model);
            // The one way to a mixed batch over merged adapters: opened inside disable_adapter (which takes the merged
            // adapters out for its while), and still open when disable_adapter's end merges them back.
            IDisposable mixed;
            using (LoraModel.disable_adapter(model))
                mixed = LoraModel.MixedBatch(model, Rows);
            var error = Assert.Throws<InvalidOperationException>(() => model.call(x));
            Assert.Contains("'default' is merged into this layer's weight", error.Message);
            Assert.Contains("Cannot pass adapter_names when there are merged adapters", error.Message);
            Assert.Contains("unmerge_adapter", error.Message);
            mixed.Dispose();
            LoraModel.unmerge_adapter(model);
            using (LoraModel.MixedBatch(model, Rows))
                Assert.True(Same(expected, model.call(x)), "the mixed batch after unmerging");
        }

        /// <summary>Every operation that merges, unmerges, adds or takes out adapters, by its current name.</summary>
        private static IEnumerable<(string Name, Action<nn.Module> Run)> Operations(string folder) => new (string, Action<nn.Module>)[]
        {
            ("merge_adapter", m => LoraModel.merge_adapter(m)),
            ("unmerge_adapter", m => LoraModel.unmerge_adapter(m)),
            ("merge_and_unload", m => LoraModel.merge_and_unload(m)),
            ("unload", m => LoraModel.unload(m)),
            ("delete_adapter", m => LoraModel.delete_adapter(m, "other")),
            ("Inject", m => LoraModel.Inject(m, new LoraConfig { r = 2, target_modules = new[] { "0" } }, "third")),
            ("Inject", m => PeftModel.Of(m).add_adapter("third", new LoraConfig { r = 2, target_modules = new[] { "0" } })),
            ("load_adapter", m => LoraModel.load_adapter(m, folder, "third")),
            ("add_weighted_adapter", m => LoraModel.add_weighted_adapter(m, new[] { "default", "other" }, new[] { 1.0, 1.0 }, "third", CombinationType.Cat)),
            // Allowed here once: inside disable_adapter, its end merged 'default' back beside an active unmerged 'other'.
            ("set_adapter", m => LoraModel.set_adapter(m, "other")),
        };

        [Theory]
        [InlineData("MixedBatch")]
        [InlineData("disable_adapter")]
        public void AnOperationThatChangesTheAdapters_IsRefusedInsideAScope_NamingIt_AndChangesNothing(string scopeName)
        {
            using var scope = NewDisposeScope();
            string folder = Path.Combine(Path.GetTempPath(), $"scope-{Guid.NewGuid():N}");
            try
            {
                using var model = TwoAdapters(2);
                LoraModel.save_pretrained(model, folder);
                var x = randn(Rows.Length, 64);
                if (scopeName == "disable_adapter")
                    LoraModel.merge_adapter(model);   // the disable scope takes it out and puts it back
                var before = model.call(x);
                var mixedBefore = scopeName == "MixedBatch" ? Mixed(model, x) : null;
                var parameters = model.named_parameters().Select(p => p.name).ToList();
                foreach (var (name, run) in Operations(folder))
                {
                    using (scopeName == "MixedBatch" ? LoraModel.MixedBatch(model, Rows) : LoraModel.disable_adapter(model))
                    {
                        var error = Assert.Throws<InvalidOperationException>(() => run(model));
                        Assert.StartsWith($"LoraModel.{name}: a {(scopeName == "MixedBatch" ? "LoraModel.MixedBatch" : "disable_adapter")} scope of this model is open", error.Message);
                        Assert.Contains("dispose the scope first; nothing changed", error.Message);
                    }
                    Assert.Equal(parameters, model.named_parameters().Select(p => p.name).ToList());
                    Assert.Equal(new[] { "default", "other" }, LoraModel.peft_config(model).Keys.ToArray());
                    Assert.True(Same(before, model.call(x)), $"{name}: the model after the scope");
                    if (mixedBefore is not null)
                        Assert.True(Same(mixedBefore, Mixed(model, x)), $"{name}: a mixed batch after the scope");
                }
            }
            finally
            {
                if (Directory.Exists(folder))
                    Directory.Delete(folder, recursive: true);
            }
        }

        private static Tensor Mixed(nn.Module<Tensor, Tensor> model, Tensor x)
        {
            using (LoraModel.MixedBatch(model, Rows))
                return model.call(x);
        }

        /// <summary>
        /// A mixed batch inside disable_adapter, opened in either order, gives the base model for every row: PEFT's
        /// <c>lora.Linear.forward</c> checks <c>disable_adapters</c> before <c>adapter_names</c>. Compared bit for bit with
        /// the same model's disabled output in the same process (the same kernels on the same data).
        /// </summary>
        [Fact]
        public void AMixedBatchInsideDisableAdapter_GivesTheBaseModelForEveryRow_AsPeft()
        {
            using var scope = NewDisposeScope();
            using var model = TwoAdapters(2);
            var x = randn(Rows.Length, 64);
            Tensor based;
            using (LoraModel.disable_adapter(model))
                based = model.call(x);
            Assert.False(Same(based, Mixed(model, x)), "the adapters change the rows they name");
            using (LoraModel.disable_adapter(model))
                Assert.True(Same(based, Mixed(model, x)), "mixed batch opened inside disable_adapter");
            using (LoraModel.MixedBatch(model, Rows))
            using (LoraModel.disable_adapter(model))
                Assert.True(Same(based, model.call(x)), "disable_adapter opened inside a mixed batch");
        }

        [Fact]
        public void DisableAdapter_RestoresMergedAdaptersAndFlags_AfterADeleteOrUnloadWasRefusedInside()
        {
            using var scope = NewDisposeScope();
            using var model = TwoAdapters(2);
            var x = randn(Rows.Length, 64);
            LoraModel.merge_adapter(model);
            var merged = model.call(x);
            var flags = model.named_parameters().Select(p => (p.name, p.parameter.requires_grad)).ToList();
            using (LoraModel.disable_adapter(model))
            {
                Assert.Throws<InvalidOperationException>(() => LoraModel.delete_adapter(model, "default"));
                Assert.Throws<InvalidOperationException>(() => LoraModel.unload(model));
            }
            Assert.True(Same(merged, model.call(x)), "the merged adapter is back in the weights");
            Assert.Equal(flags, model.named_parameters().Select(p => (p.name, p.parameter.requires_grad)).ToList());
        }

        [Fact]
        public void Scopes_EndWithoutAWord_WhenTheModelWasDisposedInside()
        {
            var model = TwoAdapters(2);
            LoraModel.merge_adapter(model);
            var disabled = LoraModel.disable_adapter(model);
            var mixed = LoraModel.MixedBatch(model, Rows);
            model.Dispose();
            mixed.Dispose();      // was: ObjectDisposedException from the released thread-local batch
            disabled.Dispose();   // was: requires_grad_ on freed parameters and merging into a freed weight
        }
    }
}
