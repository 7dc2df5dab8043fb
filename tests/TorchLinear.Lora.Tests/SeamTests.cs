using System;
using System.Collections.Generic;
using System.Linq;
using TorchLinear.Tests;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Lora.Tests
{
    /// <summary>
    /// The seams of the package's layout (docs/lora.md): the mixed batch's stacked products are the single-adapter
    /// arithmetic, checked against each row computed alone with its adapter active rather than against another run of
    /// the same stacked code.
    /// </summary>
    public class SeamTests
    {
        /// <summary>Four 256-wide Linear layers in float64 with four adapters of rank 4: small enough against the layer that a mixed batch stacks them.</summary>
        private static nn.Module<Tensor, Tensor> Wide(string[] names)
        {
            var wide = nn.Sequential(("0", nn.Linear(256, 256)), ("1", nn.ReLU()), ("2", nn.Linear(256, 256)), ("3", nn.ReLU()),
                                     ("4", nn.Linear(256, 256)), ("5", nn.ReLU()), ("6", nn.Linear(256, 256)));
            wide.to(ScalarType.Float64);
            for (int i = 0; i < names.Length; i++)
                LoraModel.Inject(wide, new LoraConfig { r = 4, lora_alpha = 3 + i, TargetModulesRegex = "all-linear" }, names[i]);
            using (no_grad())
            {
                foreach (var (_, parameter) in wide.named_parameters().Where(p => p.name.Contains(".lora_B.", StringComparison.Ordinal)))
                    parameter.normal_(0, 0.05);
            }
            wide.eval();
            return wide;
        }

        [Fact]
        public void AStackedMixedBatch_GivesEachRowWhatItsAdapterGivesAlone()
        {
            using var scope = NewDisposeScope();
            manual_seed(0);
            var names = new[] { "default", "a1", "a2", "a3" };
            using var model = Wide(names);
            var rows = Enumerable.Range(0, 20).Select(r => r % 5 == 4 ? LoraModel.BaseModel : names[r % 5]).ToArray();
            var input = randn(20, 256, dtype: ScalarType.Float64);
            Tensor mixed;
            using (no_grad())
            using (LoraModel.MixedBatch(model, rows))
                mixed = model.call(input);
            foreach (string name in names.Append(LoraModel.BaseModel))
            {
                Tensor alone;
                using (no_grad())
                {
                    if (name == LoraModel.BaseModel)
                    {
                        using (LoraModel.disable_adapter(model))
                            alone = model.call(input);
                    }
                    else
                    {
                        LoraModel.set_adapter(model, name);
                        alone = model.call(input);
                    }
                }
                var indices = Enumerable.Range(0, rows.Length).Where(r => rows[r] == name).Select(r => (long)r).ToArray();
                var mine = mixed.index_select(0, tensor(indices));
                var expected = alone.index_select(0, tensor(indices));
                // float64: the stacked and the one-adapter products differ only in summation order and the zeros of the
                // other adapters' columns, 1e-12 relative to the outputs; another adapter's output is 1e-3 away or more.
                double scale = expected.abs().max().item<double>();
                double difference = (mine - expected).abs().max().item<double>();
                Assert.True(difference <= 1e-12 * scale, $"rows of {name}: {difference:G3} from the rows computed alone (largest |y| {scale:G3})");
            }
        }
    
        /// <summary>
        /// A layer type's update as a matrix (ILoraLayerType.DeltaMatrix: an embedding's ΔW is (B A)ᵀ): an svd combination of
        /// full rank gives exactly Σ wᵢ sᵢ ΔWᵢ (PEFT's formula, each update weighed by its scaling again), on a non-square
        /// embedding and a non-square Linear, checked against the adapters' own outputs.
        /// </summary>
        [Fact]
        public void AFullRankSvdCombination_IsTheWeightedSumOfTheUpdates_ForEveryLayerType()
        {
            using var scope = NewDisposeScope();
            manual_seed(3);
            using var model = nn.Sequential(("emb", nn.Embedding(10, 6)), ("fc", nn.Linear(6, 9)));
            model.to(ScalarType.Float64);
            model.eval();
            LoraModel.Inject(model, new LoraConfig { r = 2, lora_alpha = 3, target_modules = new[] { "emb", "fc" }, init_lora_weights = LoraInit.False });
            LoraModel.Inject(model, new LoraConfig { r = 1, lora_alpha = 5, target_modules = new[] { "emb", "fc" }, init_lora_weights = LoraInit.False }, "b");
            // Each layer alone, on its own input: the update of each adapter is its output less the base's.
            var inputs = new Dictionary<string, Tensor> { ["emb"] = tensor(new long[] { 0, 3, 9, 4, 7 }), ["fc"] = randn(5, 6, dtype: ScalarType.Float64) };
            Tensor Layer(string name, string? adapter)
            {
                using var noGrad = no_grad();
                var layer = (nn.Module<Tensor, Tensor>)model.named_children().First(c => c.name == name).module;
                if (adapter is null)
                {
                    using (LoraModel.disable_adapter(model))
                        return layer.call(inputs[name]);
                }
                LoraModel.set_adapter(model, adapter);
                return layer.call(inputs[name]);
            }
            var (w1, w2, s1, s2) = (0.7, -1.3, 3.0 / 2, 5.0 / 1);
            var expected = inputs.Keys.ToDictionary(name => name, name =>
            {
                var plain = Layer(name, null);
                return plain + (Layer(name, "default") - plain) * (w1 * s1) + (Layer(name, "b") - plain) * (w2 * s2);
            });
            LoraModel.add_weighted_adapter(model, new[] { "default", "b" }, new[] { w1, w2 }, "mix", CombinationType.Svd, svd_rank: 3);
            foreach (string name in inputs.Keys)
            {
                var actual = Layer(name, "mix");
                // PEFT's svd weighs the updates with float32 weights: 1e-7 relative; a transposed or misplaced factor is O(1).
                double difference = (actual - expected[name]).abs().max().item<double>();
                Assert.True(difference <= 1e-6 * expected[name].abs().max().item<double>(), $"{name}: the combined adapter's output is {difference:G3} from the weighted sum of the updates");
            }
        }
    }
}
