using System;
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
                LoraModel.Inject(wide, new LoraConfig { r = 4, lora_alpha = 3 + i, target_modules_regex = "all-linear" }, names[i]);
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
    }
}
