using System.Globalization;
using System.Linq;
using BenchmarkDotNet.Columns;
using BenchmarkDotNet.Reports;
using BenchmarkDotNet.Running;

namespace TorchLinear.Benchmarks
{
    /// <summary>Floating-point throughput from each case's median time: the product's FLOPs divided by the time.</summary>
    public sealed class GflopsColumn : IColumn
    {
        public string Id => nameof(GflopsColumn);
        public string ColumnName => "GFLOP/s";
        public bool AlwaysShow => true;
        public ColumnCategory Category => ColumnCategory.Custom;
        public int PriorityInCategory => 0;
        public bool IsNumeric => true;
        public UnitType UnitType => UnitType.Dimensionless;
        public string Legend => "Billions of floating-point operations per second, from the median time (2·rows·in·out per product; training ×2: forward and weight gradient)";

        public bool IsDefault(Summary summary, BenchmarkCase benchmarkCase) => false;

        public bool IsAvailable(Summary summary) => true;

        public string GetValue(Summary summary, BenchmarkCase benchmarkCase) => GetValue(summary, benchmarkCase, SummaryStyle.Default);

        public string GetValue(Summary summary, BenchmarkCase benchmarkCase, SummaryStyle style)
        {
            double? flops = Flops(benchmarkCase);
            var median = summary[benchmarkCase]?.ResultStatistics?.Median;
            if (flops is null || median is null or 0)
                return "-";
            return (flops.Value / median.Value).ToString("F1", CultureInfo.InvariantCulture);  // FLOP per ns = GFLOP/s
        }

        /// <summary>The FLOPs of one call of the case, or null for a case without a known count.</summary>
        public static double? Flops(BenchmarkCase benchmarkCase)
        {
            if (benchmarkCase.Descriptor.Type == typeof(PeakBenchmarks))
                return 2.0 * PeakBenchmarks.Size * PeakBenchmarks.Size * PeakBenchmarks.Size;
            if (benchmarkCase.Descriptor.WorkloadMethod.Name == nameof(LoraBenchmarks.AdapterAlone))
                return null;  // a part of a layer: the layer's count would mislead
            var shape = benchmarkCase.Parameters.Items.FirstOrDefault(p => p.Name == "Shape")?.Value;
            if (shape is not Shape s)
                return null;
            bool training = benchmarkCase.Descriptor.Categories.Contains("Training");
            return Shapes.Flops(s, training);
        }

        public override string ToString() => ColumnName;
    }
}
