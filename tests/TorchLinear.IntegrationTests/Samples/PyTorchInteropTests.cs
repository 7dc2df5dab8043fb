using System;
using System.Linq;
using Xunit;

namespace TorchLinear.IntegrationTests.Samples
{
    public class PyTorchInteropTests
    {
        [Fact]
        public void Sample_LoadsThePyTorchMlp_AndEveryCaseIsWithinTheBound()
        {
            var (output, _) = SampleRunner.Run("PyTorchInterop", TimeSpan.FromSeconds(60));
            string[] lines = output.Split('\n').Select(l => l.TrimEnd('\r')).ToArray();

            Assert.Contains("loaded mlp.pt (torch.save from PyTorch 1.13): 0.weight (16, 8), 0.bias (16), 2.weight (4, 16), 2.bias (4)", lines);
            var rows = lines.Where(l => l.StartsWith("int/", StringComparison.Ordinal) || l.StartsWith("random/", StringComparison.Ordinal)).ToList();
            Assert.Equal(12, rows.Count);  // six recorded cases, two dispatches
            Assert.All(rows, row => Assert.EndsWith(" yes", row));
            // The two ULP measures side by side are explained before the table.
            Assert.Contains(lines, l => l.Contains("'max N ULP' (in the verdict) counts the floats between", StringComparison.Ordinal));
            Assert.Contains(lines, l => l.Contains("'ULP at scale' is the largest |difference| divided by one ULP of the largest |output|", StringComparison.Ordinal));
        }
    }
}
