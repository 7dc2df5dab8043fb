using System;
using System.Linq;
using System.Text.RegularExpressions;
using Xunit;

namespace TorchLinear.IntegrationTests.Samples
{
    public class WalkthroughTests
    {
        private static readonly Lazy<(string Output, TimeSpan Elapsed)> Run =
            new(() => SampleRunner.Run("Walkthrough", TimeSpan.FromSeconds(60)));

        [Fact]
        public void Walkthrough_RetellsTheWorkedExampleStepByStep()
        {
            string output = Run.Value.Output;
            Assert.Contains("y[0] = row 0 · x + b[0] = 1×1 + 2×2 + 3×3 + 0 = 14 + 0 = 14", output);
            Assert.Contains("y[1] = row 1 · x + b[1] = 4×1 + 5×2 + 6×3 + 1 = 32 + 1 = 33", output);
            Assert.Contains("with the article's W and b: y = [14, 33]", output);
            Assert.Contains("nn.functional.linear(x, W, b)   = [14, 33]", output);
            Assert.Contains("LinearFunctional.linear(x, W, b) = [14, 33]", output);
        }

        [Fact]
        public void Walkthrough_ShowsTheRefusalsItExplains()
        {
            string output = Run.Value.Output;
            Assert.Contains("holds nn.Linear's numbers: weight bit-exact, bias bit-exact", output);
            Assert.Contains("'weight' has shape [3, 2], this module's has shape [2, 3]", output);
            Assert.Contains("W · x fails: mat1 and mat2 shapes cannot be multiplied (2x3 and 4x3)", output);
            Assert.Contains("torch.matmul(x, W.t()) vs x.matmul(W.t()): bit-exact", output);
        }

        [Fact]
        public void Walkthrough_TableShowsOurFormulationsBitExactEverywhere()
        {
            var (output, _) = Run.Value;
            string[] lines = output.Split('\n');
            foreach (string row in new[] { "nn.Linear ", "functional.linear ", "CustomLinear ", "LinearFunctional.linear " })
            {
                string line = Assert.Single(lines, l => l.StartsWith(row, StringComparison.Ordinal));
                Assert.Equal(4, Regex.Matches(line, "bit-exact").Count);
            }
            Assert.Single(lines, l => l.StartsWith("matmul(x, W.T) + b ", StringComparison.Ordinal));
            Assert.Single(lines, l => l.StartsWith("flatten → addmm → view ", StringComparison.Ordinal));
        }
    }
}
