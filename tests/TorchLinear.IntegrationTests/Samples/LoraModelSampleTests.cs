using System;
using System.Globalization;
using System.Linq;
using System.Text.RegularExpressions;
using Xunit;

namespace TorchLinear.IntegrationTests.Samples
{
    public class LoraModelSampleTests
    {
        [Fact]
        public void Sample_LoadsAPeftAdapter_FineTunesSavesReloadsAndMerges()
        {
            var (output, _) = SampleRunner.Run("LoraModelSample", TimeSpan.FromSeconds(120));
            string[] lines = output.Split('\n').Select(l => l.TrimEnd('\r')).ToArray();
            string Line(string start) => lines.Single(l => l.StartsWith(start, StringComparison.Ordinal));
            double MaxDiff(string line) => line.EndsWith("bit-exact", StringComparison.Ordinal) ? 0
                : double.Parse(Regex.Match(line, @"max \|diff\| (\S+)$").Groups[1].Value, CultureInfo.InvariantCulture);

            // PyTorch's numbers: the base model, the adapted model, and the adapter disabled.
            Assert.True(MaxDiff(Line("2507 parameters; against PyTorch's output:")) <= 1e-5);
            Assert.Equal(6, Line("adapted 6 layers:").Split(", ").Length);
            Assert.True(MaxDiff(Line("against PyTorch's adapted output:")) <= 1e-5);
            Assert.True(MaxDiff(Line("with adapters disabled, against PyTorch's disable_adapter():")) <= 1e-5);
            // Fine-tuning in .NET lowers the loss at least 5-fold; saved and reloaded, the predictions are the same bits.
            var loss = Regex.Match(Line("loss on the shifted task:"), @"before (\S+), after (\S+) ");
            Assert.True(double.Parse(loss.Groups[1].Value, CultureInfo.InvariantCulture) >= 5 * double.Parse(loss.Groups[2].Value, CultureInfo.InvariantCulture));
            Assert.StartsWith("wrote adapter_config.json, adapter_model.safetensors", Line("wrote "));
            Assert.Equal("reloaded predictions: bit-exact", Line("reloaded predictions:"));
            Assert.True(MaxDiff(Line("merged predictions:")) <= 1e-5);
            Assert.Equal("state_dict keys with lora_: 0; q_proj is still a Linear", Line("state_dict keys with lora_:"));
        }
    }
}
