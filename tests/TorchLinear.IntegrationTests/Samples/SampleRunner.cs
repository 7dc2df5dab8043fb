using System;
using System.Diagnostics;
using System.IO;
using Xunit;

namespace TorchLinear.IntegrationTests.Samples
{
    /// <summary>Runs a sample program, built next to the tests, as its own process and returns what it printed.</summary>
    internal static class SampleRunner
    {
        public static (string Output, TimeSpan Elapsed) Run(string assemblyName, TimeSpan limit)
        {
            string dll = Path.Combine(AppContext.BaseDirectory, assemblyName + ".dll");
            Assert.True(File.Exists(dll), $"the sample should be built next to the tests: {dll}");
            var start = new ProcessStartInfo(Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") ?? "dotnet")
            {
                RedirectStandardOutput = true,
                RedirectStandardError = true,
                WorkingDirectory = AppContext.BaseDirectory,
            };
            start.ArgumentList.Add(dll);
            var clock = Stopwatch.StartNew();
            using var process = Process.Start(start)!;
            var stderr = process.StandardError.ReadToEndAsync();
            string stdout = process.StandardOutput.ReadToEnd();
            Assert.True(process.WaitForExit((int)limit.TotalMilliseconds), $"{assemblyName} did not finish within {limit.TotalSeconds} s");
            Assert.True(process.ExitCode == 0, $"{assemblyName} exited with {process.ExitCode}:{Environment.NewLine}{stdout}{stderr.Result}");
            return (stdout, clock.Elapsed);
        }
    }
}
