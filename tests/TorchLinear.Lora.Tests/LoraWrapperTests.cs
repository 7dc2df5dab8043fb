using System.Linq;
using TorchLinear.Tests;
using TorchSharp;
using TorchSharp.Modules;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Lora.Tests
{
    /// <summary>The Linear that a field typed nn.Module&lt;Tensor, Tensor&gt; gets instead: nn.Linear's bits, the base keys, and .to(...) passed on.</summary>
    public class LoraWrapperTests
    {
        /// <summary>One projection in a field typed for any module, invoked with forward(x).</summary>
        private sealed class Holder : nn.Module<Tensor, Tensor>
        {
            private readonly nn.Module<Tensor, Tensor> proj;

            public Holder(Linear linear) : base(nameof(Holder))
            {
                proj = linear;
                RegisterComponents();
            }

            public nn.Module<Tensor, Tensor> Proj => proj;

            public override Tensor forward(Tensor x) => proj.forward(x);
        }

        [Fact]
        public void AFreshAdapter_GivesNnLinearsBits_ForEveryRank_UnderTheBaseKeys()
        {
            using var scope = NewDisposeScope();
            manual_seed(10);
            var linear = nn.Linear(12, 5);
            using var reference = nn.Linear(linear.weight.detach().clone().AsParameter(), linear.bias!.detach().clone().AsParameter());
            using var model = new Holder(linear);
            LoraModel.Inject(model, new LoraConfig { r = 3, target_modules = new[] { "proj" } });
            var wrapper = Assert.IsType<LoraWrapper>(model.Proj);
            Assert.Equal(new[] { "proj.weight", "proj.bias", "proj.lora_A.default.weight", "proj.lora_B.default.weight" }, model.state_dict().Keys);
            foreach (var shape in new[] { new long[] { 12 }, new long[] { 7, 12 }, new long[] { 2, 3, 12 } })
            {
                var x = randn(shape);
                Assert.True(Equivalence.Compare(reference.forward(x), wrapper.forward(x)).BitExact, string.Join("x", shape));
            }
            Assert.Same(linear.weight, wrapper.weight);
        }

        [Fact]
        public void To_ConvertsTheBaseLayerAndTheAdapterAlike()
        {
            using var scope = NewDisposeScope();
            manual_seed(11);
            var linear = nn.Linear(6, 4);
            using var model = new Holder(linear);
            LoraModel.Inject(model, new LoraConfig { r = 2, target_modules = new[] { "proj" }, init_lora_weights = "false" });
            model.to(ScalarType.Float64);
            Assert.All(model.parameters(), p => Assert.Equal(ScalarType.Float64, p.dtype));
            var wrapper = (LoraWrapper)model.Proj;
            Assert.Same(wrapper.weight, wrapper.base_layer.weight);
            var x = randn(new long[] { 3, 6 }, dtype: ScalarType.Float64);
            var state = model.state_dict();
            var expected = LinearFunctional.linear(x, state["proj.weight"], state["proj.bias"]) + x.matmul(state["proj.lora_A.default.weight"].t()).matmul(state["proj.lora_B.default.weight"].t()) * (8.0 / 2);
            Equivalence.AssertClose(model.forward(x), expected);
            LoraModel.unload(model);
            Assert.Same(linear, model.Proj);
            Assert.Equal(ScalarType.Float64, linear.weight.dtype);
        }
    }
}
