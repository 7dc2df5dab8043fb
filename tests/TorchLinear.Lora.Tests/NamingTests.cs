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
            // PEFT's LoraConfig fields (adapter_config.json keys) and their regex forms (a string field in PEFT).
            "r", "lora_alpha", "lora_dropout", "target_modules", "target_modules_regex", "exclude_modules", "exclude_modules_regex",
            "use_rslora", "use_dora", "fan_in_fan_out", "init_lora_weights", "rank_pattern", "alpha_pattern", "modules_to_save",
            "task_type", "base_model_name_or_path",
            // PEFT's LoraLayer / lora.Linear / lora.Embedding / DoraLinearLayer members.
            "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "scaling", "merged", "merge", "unmerge",
            "get_delta_weight", "reset_lora_parameters", "use_dora", "base_layer", "adapter_name",
            // PEFT's PeftModel / LoraModel / tuners_utils / config functions.
            "from_pretrained", "save_pretrained", "get_peft_model", "load_adapter", "add_adapter", "set_adapter", "delete_adapter",
            "active_adapters", "peft_config", "merge_adapter", "unmerge_adapter", "merge_and_unload", "unload", "disable_adapter",
            "add_weighted_adapter", "get_nb_trainable_parameters", "print_trainable_parameters", "get_base_model",
            "check_target_module_exists", "get_pattern_key",
            // loralib's (and PEFT's internal _mark_only_adapters_as_trainable).
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

#pragma warning disable CS0618 // the old names, on purpose
        [Fact]
        public void TheOldNames_StillWork_AsTheNewOnes()
        {
            using var scope = NewDisposeScope();
            string folder = Path.Combine(Path.GetTempPath(), $"oldnames-{Guid.NewGuid():N}");
            try
            {
                manual_seed(2);
                using var model = nn.Sequential(("0", nn.Linear(6, 5)), ("1", nn.ReLU()), ("2", nn.Linear(5, 3)));
                model.eval();
                var x = randn(4, 6);
                var config = new LoraConfig { r = 2, target_modules = new[] { "0", "2" }, init_lora_weights = LoraInit.False, bias = LoraBias.None };
                Assert.Equal(new[] { "0", "2" }, LoraModel.Inject(model, config));
                var adapted = model.call(x);
                LoraModel.merge_adapter(model);
                Assert.True((model.call(x) - adapted).abs().max().item<float>() < 1e-5f, "merge");
                LoraModel.unmerge_adapter(model);
                Assert.True(Equivalence.Compare(adapted, model.call(x)).BitExact, "unmerge");
                using (LoraModel.disable_adapter(model))
                    Assert.False(Equivalence.Compare(adapted, model.call(x)).BitExact, "disable_adapters gives the base model");
                using (LoraModel.MixedBatch(model, new[] { "default", "__base__", "default", "default" }))
                    Assert.True(Equivalence.Compare(adapted[0], model.call(x)[0]).BitExact, "mixed_batch");
                LoraModel.check_adapters_run(model, x);
                LoraModel.allow_unused_adapters(model, "0");
                LoraModel.save_pretrained(model, folder);
                Assert.Equal(2, LoraConfig.from_pretrained(folder).r);
                LoraConfig.from_pretrained(folder).save(Path.Combine(folder, "again.json"));
                Assert.Equal(2, LoraConfig.from_pretrained(Path.Combine(folder, "again.json")).r);
                Assert.True(ModuleMatching.is_module_to_save(new LoraConfig { modules_to_save = new[] { "head" } }, "model.head"));
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
