using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Reflection;
using System.Text.RegularExpressions;
using TorchLinear.Tests;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Lora.Tests
{
    /// <summary>
    /// The package's naming rule (docs/lora.md, "Names"): a public member that mirrors PyTorch or PEFT keeps their name
    /// verbatim; every other public member has an ordinary .NET PascalCase name. Old names stay, [Obsolete], calling the new.
    /// </summary>
    public class NamingTests
    {
        /// <summary>
        /// Every snake_case (or lower-case) public name the package may have, each because PyTorch or PEFT names that member
        /// so. A new entry needs the PyTorch or PEFT member it mirrors; anything else is PascalCase.
        /// </summary>
        private static readonly HashSet<string> MirroredNames = new(StringComparer.Ordinal)
        {
            // PyTorch's nn.Module / nn.Linear / nn.Embedding members.
            "forward", "weight", "bias", "in_features", "out_features", "num_embeddings", "embedding_dim",
            // PyTorch's nn.Conv1d / nn.Conv2d members (LoraConvLayer describes its base convolution with them).
            "in_channels", "out_channels", "kernel_size",
            // PEFT's LoraConfig fields (adapter_config.json keys). (Their string forms are .NET's TargetModulesRegex and
            // ExcludeModulesRegex: PEFT has one field, target_modules, holding a list or a string.)
            "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
            "use_rslora", "use_dora", "fan_in_fan_out", "init_lora_weights", "rank_pattern", "alpha_pattern", "modules_to_save",
            "task_type", "base_model_name_or_path",
            // PEFT's LoraLayer / lora.Linear / lora.Embedding / DoraLinearLayer members.
            "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "scaling", "merged", "merge", "unmerge",
            "get_delta_weight", "reset_lora_parameters", "base_layer", "adapter_name",
            // PEFT's PeftModel / LoraModel / tuners_utils / config functions.
            "from_pretrained", "save_pretrained", "get_peft_model", "load_adapter", "add_adapter", "set_adapter", "delete_adapter",
            "active_adapters", "peft_config", "merge_adapter", "unmerge_adapter", "merge_and_unload", "unload", "disable_adapter",
            "add_weighted_adapter", "get_nb_trainable_parameters", "print_trainable_parameters", "get_base_model",
            "check_target_module_exists", "get_pattern_key",
            // loralib's (microsoft/LoRA, loralib/utils.py), not PEFT's: PEFT's own is the private _mark_only_adapters_as_trainable.
            // Kept as loralib's public name, which users of loralib look for.
            "mark_only_lora_as_trainable",
        };

        private static readonly Regex PascalCase = new("^[A-Z][A-Za-z0-9]*$");

        private static IEnumerable<MemberInfo> PublicMembers() =>
            typeof(LoraModel).Assembly.GetExportedTypes().SelectMany(t => t.GetMembers(BindingFlags.Public | BindingFlags.Instance | BindingFlags.Static | BindingFlags.DeclaredOnly))
                .Where(m => m is not ConstructorInfo && !(m is MethodInfo { IsSpecialName: true }));

        [Fact]
        public void EveryPublicName_IsPascalCase_OrMirrorsPyTorchOrPeft()
        {
            var types = typeof(LoraModel).Assembly.GetExportedTypes().Where(t => !PascalCase.IsMatch(t.Name.Split('`')[0])).Select(t => t.FullName).ToList();
            Assert.True(types.Count == 0, $"types not PascalCase: {string.Join(", ", types)}");
            var breaking = PublicMembers()
                .Where(m => m.GetCustomAttribute<ObsoleteAttribute>() is null)
                .Where(m => !PascalCase.IsMatch(m.Name) && !MirroredNames.Contains(m.Name))
                .Select(m => $"{m.DeclaringType!.Name}.{m.Name}").Distinct().OrderBy(n => n).ToList();
            Assert.True(breaking.Count == 0, $"public names neither PascalCase nor PyTorch's/PEFT's (add the mirrored ones to MirroredNames with what they mirror): {string.Join(", ", breaking)}");
        }

        [Fact]
        public void EveryObsoleteName_SaysWhichNameToUse_AndThatNameExists()
        {
            var obsolete = PublicMembers().Select(m => (Member: m, Attribute: m.GetCustomAttribute<ObsoleteAttribute>())).Where(m => m.Attribute is not null).ToList();
            Assert.NotEmpty(obsolete);
            foreach (var (member, attribute) in obsolete)
            {
                var match = Regex.Match(attribute!.Message ?? "", @"^use (\w+)\.(\w+)$");
                Assert.True(match.Success, $"{member.DeclaringType!.Name}.{member.Name}: [Obsolete(\"{attribute.Message}\")] does not say \"use Type.Name\"");
                var target = typeof(LoraModel).Assembly.GetExportedTypes().Single(t => t.Name == match.Groups[1].Value);
                Assert.Contains(target.GetMembers(), m => m.Name == match.Groups[2].Value && m.GetCustomAttribute<ObsoleteAttribute>() is null);
            }
        }

        /// <summary>A Conv2d in a field of its sealed type, invoked with forward(x): its hook does not run.</summary>
        private sealed class ForwardConv : nn.Module<Tensor, Tensor>
        {
            public TorchSharp.Modules.Conv2d conv = nn.Conv2d(2, 3, 1);

            public ForwardConv() : base(nameof(ForwardConv)) => RegisterComponents();

            public override Tensor forward(Tensor x) => conv.forward(x);
        }

        [Fact]
        public void Messages_PointToTheCurrentNames()
        {
            using var scope = NewDisposeScope();
            using var plain = nn.Sequential(("0", nn.Linear(4, 4)));
            string none = Assert.Throws<InvalidOperationException>(() => LoraModel.merge_adapter(plain)).Message;
            Assert.Contains("put one in first (Inject, get_peft_model, load_adapter or PeftModel.from_pretrained)", none);

            using var model = nn.Sequential(("0", nn.Linear(4, 4)), ("1", nn.Linear(4, 4)));
            model.eval();
            LoraModel.Inject(model, new LoraConfig { r = 2, target_modules = new[] { "0", "1" } });
            LoraModel.Inject(model, new LoraConfig { r = 2, target_modules = new[] { "0" } }, "other");
            LoraModel.merge_adapter(model);
            Assert.Contains("call unmerge_adapter first", Assert.Throws<InvalidOperationException>(() => LoraModel.delete_adapter(model, "default")).Message);
            Assert.Contains("call unmerge_adapter first", Assert.Throws<InvalidOperationException>(() => LoraModel.MixedBatch(model, new[] { "default" })).Message);

            // The run check names a hooked convolution as such (not "a sealed nn.Linear or nn.Embedding").
            using var conv = new ForwardConv();
            LoraModel.Inject(conv, new LoraConfig { r = 1, target_modules = new[] { "conv" } });
            string notRun = Assert.Throws<InvalidOperationException>(() => conv.call(randn(1, 2, 3, 3))).Message;
            Assert.Contains("conv (a layer kept as it is (a sealed nn.Linear, nn.Embedding, nn.Conv1d or nn.Conv2d field, or a layer in a Sequential) runs its adapter in a forward hook", notRun);
            foreach (string message in new[] { none, notRun })
                Assert.DoesNotMatch(@"\b(inject|merge|unmerge|mixed_batch|save_adapter|disable_adapters|check_adapters_run|allow_unused_adapters)\b(?!:)", message);   // "merge: true" is load_adapter's argument
        }

#pragma warning disable CS0618 // the old names, on purpose: each is called and compared with its new name
        /// <summary>An Embedding and a Linear in module-typed fields (wrapped), and a sealed Linear (hooked).</summary>
        private sealed class OldNamesNet : nn.Module<Tensor, Tensor>
        {
            public nn.Module<Tensor, Tensor> emb = nn.Embedding(10, 6);
            public nn.Module<Tensor, Tensor> proj = nn.Linear(6, 5);
            public TorchSharp.Modules.Linear head = nn.Linear(5, 3);

            public OldNamesNet() : base(nameof(OldNamesNet)) => RegisterComponents();

            public override Tensor forward(Tensor x) => head.call(nn.functional.relu(proj.call(emb.call(x))));
        }

        private static OldNamesNet Net()
        {
            manual_seed(2);
            var net = new OldNamesNet();
            net.eval();
            return net;
        }

        private static bool Same(Tensor a, Tensor b) => Equivalence.Compare(a, b).BitExact;

        [Fact]
        public void TheOldNames_StillWork_AsTheNewOnes()
        {
            using var scope = NewDisposeScope();
            string folder = Path.Combine(Path.GetTempPath(), $"oldnames-{Guid.NewGuid():N}");
            try
            {
                using var a = Net();   // the old names
                using var b = Net();   // the new names
                var x = tensor(new long[] { 1, 3, 5, 7 });
                var config = new LoraConfig { r = 2, target_modules = new[] { "emb", "proj", "head" }, init_lora_weights = LoraInit.False };
                manual_seed(9);
                var paths = LoraModel.inject(a, config);
                manual_seed(9);
                Assert.Equal(LoraModel.Inject(b, config), paths);
                Assert.True(Same(a.call(x), b.call(x)), "inject / Inject");

                // The adapters themselves: LoraLayer's, LoraEmbeddingLayer's and LoraWrapper's old names.
                var wrapper = Assert.IsType<LoraWrapper>(a.proj);
                Assert.Equal(wrapper.LoraLayers, wrapper.lora_layers);
                var layer = wrapper.LoraLayers.Single();
                var h = randn(4, layer.in_features);
                Assert.True(Same(layer.add_to(zeros(4, layer.out_features), h, false), layer.AddTo(zeros(4, layer.out_features), h, false)), "LoraLayer.add_to / AddTo");
                var w = randn(layer.out_features, layer.in_features);
                Assert.True(Same(layer.add_to(zeros(4, layer.out_features), h, false, w, null), layer.AddTo(zeros(4, layer.out_features), h, false, w, null)), "LoraLayer.add_to / AddTo (weight, bias)");
                Assert.True(Same(layer.delta_weight(), layer.get_delta_weight()), "LoraLayer.delta_weight / get_delta_weight");
                var embedding = a.modules().OfType<LoraEmbeddingLayer>().Single();
                Assert.True(Same(embedding.add_to(zeros(4, 6), x), embedding.AddTo(zeros(4, 6), x)), "LoraEmbeddingLayer.add_to / AddTo");
                Assert.True(Same(embedding.delta_weight(), embedding.get_delta_weight()), "LoraEmbeddingLayer.delta_weight / get_delta_weight");

                LoraModel.merge(a);
                LoraModel.merge_adapter(b);
                Assert.True(Same(a.call(x), b.call(x)), "merge / merge_adapter");
                Assert.NotNull(layer.WeightBeforeMerge);
                Assert.Same(layer.WeightBeforeMerge, layer.weight_before_merge);
                LoraModel.unmerge(a);
                LoraModel.unmerge_adapter(b);
                Assert.True(Same(a.call(x), b.call(x)), "unmerge / unmerge_adapter");
                Tensor disabledA, disabledB;
                using (LoraModel.disable_adapters(a))
                    disabledA = a.call(x);
                using (LoraModel.disable_adapter(b))
                    disabledB = b.call(x);
                Assert.True(Same(disabledA, disabledB), "disable_adapters / disable_adapter");
                Assert.False(Same(disabledA, a.call(x)), "disable_adapters gives the base model");
                var rows = new[] { "default", LoraModel.BaseModel, "default", LoraModel.BaseModel };
                Tensor mixedA, mixedB;
                using (LoraModel.mixed_batch(a, rows))
                    mixedA = a.call(x);
                using (LoraModel.MixedBatch(b, rows))
                    mixedB = b.call(x);
                Assert.True(Same(mixedA, mixedB), "mixed_batch / MixedBatch");

                // check_adapters_run (both overloads) and allow_unused_adapters: the same refusal, the same opt-out.
                LoraModel.check_adapters_run(a, x);
                LoraModel.CheckAdaptersRun(b, x);
                string refusedA = Assert.Throws<InvalidOperationException>(() => LoraModel.check_adapters_run(a, () => { })).Message;
                string refusedB = Assert.Throws<InvalidOperationException>(() => LoraModel.CheckAdaptersRun(b, () => { })).Message;
                Assert.Equal(refusedB, refusedA);
                LoraModel.allow_unused_adapters(a);
                LoraModel.AllowUnusedAdapters(b);
                LoraModel.check_adapters_run(a, () => { });
                LoraModel.CheckAdaptersRun(b, () => { });

                // save_adapter / save_pretrained, LoraConfig.load / from_pretrained, LoraConfig.save / save_pretrained: the same bytes.
                LoraModel.save_adapter(a, Path.Combine(folder, "a"));
                LoraModel.save_pretrained(b, Path.Combine(folder, "b"));
                foreach (string file in new[] { "adapter_config.json", "adapter_model.safetensors" })
                    Assert.Equal(File.ReadAllBytes(Path.Combine(folder, "b", file)), File.ReadAllBytes(Path.Combine(folder, "a", file)));
                var loaded = LoraConfig.load(Path.Combine(folder, "a"));
                var fromPretrained = LoraConfig.from_pretrained(Path.Combine(folder, "a"));
                loaded.save(Path.Combine(folder, "old.json"));
                fromPretrained.save_pretrained(Path.Combine(folder, "new.json"));
                Assert.Equal(File.ReadAllBytes(Path.Combine(folder, "new.json")), File.ReadAllBytes(Path.Combine(folder, "old.json")));

                // ModuleMatching's and LoraConfig's old names.
                var saving = new LoraConfig { modules_to_save = new[] { "head" } };
                foreach (string key in new[] { "model.head", "model.head.weight", "head", "my_head", "model.body" })
                {
                    Assert.Equal(ModuleMatching.IsModuleToSave(saving, key), ModuleMatching.is_module_to_save(saving, key));
                    Assert.Equal(ModuleMatching.IsInModuleToSave(saving, key), ModuleMatching.is_in_module_to_save(saving, key));
                }
                var regexes = new LoraConfig { target_modules_regex = ".*proj", exclude_modules_regex = "head" };
                Assert.Equal((".*proj", "head"), (regexes.TargetModulesRegex, regexes.ExcludeModulesRegex));
                regexes.TargetModulesRegex = "emb";
                regexes.ExcludeModulesRegex = null;
                Assert.Equal(("emb", (string?)null), (regexes.target_modules_regex, regexes.exclude_modules_regex));
            }
            finally
            {
                if (Directory.Exists(folder))
                    Directory.Delete(folder, recursive: true);
            }
        }
#pragma warning restore CS0618
    }
}
