using System;
using System.IO;
using System.Linq;
using TorchLinear.Tests;
using TorchSharp;
using TorchSharp.Modules;
using Xunit;
using static TorchLinear.Lora.Tests.Ports;
using static TorchSharp.torch;

namespace TorchLinear.Lora.Tests
{
    /// <summary>
    /// LoRA on an nn.Embedding against ReferenceData/Peft/embedding (make_peft_breadth.py: made, saved, reloaded and run
    /// by real PEFT 0.18.1's lora.Embedding): "emb" (10 × 12) and "fc" adapted with r = 4, trained 20 steps; outputs
    /// unmerged, merged (merge_adapter), folded (merge_and_unload) and in a mixed batch (adapter_names=).
    /// </summary>
    public class EmbeddingAdapterTests
    {
        private static string Embedding => Path.Combine(Folder, "embedding");

        [Theory]
        [InlineData(PortStyle.LinearCall)]
        [InlineData(PortStyle.ModuleForward)]
        public void AnEmbeddingAdapter_GivesPyTorchsOutput_UnmergedMergedAndInAMixedBatch(PortStyle style)
        {
            using var scope = NewDisposeScope();
            var cases = Cases("embedding");
            using var model = Pretrained("embedding", style);
            var weights = Bits(model);
            LoraModel.load_adapter(model, Embedding);
            var keys = model.state_dict().Keys.ToList();
            Assert.Contains("emb.lora_embedding_A.default", keys);
            Assert.Contains("emb.lora_embedding_B.default", keys);
            Assert.Contains("fc.lora_A.default.weight", keys);
            var x = cases["input"];
            var unmerged = Run(model, x);
            Equivalence.AssertClose(unmerged, cases["adapted_output"]);
            using (LoraModel.disable_adapter(model))
                Equivalence.AssertClose(Run(model, x), cases["base_output"]);
            using (LoraModel.MixedBatch(model, new[] { "default", LoraModel.BaseModel, "default" }))
                Equivalence.AssertClose(Run(model, x), cases["output_mixed"]);

            LoraModel.merge_adapter(model);
            Equivalence.AssertClose(Run(model, x), cases["merged_output"]);
            LoraModel.unmerge_adapter(model);
            foreach (var (key, bits) in Bits(model).Where(kv => weights.ContainsKey(kv.Key)))
                Assert.Equal(weights[key], bits);
            Assert.True(Equivalence.Compare(unmerged, Run(model, x)).BitExact);

            LoraModel.merge_and_unload(model);
            Assert.DoesNotContain(model.state_dict().Keys, k => k.Contains("lora_", StringComparison.Ordinal));
            Equivalence.AssertClose(Run(model, x), cases["unloaded_output"]);
        }

        [Fact]
        public void AFreshEmbeddingAdapter_ChangesNoBit_TrainsAndSavesPeftsKeys()
        {
            using var scope = NewDisposeScope();
            var cases = Cases("embedding");
            using var model = Pretrained("embedding");
            var x = cases["input"];
            var before = Run(model, x);
            LoraModel.Inject(model, new LoraConfig { r = 3, lora_alpha = 6, target_modules = new[] { "emb" } });
            // PEFT's initialisation for embeddings: A zeros, B normal, so the update starts at exactly zero.
            var state = model.state_dict();
            Assert.Equal(new long[] { 3, 10 }, state["emb.lora_embedding_A.default"].shape);
            Assert.Equal(new long[] { 12, 3 }, state["emb.lora_embedding_B.default"].shape);
            Assert.Equal(0, state["emb.lora_embedding_A.default"].abs().sum().item<float>());
            Assert.True(Equivalence.Compare(before, Run(model, x)).BitExact);

            model.train();
            using (var optimizer = optim.SGD(model.parameters().Where(p => p.requires_grad), 0.5))
            {
                for (int step = 0; step < 3; step++)
                {
                    using var stepScope = NewDisposeScope();
                    optimizer.zero_grad();
                    model.call(x).square().mean().backward();
                    optimizer.step();
                }
            }
            model.eval();
            var trained = Run(model, x);
            Assert.False(Equivalence.Compare(before, trained).BitExact, "the embedding adapter trained");
            string folder = Directory.CreateTempSubdirectory("torchlinear-embedding-").FullName;
            try
            {
                LoraModel.save_pretrained(model, folder);
                var saved = StateDicts.ReadPyTorchFile(Path.Combine(folder, "adapter_model.safetensors"));
                Assert.Equal(new[] { "base_model.model.emb.lora_embedding_A", "base_model.model.emb.lora_embedding_B" }, saved.Keys.OrderBy(k => k, StringComparer.Ordinal));
                using var again = Pretrained("embedding");
                LoraModel.load_adapter(again, folder);
                Assert.True(Equivalence.Compare(trained, Run(again, x)).BitExact);
            }
            finally
            {
                Directory.Delete(folder, recursive: true);
            }
        }

        [Fact]
        public void AllLinear_LeavesEmbeddingsOut_AndANamedEmbeddingIsTaken_AsPeftDecides()
        {
            using var model = Pretrained("embedding");
            // PEFT's all-linear: the linear layers (less a top-level lm_head, docs/lora.md), never an embedding.
            var adapted = LoraModel.Inject(model, new LoraConfig { r = 2, TargetModulesRegex = "all-linear" });
            Assert.Equal(new[] { "fc", "head" }, adapted.OrderBy(p => p, StringComparer.Ordinal));
            LoraModel.unload(model);
            // DoRA on embeddings (PEFT's DoraEmbeddingLayer) is not implemented here: refused by name, nothing put in.
            var before = Bits(model);
            var error = Assert.ThrowsAny<Exception>(() => LoraModel.Inject(model, new LoraConfig { r = 2, target_modules = new[] { "emb", "fc" }, use_dora = true }));
            Assert.Contains("emb is an nn.Embedding, and DoRA on embeddings is not implemented (use_dora)", error.Message);
            Assert.Equal(before, Bits(model));
            Assert.Equal(new[] { "emb", "fc" }, LoraModel.Inject(model, new LoraConfig { r = 2, target_modules = new[] { "emb", "fc" } }).OrderBy(p => p, StringComparer.Ordinal));
        }
    }
}
