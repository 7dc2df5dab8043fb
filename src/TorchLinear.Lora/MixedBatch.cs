using System;
using System.Collections.Generic;
using System.Linq;
using System.Reflection;
using System.Threading;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Lora
{
    /// <summary>
    /// The rows of one <see cref="LoraModel.MixedBatch"/> scope, grouped by adapter: the groups in the order their adapters
    /// first appear, each a contiguous range of <see cref="Order"/> (row indices, each group's rows in batch order).
    /// </summary>
    internal sealed class MixedBatch : IDisposable
    {
        private readonly long[] _order;
        private Tensor? _orderTensor;

        internal MixedBatch(IReadOnlyList<string> rows)
        {
            Rows = rows.ToArray();
            var groupOf = new Dictionary<string, int>(StringComparer.Ordinal);
            var names = new List<string>();
            var counts = new List<long>();
            GroupOf = new int[Rows.Length];
            for (int row = 0; row < Rows.Length; row++)
            {
                if (!groupOf.TryGetValue(Rows[row], out int group))
                {
                    group = names.Count;
                    groupOf[Rows[row]] = group;
                    names.Add(Rows[row]);
                    counts.Add(0);
                }
                GroupOf[row] = group;
                counts[group]++;
            }
            Names = names;
            Counts = counts.ToArray();
            Starts = new long[Counts.Length];
            for (int group = 1; group < Counts.Length; group++)
                Starts[group] = Starts[group - 1] + Counts[group - 1];
            // Each group's rows in batch order, the groups one after the other.
            _order = new long[Rows.Length];
            var next = (long[])Starts.Clone();
            for (int row = 0; row < Rows.Length; row++)
                _order[next[GroupOf[row]]++] = row;
        }

        /// <summary>The adapter name (or <c>"__base__"</c>) of each row.</summary>
        internal string[] Rows { get; }

        /// <summary>The groups' names (adapters, or <c>"__base__"</c>), in the order they first appear among the rows.</summary>
        internal IReadOnlyList<string> Names { get; }

        /// <summary>The group of each row.</summary>
        internal int[] GroupOf { get; }

        /// <summary>Where each group's rows start in <see cref="Order"/>.</summary>
        internal long[] Starts { get; }

        /// <summary>How many rows each group has.</summary>
        internal long[] Counts { get; }

        /// <summary>The row indices grouped by adapter, on <paramref name="device"/> (kept for the scope on the CPU; the caller's scope owns a copy elsewhere).</summary>
        internal Tensor Order(Device device)
        {
            if (_orderTensor is null)
            {
                _orderTensor = tensor(_order);
                _orderTensor.DetachFromDisposeScope();
            }
            return device.type == DeviceType.CPU ? _orderTensor : _orderTensor.to(device);
        }

        public void Dispose()
        {
            _orderTensor?.Dispose();
            _orderTensor = null;
        }
    }
}
