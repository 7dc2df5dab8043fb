using System;
using System.Linq;
using Xunit;

namespace TorchLinear.IntegrationTests.Samples
{
    public class ParityCheckTests
    {
        [Fact]
        public void Sample_ReportsAFaithfulPortClose_AndNamesThePlantedGeluMistake()
        {
            var (output, _) = SampleRunner.Run("ParityCheck", TimeSpan.FromSeconds(60));
            string[] lines = output.Split('\n').Select(l => l.TrimEnd('\r')).ToArray();
            Assert.StartsWith("Parity of TinyTransformer against tiny_transformer.parity.pt (PyTorch 1.13", lines[0]);
            Assert.Contains("28 module calls, 39 gradients", lines[0]);
            Assert.Contains(lines, l => l.StartsWith("No divergence: every compared output and gradient is close", StringComparison.Ordinal));
            Assert.Contains("AssertAllClose passed: the port computes what PyTorch computed, within assert_close's float32 tolerances.", lines);
            Assert.Contains("With GELU's tanh approximation planted: first divergence blocks.0.mlp.act", lines);
            Assert.Contains(lines, l => l.StartsWith("The port diverges from PyTorch 1.13", StringComparison.Ordinal) && l.Contains("first at blocks.0.mlp.act (GELU)"));
            // Every module row of the faithful port says close or bit-exact.
            var rows = lines.Skip(2).TakeWhile(l => l.Length > 0).ToList();
            Assert.Equal(28, rows.Count);
            Assert.All(rows, row => Assert.Matches(@"\s(close|bit-exact)\s", row));
        }
    }
}
