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
    /// TorchSharp twins of make_conv.py's nets (ReferenceData/RealPeft/conv): the convolutions are held as PyTorch
    /// ports hold them, some in fields of TorchSharp's sealed <c>Conv2d</c>/<c>Conv1d</c> types, some in fields typed
    /// <c>nn.Module&lt;Tensor, Tensor&gt;</c>.
    /// </summary>
    internal static class ConvNets
    {
        public static readonly string Folder = Path.Combine(AppContext.BaseDirectory, "ReferenceData", "RealPeft", "conv");

        /// <summary>make_conv.py's ConvNet2d: stem, side (Conv2d fields), down, mix (module-typed fields), head.</summary>
        internal sealed class ConvNet2d : nn.Module<Tensor, Tensor>
        {
            public Conv2d stem = nn.Conv2d(3, 8, 3, padding: 1);
            public nn.Module<Tensor, Tensor> down = nn.Conv2d(8, 16, 3, stride: 2, padding: 1, bias: false);
            public Conv2d side = nn.Conv2d(16, 16, (3, 1), stride: (1, 2), padding: (0, 1));
            public nn.Module<Tensor, Tensor> mix = nn.Conv2d(16, 16, 1);
            public nn.Module<Tensor, Tensor> head = nn.Linear(16, 5);

            public ConvNet2d() : base(nameof(ConvNet2d)) => RegisterComponents();

            public override Tensor forward(Tensor x)
            {
                using var scope = NewDisposeScope();
                x = nn.functional.relu(stem.call(x));
                x = nn.functional.relu(down.call(x));
                x = nn.functional.relu(side.call(x));
                x = mix.call(x);
                return head.call(x.mean(new long[] { 2, 3 })).MoveToOuterDisposeScope();
            }
        }

        /// <summary>make_conv.py's ConvNet1d: conv1 (a Conv1d field), conv2 (module-typed), head.</summary>
        internal sealed class ConvNet1d : nn.Module<Tensor, Tensor>
        {
            public Conv1d conv1 = nn.Conv1d(4, 8, 3, padding: 1);
            public nn.Module<Tensor, Tensor> conv2 = nn.Conv1d(8, 8, 3, stride: 2, bias: false);
            public nn.Module<Tensor, Tensor> head = nn.Linear(8, 3);

            public ConvNet1d() : base(nameof(ConvNet1d)) => RegisterComponents();

            public override Tensor forward(Tensor x)
            {
                using var scope = NewDisposeScope();
                x = nn.functional.relu(conv1.call(x));
                x = nn.functional.relu(conv2.call(x));
                return head.call(x.mean(new long[] { 2 })).MoveToOuterDisposeScope();
            }
        }

        public static readonly Dictionary<string, string[]> Targets = new()
        {
            ["conv2d"] = new[] { "stem", "down", "side", "mix" },
            ["conv1d"] = new[] { "conv1", "conv2" },
        };

        /// <summary>The net with make_conv.py's base weights, in eval mode.</summary>
        public static nn.Module<Tensor, Tensor> Base(string net)
        {
            nn.Module<Tensor, Tensor> model = net == "conv2d" ? new ConvNet2d() : new ConvNet1d();
            StateDicts.LoadPyTorchFile(model, Path.Combine(Folder, $"base_{net}.safetensors"));
            model.eval();
            return model;
        }

        /// <summary>What PEFT computed (cases.safetensors; the caller disposes them).</summary>
        public static Dictionary<string, Tensor> Cases() => StateDicts.ReadPyTorchFile(Path.Combine(Folder, "cases.safetensors"));

        public static Convolution Conv(nn.Module model, string path) =>
            (Convolution)model.named_modules().Single(m => m.name == path).module;
    }

    /// <summary>
    /// LoRA on Conv1d and Conv2d against real PEFT 0.18.1 (make_conv.py): the adapter's arithmetic
    /// (<see cref="LoraConvLayer"/>) on PEFT's own adapter tensors gives PEFT's outputs unmerged and merged, PEFT's merged
    /// weights, and unmerges bit for bit.
    /// </summary>
    public class ConvLoraTests
    {
        /// <summary>Each target's adapter made from PEFT's saved tensors, run from a forward hook on the convolution.</summary>
        private static List<(string Path, Convolution Conv, LoraConvLayer Adapter)> AdaptByHand(nn.Module<Tensor, Tensor> model, string net, string folder)
        {
            var tensors = StateDicts.ReadPyTorchFile(Path.Combine(folder, "adapter_model.safetensors"));
            var adapted = new List<(string, Convolution, LoraConvLayer)>();
            foreach (string path in ConvNets.Targets[net])
            {
                Convolution conv = ConvNets.Conv(model, path);
                var adapter = new LoraConvLayer(conv, r: 4, lora_alpha: 8);
                using (no_grad())
                {
                    adapter.lora_A.weight.copy_(tensors[$"base_model.model.{path}.lora_A.weight"]);
                    adapter.lora_B.weight.copy_(tensors[$"base_model.model.{path}.lora_B.weight"]);
                }
                conv.register_forward_hook((module, input, output) => adapter.AddTo(output, input, module.training));
                adapted.Add((path, conv, adapter));
            }
            return adapted;
        }

        [Theory]
        [InlineData("conv2d")]
        [InlineData("conv1d")]
        public void PeftsConvAdapter_GivesPeftsOutput_Unmerged_Merged_AndUnmergesBitForBit(string net)
        {
            using var scope = NewDisposeScope();
            var cases = ConvNets.Cases();
            using var model = ConvNets.Base(net);
            Tensor x = cases[$"{net}.input"];
            Equivalence.AssertClose(Ports.Run(model, x), cases[$"{net}.base"]);
            var before = Ports.Bits(model);
            var adapted = AdaptByHand(model, net, Path.Combine(ConvNets.Folder, net));

            Tensor unmerged = Ports.Run(model, x);
            Equivalence.AssertClose(unmerged, cases[$"{net}.unmerged"]);
            Assert.True(Equivalence.Compare(unmerged, cases[$"{net}.base"]).MaxAbsDiff > 0.01, "the adapter changes the output");

            foreach (var (path, conv, adapter) in adapted)
            {
                adapter.merge(conv.weight);
                Assert.True(adapter.merged);
                // PEFT's W + get_delta_weight, for the 1×1 kernel (mix) and the general case alike.
                Equivalence.AssertClose(conv.weight, cases[$"{net}.merged.{path}.weight"]);
            }
            Equivalence.AssertClose(Ports.Run(model, x), cases[$"{net}.merged"]);

            foreach (var (_, conv, adapter) in adapted)
                adapter.unmerge(conv.weight);
            Assert.Equal(before, Ports.Bits(model));
            Assert.True(Equivalence.Compare(Ports.Run(model, x), unmerged).BitExact, "unmerged back: the same bits as before the merge");
            Equivalence.AssertClose(unmerged, cases[$"{net}.unmerged_back"]);
            foreach (var (_, _, adapter) in adapted)
                adapter.Dispose();
        }

        // ---- The model API: PEFT's folders loaded into the twins, and back ------------------------------------------

        private static readonly string[] Mixed = { "second", "default", "__base__", "default" };
        private static readonly double[] Weights = { 0.7, -0.4 };

        [Theory]
        [InlineData("conv2d")]
        [InlineData("conv1d")]
        public void PeftsConvFolder_Loads_AndGivesPeftsOutputs_Unmerged_Merged_UnmergedBack_Folded(string net)
        {
            using var scope = NewDisposeScope();
            var cases = ConvNets.Cases();
            Tensor x = cases[$"{net}.input"];
            using var model = ConvNets.Base(net);
            var before = Ports.Bits(model);

            LoraModel.load_adapter(model, Path.Combine(ConvNets.Folder, net));

            // A Conv field of the sealed type keeps its type (a hook); a module-typed field holds a wrapper.
            if (model is ConvNets.ConvNet2d twin)
            {
                Assert.IsType<Conv2d>(twin.stem);
                Assert.IsType<LoraConvWrapper>(twin.down);
                Assert.IsType<LoraConvWrapper>(twin.mix);
            }
            else
            {
                Assert.IsType<LoraConvWrapper>(((ConvNets.ConvNet1d)model).conv2);
            }
            Tensor unmerged = Ports.Run(model, x);
            Equivalence.AssertClose(unmerged, cases[$"{net}.unmerged"]);
            Equivalence.AssertClose(unmerged, cases[$"{net}.loaded"]);

            LoraModel.merge_adapter(model);
            var state = model.state_dict();
            foreach (string path in ConvNets.Targets[net])
                Equivalence.AssertClose(state[$"{path}.weight"], cases[$"{net}.merged.{path}.weight"]);
            Equivalence.AssertClose(Ports.Run(model, x), cases[$"{net}.merged"]);

            LoraModel.unmerge_adapter(model);
            Assert.True(Equivalence.Compare(Ports.Run(model, x), unmerged).BitExact, "unmerged back: the bits of before the merge");
            Equivalence.AssertClose(unmerged, cases[$"{net}.unmerged_back"]);

            using (LoraModel.disable_adapter(model))
                Equivalence.AssertClose(Ports.Run(model, x), cases[$"{net}.base"]);

            LoraModel.merge_and_unload(model);
            Assert.DoesNotContain(model.named_modules(), m => m.module is LoraConvWrapper || m.name.Contains("lora_", StringComparison.Ordinal));
            Assert.Equal(before.Keys, Ports.Bits(model).Keys);
            Equivalence.AssertClose(Ports.Run(model, x), cases[$"{net}.merged"]);
        }

        [Theory]
        [InlineData(ScalarType.Float64)]
        [InlineData(ScalarType.Float16)]
        [InlineData(ScalarType.BFloat16)]
        public void PeftsConvFolder_LoadsIntoANetOfAnotherDtype_AndRunsInIt(ScalarType dtype)
        {
            using var scope = NewDisposeScope();
            var cases = ConvNets.Cases();
            using var model = ConvNets.Base("conv2d");
            model.to(dtype);
            LoraModel.load_adapter(model, Path.Combine(ConvNets.Folder, "conv2d"));
            Assert.All(model.parameters(), p => Assert.Equal(dtype, p.dtype));
            Tensor unmerged = Ports.Run(model, cases["conv2d.input"].to(dtype));
            // Within a few roundings of the coarser dtype (this one, or the float32 of PEFT's output) relative to the
            // output's size: 8 · eps · max|y| (the error is the roundings of the last products and sums, which the mean
            // over the plane averages; measured here at about half of eps · max|y| for each dtype).
            double eps = dtype switch { ScalarType.Float16 => Math.Pow(2, -10), ScalarType.BFloat16 => Math.Pow(2, -7), _ => Math.Pow(2, -23) };
            double tolerance = 8 * eps * cases["conv2d.unmerged"].abs().max().item<float>();
            Assert.True(Equivalence.Compare(unmerged.to(ScalarType.Float32), cases["conv2d.unmerged"]).MaxAbsDiff < tolerance);
            LoraModel.merge_adapter(model);
            Assert.True(Equivalence.Compare(Ports.Run(model, cases["conv2d.input"].to(dtype)).to(ScalarType.Float32), cases["conv2d.merged"]).MaxAbsDiff < tolerance);
            LoraModel.unmerge_adapter(model);
            Assert.True(Equivalence.Compare(Ports.Run(model, cases["conv2d.input"].to(dtype)), unmerged).BitExact);
        }

        [Theory]
        [InlineData("conv2d")]
        [InlineData("conv1d")]
        public void Unload_GivesTheBaseModelBack_BitForBit_InItsFieldsAndTypes(string net)
        {
            using var scope = NewDisposeScope();
            var cases = ConvNets.Cases();
            using var model = ConvNets.Base(net);
            var before = Ports.Bits(model);
            Tensor x = cases[$"{net}.input"];
            Tensor baseOutput = Ports.Run(model, x);
            LoraModel.load_adapter(model, Path.Combine(ConvNets.Folder, net));
            LoraModel.merge_adapter(model);
            LoraModel.unload(model);
            Assert.Equal(before, Ports.Bits(model));
            if (model is ConvNets.ConvNet2d twin)
            {
                Assert.IsType<Conv2d>(twin.down);
                Assert.IsType<Conv2d>(twin.mix);
            }
            else
            {
                Assert.IsType<Conv1d>(((ConvNets.ConvNet1d)model).conv2);
            }
            Assert.True(Equivalence.Compare(Ports.Run(model, x), baseOutput).BitExact);
        }

        [Fact]
        public void ASecondAdapter_OnAConvAndALinear_RunsAsPefts_AndIsDeleted()
        {
            using var scope = NewDisposeScope();
            var cases = ConvNets.Cases();
            Tensor x = cases["conv2d.input"];
            using var model = ConvNets.Base("conv2d");
            LoraModel.load_adapter(model, Path.Combine(ConvNets.Folder, "conv2d"));
            Tensor first = Ports.Run(model, x);
            LoraModel.load_adapter(model, Path.Combine(ConvNets.Folder, "conv2d", "second"), "second");
            LoraModel.set_adapter(model, "second");
            Equivalence.AssertClose(Ports.Run(model, x), cases["conv2d.second"]);
            LoraModel.set_adapter(model, "default");
            LoraModel.delete_adapter(model, "second");
            Assert.True(Equivalence.Compare(Ports.Run(model, x), first).BitExact);
            Assert.DoesNotContain(model.state_dict().Keys, k => k.Contains(".second.", StringComparison.Ordinal));
        }

        [Fact]
        public void AMixedBatch_GivesEachRowItsAdaptersUpdate_AsPefts()
        {
            using var scope = NewDisposeScope();
            var cases = ConvNets.Cases();
            using var model = ConvNets.Base("conv2d");
            LoraModel.load_adapter(model, Path.Combine(ConvNets.Folder, "conv2d"));
            LoraModel.load_adapter(model, Path.Combine(ConvNets.Folder, "conv2d", "second"), "second");
            using (LoraModel.MixedBatch(model, Mixed))
                Equivalence.AssertClose(Ports.Run(model, cases["conv2d.mixed_input"]), cases["conv2d.mixed"]);
        }

        [Theory]
        [InlineData("cat")]
        [InlineData("svd")]
        public void AWeightedCombination_OfConvAdapters_GivesPeftsOutput(string combination)
        {
            using var scope = NewDisposeScope();
            var cases = ConvNets.Cases();
            using var model = ConvNets.Base("conv2d");
            LoraModel.load_adapter(model, Path.Combine(ConvNets.Folder, "conv2d"));
            LoraModel.load_adapter(model, Path.Combine(ConvNets.Folder, "conv2d", "second"), "second");
            LoraModel.add_weighted_adapter(model, new[] { "default", "second" }, Weights, combination, combination);
            LoraModel.set_adapter(model, combination);
            Equivalence.AssertClose(Ports.Run(model, cases["conv2d.input"]), cases[$"conv2d.{combination}"]);
        }

        [Fact]
        public void AnSvdCombination_OfConv1dAdapters_IsRefusedByName_AsPeft0181FailsOnIt()
        {
            using var scope = NewDisposeScope();
            manual_seed(4);
            using var model = new ConvNets.ConvNet1d();
            model.eval();
            var config = new LoraConfig { r = 2, target_modules = new[] { "conv1", "conv2" }, init_lora_weights = "false" };
            LoraModel.Inject(model, config);
            LoraModel.Inject(model, config, "second");
            var parameters = model.named_parameters().Select(p => p.name).ToList();
            var error = Assert.Throws<NotSupportedException>(() => LoraModel.add_weighted_adapter(model, new[] { "default", "second" }, Weights, "mix", CombinationType.Svd));
            Assert.Contains("conv1 is an nn.Conv1d, and PEFT 0.18.1's svd combination fails on Conv1d adapters", error.Message);
            Assert.Contains("conv2 is an nn.Conv1d", error.Message);
            Assert.EndsWith("nothing changed.", error.Message);
            Assert.Equal(new[] { "default", "second" }, LoraModel.peft_config(model).Keys.ToArray());
            Assert.Equal(parameters, model.named_parameters().Select(p => p.name).ToList());
            LoraModel.add_weighted_adapter(model, new[] { "default", "second" }, Weights, "mix", CombinationType.Cat);   // cat is PEFT's too
        }

        [Fact]
        public void LoadingPeftsConvFolder_ThenSaving_GivesItsKeysAndBytesBack()
        {
            using var scope = NewDisposeScope();
            using var model = ConvNets.Base("conv2d");
            LoraModel.load_adapter(model, Path.Combine(ConvNets.Folder, "conv2d"));
            LoraModel.load_adapter(model, Path.Combine(ConvNets.Folder, "conv2d", "second"), "second");
            string output = Directory.CreateTempSubdirectory("torchlinear-conv-").FullName;
            try
            {
                LoraModel.save_pretrained(model, output);
                foreach (string sub in new[] { "", "second" })
                {
                    var theirs = StateDicts.ReadPyTorchFile(Path.Combine(ConvNets.Folder, "conv2d", sub, "adapter_model.safetensors"));
                    var ours = StateDicts.ReadPyTorchFile(Path.Combine(output, sub, "adapter_model.safetensors"));
                    Assert.Equal(theirs.Keys.OrderBy(k => k, StringComparer.Ordinal), ours.Keys.OrderBy(k => k, StringComparer.Ordinal));
                    foreach (var (key, tensor) in theirs)
                        Assert.True(Equivalence.Compare(tensor, ours[key]).BitExact, key);
                }
            }
            finally
            {
                Directory.Delete(output, recursive: true);
            }
        }

        [Fact]
        public void Inject_DrawsPeftsNumbersUnderTheSameSeed()
        {
            // make_conv.py: torch.manual_seed(11), a new ConvNet2d whose base weights are then loaded, get_peft_model.
            using var scope = NewDisposeScope();
            var saved = StateDicts.ReadPyTorchFile(Path.Combine(ConvNets.Folder, "conv2d", "adapter_model.safetensors"));
            manual_seed(11);
            using var model = new ConvNets.ConvNet2d();
            StateDicts.LoadPyTorchFile(model, Path.Combine(ConvNets.Folder, "base_conv2d.safetensors"));
            LoraModel.Inject(model, new LoraConfig { r = 4, lora_alpha = 8, target_modules = ConvNets.Targets["conv2d"], init_lora_weights = "false" });
            var state = model.state_dict();
            foreach (var (key, theirs) in saved)
            {
                Tensor ours = state[key["base_model.model.".Length..].Replace(".weight", ".default.weight")];
                if (KernelFacts.FusesMultiplyAdd)
                    Assert.True(Equivalence.Compare(theirs, ours).BitExact, key);
                else
                    Assert.True(KernelFacts.WithinUniformRounding(theirs.data<float>().ToArray(), ours.data<float>().ToArray(), 1 / Math.Sqrt(theirs[0].numel())), key);
            }
        }

        /// <summary>A model with one convolution <c>conv</c> of the given kind beside a Linear <c>head</c>.</summary>
        private sealed class OneConv : nn.Module<Tensor, Tensor>
        {
            public nn.Module<Tensor, Tensor> conv;
            public nn.Module<Tensor, Tensor> head = nn.Linear(8, 2);

            public OneConv(nn.Module<Tensor, Tensor> conv) : base(nameof(OneConv))
            {
                this.conv = conv;
                RegisterComponents();
            }

            public override Tensor forward(Tensor x) => head.call(conv.call(x).flatten(2).mean(new long[] { 2 }));
        }

        public static TheoryData<string, string> ModelRefusals => new()
        {
            { "groups", "cannot adapt conv is a Conv2d with groups=2; PEFT builds lora_B with the base's groups and cannot merge such an adapter" },
            { "dilation", "cannot adapt conv is a Conv1d with dilation=(2); PEFT builds lora_A without the dilation" },
            { "dora", "cannot adapt conv is an nn.Conv2d, and DoRA on convolutions is not implemented (use_dora)" },
            { "conv3d", "cannot adapt conv is a Conv3d, neither nn.Linear, CustomLinear, Conv1D, nn.Embedding, nn.Conv1d nor nn.Conv2d" },
        };

        [Theory]
        [MemberData(nameof(ModelRefusals))]
        public void WhatIsNotImplementedForConvolutions_IsRefusedByName_AndChangesNothing(string kind, string message)
        {
            using var scope = NewDisposeScope();
            using var model = new OneConv(kind switch
            {
                "groups" => nn.Conv2d(4, 8, 3, groups: 2),
                "dilation" => nn.Conv1d(4, 8, 3, dilation: 2),
                "dora" => nn.Conv2d(4, 8, 3),
                _ => nn.Conv3d(4, 8, 3),
            });
            var before = Ports.Bits(model);
            var error = Assert.Throws<ArgumentException>(() => LoraModel.Inject(model, new LoraConfig { r = 4, target_modules = new[] { "conv" }, use_dora = kind == "dora" }));
            Assert.Contains(message, error.Message);
            Assert.Equal(before, Ports.Bits(model));
            Assert.IsNotType<LoraConvWrapper>(model.conv);
        }

        /// <summary>ConvNet2d whose stem, a field of the sealed Conv2d type, is invoked with forward(x): no hook runs.</summary>
        private sealed class ForwardStem : nn.Module<Tensor, Tensor>
        {
            public Conv2d stem = nn.Conv2d(3, 8, 3, padding: 1);
            public nn.Module<Tensor, Tensor> down = nn.Conv2d(8, 4, 3);

            public ForwardStem() : base(nameof(ForwardStem)) => RegisterComponents();

            public override Tensor forward(Tensor x)
            {
                using var h = stem.forward(x);
                return down.forward(h);
            }
        }

        [Fact]
        public void ASealedConvInvokedWithForward_IsNamed_ForItsAdapterDidNotRun()
        {
            using var scope = NewDisposeScope();
            using var model = new ForwardStem();
            LoraModel.Inject(model, new LoraConfig { r = 2, target_modules = new[] { "stem", "down" } });
            // down is wrapped and runs its adapter from forward(x); stem keeps its type, and forward(x) runs no hook.
            Assert.IsType<LoraConvWrapper>(model.down);
            var error = Assert.Throws<InvalidOperationException>(() => model.call(randn(1, 3, 6, 6)));
            Assert.Contains("did not run in this call of ForwardStem, so its output lacks their updates: stem ", error.Message);
            Assert.DoesNotContain("down", error.Message[..error.Message.IndexOf(" (", StringComparison.Ordinal)]);
            // Merged, the adapter needs no hook.
            LoraModel.merge_adapter(model);
            model.call(randn(1, 3, 6, 6));
        }

        [Fact]
        public void ANetConvertedAfterInjection_IsRefusedAtTheFirstCall_NamingTheHookedConv()
        {
            // TorchSharp's Conv2d, like its Linear, does not pass .to(...) on to its children: the adapter of a hooked conv
            // stays float32; a wrapper converts its adapters with it.
            using var scope = NewDisposeScope();
            using var model = new ConvNets.ConvNet2d();
            LoraModel.Inject(model, new LoraConfig { r = 2, target_modules = new[] { "stem", "down" } });
            model.to(ScalarType.Float64);
            var error = Assert.Throws<InvalidOperationException>(() => model.call(randn(1, 3, 9, 10, dtype: ScalarType.Float64)));
            Assert.Contains("stem: the adapter is Float32 on cpu, but the convolution computes Float64 on cpu. TorchSharp's convolutions do not pass .to(...) on to their children", error.Message);
            Assert.Equal(ScalarType.Float64, model.named_parameters().Single(p => p.name == "down.lora_A.default.weight").parameter.dtype);
        }

        [Fact]
        public void InjectTrainMergeUnload_AndDisposingAnAdaptedConvNet_LeaveNoTensorAlive()
        {
            // TorchSharp's Conv2d constructor itself leaves a tensor alive per biased convolution (measured: a plain
            // ConvNet2d made and disposed leaves 3): each block is held to what the same net without adapters leaves.
            static long Live() => DisposeScopeManager.Statistics.ThreadTotalLiveCount;
            var config = new LoraConfig { r = 2, target_modules = ConvNets.Targets["conv2d"] };
            long start = Live();
            new ConvNets.ConvNet2d().Dispose();
            long plain = Live() - start;

            long before = Live();
            using (var model = new ConvNets.ConvNet2d())
            {
                LoraModel.Inject(model, config);
                using (var x = randn(2, 3, 9, 10))
                using (var output = model.call(x))
                using (var squared = output.square())
                using (var loss = squared.sum())
                    loss.backward();
                LoraModel.merge_adapter(model);
                LoraModel.unmerge_adapter(model);
                using (LoraModel.disable_adapter(model)) { }
                LoraModel.unload(model);
            }
            Assert.True(Live() - before == plain, $"trained, merged, unmerged, disabled, unloaded: {Live() - before} tensors alive, {plain} without adapters");
            before = Live();
            using (var model = new ConvNets.ConvNet2d())
            {
                LoraModel.Inject(model, config);
                LoraModel.merge_and_unload(model);
            }
            Assert.True(Live() - before == plain, $"merge_and_unload: {Live() - before} tensors alive, {plain} without adapters");
            // Disposed while adapted and merged: the adapters' state (and the kept weights) go with the model.
            before = Live();
            using (var model = new ConvNets.ConvNet2d())
            {
                LoraModel.Inject(model, config);
                LoraModel.merge_adapter(model);
            }
            Assert.True(Live() - before == plain, $"disposed while merged: {Live() - before} tensors alive, {plain} without adapters");
        }

        [Fact]
        public void AFreshAdapter_AddsNothing_AndTrainsOnlyItsFactors()
        {
            using var scope = NewDisposeScope();
            var cases = ConvNets.Cases();
            Tensor x = cases["conv2d.input"];
            using var model = ConvNets.Base("conv2d");
            LoraModel.Inject(model, new LoraConfig { r = 4, lora_alpha = 8, target_modules = ConvNets.Targets["conv2d"], lora_dropout = 0.5 });
            var trainable = model.named_parameters().Where(p => p.parameter.requires_grad).Select(p => p.name).OrderBy(n => n, StringComparer.Ordinal).ToList();
            Assert.Equal(ConvNets.Targets["conv2d"].SelectMany(t => new[] { $"{t}.lora_A.default.weight", $"{t}.lora_B.default.weight" }).OrderBy(n => n, StringComparer.Ordinal), trainable);
            // lora_B starts at zero (init_lora_weights true): the model is the base model, bit for bit, in eval mode.
            model.eval();
            using (var baseModel = ConvNets.Base("conv2d"))
                Assert.True(Equivalence.Compare(Ports.Run(model, x), Ports.Run(baseModel, x)).BitExact);
            // Training mode: dropout on the adapters' input; the gradient reaches B (A's is zero while B is).
            model.train();
            manual_seed(7);
            model.call(x).square().sum().backward();
            var parameters = model.named_parameters().ToDictionary(p => p.name, p => p.parameter);
            foreach (string path in ConvNets.Targets["conv2d"])
                Assert.True(parameters[$"{path}.lora_B.default.weight"].grad!.abs().max().item<float>() > 0, path);
            Assert.Null(parameters["stem.weight"].grad);
        }

        // ---- The way back: folders written here, loaded by real PEFT ------------------------------------------------

        /// <summary>
        /// An adapter "trained" here: injected on the net's convolutions, lora_A and lora_B then set to small exact values
        /// (k/32), so that the file's bytes are the same on every machine.
        /// </summary>
        private static nn.Module<Tensor, Tensor> TrainedHere(string net)
        {
            var model = ConvNets.Base(net);
            LoraModel.Inject(model, new LoraConfig { r = 4, lora_alpha = 8, target_modules = ConvNets.Targets[net] });
            using (no_grad())
            {
                foreach (var (key, parameter) in model.named_parameters().Where(p => p.parameter.requires_grad))
                {
                    using var values = (arange(parameter.numel(), ScalarType.Float64) * 7 % 11 - 5).div(32).to(parameter.dtype).reshape(parameter.shape);
                    parameter.copy_(values);
                }
            }
            model.eval();
            return model;
        }

        private static string RepositoryRoot()
        {
            for (var directory = new DirectoryInfo(AppContext.BaseDirectory); directory is not null; directory = directory.Parent)
            {
                if (File.Exists(Path.Combine(directory.FullName, "TorchLinear.sln")))
                    return directory.FullName;
            }
            throw new InvalidOperationException($"No TorchLinear.sln above {AppContext.BaseDirectory}.");
        }

        /// <summary>Writes each net's adapter and the outputs .NET computes with it into <paramref name="folder"/>.</summary>
        private static void WriteFromDotnet(string folder, Dictionary<string, Tensor> cases)
        {
            Directory.CreateDirectory(folder);
            var outputs = new Dictionary<string, Tensor>();
            foreach (string net in ConvNets.Targets.Keys)
            {
                using var model = TrainedHere(net);
                LoraModel.save_pretrained(model, Path.Combine(folder, net));
                outputs[$"{net}.input"] = cases[$"{net}.input"];
                outputs[$"{net}.output"] = Ports.Run(model, cases[$"{net}.input"]);
            }
            Safetensors.SaveStateDict(Path.Combine(folder, "outputs.safetensors"), outputs);
        }

        [Fact]
        public void ConvAdaptersWrittenHere_HavePeftsKeys_AndRealPeftReproducesTheOutputs()
        {
            using var scope = NewDisposeScope();
            var cases = ConvNets.Cases();
            string fresh = Directory.CreateTempSubdirectory("torchlinear-conv-from-dotnet-").FullName;
            try
            {
                WriteFromDotnet(fresh, cases);
                if (Environment.GetEnvironmentVariable("TORCHLINEAR_WRITE_FROM_DOTNET") == "1")
                    WriteFromDotnet(Path.Combine(RepositoryRoot(), "tests", "TorchLinear.Lora.Tests", "ReferenceData", "RealPeft", "conv", "from_dotnet"), cases);

                string committed = Path.Combine(ConvNets.Folder, "from_dotnet");
                var outputs = StateDicts.ReadPyTorchFile(Path.Combine(fresh, "outputs.safetensors"));
                var committedOutputs = StateDicts.ReadPyTorchFile(Path.Combine(committed, "outputs.safetensors"));
                foreach (string net in ConvNets.Targets.Keys)
                {
                    // PEFT's keys and shapes: those of the folder PEFT itself saved for this net.
                    var peft = StateDicts.ReadPyTorchFile(Path.Combine(ConvNets.Folder, net, "adapter_model.safetensors"));
                    var written = StateDicts.ReadPyTorchFile(Path.Combine(fresh, net, "adapter_model.safetensors"));
                    var stored = StateDicts.ReadPyTorchFile(Path.Combine(committed, net, "adapter_model.safetensors"));
                    Assert.Equal(peft.Keys.OrderBy(k => k, StringComparer.Ordinal), written.Keys.OrderBy(k => k, StringComparer.Ordinal));
                    foreach (var (key, tensor) in written)
                    {
                        Assert.Equal(peft[key].shape, tensor.shape);
                        Assert.True(Equivalence.Compare(stored[key], tensor).BitExact, $"{net} {key}: .NET now writes other values than the committed folder PEFT checked");
                    }
                    // Ours reads it back to the same model.
                    using var again = ConvNets.Base(net);
                    LoraModel.load_adapter(again, Path.Combine(fresh, net));
                    Assert.True(Equivalence.Compare(outputs[$"{net}.output"], Ports.Run(again, cases[$"{net}.input"])).BitExact, net);
                    // The outputs PEFT was compared with are those .NET computes (a convolution's last bits are the CPU's).
                    Equivalence.AssertClose(outputs[$"{net}.output"], committedOutputs[$"{net}.output"]);
                }

                // make_conv.py --check loaded the committed folders with PeftModel.from_pretrained and wrote this report.
                string[] report = File.ReadAllLines(Path.Combine(committed, "check_report.txt"));
                Assert.Contains("result: all matched", report);
                foreach (string net in ConvNets.Targets.Keys)
                {
                    foreach (string mode in new[] { "unmerged", "merged" })
                        Assert.Single(report, l => l.StartsWith($"{net} {mode}: matched: PeftModel.from_pretrained ({(net == "conv2d" ? "Conv2d" : "Conv1d")}) gives .NET's output", StringComparison.Ordinal) && l.EndsWith("unexpected keys: none", StringComparison.Ordinal));
                    // The control: without the adapter PEFT's output is off by far more than assert_close lets through (1e-5
                    // absolute plus 1.3e-6 relative for float32), so the match above is the adapter's.
                    string control = Assert.Single(report, l => l.StartsWith($"{net}: control, the base model without the adapter: off by ", StringComparison.Ordinal));
                    Assert.True(double.Parse(control[(control.LastIndexOf(' ') + 1)..], System.Globalization.CultureInfo.InvariantCulture) > 1e-3, control);
                }

                // The report ends with the sha256 of every file it checked and of make_conv.py (as results.json for
                // check_from_dotnet.py): a committed file changed after the check, a file the check did not see, a script
                // changed since, or a library that now writes other bytes than PEFT checked, fails here.
                var checkedFiles = report.Where(l => l.StartsWith("sha256 ", StringComparison.Ordinal)).Select(l => l.Split(' ', 3))
                                         .ToDictionary(p => p[2], p => p[1], StringComparer.Ordinal);
                var committedFiles = WayBackTests.Hashes(committed);
                committedFiles.Remove("check_report.txt");
                Assert.Equal(committedFiles.Keys, checkedFiles.Keys.Where(k => k != "make_conv.py").OrderBy(k => k, StringComparer.Ordinal));
                foreach (var (file, sha) in committedFiles)
                    Assert.True(sha == checkedFiles[file], $"from_dotnet/{file}: sha256 {sha}, but make_conv.py --check saw {checkedFiles[file]}: run it again");
                Assert.True(WayBackTests.Hashes(ConvNets.Folder)["make_conv.py"] == checkedFiles["make_conv.py"], "make_conv.py changed after its --check wrote check_report.txt: run it again");
                var freshFiles = WayBackTests.Hashes(fresh);
                foreach (string net in ConvNets.Targets.Keys)
                {
                    foreach (string file in new[] { "adapter_config.json", "adapter_model.safetensors" })
                        Assert.True(freshFiles[$"{net}/{file}"] == checkedFiles[$"{net}/{file}"], $"{net}/{file}: .NET now writes other bytes than the file PEFT checked");
                }
            }
            finally
            {
                Directory.Delete(fresh, recursive: true);
            }
        }

        [Fact]
        public void ANewAdapter_DrawsPeftsNumbersUnderTheSameSeed()
        {
            // make_conv.py: torch.manual_seed(11), a new ConvNet2d (its own init draws first; then its base weights are
            // loaded), then get_peft_model with init_lora_weights=False on stem, down, side, mix in that order; PEFT's
            // update_layer makes lora_A, then lora_B, as convolutions (each draws kaiming-uniform).
            using var scope = NewDisposeScope();
            var saved = StateDicts.ReadPyTorchFile(Path.Combine(ConvNets.Folder, "conv2d", "adapter_model.safetensors"));
            manual_seed(11);
            using var model = new ConvNets.ConvNet2d();
            foreach (string path in ConvNets.Targets["conv2d"])
            {
                using var adapter = new LoraConvLayer(ConvNets.Conv(model, path), r: 4, lora_alpha: 8, init_lora_weights: "false");
                foreach (var (part, ours) in new[] { ("lora_A", adapter.lora_A.weight), ("lora_B", adapter.lora_B.weight) })
                {
                    Tensor theirs = saved[$"base_model.model.{path}.{part}.weight"];
                    // PyTorch's bits with kernels that round from + u · (to − from) once (KernelFacts); else within that rounding.
                    if (KernelFacts.FusesMultiplyAdd)
                        Assert.True(Equivalence.Compare(theirs, ours).BitExact, $"{path}.{part}");
                    else
                        Assert.True(KernelFacts.WithinUniformRounding(theirs.data<float>().ToArray(), ours.data<float>().ToArray(), 1 / Math.Sqrt(theirs[0].numel())), $"{path}.{part}");
                }
            }
        }

        /// <summary>Σⱼ B[o, j] A[j, i, …] · scaling in float64, by broadcasting: not PEFT's conv trick nor its matmul.</summary>
        private static Tensor DeltaByHand(LoraConvLayer adapter)
        {
            Tensor a = adapter.lora_A.weight.detach().to(ScalarType.Float64);  // (r, in, *k)
            Tensor b = adapter.lora_B.weight.detach().to(ScalarType.Float64).flatten(1);  // (out, r)
            long[] shape = b.shape.Concat(Enumerable.Repeat(1L, (int)a.dim() - 1)).ToArray();  // (out, r, 1, 1[, 1])
            return (b.reshape(shape) * a.unsqueeze(0)).sum(new long[] { 1 }) * adapter.scaling;
        }

        [Theory]
        [InlineData(2, 3, 1, 1)]  // PEFT's 1×1 special case: a matrix product
        [InlineData(2, 3, 3, 3)]  // the conv trick
        [InlineData(2, 3, 3, 1)]
        [InlineData(1, 5, 0, 0)]  // Conv1d, kernel 5: always the conv trick (PEFT's size()[2:4] has one entry)
        [InlineData(1, 1, 0, 0)]  // Conv1d, kernel 1
        public void DeltaWeight_IsTheSumOverTheRank_ForEveryKernel(int dims, long k0, long k1, long k2)
        {
            using var scope = NewDisposeScope();
            manual_seed(3);
            Convolution conv = dims == 1 ? nn.Conv1d(6, 5, k0) : nn.Conv2d(6, 5, (k1 == 0 ? k0 : k1, k2 == 0 ? k0 : k2));
            using var adapter = new LoraConvLayer(conv, r: 3, lora_alpha: 5, init_lora_weights: "false");
            Tensor delta = adapter.get_delta_weight();
            Assert.Equal(conv.weight.shape, delta.shape);
            Equivalence.AssertClose(delta, DeltaByHand(adapter).to(ScalarType.Float32));
            conv.Dispose();
        }

        [Fact]
        public void AddTo_IsTheUpdateOfTheMergedWeight()
        {
            // conv(x, W + Δ) = conv(x, W) + lora_B(lora_A(x)) · scaling, for stride and padding.
            using var scope = NewDisposeScope();
            manual_seed(4);
            using var conv = nn.Conv2d(4, 6, (3, 2), stride: (2, 1), padding: (1, 0));
            using var adapter = new LoraConvLayer(conv, r: 2, lora_alpha: 3, init_lora_weights: "false");
            Tensor x = randn(2, 4, 7, 5);
            Tensor unmerged = adapter.AddTo(conv.call(x), x, training: false);
            Tensor merged = nn.functional.conv2d(x, conv.weight + adapter.get_delta_weight(), conv.bias, new long[] { 2, 1 }, new long[] { 1, 0 });
            Equivalence.AssertClose(unmerged, merged);
        }

        [Fact]
        public void Dropout_AppliesToTheAdaptersInput_InTrainingModeOnly()
        {
            using var scope = NewDisposeScope();
            manual_seed(6);
            using var conv = nn.Conv1d(3, 4, 3, stride: 2, padding: 1);
            using var adapter = new LoraConvLayer(conv, r: 2, lora_alpha: 4, lora_dropout: 0.5, init_lora_weights: "false");
            Tensor x = randn(2, 3, 9);
            Tensor Update(Tensor input) =>
                nn.functional.conv1d(nn.functional.conv1d(input, adapter.lora_A.weight, null, 2, 1), adapter.lora_B.weight) * adapter.scaling;
            using (no_grad())
            {
                // Eval: no dropout.
                Equivalence.AssertClose(adapter.AddTo(conv.call(x), x, training: false), conv.call(x) + Update(x));
                // Training: PEFT's lora_B(lora_A(dropout(x))) · scaling, the base output untouched by the dropout.
                manual_seed(8);
                Tensor trained = adapter.AddTo(conv.call(x), x, training: true);
                manual_seed(8);
                Tensor dropped = nn.functional.dropout(x, 0.5, training: true);
                Equivalence.AssertClose(trained, conv.call(x) + Update(dropped));
                Assert.True(Equivalence.Compare(trained, conv.call(x) + Update(x)).MaxAbsDiff > 1e-3, "the dropout changed the update");
            }
        }

        [Fact]
        public void AMergeThatWouldNotBeFinite_IsRefused_AndChangesNothing()
        {
            using var scope = NewDisposeScope();
            using var conv = nn.Conv2d(2, 2, 3);
            using var adapter = new LoraConvLayer(conv, r: 1, lora_alpha: 3e38, init_lora_weights: "false");
            using (no_grad())
            {
                adapter.lora_A.weight.fill_(10);
                adapter.lora_B.weight.fill_(10);
            }
            var before = TensorText.Bits(conv.weight);
            var error = Assert.Throws<InvalidOperationException>(() => adapter.merge(conv.weight));
            Assert.Contains("would put NaN or infinity into its weight; no weight was changed", error.Message);
            Assert.Equal(before, TensorText.Bits(conv.weight));
            Assert.False(adapter.merged);
        }

        public static TheoryData<string, string> UnsupportedConvolutions => new()
        {
            { "groups", "a Conv2d with groups=2; PEFT builds lora_B with the base's groups and cannot merge such an adapter" },
            { "dilation", "a Conv2d with dilation=(2, 2); PEFT builds lora_A without the dilation" },
            { "reflect", "a Conv1d with padding_mode=Reflect; PEFT's lora_A pads with zeros whatever the base does" },
            { "transposed", "a transposed convolution (ConvTranspose2d); LoRA is implemented for nn.Conv1d and nn.Conv2d" },
            { "conv3d", "a Conv3d; LoRA is implemented for nn.Conv1d and nn.Conv2d (PEFT's Conv3d is not)" },
        };

        [Theory]
        [MemberData(nameof(UnsupportedConvolutions))]
        public void ConvolutionsPeftDoesNotAdaptConsistently_AreRefusedByName(string kind, string message)
        {
            using var scope = NewDisposeScope();
            using Convolution conv = kind switch
            {
                "groups" => nn.Conv2d(4, 8, 3, groups: 2),
                "dilation" => nn.Conv2d(4, 8, 3, padding: 2, dilation: 2),
                "reflect" => nn.Conv1d(4, 8, 3, padding: 1, padding_mode: PaddingModes.Reflect),
                "transposed" => nn.ConvTranspose2d(4, 8, 3),
                _ => nn.Conv3d(4, 8, 3),
            };
            Assert.Contains(message, LoraConvLayer.Unsupported(conv));
            var error = Assert.Throws<NotSupportedException>(() => new LoraConvLayer(conv, r: 4));
            Assert.Contains(message, error.Message);
        }

        [Fact]
        public void PeftsOwnBehaviour_ForWhatIsRefused_IsRecorded()
        {
            // make_conv.py ran PEFT 0.18.1 on a groups=2 and a dilated conv: what the refusals above stand on.
            string facts = File.ReadAllText(Path.Combine(ConvNets.Folder, "peft_facts.json"));
            Assert.Contains("\"peft\": \"0.18.1\"", facts);
            Assert.Contains("NotImplementedError: Merging is not supported for _ConvNd layers with groups > 1!", facts);
            Assert.Contains("\"dilated_lora_A_dilation\": [\n  1,\n  1\n ]", facts);
            Assert.Contains("\"dilated_forward\": \"RuntimeError: The size of tensor a", facts);
        }

        [Fact]
        public void ADilationOnAKernelOfOne_IsAccepted_AsItChangesNothing()
        {
            using var scope = NewDisposeScope();
            using var conv = nn.Conv2d(4, 8, 1, dilation: 2);
            Assert.Null(LoraConvLayer.Unsupported(conv));
        }

        [Fact]
        public void SamePadding_IsPassedOnToLoraA()
        {
            using var scope = NewDisposeScope();
            manual_seed(5);
            using var conv = nn.Conv2d(3, 4, 3, Padding.Same);
            using var adapter = new LoraConvLayer(conv, r: 2, init_lora_weights: "false");
            Tensor x = randn(1, 3, 6, 5);
            Tensor output = adapter.AddTo(conv.call(x), x, training: false);
            Tensor merged = nn.functional.conv2d_padding(x, conv.weight + adapter.get_delta_weight(), conv.bias, null, Padding.Same);
            Equivalence.AssertClose(output, merged);
        }
    }
}
