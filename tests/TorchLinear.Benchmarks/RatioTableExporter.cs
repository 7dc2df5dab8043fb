using System;
using System.Collections.Generic;
using System.Globalization;
using System.Linq;
using BenchmarkDotNet.Exporters;
using BenchmarkDotNet.Loggers;
using BenchmarkDotNet.Reports;
using BenchmarkDotNet.Running;

namespace TorchLinear.Benchmarks
{
    /// <summary>
    /// Writes <c>*-ratios.md</c> next to BenchmarkDotNet's own reports: for every group (category and parameters, rounds
    /// aside) each contender's ratio to the group's baseline, taken within each round, as "median (min–max)" over the
    /// rounds; then each contender's median time, GFLOP/s and managed bytes allocated per call.
    /// </summary>
    public sealed class RatioTableExporter : ExporterBase
    {
        protected override string FileExtension => "md";

        protected override string FileCaption => "ratios";

        public override void ExportToLog(Summary summary, ILogger logger)
        {
            var groups = summary.BenchmarksCases
                .GroupBy(GroupKey)
                .Select(g => g.ToList())
                .ToList();
            int rounds = summary.BenchmarksCases.Select(RoundsBenchmark.RoundOf).Distinct().Count();

            logger.WriteLine($"Ratio to the baseline of each group, taken within each round: median (min–max) over {rounds} round(s).");
            logger.WriteLine();
            var baselineNames = summary.BenchmarksCases.Where(c => c.Descriptor.Baseline).Select(Contender).Distinct().ToList();
            var contenderNames = summary.BenchmarksCases.Where(c => !c.Descriptor.Baseline)
                .OrderBy(c => c.Descriptor.MethodIndex).Select(Contender).Distinct().ToList();
            if (baselineNames.Count > 0)
            {
                string baselineName = string.Join(" / ", baselineNames);
                logger.WriteLine($"| group | {baselineName} median | {string.Join(" | ", contenderNames.Select(n => $"{n} / {baselineName}"))} |");
                logger.WriteLine($"|---|---:|{string.Concat(contenderNames.Select(_ => "---:|"))}");
            }
            foreach (var group in groups)
            {
                var baseline = group.Where(c => c.Descriptor.Baseline).ToList();
                if (baseline.Count == 0)
                    continue;
                var baselineTimes = TimesByRound(summary, baseline);
                var ratios = contenderNames.Select(name =>
                    Spread(RatiosByRound(baselineTimes, TimesByRound(summary, group.Where(c => !c.Descriptor.Baseline && Contender(c) == name)))));
                logger.WriteLine($"| {GroupKey(group[0])} | {Time(Median(baselineTimes.Values))} | {string.Join(" | ", ratios)} |");
            }

            logger.WriteLine();
            logger.WriteLine("| group | contender | median time (median over rounds) | GFLOP/s | allocated per call |");
            logger.WriteLine("|---|---|---:|---:|---:|");
            foreach (var group in groups)
            foreach (var contender in Contenders(group))
            {
                var cases = group.Where(c => c.Descriptor == contender.Descriptor).ToList();
                double time = Median(TimesByRound(summary, cases).Values);
                double? flops = GflopsColumn.Flops(contender);
                // Median over rounds: a round's figure can include a few bytes the runtime allocated meanwhile.
                double bytes = Median(cases.Select(c => (double?)summary[c]?.GcStats.GetBytesAllocatedPerOperation(c) ?? double.NaN));
                logger.WriteLine($"| {GroupKey(contender)} | {Contender(contender)} | {Time(time)} | " +
                                 $"{(flops is null || double.IsNaN(time) ? "-" : (flops.Value / time).ToString("F1", CultureInfo.InvariantCulture))} | " +
                                 $"{(double.IsNaN(bytes) ? "-" : $"{bytes:F0} B")} |");
            }
        }

        /// <summary>Class, category and parameters, without the round.</summary>
        private static string GroupKey(BenchmarkCase benchmarkCase) =>
            string.Join(", ", new[] { benchmarkCase.Descriptor.Type.Name, RoundsFirstOrderer.GroupOf(benchmarkCase) }.Where(k => k.Length > 0));

        /// <summary>One case per contender of the group, in declared order.</summary>
        private static IEnumerable<BenchmarkCase> Contenders(List<BenchmarkCase> group) =>
            group.GroupBy(c => c.Descriptor).Select(g => g.First()).OrderBy(c => c.Descriptor.MethodIndex);

        private static string Contender(BenchmarkCase benchmarkCase) => benchmarkCase.Descriptor.WorkloadMethodDisplayInfo.Trim('\'');

        /// <summary>Each case's median time (ns) by its round; cases without a result are left out.</summary>
        private static Dictionary<int, double> TimesByRound(Summary summary, IEnumerable<BenchmarkCase> cases) =>
            cases.Select(c => (Round: RoundsBenchmark.RoundOf(c), Time: summary[c]?.ResultStatistics?.Median ?? double.NaN))
                .Where(t => !double.IsNaN(t.Time))
                .ToDictionary(t => t.Round, t => t.Time);

        /// <summary>contender ÷ baseline within each round that measured both, in round order.</summary>
        public static List<double> RatiosByRound(IReadOnlyDictionary<int, double> baseline, IReadOnlyDictionary<int, double> contender) =>
            contender.Keys.Where(baseline.ContainsKey).Order().Select(round => contender[round] / baseline[round]).ToList();

        /// <summary>The median of the values that are numbers (the mean of the middle two for an even count); NaN for none.</summary>
        public static double Median(IEnumerable<double> values)
        {
            var sorted = values.Where(v => !double.IsNaN(v)).Order().ToList();
            if (sorted.Count == 0)
                return double.NaN;
            int middle = sorted.Count / 2;
            return sorted.Count % 2 == 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
        }

        private static string Spread(List<double> ratios) =>
            ratios.Count == 0
                ? "-"
                : string.Create(CultureInfo.InvariantCulture, $"{Median(ratios):F2} ({ratios.Min():F2}–{ratios.Max():F2})");

        private static string Time(double nanoseconds) => nanoseconds switch
        {
            double.NaN => "-",
            < 1e3 => string.Create(CultureInfo.InvariantCulture, $"{nanoseconds:F1} ns"),
            < 1e6 => string.Create(CultureInfo.InvariantCulture, $"{nanoseconds / 1e3:F2} µs"),
            _ => string.Create(CultureInfo.InvariantCulture, $"{nanoseconds / 1e6:F2} ms"),
        };
    }
}
