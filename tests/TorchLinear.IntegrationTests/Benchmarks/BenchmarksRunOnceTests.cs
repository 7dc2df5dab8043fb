using System;
using System.Collections.Generic;
using System.Linq;
using System.Reflection;
using BenchmarkDotNet.Attributes;
using TorchLinear.Benchmarks;
using TorchSharp;
using Xunit;

namespace TorchLinear.IntegrationTests.Benchmarks
{
    /// <summary>
    /// CI does not run the benchmarks (they take about half an hour); this proves that every benchmark method, for every
    /// parameter combination, runs without error and leaves no tensor alive, so the project cannot rot.
    /// </summary>
    public class BenchmarksRunOnceTests
    {
        public static IEnumerable<object[]> BenchmarkClasses() =>
            typeof(LinearBenchmarks).Assembly.GetTypes()
                .Where(t => t.GetMethods().Any(m => m.GetCustomAttribute<BenchmarkAttribute>() is not null))
                .Select(t => new object[] { t.Name });

        [Theory]
        [MemberData(nameof(BenchmarkClasses))]
        public void EveryBenchmark_Runs_ForEveryParameterCombination_AndLeaksNothing(string className)
        {
            Type type = typeof(LinearBenchmarks).Assembly.GetTypes().Single(t => t.Name == className);
            var methods = type.GetMethods().Where(m => m.GetCustomAttribute<BenchmarkAttribute>() is not null).ToList();
            Assert.NotEmpty(methods);
            int threadsBefore = torch.get_num_threads();
            int runs = 0;

            foreach (var assignment in Combinations(type))
            {
                object instance = Activator.CreateInstance(type)!;
                foreach (var (property, value) in assignment)
                    property.SetValue(instance, value);
                Invoke<GlobalSetupAttribute>(type, instance);
                try
                {
                    foreach (var method in methods)
                    {
                        method.Invoke(instance, null);  // the first call may make state a layer keeps (CustomLinear's Wᵀ)
                        long live = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
                        method.Invoke(instance, null);
                        Assert.True(live == DisposeScopeManager.Statistics.ThreadTotalLiveCount,
                            $"{type.Name}.{method.Name} ({string.Join(", ", assignment.Select(a => $"{a.Property.Name}={a.Value}"))}) left tensors alive");
                        runs++;
                    }
                }
                finally
                {
                    Invoke<GlobalCleanupAttribute>(type, instance);
                }
            }

            Assert.Equal(threadsBefore, torch.get_num_threads());
            Assert.True(runs >= methods.Count);
        }

        /// <summary>
        /// Every combination of the values in the class's [Params] attributes. The [ParamsSource] Round is left out on
        /// purpose: it only repeats a case later (Rounds.cs), and changes nothing a single call does.
        /// </summary>
        private static IEnumerable<List<(PropertyInfo Property, object Value)>> Combinations(Type type)
        {
            var parameters = type.GetProperties()
                .Select(p => (Property: p, Values: p.GetCustomAttribute<ParamsAttribute>()?.Values))
                .Where(p => p.Values is not null)
                .ToList();
            IEnumerable<List<(PropertyInfo, object)>> result = new[] { new List<(PropertyInfo, object)>() };
            foreach (var (property, values) in parameters)
                result = result.SelectMany(partial => values!.Select(v => new List<(PropertyInfo, object)>(partial) { (property, v!) }));
            return result;
        }

        private static void Invoke<TAttribute>(Type type, object instance) where TAttribute : Attribute
        {
            foreach (var method in type.GetMethods().Where(m => m.GetCustomAttribute<TAttribute>() is not null))
                method.Invoke(instance, null);
        }
    }
}
