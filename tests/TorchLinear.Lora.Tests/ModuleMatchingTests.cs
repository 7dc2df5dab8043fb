using System;
using System.Linq;
using Xunit;

namespace TorchLinear.Lora.Tests
{
    /// <summary>PEFT's matching rules, with the cases that surprise people, and hostile patterns decided in bounded time.</summary>
    public class ModuleMatchingTests
    {
        [Fact]
        public void TargetModulesList_MatchesNamesAtDots_NeverAsRegexes()
        {
            var list = new LoraConfig { target_modules = new[] { "q_proj", "self_attn.o_proj", ".*" } };
            Assert.True(list.Targets("q_proj"));
            Assert.True(list.Targets("model.layers.0.self_attn.q_proj"));
            Assert.False(list.Targets("model.layers.0.self_attn.q_proj_extra"));
            Assert.False(list.Targets("model.layers.0.xq_proj"));
            Assert.True(list.Targets("model.layers.3.self_attn.o_proj"));
            Assert.False(list.Targets("model.layers.3.mlp.o_proj"));
            // ".*" is a name like any other: it matches a module called ".*" and nothing else.
            Assert.False(list.Targets("model.layers.3.mlp.up_proj"));
        }

        [Fact]
        public void TargetModulesString_IsARegexThatMustMatchTheWholePath()
        {
            var regex = new LoraConfig { TargetModulesRegex = @".*\.(q|v)_proj" };
            Assert.True(regex.Targets("model.layers.0.self_attn.v_proj"));
            Assert.False(regex.Targets("model.layers.0.self_attn.v_proj.lora_A"));  // a full match, not a search
            Assert.False(regex.Targets("v_proj"));
            // Python's named groups, as PEFT's configs may write them.
            var named = new LoraConfig { TargetModulesRegex = @"(?P<layer>model\.layers\.\d+)\.self_attn\.(?P=layer)?q_proj\Z" };
            Assert.True(named.Targets("model.layers.12.self_attn.q_proj"));
        }

        [Fact]
        public void AllLinear_LeavesOutTheOutputLayer_AndTheClassifierForSequenceClassification()
        {
            var all = new LoraConfig { TargetModulesRegex = "all-linear" };
            Assert.True(all.Targets("model.layers.0.mlp.up_proj"));
            Assert.False(all.Targets("lm_head"));
            Assert.True(all.Targets("classifier"));
            Assert.False(new LoraConfig { TargetModulesRegex = "All-Linear", task_type = "SEQ_CLS" }.Targets("classifier"));
        }

        [Fact]
        public void RankAndAlphaPatterns_TakeTheFirstKeyThatMatchesTheEndAtADot()
        {
            var patterns = new LoraConfig
            {
                r = 8, lora_alpha = 16, target_modules = new[] { "q_proj" },
                rank_pattern = new() { ["layers.1.self_attn.q_proj"] = 2, ["q_proj"] = 4 },
                alpha_pattern = new() { [@"layers\.[23]\..*"] = 64 },
            };
            Assert.Equal(2, patterns.RankFor("model.layers.1.self_attn.q_proj"));
            Assert.Equal(4, patterns.RankFor("model.layers.11.self_attn.q_proj"));   // "layers.1." does not match "layers.11."
            Assert.Equal(8, patterns.RankFor("model.layers.1.mlp.up_proj"));
            Assert.Equal(64, patterns.AlphaFor("model.layers.3.self_attn.q_proj"));
            Assert.Equal(16, patterns.AlphaFor("model.layers.4.self_attn.q_proj"));
            Assert.Equal(64 / 4.0, patterns.ScalingFor("model.layers.2.self_attn.q_proj"));
        }

        [Fact]
        public void ExcludeModules_AsAListIsNames_AsAStringAFullMatchRegex()
        {
            var names = new LoraConfig { target_modules = new[] { "q_proj" }, exclude_modules = new[] { "layers.0.self_attn.q_proj" } };
            Assert.False(names.Targets("model.layers.0.self_attn.q_proj"));
            Assert.True(names.Targets("model.layers.1.self_attn.q_proj"));
            var regex = new LoraConfig { target_modules = new[] { "q_proj" }, ExcludeModulesRegex = @"model\.layers\.1\..*" };
            Assert.True(regex.Targets("model.layers.0.self_attn.q_proj"));
            Assert.False(regex.Targets("model.layers.1.self_attn.q_proj"));
        }

        [Fact]
        public void ModulesToSave_IsANameAtAnyDepth_AndNothingInsideIsTargeted()
        {
            // The rule the old sample had in only one of five places: a nested head named by its last part.
            var config = new LoraConfig { target_modules = new[] { "dense", "classifier" }, modules_to_save = new[] { "classifier" } };
            Assert.True(ModuleMatching.IsModuleToSave(config, "classifier"));
            Assert.True(ModuleMatching.IsModuleToSave(config, "head.classifier"));
            Assert.False(ModuleMatching.IsModuleToSave(config, "head.my_classifier"));   // PEFT's own endswith would take it; at dots it is not
            Assert.False(ModuleMatching.IsModuleToSave(config, "head.classifier.dense"));
            Assert.True(ModuleMatching.IsInModuleToSave(config, "head.classifier.dense"));
            Assert.False(config.Targets("head.classifier"));
            Assert.False(config.Targets("head.classifier.dense"));
            Assert.True(config.Targets("encoder.dense"));
        }

        // ---- Patterns from strangers ---------------------------------------------------------------------------------

        [Fact]
        public void APatternTheLinearEngineCannotRun_RunsWithABound_AndIsRefusedByKeyWhenItRunsAway()
        {
            // A lookahead with a nested quantifier: backtracking only, and exponential on this path.
            var config = new LoraConfig { TargetModulesRegex = @"(?=(x+x+)+y$)z" };
            var error = Assert.ThrowsAny<ArgumentException>(() => config.Targets(new string('x', 40)));
            Assert.Contains("target_modules", error.Message);
            Assert.Contains("ran past its time bound", error.Message);
            // A bounded backreference that does finish is matched.
            Assert.True(new LoraConfig { TargetModulesRegex = @"(\w+)\.\1" }.Targets("ab.ab"));
        }

        [Fact]
        public void AnInvalidPattern_IsNamedWithItsKey_AndShownAsWritten()
        {
            var error = Assert.ThrowsAny<ArgumentException>(() => new LoraConfig { TargetModulesRegex = "q_proj(" }.Targets("q_proj"));
            Assert.Contains("target_modules: 'q_proj(' is not a valid regular expression", error.Message);
            Assert.DoesNotContain(@"\A(?:", error.Message);
            var pattern = Assert.ThrowsAny<ArgumentException>(() => new LoraConfig { target_modules = new[] { "q" }, rank_pattern = new() { ["[q"] = 2 } }.RankFor("q"));
            Assert.Contains("rank_pattern.[q", pattern.Message);
        }

        [Fact]
        public void KeysOfLiteralsAndDots_MatchExactlyAsTheRegularExpressionsTheyAre()
        {
            // Such keys (module paths, as configs write them) are matched without the regex engine: here against it, on
            // 20,000 random keys and paths where a dot may stand for any character, a newline, or a literal.
            var random = new Random(20261201);
            string Draw(string alphabet, int max) => new string(Enumerable.Range(0, random.Next(max)).Select(_ => alphabet[random.Next(alphabet.Length)]).ToArray());
            for (int i = 0; i < 20_000; i++)
            {
                string key = Draw("ab.", 5).Replace("b", random.Next(2) == 0 ? "b" : @"\.");
                string path = Draw("ab.\n", 9);
                var config = new LoraConfig { TargetModulesRegex = key, rank_pattern = new() { [key] = 2 } };
                bool full = System.Text.RegularExpressions.Regex.IsMatch(path, $@"\A(?:{key})\z");
                bool end = System.Text.RegularExpressions.Regex.IsMatch(path, $@"\A(.*\.)?({key})$");
                Assert.True(full == config.Targets(path), $"fullmatch '{key}' on '{path}'");
                Assert.True(end == (config.RankFor(path) == 2), $"pattern key '{key}' on '{path}'");
            }
        }

        [Fact]
        public void ThousandsOfPatternKeysThatNeedTheEngine_AreRefused_WhileThousandsOfModulePathsAreNot()
        {
            using var model = TorchSharp.torch.nn.Sequential(("q_proj", TorchSharp.torch.nn.Linear(2, 2)));
            var paths = Enumerable.Range(0, 5000).ToDictionary(i => $"model.layers.{i}.self_attn.q_proj", _ => 2);
            LoraModel.Inject(model, new LoraConfig { target_modules = new[] { "q_proj" }, rank_pattern = paths });
            using var other = TorchSharp.torch.nn.Sequential(("q_proj", TorchSharp.torch.nn.Linear(2, 2)));
            var expressions = Enumerable.Range(0, LoraConfig.MaxPatternExpressions + 1).ToDictionary(i => $@"layers\.{i}\..*", _ => 2);
            var error = Assert.Throws<ArgumentException>(() => LoraModel.Inject(other, new LoraConfig { target_modules = new[] { "q_proj" }, rank_pattern = expressions }));
            Assert.Contains($"rank_pattern: rank_pattern and alpha_pattern hold {LoraConfig.MaxPatternExpressions + 1} keys that are regular expressions", error.Message);
        }
    }
}
