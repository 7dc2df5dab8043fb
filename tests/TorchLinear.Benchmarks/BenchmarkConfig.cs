using BenchmarkDotNet.Columns;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Jobs;
using BenchmarkDotNet.Reports;
using BenchmarkDotNet.Toolchains.InProcess.Emit;
using Perfolizer.Horology;

namespace TorchLinear.Benchmarks
{
    /// <summary>How every benchmark here is run; Program uses it, and the tests check its order of execution.</summary>
    public static class BenchmarkConfig
    {
        public static IConfig Create() => DefaultConfig.Instance
            // In process: BenchmarkDotNet's generated per-case projects skip this repository's Directory.Build.targets,
            // and with it the build step that makes libLibTorchSharp.so loadable on Debian 12 / Ubuntu 22.04.
            // Short cases (2 warm-up and 5 measured iterations of 250 ms), repeated in interleaved rounds (Rounds.cs):
            // on a shared machine, measuring a case again later says more about the noise than measuring it longer.
            .AddJob(Job.Default.WithToolchain(InProcessEmitToolchain.Instance)
                .WithWarmupCount(2).WithIterationCount(5).WithIterationTime(TimeInterval.FromMilliseconds(250)))
            .WithOrderer(new RoundsFirstOrderer())
            .AddColumn(StatisticColumn.Median, new GflopsColumn())
            .AddExporter(new RatioTableExporter())
            .WithSummaryStyle(SummaryStyle.Default.WithRatioStyle(RatioStyle.Value));
    }
}
