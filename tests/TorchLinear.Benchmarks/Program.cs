// Benchmarks of TorchLinear against TorchSharp's built-ins. Run all of them (Release, about 20 minutes):
//   dotnet run -c Release --project tests/TorchLinear.Benchmarks -- --filter '*'
// or one class:  ... -- --filter '*LinearBenchmarks*'
using System.Linq;
using BenchmarkDotNet.Columns;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Jobs;
using BenchmarkDotNet.Reports;
using BenchmarkDotNet.Running;
using TorchLinear.Benchmarks;

var config = DefaultConfig.Instance
    // One process per case, 3 warm-up and 10 measured iterations: enough for stable medians of the ratios.
    .AddJob(Job.Default.WithLaunchCount(1).WithWarmupCount(3).WithIterationCount(10))
    .AddColumn(StatisticColumn.Median, new GflopsColumn())
    .WithSummaryStyle(SummaryStyle.Default.WithRatioStyle(RatioStyle.Value));
BenchmarkSwitcher.FromAssembly(typeof(LinearBenchmarks).Assembly).Run(args, config);
