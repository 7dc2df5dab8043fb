using System;
using System.Diagnostics;
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
            var regex = new LoraConfig { target_modules_regex = @".*\.(q|v)_proj" };
            Assert.True(regex.Targets("model.layers.0.self_attn.v_proj"));
            Assert.False(regex.Targets("model.layers.0.self_attn.v_proj.lora_A"));  // a full match, not a search
            Assert.False(regex.Targets("v_proj"));
            // Python's named groups, as PEFT's configs may write them.
            var named = new LoraConfig { target_modules_regex = @"(?P<layer>model\.layers\.\d+)\.self_attn\.(?P=layer)?q_proj\Z" };
            Assert.True(named.Targets("model.layers.12.self_attn.q_proj"));
        }

        [Fact]
        public void AllLinear_LeavesOutTheOutputLayer_AndTheClassifierForSequenceClassification()
        {
            var all = new LoraConfig { target_modules_regex = "all-linear" };
            Assert.True(all.Targets("model.layers.0.mlp.up_proj"));
            Assert.False(all.Targets("lm_head"));
            Assert.True(all.Targets("classifier"));
            Assert.False(new LoraConfig { target_modules_regex = "All-Linear", task_type = "SEQ_CLS" }.Targets("classifier"));
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
            var regex = new LoraConfig { target_modules = new[] { "q_proj" }, exclude_modules_regex = @"model\.layers\.1\..*" };
            Assert.True(regex.Targets("model.layers.0.self_attn.q_proj"));
            Assert.False(regex.Targets("model.layers.1.self_attn.q_proj"));
        }

        [Fact]
        public void ModulesToSave_IsANameAtAnyDepth_AndNothingInsideIsTargeted()
        {
            // The rule the old sample had in only one of five places: a nested head named by its last part.
            var config = new LoraConfig { target_modules = new[] { "dense", "classifier" }, modules_to_save = new[] { "classifier" } };
            Assert.True(ModuleMatching.is_module_to_save(config, "classifier"));
            Assert.True(ModuleMatching.is_module_to_save(config, "head.classifier"));
            Assert.False(ModuleMatching.is_module_to_save(config, "head.my_classifier"));   // PEFT's own endswith would take it; at dots it is not
            Assert.False(ModuleMatching.is_module_to_save(config, "head.classifier.dense"));
            Assert.True(ModuleMatching.is_in_module_to_save(config, "head.classifier.dense"));
            Assert.False(config.Targets("head.classifier"));
            Assert.False(config.Targets("head.classifier.dense"));
            Assert.True(config.Targets("encoder.dense"));
        }

        // ---- Patterns from strangers ---------------------------------------------------------------------------------

        /// <summary>A module path of 60 characters, the kind a catastrophic pattern takes exponential time on.</summary>
        private static readonly string LongPath = string.Join(".", Enumerable.Repeat("xxxxxxxxxx", 6)) + "y";

        [Theory]
        [InlineData("target_modules")]
        [InlineData("exclude_modules")]
        [InlineData("rank_pattern")]
        public void ACatastrophicPattern_IsDecidedInLinearTime(string field)
        {
            // The old sample hung on "(.*)*x" without limit (4x slower per two characters of module path). Time here is
            // linear in the path: 10 s is a margin no machine should come near (it takes milliseconds).
            const string pattern = "(.*)*x";
            var config = field switch
            {
                "target_modules" => new LoraConfig { target_modules_regex = pattern },
                "exclude_modules" => new LoraConfig { target_modules = new[] { "y" }, exclude_modules_regex = pattern },
                _ => new LoraConfig { target_modules = new[] { "y" }, rank_pattern = new() { [pattern] = 2 } },
            };
            var clock = Stopwatch.StartNew();
            for (int i = 0; i < 100; i++)
            {
                _ = config.Targets(LongPath + i);
                _ = config.RankFor(LongPath + i);
            }
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(10), $"100 matches took {clock.Elapsed.TotalSeconds:F1} s");
        }

        [Fact]
        public void APatternTheLinearEngineCannotRun_RunsWithABound_AndIsRefusedByKeyWhenItRunsAway()
        {
            // A lookahead with a nested quantifier: backtracking only, and exponential on this path.
            var config = new LoraConfig { target_modules_regex = @"(?=(x+x+)+y$)z" };
            var error = Assert.ThrowsAny<ArgumentException>(() => config.Targets(new string('x', 40)));
            Assert.Contains("target_modules", error.Message);
            Assert.Contains("ran past its time bound", error.Message);
            // A bounded backreference that does finish is matched.
            Assert.True(new LoraConfig { target_modules_regex = @"(\w+)\.\1" }.Targets("ab.ab"));
        }

        [Fact]
        public void AnInvalidPattern_IsNamedWithItsKey_AndShownAsWritten()
        {
            var error = Assert.ThrowsAny<ArgumentException>(() => new LoraConfig { target_modules_regex = "q_proj(" }.Targets("q_proj"));
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
                var config = new LoraConfig { target_modules_regex = key, rank_pattern = new() { [key] = 2 } };
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
            LoraModel.inject(model, new LoraConfig { target_modules = new[] { "q_proj" }, rank_pattern = paths });
            using var other = TorchSharp.torch.nn.Sequential(("q_proj", TorchSharp.torch.nn.Linear(2, 2)));
            var expressions = Enumerable.Range(0, LoraConfig.MaxPatternExpressions + 1).ToDictionary(i => $@"layers\.{i}\..*", _ => 2);
            var error = Assert.Throws<ArgumentException>(() => LoraModel.inject(other, new LoraConfig { target_modules = new[] { "q_proj" }, rank_pattern = expressions }));
            Assert.Contains($"rank_pattern: rank_pattern and alpha_pattern hold {LoraConfig.MaxPatternExpressions + 1} keys that are regular expressions", error.Message);
        }

        [Fact]
        public void ALongListOfNames_IsDecidedInTimeLinearInItsLength()
        {
            // The old sample put every modules_to_save name into a regex: 44k names took 12 s per module.
            var names = Enumerable.Range(0, 100_000).Select(i => $"module_{i}").ToArray();
            var config = new LoraConfig { target_modules = names, modules_to_save = names, exclude_modules = names };
            var clock = Stopwatch.StartNew();
            for (int i = 0; i < 1000; i++)
                _ = config.Targets($"model.layers.{i}.module_{i * 7}");
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(10), $"1000 modules took {clock.Elapsed.TotalSeconds:F1} s");
            Assert.True(ModuleMatching.is_module_to_save(config, "a.module_99999"));
        }
    }
}
