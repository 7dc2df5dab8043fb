using System;
using System.Linq;
using Xunit;

namespace TorchLinear.IntegrationTests.Samples
{
    public class TrainingParityTests
    {
        [Fact]
        public void Sample_ReproducesPyTorchsTraining_ShowsBothLossCurves_AndNamesThePlantedMistake()
        {
            var (output, _) = SampleRunner.Run("TrainingParity", TimeSpan.FromSeconds(120));
            string[] lines = output.Split('\n').Select(l => l.TrimEnd('\r')).ToArray();
            Assert.StartsWith("Training parity against tiny_gpt.training.pt (PyTorch 1.13", lines[0]);
            Assert.EndsWith("AdamW; the port: AdamW), 20 steps, each from the recorded state", lines[0]);
            // 20 step rows, each close, then the verdict.
            var rows = lines.Skip(2).Take(20).ToList();
            Assert.All(rows, row => Assert.EndsWith("  close", row));
            Assert.Equal("no divergence", lines[23]);
            Assert.Contains("AssertAllClose passed: every step's forward, loss, gradients and updates are PyTorch's, within assert_close's tolerances.", lines);
            // The free-running table: the port's loss curve beside PyTorch's.
            int free = Array.FindIndex(lines, l => l.EndsWith("20 steps, free-running", StringComparison.Ordinal));
            Assert.True(free > 0, output);
            Assert.Matches(@"^\s+0\s+2\.081469\s+2\.0814\d\d\s", lines[free + 2]);
            Assert.Contains("With weight decay on every parameter: first divergence step 0, Update, wte.weight: weight_decay: PyTorch 0, the port 0.1", lines);
        }
    }
}
