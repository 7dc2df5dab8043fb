using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using TorchLinear.Samples.TrainingParity;
using TorchSharp;
using TorchSharp.Modules;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Tests
{
    /// <summary>
    /// Parity.ReplayTraining against the TrainingParity sample's recording: 20 steps of TinyGpt (minGPT's shape) trained
    /// by PyTorch 1.13 with AdamW over minGPT's two groups, a warm-up and clipping. The sample's port reproduces it; each
    /// mistake planted in its training code is named by step, phase, parameter and, where it is a setting, which one.
    /// The expected steps and names follow from the recording's metadata (printed by pytorch/record.py): the parameter
    /// order starts wte.weight (undecayed), and the first decayed parameter is h.0.attn.c_attn.weight; PyTorch clipped
    /// at step 0 (its recorded gradients have norm 1) and its learning rate doubled from step 0 to step 1 (warm-up 1/6,
    /// 2/6); cross_entropy's mean is over 2 × 6 tokens.
    /// </summary>
    public class TrainingParityTests
    {
        private static readonly string Recording = Path.Combine(AppContext.BaseDirectory, "pytorch", "tiny_gpt.training.pt");

        private static TrainingParityReport Replay(TrainingMistakes mistakes, TrainingParityOptions? options = null)
        {
            using var training = new TinyGptTraining(mistakes);
            return Parity.ReplayTraining(training.Model, Recording, training.Optimizer, training.Step, options);
        }

        [Fact]
        public void TheSamplesPort_ReproducesPyTorchsTraining_StepByStep()
        {
            // The port's own step, watched: each step's gradients and update, judged below against the recording by the
            // arithmetic of AdamW, independently of the replay's rule for gradient noise.
            using var training = new TinyGptTraining();
            using var recording = TrainingRecording.Load(Recording);
            var recorded = StateDicts.ReadPyTorchFile(Recording);
            var parameters = training.Model.named_parameters().ToList();
            var steps = new List<NoiseAudit>();
            Tensor Step(Tensor input, Tensor target)
            {
                using var scope = NewDisposeScope();
                var before = parameters.ToDictionary(p => p.name, p => p.parameter.detach().clone());
                Tensor loss = training.Step(input, target);
                steps.Add(AuditUpdates(recording, recorded, steps.Count, parameters, before));
                return loss.MoveToOuterDisposeScope();
            }
            TrainingParityReport report;
            try
            {
                report = Parity.ReplayTraining(training.Model, recording, training.Optimizer, Step);
            }
            finally
            {
                foreach (var t in recorded.Values)
                    t.Dispose();
            }
            Assert.Equal(20, report.Steps.Count);
            Assert.Null(report.FirstDivergence);
            report.AssertAllClose();
            Assert.Equal(("AdamW", "AdamW", true), (report.RecordedOptimizer, report.PortOptimizer, report.TeacherForcing));
            // The losses are PyTorch's (recorded in the file's metadata), within float32's tolerance.
            Assert.All(report.Steps, row => Assert.InRange(Math.Abs(row.PortLoss - row.RecordedLoss), 0, 1e-5 * row.RecordedLoss));
            Assert.InRange(report.Steps[0].RecordedLoss, 2.08, 2.09);
            Assert.InRange(report.Steps[19].RecordedLoss, 0.76, 0.77);
            // Excused as gradient noise: only update elements beyond the default tolerance (how many is the CPU's
            // kernels' business: no count is asserted), and each of those the arithmetic explains (AuditUpdates): a
            // key-bias element, whose gradient is rounding noise, or one whose update differs by no more than its
            // gradients' difference can move AdamW's step. Some over the run: the two libraries' key-bias noise differs
            // (no two kernels share it), and Adam turns it into steps of ordinary size, so the rule is exercised; how many
            // a step is the CPU's business.
            Assert.Equal(20, steps.Count);
            Assert.All(report.Steps, row => Assert.InRange(row.ExcusedUpdateElements, 0, steps[row.Step].BeyondTolerance));
            Assert.True(report.Steps.Sum(row => row.ExcusedUpdateElements) > 0, "no update element was excused as gradient noise");
            Assert.Empty(steps.SelectMany(audit => audit.Unexplained));
            // The forward of every step is compared module by module: wte, wpe, 10 calls in each of the 2 blocks (ln_1,
            // c_attn, c_proj, attn, ln_2, c_fc, act, c_proj, mlp, the block), ln_f, lm_head and the model: 25.
            Assert.All(report.Steps, row => Assert.Equal(25, row.Forward.Modules.Count));
        }

        /// <summary>One step's update elements beyond the replay's default tolerance, and those the arithmetic does not explain.</summary>
        private sealed record NoiseAudit(long BeyondTolerance, List<string> Unexplained);

        /// <summary>
        /// After the port's step <paramref name="step"/> (teacher forced: <paramref name="before"/> is PyTorch's state after
        /// the step before), every update element beyond the replay's default tolerance (rtol 1.3e-6, atol 4 ULP of the
        /// parameter's largest value), and each of them checked against what the arithmetic allows (docs/parity.md,
        /// "Gradient noise"):
        /// <list type="bullet">
        /// <item>an element of a key bias (<c>c_attn.bias[12:24]</c>), whose gradient is mathematically 0: both gradients
        /// must be at rounding-noise level, below 2^-16 of the largest query or value bias gradient (float32's unit
        /// roundoff is 2^-24; measured here about 2^-23.5);</item>
        /// <item>any other element: its update may differ by the tolerance plus twice AdamW's first-order response to its
        /// gradients' relative difference r. AdamW's step is −lr · m̂ / (√v̂ + ε) with m = β1 m₀ + (1 − β1) g and
        /// v = β2 v₀ + (1 − β2) g², so a gradient off by r · |g| moves it by at most
        /// r · lr / (1 − β1ᵗ) / (√v̂ + ε) · ((1 − β1)|g| + (1 − β2) g² |m| / v) (m, v: PyTorch's moments after the step);
        /// the weight decay term is the same on both sides, the parameters being PyTorch's, and the factor 2 covers
        /// the terms of higher order in r.</item>
        /// </list>
        /// </summary>
        private static NoiseAudit AuditUpdates(TrainingRecording recording, Dictionary<string, Tensor> recorded, int step, List<(string name, Parameter parameter)> parameters,
                                               Dictionary<string, Tensor> before)
        {
            const double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
            long beyond = 0;
            var unexplained = new List<string>();
            foreach (var (name, parameter) in parameters)
            {
                using var scope = NewDisposeScope();
                Tensor after = recorded[$"step/{step}/param/{name}"];
                Tensor portUpdate = (parameter.detach() - before[name]).to(ScalarType.Float64).flatten();
                Tensor update = (after - (step == 0 ? recorded[$"state/{name}"] : recorded[$"step/{step - 1}/param/{name}"])).to(ScalarType.Float64).flatten();
                float largest = after.abs().max().item<float>();
                Tensor allowed = update.abs() * 1.3e-6 + 4 * (double)(MathF.BitIncrement(largest) - largest);
                Tensor difference = (portUpdate - update).abs();
                Tensor gp = parameter.grad!.to(ScalarType.Float64).flatten(), g = recorded[$"step/{step}/grad/{name}"].to(ScalarType.Float64).flatten();
                Tensor size = maximum(gp.abs(), g.abs());
                Tensor r = where(size > 0, (gp - g).abs() / size.clamp_min(double.Epsilon), zeros_like(size));
                Tensor m = recorded[$"step/{step}/optim/{name}/exp_avg"].to(ScalarType.Float64).flatten();
                Tensor v = recorded[$"step/{step}/optim/{name}/exp_avg_sq"].to(ScalarType.Float64).flatten();
                // K · |Adam's step|, written without dividing by m (0 where a row of wte saw no token yet); v is 0 only
                // where every gradient so far was 0, and r with it.
                int t = step + 1;
                Tensor scale = recording.LearningRate(step, name) / (1 - Math.Pow(beta1, t)) / ((v / (1 - Math.Pow(beta2, t))).sqrt() + eps);
                Tensor response = scale * ((1 - beta1) * g.abs() + (1 - beta2) * g * g * m.abs() / v.clamp_min(double.Epsilon));
                Tensor explained = difference <= allowed + 2 * r * response;
                bool[] isBeyond = (difference > allowed).data<bool>().ToArray();
                bool[] isExplained = explained.data<bool>().ToArray();
                bool keyBias = name.EndsWith("attn.c_attn.bias", StringComparison.Ordinal);
                double noise = keyBias ? Math.Pow(2, -16) * cat(new[] { g.slice(0, 0, 12, 1), g.slice(0, 24, 36, 1) }).abs().max().item<double>() : 0;
                double[] portGrad = gp.data<double>().ToArray(), grad = g.data<double>().ToArray(), differs = difference.data<double>().ToArray();
                for (int i = 0; i < isBeyond.Length; i++)
                {
                    if (!isBeyond[i])
                        continue;
                    beyond++;
                    if (keyBias && i >= 12 && i < 24)
                    {
                        if (Math.Max(Math.Abs(portGrad[i]), Math.Abs(grad[i])) > noise)
                            unexplained.Add($"step {step}, {name}[{i}]: key-bias gradients {portGrad[i]:G3} and {grad[i]:G3} are more than rounding noise ({noise:G3})");
                    }
                    else if (!isExplained[i])
                    {
                        unexplained.Add($"step {step}, {name}[{i}]: the update differs by {differs[i]:G3}, beyond what its gradients' difference explains");
                    }
                }
            }
            return new NoiseAudit(beyond, unexplained);
        }

        [Fact]
        public void TheSamplesPort_WithItsOwnTrainStep_EndsWhereTheReplayLeftIt()
        {
            // The replay loads the recorded weights, then runs the port's own step: after it the port holds PyTorch's
            // weights of the last step. Within 3e-4: attention's key biases, whose gradient is rounding noise (it is
            // mathematically 0), take Adam steps of ordinary size in directions no two libraries share; every other
            // parameter agrees to float32's tolerance.
            using var training = new TinyGptTraining();
            Parity.ReplayTraining(training.Model, Recording, training.Optimizer, training.Step).AssertAllClose();
            using var recording = TrainingRecording.Load(Recording);
            var state = training.Model.state_dict();
            foreach (string name in recording.Parameters)
            {
                if (name.EndsWith("attn.c_attn.bias", StringComparison.Ordinal))
                    Equivalence.AssertClose(state[name], recording.ParameterAfter(19, name), rtol: 0, atol: 3e-4);
                else
                    Equivalence.AssertClose(state[name], recording.ParameterAfter(19, name));
            }
        }

        public static TheoryData<TrainingMistakes, int, TrainingPhase, string, string> Mistakes => new()
        {
            { TrainingMistakes.WeightDecayEverywhere, 0, TrainingPhase.Update, "wte.weight", "weight_decay: PyTorch 0, the port 0.1" },
            { TrainingMistakes.AdamInsteadOfAdamW, 0, TrainingPhase.Update, "h.0.attn.c_attn.weight", "the optimizer: PyTorch's AdamW, the port's Adam" },
            { TrainingMistakes.OtherEps, 0, TrainingPhase.Update, "wte.weight", "eps: PyTorch 1e-08, the port 1e-06" },
            { TrainingMistakes.GradientsNotZeroed, 1, TrainingPhase.Gradient, "wte.weight", "were the gradients zeroed (optimizer.zero_grad()) before backward?" },
            { TrainingMistakes.SchedulerBeforeOptimizer, 0, TrainingPhase.Update, "wte.weight", "the update is 2× PyTorch's in every element" },
            { TrainingMistakes.ClippingLeftOut, 0, TrainingPhase.Gradient, "wte.weight", "PyTorch clipped the gradients to norm 1 (clip_grad_norm_) before the step" },
            { TrainingMistakes.SumInsteadOfMean, 0, TrainingPhase.Loss, "loss", "the port's loss is 12× PyTorch's" },
            { TrainingMistakes.GroupDefaultsOverride, 0, TrainingPhase.Update, "wte.weight", "betas[1]: PyTorch 0.95, the port 0.999" },
        };

        [Theory]
        [MemberData(nameof(Mistakes))]
        public void EachMistakeInTheTrainingCode_IsNamed_ByStepPhaseAndParameter(TrainingMistakes mistake, int step, TrainingPhase phase, string name, string cause)
        {
            var report = Replay(mistake);
            var first = report.FirstDivergence;
            Assert.NotNull(first);
            Assert.Equal((step, phase, name), (first!.Step, first.Phase, first.Name));
            Assert.Contains(first.Causes, c => c.Contains(cause, StringComparison.Ordinal));
            // The steps before it are close: the divergence is charged to the step where it appears.
            Assert.All(report.Steps.Take(step), row => Assert.Null(row.Divergence));
            var error = Assert.Throws<TensorMismatchException>(report.AssertAllClose);
            Assert.StartsWith($"Training diverges from PyTorch 1.13.0a0 first at step {step}, {phase}, {name} (", error.Message);
            Assert.Contains(cause, error.Message);
        }

        [Fact]
        public void ASchedulerSteppedFirst_NamesTheLearningRatesThePortHeld()
        {
            var cause = Replay(TrainingMistakes.SchedulerBeforeOptimizer).FirstDivergence!.Causes.Single();
            // PyTorch used 0.01 × 1/6 at step 0; the port's optimizer held that before its step (the scheduler moved it
            // to 2/6 before optimizer.step() used it).
            Assert.Contains("a learning rate of 0.003333 where PyTorch used 0.001667", cause);
            Assert.Contains("held 0.001667 before its step and 0.003333 after it", cause);
            Assert.Contains("PyTorch stepped its LambdaLR after optimizer.step()", cause);
        }

        [Fact]
        public void GroupDefaultsThatOverrideTheOptimizers_AreEachNamed()
        {
            var causes = Replay(TrainingMistakes.GroupDefaultsOverride).FirstDivergence!.Causes;
            Assert.Contains("lr: PyTorch used 0.001667 at this step, the port's optimizer held 0.0001667", causes);
            Assert.Contains("betas[1]: PyTorch 0.95, the port 0.999", causes);
            Assert.Equal(2, causes.Count);
        }

        [Fact]
        public void TeacherForcing_ChargesEachStepWithItsOwnDifference()
        {
            // An eps mistake changes every step's update, and nothing before it: with every step started from PyTorch's
            // state, every row diverges at its Update and no row's forward or gradients do. Without teacher forcing the
            // weights drift from the first step and later forwards diverge too.
            var report = Replay(TrainingMistakes.OtherEps);
            Assert.All(report.Steps, row =>
            {
                Assert.Equal(TrainingPhase.Update, row.Divergence?.Phase);
                Assert.Null(row.Forward.FirstDivergence);
            });
            var free = Replay(TrainingMistakes.OtherEps, new TrainingParityOptions { TeacherForcing = false });
            Assert.False(free.TeacherForcing);
            Assert.Equal((0, TrainingPhase.Update), (free.FirstDivergence!.Step, free.FirstDivergence.Phase));
            Assert.Contains(free.Steps.Skip(1), row => row.Divergence?.Phase == TrainingPhase.Forward);
        }

        [Fact]
        public void FreeRunning_ShowsTheTwoLossCurves()
        {
            var report = Replay(TrainingMistakes.SumInsteadOfMean, new TrainingParityOptions { TeacherForcing = false });
            string table = report.ToString();
            Assert.Contains("20 steps, free-running", table);
            // Step 0's losses side by side: PyTorch's mean and the port's sum, 12 tokens' worth.
            var row = report.Steps[0];
            Assert.Equal(12 * row.RecordedLoss, row.PortLoss, 4);
            Assert.Contains($"{row.RecordedLoss,12:F6}  {row.PortLoss,12:F6}", table);
            Assert.Contains("first divergence: step 0, Loss, loss", table);
        }

        [Fact]
        public void Tolerances_AreOverridablePerPhaseAndPerParameter()
        {
            // The eps mistake changes Adam's steps by less than their own size (eps 1e-6 against gradients of 1e-6 and
            // more): an update rtol of 1 accepts it, and a per-parameter tolerance replaces the phase's for that parameter.
            var loose = Replay(TrainingMistakes.OtherEps, new TrainingParityOptions { Update = (1, 0) });
            Assert.Null(loose.FirstDivergence);
            var perParameter = Replay(TrainingMistakes.OtherEps, new TrainingParityOptions
            {
                Update = (1, 0),
                UpdateByParameter = new Dictionary<string, (double, double)> { ["ln_f.bias"] = (1e-7, 0) },
            });
            Assert.Equal((0, TrainingPhase.Update, "ln_f.bias"), (perParameter.FirstDivergence!.Step, perParameter.FirstDivergence.Phase, perParameter.FirstDivergence.Name));
            // A loss tolerance of 12× accepts the sum's loss; its gradients, 12× PyTorch's, are clipped to norm 1 as
            // PyTorch's were at steps 0 to 3 (their recorded norms are 1), and first show at step 4, the first step whose
            // gradients PyTorch did not clip (norm 0.957).
            var loss = Replay(TrainingMistakes.SumInsteadOfMean, new TrainingParityOptions { Loss = (12, 0) });
            Assert.Equal((4, TrainingPhase.Gradient), (loss.FirstDivergence!.Step, loss.FirstDivergence.Phase));
        }

        [Fact]
        public void APortThatDoesNotFit_IsRefused_WithEveryProblem_BeforeAnythingRuns()
        {
            using var training = new TinyGptTraining();
            using var wrong = nn.Linear(TinyGptConfig.Embd, TinyGptConfig.Vocab);
            var optimizer = optim.AdamW(wrong.parameters());
            int steps = 0;
            var error = Assert.Throws<InvalidOperationException>(() =>
                Parity.ReplayTraining(wrong, Recording, optimizer, (x, y) => { steps++; return zeros(1); }));
            Assert.Equal(0, steps);
            Assert.Contains("the port Linear and its optimizer do not fit", error.Message);
            Assert.Contains("tiny_gpt.training.pt", error.Message);
            Assert.Contains("PyTorch's parameter wte.weight is not a parameter of the port", error.Message);
            Assert.Contains("PyTorch's parameter lm_head.weight is not a parameter of the port", error.Message);
            Assert.Contains("the port's parameter weight is not one of PyTorch's", error.Message);
            Assert.Contains("the port's parameter bias is not one of PyTorch's", error.Message);
        }

        [Fact]
        public void AnOptimizerThatDoesNotHoldExactlyThePortsParameters_IsRefused()
        {
            using var training = new TinyGptTraining();
            var parameters = training.Model.named_parameters().ToList();
            using var stranger = new Parameter(zeros(3, 5));
            var groups = new List<AdamW.ParamGroup>
            {
                new(parameters.Skip(1).Select(p => p.parameter), new AdamW.Options()),
                new(new[] { stranger, parameters[5].parameter }, new AdamW.Options()),
            };
            using var optimizer = optim.AdamW(groups);
            var before = parameters[0].parameter.detach().clone();
            var error = Assert.Throws<InvalidOperationException>(() => Parity.ReplayTraining(training.Model, Recording, optimizer, training.Step));
            Assert.Contains("the optimizer does not hold the port's parameter wte.weight", error.Message);
            Assert.Contains("the optimizer holds a tensor of shape [3, 5] that is not a parameter of the port", error.Message);
            Assert.Contains($"the optimizer holds the port's parameter {parameters[5].name} 2 times", error.Message);
            // Nothing ran: not even the recorded weights were loaded.
            Assert.True(Equivalence.Compare(parameters[0].parameter, before).BitExact);
        }

        [Fact]
        public void AParameterOfAnotherDtype_IsRefused_NamingBoth()
        {
            using var model = new TinyGpt();
            model.to(ScalarType.Float64);
            using var optimizer = optim.AdamW(model.parameters());
            var error = Assert.Throws<InvalidOperationException>(() => Parity.ReplayTraining(model, Recording, optimizer, (x, y) => zeros(1)));
            Assert.Contains("wte.weight", error.Message);
            Assert.Contains("Float64", error.Message);
            Assert.Contains("Float32", error.Message);
        }

        [Fact]
        public void AnOptimizerMadeBeforeTheModelMoved_IsRefused_SayingSo()
        {
            // TorchSharp's module.to(dtype) gives the model new parameters: the optimizer made before holds the old ones.
            using var training = new TinyGptTraining();
            training.Model.to(ScalarType.Float64);
            var error = Assert.Throws<InvalidOperationException>(() => Parity.ReplayTraining(training.Model, Recording, training.Optimizer, training.Step));
            Assert.Contains("make the optimizer after moving the model", error.Message);
        }

        [Fact]
        public void AForwardMistake_IsNamedByModule_AsParityReplayNamesIt()
        {
            // The training step is the sample's, but its forward runs ln_f twice: the replay reports the Forward phase
            // at the first module whose output departs, from the module-by-module comparison.
            using var training = new TinyGptTraining();
            var ln_f = training.Model.named_modules().Single(m => m.name == "ln_f").module as LayerNorm;
            ln_f!.register_forward_hook((m, input, output) => output * 1.5f);
            var report = Parity.ReplayTraining(training.Model, Recording, training.Optimizer, training.Step);
            Assert.Equal((0, TrainingPhase.Forward, "ln_f"), (report.FirstDivergence!.Step, report.FirstDivergence.Phase, report.FirstDivergence.Name));
        }

        [Fact]
        public void ARecordingOfAnotherKind_IsRefused_SayingWhatItIs()
        {
            var parity = Assert.Throws<CheckpointFormatException>(() => TrainingRecording.Load(Path.Combine(AppContext.BaseDirectory, "pytorch", "tiny_transformer.parity.pt")));
            Assert.Contains("torchlinear-parity/1", parity.Message);
            Assert.Contains("replay it with Parity.Replay", parity.Message);
            var stateDict = Assert.Throws<CheckpointFormatException>(() => TrainingRecording.Load(Path.Combine(AppContext.BaseDirectory, "ReferenceData", "Interop", "linear_3_2.pt")));
            Assert.Contains("not a training recording", stateDict.Message);
            Assert.Throws<FileNotFoundException>(() => TrainingRecording.Load(Path.Combine(AppContext.BaseDirectory, "no-such.training.pt")));
        }

        [Fact]
        public void ADamagedRecording_IsRefused_AsCheckpointsAre()
        {
            string path = Path.Combine(Path.GetTempPath(), $"torchlinear-damaged-{Guid.NewGuid():N}.training.pt");
            byte[] bytes = File.ReadAllBytes(Recording);
            File.WriteAllBytes(path, bytes.AsSpan(0, bytes.Length / 2).ToArray());
            try
            {
                Assert.Throws<CheckpointFormatException>(() => TrainingRecording.Load(path));
            }
            finally
            {
                File.Delete(path);
            }
        }
    }
}
