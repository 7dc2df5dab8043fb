using System;
using System.Linq;
using Xunit;

namespace TorchLinear.IntegrationTests.Samples
{
    /// <summary>Runs samples/CustomLayer as a process and checks what it prints.</summary>
    public class CustomLayerSampleTests
    {
        [Fact]
        public void Sample_PrintsItsVerdicts()
        {
            var (output, _) = SampleRunner.Run("CustomLayer", TimeSpan.FromSeconds(60));
            Assert.Contains("  weight: (64, 32) Float32, requires_grad=True", output);
            Assert.Contains("weight Float64, bias Float64", output);
            Assert.Equal(3, output.Split('\n').Count(l => l.StartsWith("input (", StringComparison.Ordinal)));
            Assert.Equal(3, output.Split('\n').Count(l => l.StartsWith("  weight gradient: ", StringComparison.Ordinal)));
            // alignGradient brought every weight gradient into nn.Linear's layout: no comparison failed on shape.
            Assert.DoesNotContain("shape differs", output);
        }
    }
}
