using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using TorchLinear.Tests;
using TorchSharp;
using Xunit;
using static TorchLinear.Lora.Tests.Ports;
using static TorchSharp.torch;

namespace TorchLinear.Lora.Tests
{
    /// <summary>
    /// Several named adapters on one model, against ReferenceData/Peft/named (make_peft_breadth.py: made, saved, reloaded
    /// and run by real PEFT 0.18.1): "default" (r 4 on q_proj, v_proj), "other" (r 8 on q_proj, k_proj, o_proj) and
    /// "third" (r 4 on q_proj, v_proj), each trained alone, in PEFT's save_pretrained layout (default in the folder, the
    /// others in sub-folders). Switching, several active, deleting, saving, mixed batches (PEFT's adapter_names=) and
    /// weighted combinations (PEFT's add_weighted_adapter).
    /// </summary>
    public class NamedAdapterTests
    {
        private static string Named => Path.Combine(Folder, "named");

        /// <summary>The classifier with all three adapters loaded, "default" active (the first loaded).</summary>
        private static nn.Module<Tensor, Tensor> ThreeAdapters(PortStyle style = PortStyle.LinearCall, bool trainable = false)
        {
            var model = Pretrained("named", style);
            LoraModel.load_adapter(model, Named, is_trainable: trainable);
            LoraModel.load_adapter(model, Path.Combine(Named, "other"), "other", is_trainable: trainable);
            LoraModel.load_adapter(model, Path.Combine(Named, "third"), "third", is_trainable: trainable);
            return model;
        }

        [Theory]
        [InlineData(PortStyle.LinearCall)]
        [InlineData(PortStyle.ModuleForward)]
        [InlineData(PortStyle.CustomForward)]
        public void EachAdapter_AndTwoTogether_GivePyTorchsOutputs(PortStyle style)
        {
            using var scope = NewDisposeScope();
            var cases = Cases("named");
            using var model = ThreeAdapters(style);
            var x = cases["input"];
            // PEFT's load_adapter adds an adapter without activating it: the first one loaded stays active.
            Assert.Equal(new[] { "default" }, LoraModel.active_adapters(model));
            Equivalence.AssertClose(Run(model, x), cases["output_default"]);
            LoraModel.set_adapter(model, "other");
            Equivalence.AssertClose(Run(model, x), cases["output_other"]);
            LoraModel.set_adapter(model, "third");
            Equivalence.AssertClose(Run(model, x), cases["output_third"]);
            // Two active: both updates add up in every layer either adapts (q_proj has both).
            LoraModel.set_adapter(model, "default", "other");
            Assert.Equal(new[] { "default", "other" }, LoraModel.active_adapters(model));
            Equivalence.AssertClose(Run(model, x), cases["output_default_other"]);
            using (LoraModel.disable_adapter(model))
                Equivalence.AssertClose(Run(model, x), cases["base_output"]);
            Equivalence.AssertClose(Run(model, x), cases["output_default_other"]);
        }

        [Fact]
        public void TheModelsKeys_ArePeftsInMemoryKeys_WithEachAdaptersName()
        {
            using var scope = NewDisposeScope();
            using var model = ThreeAdapters();
            var keys = model.state_dict().Keys.ToList();
            Assert.Contains("model.layers.0.self_attn.q_proj.lora_A.default.weight", keys);
            Assert.Contains("model.layers.0.self_attn.q_proj.lora_A.other.weight", keys);
            Assert.Contains("model.layers.0.self_attn.q_proj.lora_B.third.weight", keys);
            Assert.Contains("model.layers.1.self_attn.k_proj.lora_B.other.weight", keys);
            Assert.DoesNotContain("model.layers.1.self_attn.k_proj.lora_B.default.weight", keys);
            Assert.Equal(new[] { "default", "other", "third" }, LoraModel.peft_config(model).Keys);
            Assert.Equal(8, LoraModel.peft_config(model)["other"].r);
        }

        [Fact]
        public void MergingSeveral_MergesTheActiveOnes_AndUnmergingRestoresEveryWeightBitForBit()
        {
            using var scope = NewDisposeScope();
            var cases = Cases("named");
            using var model = ThreeAdapters();
            var before = Bits(model);
            LoraModel.set_adapter(model, "default", "other");
            // PEFT's merge_adapter() with both active.
            LoraModel.merge_adapter(model);
            Equivalence.AssertClose(Run(model, cases["input"]), cases["merged_default_other"]);
            Assert.NotEqual(before["model.layers.0.self_attn.q_proj.weight"], Bits(model)["model.layers.0.self_attn.q_proj.weight"]);
            LoraModel.unmerge_adapter(model);
            Assert.All(before, kv => Assert.Equal(kv.Value, Bits(model)[kv.Key]));
            // set_adapter on a merged model unmerges it first, as PEFT does.
            LoraModel.merge_adapter(model);
            LoraModel.set_adapter(model, "third");
            Assert.All(before, kv => Assert.Equal(kv.Value, Bits(model)[kv.Key]));
            Equivalence.AssertClose(Run(model, cases["input"]), cases["output_third"]);
        }

        [Fact]
        public void MergeAndUnload_FoldsTheActiveAdaptersOnly()
        {
            using var scope = NewDisposeScope();
            var cases = Cases("named");
            using var model = ThreeAdapters();
            LoraModel.set_adapter(model, "other");
            LoraModel.merge_and_unload(model);
            Assert.DoesNotContain(model.state_dict().Keys, k => k.Contains(".lora_"));
            // PEFT's merge_and_unload(adapter_names: ["other"]).
            Equivalence.AssertClose(Run(model, cases["input"]), cases["unloaded_other"]);
        }

        [Fact]
        public void SaveAdapter_WritesPeftsLayout_DefaultInTheFolder_OthersInSubFoldersNamedAfterThem()
        {
            using var scope = NewDisposeScope();
            using var model = ThreeAdapters();
            string folder = Directory.CreateTempSubdirectory("torchlinear-named-").FullName;
            try
            {
                LoraModel.save_pretrained(model, folder);
                foreach (var (sub, name) in new[] { ("", "default"), ("other", "other"), ("third", "third") })
                {
                    var saved = StateDicts.ReadPyTorchFile(Path.Combine(folder, sub, "adapter_model.safetensors"));
                    var original = StateDicts.ReadPyTorchFile(Path.Combine(Named, sub, "adapter_model.safetensors"));
                    // PEFT's keys, no adapter name in them, the same values bit for bit.
                    Assert.Equal(original.Keys.OrderBy(k => k), saved.Keys.OrderBy(k => k));
                    Assert.All(original, kv => Assert.True(Equivalence.Compare(kv.Value, saved[kv.Key]).BitExact, $"{name}: {kv.Key}"));
                    Assert.Equal(LoraModel.peft_config(model)[name].r, LoraConfig.from_pretrained(Path.Combine(folder, sub)).r);
                }
                // Loaded back as PEFT's from_pretrained and load_adapter read it: the same outputs.
                using var again = Pretrained("named");
                LoraModel.load_adapter(again, folder);
                LoraModel.load_adapter(again, Path.Combine(folder, "other"), "other");
                LoraModel.set_adapter(model, "other");
                LoraModel.set_adapter(again, "other");
                var x = Cases("named")["input"];
                Assert.True(Equivalence.Compare(Run(model, x), Run(again, x)).BitExact);
                // One adapter alone, selected.
                string one = Path.Combine(folder, "selected");
                LoraModel.save_pretrained(model, one, new[] { "third" });
                Assert.True(File.Exists(Path.Combine(one, "third", "adapter_model.safetensors")));
                Assert.False(File.Exists(Path.Combine(one, "adapter_model.safetensors")));
            }
            finally
            {
                Directory.Delete(folder, recursive: true);
            }
        }

        [Fact]
        public void AnotherAdapter_IsAddedInactiveAndFrozen_UntilSetAdapterMakesItActive()
        {
            using var scope = NewDisposeScope();
            using var model = Pretrained("named");
            LoraModel.Inject(model, new LoraConfig { r = 2, target_modules = new[] { "q_proj" } });
            LoraModel.Inject(model, new LoraConfig { r = 3, target_modules = new[] { "v_proj" } }, "second");
            var grads = model.named_parameters().Where(p => p.parameter.requires_grad).Select(p => p.name).ToList();
            Assert.All(grads, name => Assert.Contains(".lora_", name));
            Assert.Contains("model.layers.0.self_attn.q_proj.lora_A.default.weight", grads);
            Assert.DoesNotContain(grads, name => name.Contains(".second."));
            LoraModel.set_adapter(model, "second");
            grads = model.named_parameters().Where(p => p.parameter.requires_grad).Select(p => p.name).ToList();
            Assert.Equal(new[] { "model.layers.0.self_attn.v_proj.lora_A.second.weight", "model.layers.0.self_attn.v_proj.lora_B.second.weight",
                                 "model.layers.1.self_attn.v_proj.lora_A.second.weight", "model.layers.1.self_attn.v_proj.lora_B.second.weight" }, grads);
            // Loaded for inference (is_trainable false, PEFT's default): frozen even when active.
            using var loaded = ThreeAdapters();
            LoraModel.set_adapter(loaded, "other");
            Assert.DoesNotContain(loaded.parameters(), p => p.requires_grad);
        }

        [Fact]
        public void DeleteAdapter_TakesItOutEverywhere_AndPicksTheNextActiveAsPeftDoes()
        {
            using var scope = NewDisposeScope();
            var cases = Cases("named");
            using var model = ThreeAdapters();
            var baseKeys = Pretrained("named").state_dict().Keys.ToList();
            LoraModel.delete_adapter(model, "other");
            Assert.DoesNotContain(model.state_dict().Keys, k => k.Contains(".other."));
            // The k_proj and o_proj layers had only "other": they are plain layers again.
            Assert.DoesNotContain(model.state_dict().Keys, k => k.StartsWith("model.layers.0.self_attn.k_proj.lora_", StringComparison.Ordinal));
            Assert.Equal(new[] { "default" }, LoraModel.active_adapters(model));
            Equivalence.AssertClose(Run(model, cases["input"]), cases["output_default"]);
            // Deleting the active adapter activates the first remaining one by name.
            LoraModel.delete_adapter(model, "default");
            Assert.Equal(new[] { "third" }, LoraModel.active_adapters(model));
            Equivalence.AssertClose(Run(model, cases["input"]), cases["output_third"]);
            // The last one: the plain model.
            LoraModel.delete_adapter(model, "third");
            Assert.Equal(baseKeys, model.state_dict().Keys.ToList());
            Equivalence.AssertClose(Run(model, cases["input"]), cases["base_output"]);
            Assert.Throws<InvalidOperationException>(() => LoraModel.active_adapters(model));
        }

        [Fact]
        public void EveryOperationOnAnUnknownName_IsRefusedNamingIt_AndChangesNothing()
        {
            using var scope = NewDisposeScope();
            using var model = ThreeAdapters();
            var before = Bits(model);
            string folder = Path.Combine(Path.GetTempPath(), $"torchlinear-unknown-{Guid.NewGuid():N}");
            var refusals = new (string What, Action Act)[]
            {
                ("set_adapter", () => LoraModel.set_adapter(model, "default", "nope")),
                ("delete_adapter", () => LoraModel.delete_adapter(model, "nope")),
                ("merge_adapter", () => LoraModel.merge_adapter(model, new[] { "nope" })),
                ("merge_and_unload", () => LoraModel.merge_and_unload(model, new[] { "nope" })),
                ("save_pretrained", () => LoraModel.save_pretrained(model, folder, new[] { "nope" })),
                ("MixedBatch", () => LoraModel.MixedBatch(model, new[] { "default", "nope" }).Dispose()),
                ("add_weighted_adapter", () => LoraModel.add_weighted_adapter(model, new[] { "default", "nope" }, new[] { 1.0, 1.0 }, "mix", "cat")),
            };
            foreach (var (what, act) in refusals)
            {
                var error = Assert.Throws<ArgumentException>(act);
                Assert.Contains("'nope'", error.Message);
                Assert.Contains("its adapters: default, other, third", error.Message);
                Assert.Contains($"LoraModel.{what}", error.Message);
            }
            Assert.False(Directory.Exists(folder));
            Assert.Equal(new[] { "default" }, LoraModel.active_adapters(model));
            Assert.Equal(before.Keys, Bits(model).Keys);
            Assert.All(before, kv => Assert.Equal(kv.Value, Bits(model)[kv.Key]));
            // A name that cannot be one, and a taken one.
            Assert.Contains("cannot name an adapter", Assert.Throws<ArgumentException>(() => LoraModel.load_adapter(model, Named, "a.b")).Message);
            Assert.Contains("cannot name an adapter", Assert.Throws<ArgumentException>(() => LoraModel.Inject(model, new LoraConfig { target_modules = new[] { "q_proj" } }, "__base__")).Message);
            Assert.Contains("'other' already", Assert.Throws<ArgumentException>(() => LoraModel.load_adapter(model, Named, "other")).Message);
            Assert.Contains("merge: true is for a model's first adapter", Assert.Throws<ArgumentException>(() => LoraModel.load_adapter(model, Named, "fourth", merge: true)).Message);
        }

        // ---- Mixed-adapter batches ---------------------------------------------------------------------------------

        private static readonly string[] MixedRows = { "other", "__base__", "default", "other" };

        [Theory]
        [InlineData(PortStyle.LinearCall)]
        [InlineData(PortStyle.ModuleForward)]
        [InlineData(PortStyle.CustomForward)]
        public void AMixedBatch_GivesEachRowItsAdaptersOutput_AsPyTorchComputedIt(PortStyle style)
        {
            using var scope = NewDisposeScope();
            var cases = Cases("named");
            using var model = ThreeAdapters(style);
            Assert.Equal(MixedRows, System.Text.Json.JsonSerializer.Deserialize<string[]>(File.ReadAllText(Path.Combine(Named, "mixed_rows.json"))));
            Tensor mixed;
            using (LoraModel.MixedBatch(model, MixedRows))
                mixed = Run(model, cases["input"]);
            Equivalence.AssertClose(mixed, cases["output_mixed"]);
            // After the scope, the active adapter runs for every row again.
            Equivalence.AssertClose(Run(model, cases["input"]), cases["output_default"]);
        }

        /// <summary>
        /// How far a mixed batch's row may be from the exact result (the same model, weights and adapters in float64), in
        /// multiples of how far the float32 computations it stands for are: the same row computed alone, and in the whole
        /// batch with its adapter active. A GEMM's rows depend in their last bits on how many rows it multiplies (its
        /// kernels block the batch), and a mixed batch multiplies each adapter's rows apart, as PEFT does, so no batched
        /// forward is bit for bit either way, and by how much depends on the CPU's kernels. What does not: the same
        /// arithmetic in another order has rounding errors of the same size. The factor is Parity's NoiseFactor rule
        /// (docs/parity.md, "Rounding"), each error taken with one ULP of the row's largest value for its final rounding.
        /// </summary>
        internal const double MixedRowErrorFactor = 4;

        /// <summary>max |expected − actual| over a row, in ULPs of the row's largest |expected|.</summary>
        internal static double RowUlps(Tensor expected, Tensor actual)
        {
            float scale = expected.abs().max().item<float>();
            double ulp = MathF.BitIncrement(scale) - scale;
            return (expected - actual).abs().max().item<float>() / ulp;
        }

        /// <summary>
        /// The largest, over the rows of <paramref name="mixed"/>, of its error against <paramref name="exact"/> divided by
        /// the larger error of the same row computed alone or in the whole batch with its adapter (each plus one ULP of the
        /// row's largest value), with where it was.
        /// </summary>
        private static (double Ratio, string Where) MixedRowErrors(nn.Module<Tensor, Tensor> model, Tensor x, string[] rows, Tensor mixed, Tensor exact)
        {
            double worst = 0;
            string where = "";
            for (int row = 0; row < rows.Length; row++)
            {
                using var rowScope = NewDisposeScope();
                Tensor wholeBatch, oneRow;
                if (rows[row] == LoraModel.BaseModel)
                {
                    using (LoraModel.disable_adapter(model))
                    {
                        wholeBatch = Run(model, x);
                        oneRow = Run(model, x.narrow(0, row, 1));
                    }
                }
                else
                {
                    LoraModel.set_adapter(model, rows[row]);
                    wholeBatch = Run(model, x);
                    oneRow = Run(model, x.narrow(0, row, 1));
                }
                Tensor truth = exact[row];
                double Error(Tensor value) => (value.to(ScalarType.Float64) - truth).abs().max().item<double>();
                float scale = (float)truth.abs().max().item<double>();
                double ulp = MathF.BitIncrement(scale) - scale;
                double mixedError = Error(mixed[row]), aloneError = Error(oneRow[0]), wholeError = Error(wholeBatch[row]);
                double ratio = mixedError / (Math.Max(aloneError, wholeError) + ulp);
                if (ratio > worst)
                {
                    worst = ratio;
                    where = $"row {row} ({rows[row]}): mixed {mixedError:G3}, alone {aloneError:G3}, whole batch {wholeError:G3} from exact ({RowUlps(oneRow[0], mixed[row]):F1} ULP from the row alone)";
                }
            }
            return (worst, where);
        }

        /// <summary>The float64 twin of <see cref="ThreeAdapters"/>: the port converted before its adapters are loaded.</summary>
        private static nn.Module<Tensor, Tensor> ThreeAdapters64()
        {
            var model = Pretrained("named");
            model.to(ScalarType.Float64);
            LoraModel.load_adapter(model, Named);
            LoraModel.load_adapter(model, Path.Combine(Named, "other"), "other");
            LoraModel.load_adapter(model, Path.Combine(Named, "third"), "third");
            return model;
        }

        [Fact]
        public void EachRowOfAMixedBatch_IsWhatThatRowAloneGives_WithinTheStatedBound()
        {
            using var scope = NewDisposeScope();
            var cases = Cases("named");
            using var model = ThreeAdapters();
            using var model64 = ThreeAdapters64();
            var x = cases["input"];
            Tensor mixed, exact;
            using (LoraModel.MixedBatch(model, MixedRows))
                mixed = Run(model, x);
            using (LoraModel.MixedBatch(model64, MixedRows))
                exact = Run(model64, x.to(ScalarType.Float64));
            var (ratio, where) = MixedRowErrors(model, x, MixedRows, mixed, exact);
            Assert.True(ratio <= MixedRowErrorFactor, $"a mixed row's error is {ratio:F2} times the row's own alone or in its batch, above {MixedRowErrorFactor}: {where}");

            // The benchmark's shape: four 512-wide layers, 64 rows over 8 adapters and the base model, rows interleaved;
            // r = 8 takes the stacked products, r = 16 one pair of products per adapter (AdaptedLayer.Stacks). (Random
            // data: compared in the test, never snapshotted.)
            foreach (int rank in new[] { 8, 16 })
            {
                var names = Enumerable.Range(0, 8).Select(i => i == 0 ? LoraModel.DefaultAdapter : $"adapter{i}").ToArray();
                nn.Module<Tensor, Tensor> Wide(ScalarType dtype)
                {
                    var wide = nn.Sequential(("0", nn.Linear(512, 512)), ("1", nn.ReLU()), ("2", nn.Linear(512, 512)), ("3", nn.ReLU()),
                                             ("4", nn.Linear(512, 512)), ("5", nn.ReLU()), ("6", nn.Linear(512, 512)));
                    wide.to(dtype);
                    foreach (string name in names)
                        LoraModel.Inject(wide, new LoraConfig { r = rank, lora_alpha = 2 * rank, TargetModulesRegex = "all-linear" }, name);
                    wide.eval();
                    return wide;
                }
                manual_seed(0);
                using var wide = Wide(ScalarType.Float32);
                using (no_grad())
                {
                    foreach (var (_, parameter) in wide.named_parameters().Where(p => p.name.Contains(".lora_B.", StringComparison.Ordinal)))
                        parameter.normal_(0, 0.05);
                }
                using var wide64 = Wide(ScalarType.Float64);
                wide64.load_state_dict(wide.state_dict());  // TorchSharp's copy_ widens every float32 value exactly
                var rows = Enumerable.Range(0, 64).Select(r => r % 9 == 8 ? LoraModel.BaseModel : names[r % 9]).ToArray();
                var input = randn(64, 512);
                using (LoraModel.MixedBatch(wide, rows))
                {
                    mixed = Run(wide, input);
                    Assert.True(Equivalence.Compare(mixed, wide.call(input)).BitExact, "the same in grad mode");
                }
                using (LoraModel.MixedBatch(wide64, rows))
                    exact = Run(wide64, input.to(ScalarType.Float64));
                (ratio, where) = MixedRowErrors(wide, input, rows, mixed, exact);
                Assert.True(ratio <= MixedRowErrorFactor, $"r = {rank}: a mixed row's error is {ratio:F2} times the row's own alone or in its batch, above {MixedRowErrorFactor}: {where}");
                // Every row got its own adapter's term: another adapter's output is another function, thousands of ULP away.
                LoraModel.set_adapter(wide, names[1]);
                Assert.True(RowUlps(Run(wide, input)[0], mixed[0]) > 1000, $"r = {rank}: row 0 is adapter default's, not adapter1's");
            }
        }

        [Fact]
        public void AMixedBatchOfOneName_IsBitForBitTheBatchWithThatAdapter_OrTheBaseModel()
        {
            using var scope = NewDisposeScope();
            var cases = Cases("named");
            using var model = ThreeAdapters();
            var x = cases["input"];
            foreach (string name in new[] { "default", "other", "third", LoraModel.BaseModel })
            {
                Tensor mixed;
                using (LoraModel.MixedBatch(model, Enumerable.Repeat(name, 4).ToArray()))
                    mixed = Run(model, x);
                Tensor expected;
                if (name == LoraModel.BaseModel)
                {
                    using (LoraModel.disable_adapter(model))
                        expected = Run(model, x);
                }
                else
                {
                    LoraModel.set_adapter(model, name);
                    expected = Run(model, x);
                }
                Assert.True(Equivalence.Compare(expected, mixed).BitExact, $"{name}: {Equivalence.Compare(expected, mixed)}");
            }
        }

        [Fact]
        public void AMixedBatch_RunsWithGradients_ToTheSameBits_AndTrainsTheRowsAdapters()
        {
            // Guards: the first grouped version wrote into views from split, which autograd refuses in grad mode (the
            // README's example found it; the other tests run under no_grad).
            using var scope = NewDisposeScope();
            var cases = Cases("named");
            using var model = Pretrained("named");
            LoraModel.load_adapter(model, Named, is_trainable: true);
            LoraModel.load_adapter(model, Path.Combine(Named, "other"), "other", is_trainable: true);
            LoraModel.set_adapter(model, "default", "other");   // both train; the mixed batch gives each its rows
            var x = cases["input"];
            Tensor expected;
            using (LoraModel.MixedBatch(model, MixedRows))
            {
                expected = Run(model, x);
                var withGrad = model.call(x);
                Assert.True(Equivalence.Compare(expected, withGrad).BitExact);
                withGrad.square().sum().backward();
            }
            var grads = model.named_parameters().ToDictionary(p => p.name, p => p.parameter.grad);
            Assert.True(grads["model.layers.0.self_attn.q_proj.lora_B.default.weight"]!.abs().sum().item<float>() > 0);
            Assert.True(grads["model.layers.0.self_attn.k_proj.lora_B.other.weight"]!.abs().sum().item<float>() > 0);
        }

        [Fact]
        public void AMixedBatch_IsRefused_WhenItCannotBeWhatItSays()
        {
            using var scope = NewDisposeScope();
            var cases = Cases("named");
            using var model = ThreeAdapters();
            var x = cases["input"];
            // One name per row: three names for four rows is refused by the first adapted layer, naming both counts.
            using (LoraModel.MixedBatch(model, new[] { "default", "other", "third" }))
            {
                var error = Assert.Throws<ArgumentException>(() => Run(model, x));
                Assert.Contains("names an adapter for each of 3 rows, but the layer's input has 4 rows", error.Message);
            }
            // Merged adapters (as PEFT).
            LoraModel.merge_adapter(model);
            Assert.Contains("(call unmerge_adapter first)", Assert.Throws<InvalidOperationException>(() => LoraModel.MixedBatch(model, MixedRows)).Message);
            LoraModel.unmerge_adapter(model);
            // A DoRA adapter (as PEFT).
            LoraModel.Inject(model, new LoraConfig { r = 2, target_modules = new[] { "q_proj" }, use_dora = true }, "dora");
            Assert.Contains("dora is a DoRA adapter", Assert.Throws<ArgumentException>(() => LoraModel.MixedBatch(model, new[] { "dora", "default", "default", "default" })).Message);
            // An adapter that saves a module: PEFT switches the module per row, this does not, so it is refused.
            LoraModel.Inject(model, new LoraConfig { r = 2, target_modules = new[] { "v_proj" }, modules_to_save = new[] { "classifier" } }, "head");
            Assert.Contains("head saves modules (modules_to_save)", Assert.Throws<ArgumentException>(() => LoraModel.MixedBatch(model, new[] { "head", "default", "default", "default" })).Message);
            // Training mode, with or without dropout, as PEFT ("Cannot pass adapter_names when the model is in training mode"):
            // refused when the batch is asked for, and at the call when the model is put into training inside the scope.
            model.train();
            Assert.Contains("the model is in training mode, and a mixed-adapter batch is for inference", Assert.Throws<InvalidOperationException>(() => LoraModel.MixedBatch(model, MixedRows)).Message);
            model.eval();
            using (LoraModel.MixedBatch(model, MixedRows))
            {
                model.train();
                Assert.Contains("the model is in training mode (as PEFT: \"Cannot pass adapter_names when the model is in training mode\"): call eval() first", Assert.Throws<InvalidOperationException>(() => model.call(x)).Message);
                model.eval();
            }
            // The model still runs its active adapter for every row.
            Equivalence.AssertClose(Run(model, x), cases["output_default"]);
        }

        // ---- Weighted combinations --------------------------------------------------------------------------------

        [Theory]
        [InlineData("cat_mix", "cat", new[] { "default", "other" }, new[] { 1.0, 0.5 }, 0)]
        [InlineData("linear_pos", "linear", new[] { "default", "third" }, new[] { 0.7, 0.4 }, 0)]
        [InlineData("svd_mix", "svd", new[] { "default", "other" }, new[] { 0.6, 0.8 }, 6)]
        public void AddWeightedAdapter_GivesPeftsCombination(string name, string combination, string[] adapters, double[] weights, int svdRank)
        {
            using var scope = NewDisposeScope();
            var cases = Cases("named");
            using var model = ThreeAdapters();
            var before = Bits(model);
            LoraModel.add_weighted_adapter(model, adapters, weights, name, combination, svdRank == 0 ? null : svdRank);
            // Added inactive and frozen, as PEFT's; the others unchanged.
            Assert.Equal(new[] { "default" }, LoraModel.active_adapters(model));
            Assert.All(before, kv => Assert.Equal(kv.Value, Bits(model)[kv.Key]));
            var config = LoraModel.peft_config(model)[name];
            Assert.Equal(config.r, config.lora_alpha);
            Assert.Equal(combination switch { "cat" => 12, "linear" => 4, _ => 6 }, config.r);
            LoraModel.set_adapter(model, name);
            // The svd's factors come from LAPACK, whose last bits differ between the two libtorch builds.
            if (combination == "svd")
                Equivalence.AssertClose(Run(model, cases["input"]), cases[$"output_{name}"], rtol: 1e-4, atol: 1e-5);
            else
                Equivalence.AssertClose(Run(model, cases["input"]), cases[$"output_{name}"]);
        }

        [Fact]
        public void ALinearCombinationWithANegativeWeight_IsPeft019s_NotPeft0181s()
        {
            // PEFT 0.18.1 gives √|w s| the weight's sign on lora_A and on lora_B, so a negative weight's sign cancels in
            // B A; PEFT v0.19.0 fixed it (#2918, "apply sign only on one side"). This library signs lora_A only, as the
            // fix does (docs/lora.md): it gives what PEFT 0.19.1 computes from PEFT 0.18.1's folders
            // (make_peft_breadth.py --linear-negative), and not what PEFT 0.18.1 computes.
            using var scope = NewDisposeScope();
            var cases = Cases("named");
            var fixedPeft = StateDicts.ReadPyTorchFile(Path.Combine(Named, "linear_mix_peft_0.19.1.safetensors"));
            using var model = ThreeAdapters();
            LoraModel.add_weighted_adapter(model, new[] { "default", "third" }, new[] { 0.7, -0.4 }, "linear_mix", "linear");
            LoraModel.set_adapter(model, "linear_mix");
            var output = Run(model, cases["input"]);
            Equivalence.AssertClose(output, fixedPeft["output_linear_mix"]);
            Assert.True(Equivalence.Compare(output, cases["output_linear_mix"]).MaxAbsDiff > 0.1, "PEFT 0.18.1's sign error is a large difference");
        }

        [Fact]
        public void Cat_IsExactlyTheWeightedSumOfTheUpdates()
        {
            // A = [w₁s₁A₁; w₂s₂A₂], B = [B₁ B₂], scaling 1: B A = w₁ΔW₁ + w₂ΔW₂ up to rounding.
            using var scope = NewDisposeScope();
            using var model = ThreeAdapters();
            LoraModel.add_weighted_adapter(model, new[] { "default", "other" }, new[] { 1.0, 0.5 }, "cat_mix", "cat");
            var state = model.state_dict();
            string q = "model.layers.1.self_attn.q_proj";
            var configs = LoraModel.peft_config(model);
            Tensor Delta(string adapter) => state[$"{q}.lora_B.{adapter}.weight"].matmul(state[$"{q}.lora_A.{adapter}.weight"]) * (configs[adapter].lora_alpha / configs[adapter].r);
            Equivalence.AssertClose(Delta("cat_mix"), Delta("default") + Delta("other") * 0.5, rtol: 1e-5, atol: 1e-7);
        }

        [Fact]
        public void AddWeightedAdapter_RefusesWhatItCannotCombine()
        {
            using var scope = NewDisposeScope();
            using var model = ThreeAdapters();
            var before = Bits(model);
            Assert.Contains("needs adapters of one rank, but theirs are 4, 8", Assert.Throws<ArgumentException>(() =>
                LoraModel.add_weighted_adapter(model, new[] { "default", "other" }, new[] { 1.0, 1.0 }, "mix", "linear")).Message);
            Assert.Contains("'ties' is not implemented", Assert.Throws<NotSupportedException>(() =>
                LoraModel.add_weighted_adapter(model, new[] { "default", "other" }, new[] { 1.0, 1.0 }, "mix", "ties")).Message);
            Assert.Contains("2 adapters but 1 weights", Assert.Throws<ArgumentException>(() =>
                LoraModel.add_weighted_adapter(model, new[] { "default", "other" }, new[] { 1.0 }, "mix", "cat")).Message);
            Assert.Contains("must be finite", Assert.Throws<ArgumentException>(() =>
                LoraModel.add_weighted_adapter(model, new[] { "default", "other" }, new[] { 1.0, double.NaN }, "mix", "cat")).Message);
            // PEFT returns silently when the name is taken; here that is refused.
            Assert.Contains("'third' already", Assert.Throws<ArgumentException>(() =>
                LoraModel.add_weighted_adapter(model, new[] { "default", "other" }, new[] { 1.0, 1.0 }, "third", "cat")).Message);
            Assert.Equal(new[] { "default", "other", "third" }, LoraModel.peft_config(model).Keys);
            Assert.All(before, kv => Assert.Equal(kv.Value, Bits(model)[kv.Key]));
        }
    }
}
