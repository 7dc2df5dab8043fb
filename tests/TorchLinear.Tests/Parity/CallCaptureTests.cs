using System;
using System.Collections.Generic;
using System.Linq;
using TorchSharp;
using TorchSharp.Modules;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Tests
{
    /// <summary>
    /// CallCapture on modules of several tensor inputs and outputs: every call under its path, tensors flattened from
    /// tuples, arrays, lists and dictionaries in order, inputs copied before an in-place module changes them, every copy freed.
    /// </summary>
    public class CallCaptureTests
    {
        /// <summary>(x, y) → (x·w + y, [x, y]): two inputs, a tuple output holding a list.</summary>
        private sealed class Pair : nn.Module<Tensor, Tensor, (Tensor Sum, List<Tensor> Both)>
        {
            private readonly Parameter w = new(ones(3) * 2);

            public Pair() : base(nameof(Pair)) => RegisterComponents();

            public override (Tensor Sum, List<Tensor> Both) forward(Tensor x, Tensor y) => (x * w + y, new List<Tensor> { x, y });
        }

        /// <summary>A dictionary in, an array out.</summary>
        private sealed class Named : nn.Module<Dictionary<string, Tensor>, Tensor[]>
        {
            public Named() : base(nameof(Named)) { }

            public override Tensor[] forward(Dictionary<string, Tensor> inputs) => new[] { inputs["b"] - inputs["a"] };
        }

        /// <summary>The root: an in-place ReLU, the pair called twice, the dictionary module, and a ModuleList (not watchable).</summary>
        private sealed class Root : nn.Module<Tensor, Tensor>
        {
            private readonly ReLU act = nn.ReLU(inplace: true);
            private readonly Pair pair = new();
            private readonly Named named = new();
            private readonly ModuleList<nn.Module<Tensor, Tensor>> extras = nn.ModuleList<nn.Module<Tensor, Tensor>>(nn.Identity());

            public Root() : base(nameof(Root)) => RegisterComponents();

            public override Tensor forward(Tensor x)
            {
                var (sum, _) = pair.call(x, x);
                var (again, _) = pair.call(sum, x);
                var difference = named.call(new Dictionary<string, Tensor> { ["a"] = x, ["b"] = again })[0];
                return act.call(difference);
            }
        }

        [Fact]
        public void EveryCall_IsCaptured_WithItsTensorsFlattenedInOrder_UnderItsPathAndRepetition()
        {
            using var root = new Root();
            using var x = tensor(new float[] { -1, 2, -3 });
            using var capture = new CallCapture(root);
            using var output = root.call(x);
            Assert.Equal(new[] { "pair", "pair#1", "named", "act", "" }, capture.Calls.Select(c => c.Key));
            Assert.Equal(new[] { "", "pair", "pair#1", "named", "act" }, capture.StartOrder);
            Assert.Equal(new[] { "pair", "pair", "named", "act", "" }, capture.Calls.Select(c => c.Path));
            Assert.Equal(new[] { 0, 1, 0, 0, 0 }, capture.Calls.Select(c => c.Index));
            Assert.Equal(new[] { "Pair", "Pair", "Named", "ReLU", "Root" }, capture.Calls.Select(c => c.ModuleType));
            Assert.Equal(new[] { "extras" }, capture.Unwatched);

            var second = capture.Calls[1];
            // Inputs (sum, x); outputs (sum·2 + x, [sum, x]): 2 and 3 tensors, in order.
            Assert.Equal(new[] { new float[] { -3, 6, -9 }, new float[] { -1, 2, -3 } }, second.Inputs.Select(t => t.data<float>().ToArray()));
            Assert.Equal(new[] { new float[] { -7, 14, -21 }, new float[] { -3, 6, -9 }, new float[] { -1, 2, -3 } }, second.Outputs.Select(t => t.data<float>().ToArray()));
            // The dictionary's values in order, the array's item.
            Assert.Equal(new[] { new float[] { -1, 2, -3 }, new float[] { -7, 14, -21 } }, capture.Calls[2].Inputs.Select(t => t.data<float>().ToArray()));
            Assert.Single(capture.Calls[2].Outputs);
            // The in-place ReLU: its input was copied before it ran (negatives kept); its output is the clamped tensor.
            var act = capture.Calls[3];
            Assert.Equal(new float[] { -6, 12, -18 }, act.Inputs[0].data<float>().ToArray());
            Assert.Equal(new float[] { 0, 12, 0 }, act.Outputs[0].data<float>().ToArray());
            // Copies, not the module's own tensors.
            Assert.NotEqual(output.Handle, capture.Calls[4].Outputs[0].Handle);
            Assert.All(capture.Calls, c => Assert.True(c.Finished));
        }

        [Fact]
        public void ClearAndDispose_FreeEveryCopy_AndStopRemovesTheHooks()
        {
            using var root = new Root();
            using var x = tensor(new float[] { -1, 2, -3 });
            void Run()
            {
                using var scope = NewDisposeScope();  // the forward's own temporaries
                root.call(x);
            }
            Run();
            long before = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
            var capture = new CallCapture(root);
            Run();
            Assert.Equal(5, capture.Calls.Count);
            Assert.Equal(before + 17, DisposeScopeManager.Statistics.ThreadTotalLiveCount);  // 8 inputs and 9 outputs copied, outside the scope
            capture.Clear();
            Assert.Empty(capture.Calls);
            Assert.Empty(capture.StartOrder);
            Assert.Equal(before, DisposeScopeManager.Statistics.ThreadTotalLiveCount);
            Run();
            Assert.Equal("pair", capture.Calls[0].Key);  // the count starts again after Clear
            capture.Stop();
            Run();
            Assert.Equal(5, capture.Calls.Count);
            capture.Dispose();
            Assert.Equal(before, DisposeScopeManager.Statistics.ThreadTotalLiveCount);
        }

        [Fact]
        public void Flatten_TakesTensorsFromTuplesArraysListsAndDictionaries_DepthFirst_AndSkipsTheRest()
        {
            using var a = tensor(1f);
            using var b = tensor(2f);
            using var c = tensor(3f);
            object value = (a, 7, "text", new object?[] { null, new List<Tensor> { b }, new Dictionary<string, object> { ["k"] = Tuple.Create(c, 1.5) } });
            var tensors = CallCapture.Flatten(value);
            Assert.Equal(new[] { a.Handle, b.Handle, c.Handle }, tensors.Select(t => t.Handle));
            Assert.Empty(CallCapture.Flatten(null));
            Assert.Empty(CallCapture.Flatten(42));
        }
    }
}
