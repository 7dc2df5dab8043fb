using System.Collections.Generic;
using System.Collections.Immutable;
using System.Linq;
using BenchmarkDotNet.Attributes;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Order;
using BenchmarkDotNet.Running;
using static TorchSharp.torch;

namespace TorchLinear.Benchmarks
{
    /// <summary>
    /// Rounds make ratios trustworthy on a shared machine. BenchmarkDotNet measures one case after another, so two
    /// contenders measured a minute apart see different neighbours, and their ratio measures the neighbours. Here every
    /// case is measured once per round, a round runs every case of a class once, and each ratio is taken within a round
    /// (between cases measured seconds apart); <see cref="RatioTableExporter"/> reports the median ratio over the rounds
    /// with its range.
    /// </summary>
    public abstract class RoundsBenchmark
    {
        /// <summary>How many rounds a run makes; <c>--rounds N</c> on the command line sets it (default 5).</summary>
        public static int Count { get; set; } = 5;

        /// <summary>The values of <see cref="Round"/>: 1 to <see cref="Count"/>.</summary>
        public static IEnumerable<int> AllRounds => Enumerable.Range(1, Count);

        /// <summary>Which round this case belongs to; it changes nothing in the case itself.</summary>
        [ParamsSource(nameof(AllRounds))]
        public int Round { get; set; }

        /// <summary>The round of a benchmark case, 0 for a case without one.</summary>
        public static int RoundOf(BenchmarkCase benchmarkCase) =>
            benchmarkCase.Parameters.Items.FirstOrDefault(p => p.Name == nameof(Round))?.Value is int round ? round : 0;
    }

    /// <summary>
    /// A <see cref="RoundsBenchmark"/> measured on one and on two of libtorch's threads. A class calls
    /// <see cref="UseThreads"/> first in its global setup and <see cref="RestoreThreads"/> last in its cleanup.
    /// </summary>
    public abstract class ThreadsBenchmark : RoundsBenchmark
    {
        private int _threadsBefore;

        [Params(1, 2)]
        public int Threads { get; set; }

        protected void UseThreads()
        {
            _threadsBefore = get_num_threads();
            set_num_threads(Threads);
        }

        protected void RestoreThreads() => set_num_threads(_threadsBefore);
    }

    /// <summary>
    /// Runs round 1 of every case, then round 2, and so on. Within a round the cases of one group (category and
    /// parameters) stay back to back, in BenchmarkDotNet's order rotated by one place per round: round 1 starts with
    /// the first contender, round 2 with the second..., so no contender is always measured first (five rounds of five
    /// contenders put each in each place once).
    /// </summary>
    public sealed class RoundsFirstOrderer : DefaultOrderer
    {
        public override IEnumerable<BenchmarkCase> GetExecutionOrder(
            ImmutableArray<BenchmarkCase> benchmarkCases, IEnumerable<BenchmarkLogicalGroupRule>? order = null)
        {
            var result = new List<BenchmarkCase>(benchmarkCases.Length);
            foreach (var round in base.GetExecutionOrder(benchmarkCases, order).GroupBy(RoundsBenchmark.RoundOf).OrderBy(g => g.Key))
            {
                var cases = round.ToList();
                for (int start = 0; start < cases.Count;)
                {
                    int end = start;
                    while (end < cases.Count && GroupOf(cases[end]) == GroupOf(cases[start]))
                        end++;
                    int length = end - start, shift = (round.Key - 1) % length;
                    for (int i = 0; i < length; i++)
                        result.Add(cases[start + (i + shift) % length]);
                    start = end;
                }
            }
            return result;
        }

        /// <summary>The category and the parameters other than the round: the cases whose times are compared.</summary>
        public static string GroupOf(BenchmarkCase benchmarkCase) =>
            string.Join(", ", benchmarkCase.Descriptor.Categories.Concat(benchmarkCase.Parameters.Items
                .Where(p => p.Name != nameof(RoundsBenchmark.Round))
                .Select(p => $"{p.Name}={p.Value}")));
    }
}
