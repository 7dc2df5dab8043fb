using System;
using System.IO;
using Xunit;

namespace TorchLinear.IntegrationTests.Checkpoints
{
    /// <summary>Files that are not files: refused before they are opened, so that nothing blocks (a hang guard of 10 s).</summary>
    public class SpecialFilesTests
    {
        [Fact]
        public async System.Threading.Tasks.Task AFifo_IsRefusedWithoutBlocking()
        {
            if (!OperatingSystem.IsLinux())
                return;
            string path = Path.Combine(Path.GetTempPath(), $"torchlinear-fifo-{Guid.NewGuid():N}.pt");
            Assert.Equal(0, mkfifo(path, Convert.ToInt32("600", 8)));
            try
            {
                var refusal = System.Threading.Tasks.Task.Run(() => Assert.Throws<CheckpointFormatException>(() => StateDicts.ReadPyTorchFile(path)));
                var first = await System.Threading.Tasks.Task.WhenAny(refusal, System.Threading.Tasks.Task.Delay(TimeSpan.FromSeconds(10)));
                Assert.True(first == refusal, "reading a FIFO blocked");
                Assert.Contains("not a regular file (a FIFO)", (await refusal).Message);
            }
            finally
            {
                File.Delete(path);
            }
        }

        [System.Runtime.InteropServices.DllImport("libc", SetLastError = true)]
        private static extern int mkfifo(string path, int mode);

    }
}
