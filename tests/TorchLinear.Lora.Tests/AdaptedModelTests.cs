using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using TorchSharp;
using TorchSharp.Modules;
using Xunit;
using static TorchLinear.Lora.Tests.Ports;
using static TorchSharp.torch;

namespace TorchLinear.Lora.Tests
{
    /// <summary>
    /// The check that every active adapter ran in a model call: where an adapter cannot run (a sealed Linear invoked with
    /// forward(x)), no wrong number leaves the model; the opt-out, the explicit check, and threads.
    /// </summary>
    public class AdaptedModelTests
    {
        private static string AttentionAdapter => Path.Combine(Folder, "attention");

        private static readonly string[] AttentionPaths =
        {
            "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj",
            "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.self_attn.o_proj",
        };

        [Fact]
        public void SealedLinearFieldsInvokedWithForward_AreRefusedAtTheFirstCall_NamingEveryLayer()
        {
            // Guards: the old sample returned the adapted paths and then computed the base model's output, silently.
            using var scope = NewDisposeScope();
            var cases = Cases("attention");
            using var model = Pretrained("attention", PortStyle.LinearForward);
            LoraModel.load_adapter(model, AttentionAdapter);

            var error = Assert.Throws<InvalidOperationException>(() => Run(model, cases["input"]));

            Assert.Contains("LoRA adapters did not run in this call of Classifier", error.Message);
            foreach (string path in AttentionPaths)
                Assert.Contains(path, error.Message);
            Assert.Contains("call(x)", error.Message);
            Assert.Contains("merge: true", error.Message);
            Assert.Contains("nn.Module<Tensor, Tensor>", error.Message);
            Assert.Contains("AllowUnusedAdapters", error.Message);
            // The next call says it again: no call gives a wrong number.
            Assert.Throws<InvalidOperationException>(() => Run(model, cases["input"]));
        }

        [Fact]
        public void SealedLinearFieldsInvokedWithForward_RunAMergedAdapter()
        {
            using var scope = NewDisposeScope();
            var cases = Cases("attention");
            using var model = Pretrained("attention", PortStyle.LinearForward);
            LoraModel.load_adapter(model, AttentionAdapter, merge: true);
            // PEFT's merge_adapter() of the same folder.
            Equivalence.AssertClose(Run(model, cases["input"]), cases["merged_output"]);
            // disable_adapters unmerges inside (guards: the old sample kept the adapted output).
            using (LoraModel.disable_adapter(model))
                Equivalence.AssertClose(Run(model, cases["input"]), cases["disabled_output"]);
            Equivalence.AssertClose(Run(model, cases["input"]), cases["merged_output"]);
        }

        [Fact]
        public void TrainingAPortWhoseAdaptersCannotRun_FailsWithTheNamedError_NotABareLibtorchOne()
        {
            using var scope = NewDisposeScope();
            var cases = Cases("attention");
            using var model = Pretrained("attention", PortStyle.LinearForward);
            LoraModel.Inject(model, new LoraConfig { r = 2, target_modules = new[] { "q_proj" } });
            model.train();
            var error = Assert.Throws<InvalidOperationException>(() => model.call(cases["input"]).square().mean().backward());
            Assert.Contains("model.layers.0.self_attn.q_proj", error.Message);
            Assert.DoesNotContain("does not require grad", error.Message);
        }

        /// <summary>A model whose forward uses one of two heads, as told: the other head's layers legitimately do not run.</summary>
        private sealed class TwoHeads : nn.Module<Tensor, Tensor>
        {
            private readonly Linear body = nn.Linear(8, 8), left = nn.Linear(8, 2), right = nn.Linear(8, 2);

            public TwoHeads() : base(nameof(TwoHeads)) => RegisterComponents();

            public bool UseLeft { get; set; } = true;

            public override Tensor forward(Tensor x)
            {
                using var h = body.call(x);
                return UseLeft ? left.call(h) : right.call(h);
            }
        }

        [Fact]
        public void AForwardThatSkipsLayers_IsRefusedUntilItSaysWhichMayBeSkipped()
        {
            using var scope = NewDisposeScope();
            manual_seed(4);
            using var model = new TwoHeads();
            LoraModel.Inject(model, new LoraConfig { r = 2, TargetModulesRegex = "all-linear" });
            var x = randn(3, 8);
            Assert.Contains("right", Assert.Throws<InvalidOperationException>(() => model.call(x)).Message);
            Assert.Contains("nowhere is not an adapted layer of this model", Assert.Throws<ArgumentException>(() => LoraModel.AllowUnusedAdapters(model, "nowhere")).Message);

            LoraModel.AllowUnusedAdapters(model, "right");
            model.call(x);
            model.UseLeft = false;
            Assert.Contains("left", Assert.Throws<InvalidOperationException>(() => model.call(x)).Message);
            LoraModel.AllowUnusedAdapters(model);
            model.call(x);
        }

        [Fact]
        public void APortInvokedWithForward_IsCheckedExplicitly()
        {
            using var scope = NewDisposeScope();
            var cases = Cases("attention");
            using var bad = Pretrained("attention", PortStyle.LinearForward);
            LoraModel.load_adapter(bad, AttentionAdapter);
            // model.forward(x) runs no hooks, the model's own check among them: the explicit check runs one forward.
            var error = Assert.Throws<InvalidOperationException>(() => LoraModel.CheckAdaptersRun(bad, cases["input"]));
            Assert.Contains("model.layers.1.self_attn.o_proj", error.Message);

            using var good = Pretrained("attention", PortStyle.CustomForward);
            LoraModel.load_adapter(good, AttentionAdapter);
            LoraModel.CheckAdaptersRun(good, cases["input"]);
            LoraModel.CheckAdaptersRun(good, () => good.forward(cases["input"]));
            Assert.Throws<InvalidOperationException>(() => LoraModel.CheckAdaptersRun(bad, () => bad.forward(cases["input"])));
        }

        [Fact]
        public void TheRunCheck_IsOneModelCallPerThread()
        {
            using var scope = NewDisposeScope();
            var cases = Cases("attention");
            using var model = Pretrained("attention", PortStyle.LinearCall);
            LoraModel.load_adapter(model, AttentionAdapter);
            var input = cases["input"];
            var expected = cases["adapted_output"];
            // Four threads calling the one model at once: each call is checked on its own thread, none is refused.
            var errors = new List<Exception>();
            var threads = Enumerable.Range(0, 4).Select(_ => new System.Threading.Thread(() =>
            {
                try
                {
                    for (int i = 0; i < 20; i++)
                    {
                        using var s = NewDisposeScope();
                        Equivalence.AssertClose(Run(model, input), expected);
                    }
                }
                catch (Exception error)
                {
                    lock (errors)
                        errors.Add(error);
                }
            })).ToList();
            threads.ForEach(t => t.Start());
            threads.ForEach(t => t.Join());
            Assert.Empty(errors);
        }

        /// <summary>A forward that throws half way: the call's bookkeeping must not outlive it.</summary>
        private sealed class Fragile : nn.Module<Tensor, Tensor>
        {
            private readonly Linear first = nn.Linear(4, 4), second = nn.Linear(4, 4);

            public Fragile() : base(nameof(Fragile)) => RegisterComponents();

            public bool Throw { get; set; }

            public override Tensor forward(Tensor x)
            {
                using var h = first.call(x);
                if (Throw)
                    throw new InvalidTimeZoneException("planted");
                return second.call(h);
            }
        }

        [Fact]
        public void ACallThatThrows_LeavesNothingBehindForTheNext()
        {
            using var scope = NewDisposeScope();
            using var model = new Fragile();
            LoraModel.Inject(model, new LoraConfig { r = 2, target_modules = new[] { "first", "second" } });
            var x = randn(2, 4);
            model.Throw = true;
            Assert.Throws<InvalidTimeZoneException>(() => model.call(x));
            model.Throw = false;
            model.call(x);
            model.call(x);
        }
    }
}
