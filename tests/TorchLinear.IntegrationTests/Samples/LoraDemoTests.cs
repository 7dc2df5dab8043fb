using System;
using System.Globalization;
using System.Linq;
using System.Text.RegularExpressions;
using TorchLinear.Tests;
using Xunit;

namespace TorchLinear.IntegrationTests.Samples
{
    /// <summary>Runs samples/Lora (the fine-tuning demo) and checks the story it tells.</summary>
    public class LoraDemoTests
    {
        private static readonly Lazy<(string Output, TimeSpan Elapsed)> Run =
            new(() => SampleRunner.Run("Lora", TimeSpan.FromSeconds(90)));

        private static string Line(string prefix) =>
            Assert.Single(Run.Value.Output.Split('\n'), l => l.StartsWith(prefix, StringComparison.Ordinal)).TrimEnd('\r');

        [Fact]
        public void Demo_LossFallsByAtLeastAHundredfold()
        {
            var match = Regex.Match(Line("loss on the shifted task: "), @"before ([0-9.]+), after ([0-9.]+)");
            Assert.True(match.Success);
            double before = double.Parse(match.Groups[1].Value, CultureInfo.InvariantCulture);
            double after = double.Parse(match.Groups[2].Value, CultureInfo.InvariantCulture);
            Assert.True(before > 0.1, $"the shifted task should start clearly wrong (loss {before})");
            Assert.True(after < before / 100, $"fine-tuning should lower the loss at least 100-fold: {before} → {after}");
        }

        [Fact]
        public void Demo_ProvesFrozenWeightsMergeAndReload()
        {
            // Adding B A x = 0 may turn a -0.0 output into +0.0: equal values is what a fresh adapter promises.
            Assert.Contains(Line("fresh adapter"), new[]
            {
                "fresh adapter (B = 0) vs the pretrained layer: bit-exact",
                "fresh adapter (B = 0) vs the pretrained layer: equal in value (some zeros changed sign)",
            });
            Assert.Equal("frozen weight after training: bit-exact", Line("frozen weight after training"));
            Assert.Equal("frozen bias after training: bit-exact", Line("frozen bias after training"));
            Assert.EndsWith("within tolerance", Line("merged vs unmerged predictions"));
            Assert.Equal("reloaded adapter predictions: bit-exact", Line("reloaded adapter predictions"));
            var sizes = Regex.Match(Line("adapter file: "), @"(\d+) bytes \(the whole layer's tensors: (\d+) bytes\)");
            Assert.True(long.Parse(sizes.Groups[1].Value) * 5 < long.Parse(sizes.Groups[2].Value), "the adapter file should be small");
        }

        [Fact]
        public void Demo_DeterministicParts_AreStable()
        {
            Snapshots.Match(new[]
            {
                Line("LoraLinear("),
                Line("trainable parameters: "),
                Line("trainable: "),
                Line("LoRA state_dict: "),
                Line("keys taken from the pretrained layer instead: "),
            });
        }
    }
}
