// Benchmarks of TorchLinear against TorchSharp's built-ins. Run all of them (Release; see docs/benchmarks.md for the time it takes):
//   dotnet run -c Release --project tests/TorchLinear.Benchmarks -- --filter '*'
// or one class, with fewer rounds:  ... -- --filter '*LoraBenchmarks*' --rounds 3
using System;
using System.Collections.Generic;
using BenchmarkDotNet.Running;
using TorchLinear.Benchmarks;

var benchmarkArgs = new List<string>(args);
int roundsAt = benchmarkArgs.IndexOf("--rounds");
if (roundsAt >= 0)
{
    if (roundsAt + 1 >= benchmarkArgs.Count || !int.TryParse(benchmarkArgs[roundsAt + 1], out int rounds) || rounds < 1)
    {
        Console.Error.WriteLine("--rounds needs a whole number of at least 1");
        return 2;
    }
    RoundsBenchmark.Count = rounds;
    benchmarkArgs.RemoveRange(roundsAt, 2);
}

BenchmarkSwitcher.FromAssembly(typeof(LinearBenchmarks).Assembly).Run(benchmarkArgs.ToArray(), BenchmarkConfig.Create());
return 0;
