using System.Collections.Generic;
using System.Collections.Immutable;
using System.Linq;
using BenchmarkDotNet.Running;
using TorchLinear.Benchmarks;
using Xunit;

namespace TorchLinear.IntegrationTests.Benchmarks
{
    /// <summary>
    /// The benchmark ratios in docs/benchmarks.md are medians over interleaved rounds; these tests hold the two pieces that make
    /// them so: the execution order, and the arithmetic of the ratio table.
    /// </summary>
    public class RoundsTests
    {
        [Fact]
        public void ExecutionOrder_RunsEveryCaseOncePerRound_RoundAfterRound_WithEachGroupsContendersBackToBack_InRotatingOrder()
        {
            var runInfo = BenchmarkConverter.TypeToBenchmarks(typeof(LoraBenchmarks), BenchmarkConfig.Create());
            var cases = runInfo.BenchmarksCases;
            var order = runInfo.Config.Orderer.GetExecutionOrder(ImmutableArray.Create(cases)).ToList();

            Assert.Equal(cases.Length, order.Count);
            Assert.Equal(cases.Length, order.Distinct().Count());
            var rounds = order.Select(RoundsBenchmark.RoundOf).ToList();
            Assert.Equal(Enumerable.Range(1, RoundsBenchmark.Count), rounds.Distinct());
            Assert.Equal(rounds.Order(), rounds);  // round 1 of everything, then round 2, ...

            // Per round: every contender of every group exactly once, and a group's contenders one after another,
            // so that a ratio compares cases measured seconds apart.
            var firsts = new Dictionary<string, HashSet<string>>();
            foreach (var round in order.GroupBy(RoundsBenchmark.RoundOf))
            {
                var inRound = round.ToList();
                Assert.Equal(cases.Length / RoundsBenchmark.Count, inRound.Count);
                Assert.Equal(inRound.Count, inRound.Select(c => (RoundsFirstOrderer.GroupOf(c), c.Descriptor.WorkloadMethod.Name)).Distinct().Count());
                var groups = inRound.Select(RoundsFirstOrderer.GroupOf).ToList();
                var runs = groups.Where((g, i) => i == 0 || groups[i - 1] != g).ToList();
                Assert.Equal(runs.Count, runs.Distinct().Count());
                foreach (var first in inRound.Where((c, i) => i == 0 || groups[i - 1] != groups[i]))
                {
                    string group = RoundsFirstOrderer.GroupOf(first);
                    if (!firsts.TryGetValue(group, out var names))
                        firsts[group] = names = new HashSet<string>();
                    names.Add(first.Descriptor.WorkloadMethod.Name);
                }
            }

            // Rotation: over the rounds, every contender of a group (four here, five rounds) is measured first once or more.
            int contenders = cases.Select(c => c.Descriptor.WorkloadMethod).Distinct().Count();
            Assert.True(RoundsBenchmark.Count >= contenders);
            Assert.All(firsts.Values, names => Assert.Equal(contenders, names.Count));
        }

        [Fact]
        public void RatiosByRound_DividesWithinEachRound_AndSkipsRoundsMissingEitherSide()
        {
            var baseline = new Dictionary<int, double> { [1] = 100, [2] = 200, [3] = 50 };
            var contender = new Dictionary<int, double> { [2] = 180, [1] = 110, [4] = 70 };

            var ratios = RatioTableExporter.RatiosByRound(baseline, contender);

            Assert.Equal(new[] { 1.1, 0.9 }, ratios.Select(r => System.Math.Round(r, 12)));
        }

        [Theory]
        [InlineData(new double[] { 3, 1, 2 }, 2)]
        [InlineData(new double[] { 4, 1, 3, 2 }, 2.5)]
        [InlineData(new double[] { 7, double.NaN }, 7)]
        public void Median_OfTheNumbers(double[] values, double expected) =>
            Assert.Equal(expected, RatioTableExporter.Median(values));

        [Fact]
        public void Median_OfNothing_IsNaN() =>
            Assert.True(double.IsNaN(RatioTableExporter.Median(new[] { double.NaN })));
    }
}
