using System;
using System.Diagnostics;
using System.IO;
using System.Linq;
using System.Text.Json.Nodes;
using TorchLinear.Lora;
using TorchLinear.Lora.Tests;
using Xunit;
using static TorchLinear.Lora.Tests.Ports;
using static TorchSharp.torch;

namespace TorchLinear.IntegrationTests.Lora
{
    /// <summary>
    /// Configs from strangers decided in bounded time: patterns that take a backtracking engine exponential time, and lists
    /// of names of any length. Wall-clock bounds, so here and not in the unit suite; each bound (10 s) is a margin no
    /// machine comes near (they take milliseconds), against the old code's minutes or hours.
    /// </summary>
    public class StrangersInBoundedTimeTests
    {
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
                "target_modules" => new LoraConfig { TargetModulesRegex = pattern },
                "exclude_modules" => new LoraConfig { target_modules = new[] { "y" }, ExcludeModulesRegex = pattern },
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
        public void ALongListOfNames_IsDecidedInTimeLinearInItsLength()
        {
            // The old sample put every modules_to_save name into a regex: 44k names took 12 s per module.
            var names = Enumerable.Range(0, 100_000).Select(i => $"module_{i}").ToArray();
            var config = new LoraConfig { target_modules = names, modules_to_save = names, exclude_modules = names };
            var clock = Stopwatch.StartNew();
            for (int i = 0; i < 1000; i++)
                _ = config.Targets($"model.layers.{i}.module_{i * 7}");
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(10), $"1000 modules took {clock.Elapsed.TotalSeconds:F1} s");
            Assert.True(ModuleMatching.IsModuleToSave(config, "a.module_99999"));
        }
        /// <summary>A copy of the reference "attention" adapter folder with its config changed.</summary>
        private static string WithConfig(Action<JsonObject> edit)
        {
            string folder = Directory.CreateTempSubdirectory("torchlinear-peft-mutant-").FullName;
            var json = JsonNode.Parse(File.ReadAllText(Path.Combine(Ports.Folder, "attention", "adapter_config.json")))!.AsObject();
            edit(json);
            File.WriteAllText(Path.Combine(folder, "adapter_config.json"), json.ToJsonString());
            File.Copy(Path.Combine(Ports.Folder, "attention", "adapter_model.safetensors"), Path.Combine(folder, "adapter_model.safetensors"));
            return folder;
        }

        [Theory]
        [InlineData("target_modules")]
        [InlineData("rank_pattern")]
        public void ACatastrophicPatternInAStrangersConfig_IsDecidedQuickly(string field)
        {
            // The old sample's load_adapter hung on "(.*)*x", longer with every character of the module paths. Here the
            // pattern is one alternative more (target_modules) or a key that matches nothing (rank_pattern): the same
            // adapter loads, to PyTorch's numbers, in milliseconds (10 s is a margin no machine comes near).
            string folder = WithConfig(c =>
            {
                if (field == "target_modules")
                    c["target_modules"] = @"(.*)*x|.*\.(q_proj|v_proj|o_proj)";
                else
                    c["rank_pattern"] = new JsonObject { ["(.*)*x"] = 3, ["o_proj"] = 2 };
            });
            try
            {
                using var scope = NewDisposeScope();
                var cases = Cases("attention");
                using var model = Pretrained("attention");
                var clock = System.Diagnostics.Stopwatch.StartNew();
                LoraModel.load_adapter(model, folder);
                Assert.True(clock.Elapsed < TimeSpan.FromSeconds(10), $"{clock.Elapsed.TotalSeconds:F1} s");
                Equivalence.AssertClose(Run(model, cases["input"]), cases["adapted_output"]);
            }
            finally
            {
                Directory.Delete(folder, recursive: true);
            }
        }
    }
}
