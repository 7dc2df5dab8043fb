// Benchmarks of TorchLinear against TorchSharp's built-ins. Run all of them (Release; about 15 minutes on 2 cores):
//   dotnet run -c Release --project tests/TorchLinear.Benchmarks -- --filter '*'
// or one class:  ... -- --filter '*LinearBenchmarks*'
using System.Linq;
using BenchmarkDotNet.Columns;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Jobs;
using BenchmarkDotNet.Reports;
using BenchmarkDotNet.Running;
using BenchmarkDotNet.Toolchains.InProcess.Emit;
using TorchLinear.Benchmarks;

var config = DefaultConfig.Instance
    // In process: BenchmarkDotNet's generated per-case projects skip this repository's Directory.Build.targets, and
    // with it the build step that makes libLibTorchSharp.so loadable on Debian 12 / Ubuntu 22.04; this process has it.
    // 3 warm-up and 10 measured iterations per case: enough for stable medians of the ratios.
    .AddJob(Job.Default.WithToolchain(InProcessEmitToolchain.Instance).WithWarmupCount(3).WithIterationCount(10))
    .AddColumn(StatisticColumn.Median, new GflopsColumn())
    .WithSummaryStyle(SummaryStyle.Default.WithRatioStyle(RatioStyle.Value));
BenchmarkSwitcher.FromAssembly(typeof(LinearBenchmarks).Assembly).Run(args, config);
