// The port's training code, as pytorch/tiny_gpt.py and record_training have it: minGPT's two parameter groups, AdamW
// with betas (0.9, 0.95), a linear warm-up of the learning rate stepped after the optimizer, clipping at norm 1, the
// mean cross-entropy. Copy it with TrainingMistakes left out: they are the mistakes the tests plant, one at a time, to
// show that the replay names each.
using System;
using System.Collections.Generic;
using System.Linq;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Samples.TrainingParity
{
    /// <summary>Mistakes ports make in training code (not in the layers), planted one at a time by the tests.</summary>
    [Flags]
    public enum TrainingMistakes
    {
        /// <summary>The training code as PyTorch's.</summary>
        None = 0,
        /// <summary>One parameter group decaying every parameter, where minGPT decays the Linear weights only.</summary>
        WeightDecayEverywhere = 1,
        /// <summary>Adam (weight decay added to the gradient) where PyTorch used AdamW (weights decayed apart from it).</summary>
        AdamInsteadOfAdamW = 2,
        /// <summary>eps 1e-6 where PyTorch's AdamW had its default 1e-8.</summary>
        OtherEps = 4,
        /// <summary>No optimizer.zero_grad(): each backward adds to the gradients of the step before.</summary>
        GradientsNotZeroed = 8,
        /// <summary>scheduler.step() before optimizer.step(): every step uses the next step's learning rate.</summary>
        SchedulerBeforeOptimizer = 16,
        /// <summary>No clip_grad_norm_.</summary>
        ClippingLeftOut = 32,
        /// <summary>cross_entropy reduced by sum where PyTorch takes the mean.</summary>
        SumInsteadOfMean = 64,
        /// <summary>
        /// Each group built with AdamW.ParamGroup's optional arguments (<c>new AdamW.ParamGroup(decay, weight_decay: 0.1)</c>):
        /// they have defaults (lr 1e-3, betas (0.9, 0.999)) that override what the optimizer was given. A TorchSharp trap:
        /// pass <c>new AdamW.Options { weight_decay = 0.1 }</c> instead, whose unset fields take the optimizer's.
        /// </summary>
        GroupDefaultsOverride = 128,
    }

    /// <summary>TinyGpt, its optimizer and its scheduler, and the training step that uses them.</summary>
    public sealed class TinyGptTraining : IDisposable
    {
        /// <summary>The peak learning rate.</summary>
        public const double LearningRate = 1e-2;
        /// <summary>The weight decay of the Linear layers' weights.</summary>
        public const double WeightDecay = 0.1;
        /// <summary>Steps of linear warm-up.</summary>
        public const int Warmup = 6;
        /// <summary>The norm the gradients are clipped to.</summary>
        public const double MaxGradNorm = 1.0;

        private readonly TrainingMistakes _mistakes;

        /// <summary>Builds the model, the optimizer over minGPT's two groups and the warm-up scheduler.</summary>
        public TinyGptTraining(TrainingMistakes mistakes = TrainingMistakes.None)
        {
            _mistakes = mistakes;
            Model = new TinyGpt();
            Optimizer = ConfigureOptimizer(Model, mistakes);
            Scheduler = optim.lr_scheduler.LambdaLR(Optimizer, step => Math.Min(1.0, (step + 1) / (double)Warmup));
        }

        /// <summary>The model.</summary>
        public TinyGpt Model { get; }

        /// <summary>AdamW over the decayed and the undecayed group.</summary>
        public optim.Optimizer Optimizer { get; }

        /// <summary>The linear warm-up, stepped once per training step.</summary>
        public optim.lr_scheduler.LRScheduler Scheduler { get; }

        /// <summary>
        /// minGPT's rule: the weights of Linear layers decay; biases, LayerNorm weights and Embedding weights do not.
        /// </summary>
        public static (List<Parameter> Decay, List<Parameter> NoDecay) ParameterGroups(nn.Module model)
        {
            var decay = new List<Parameter>();
            var noDecay = new List<Parameter>();
            foreach (var (_, module) in model.named_modules())
            {
                foreach (var (name, parameter) in module.named_parameters(recurse: false))
                {
                    if (name.EndsWith("bias", StringComparison.Ordinal) || module is LayerNorm or Embedding)
                        noDecay.Add(parameter);
                    else if (name.EndsWith("weight", StringComparison.Ordinal) && module is Linear)
                        decay.Add(parameter);
                }
            }
            return (decay, noDecay);
        }

        private static optim.Optimizer ConfigureOptimizer(TinyGpt model, TrainingMistakes mistakes)
        {
            var (decay, noDecay) = ParameterGroups(model);
            double eps = mistakes.HasFlag(TrainingMistakes.OtherEps) ? 1e-6 : 1e-8;
            if (mistakes.HasFlag(TrainingMistakes.WeightDecayEverywhere))
            {
                decay = decay.Concat(noDecay).ToList();
                noDecay = new List<Parameter>();
            }
            if (mistakes.HasFlag(TrainingMistakes.AdamInsteadOfAdamW))
            {
                var adamGroups = new List<Adam.ParamGroup> { new(decay, new Adam.Options { weight_decay = WeightDecay }) };
                if (noDecay.Count > 0)
                    adamGroups.Add(new(noDecay, new Adam.Options { weight_decay = 0.0 }));
                return optim.Adam(adamGroups, lr: LearningRate, beta1: 0.9, beta2: 0.95, eps: eps);
            }
            var groups = new List<AdamW.ParamGroup>();
            if (mistakes.HasFlag(TrainingMistakes.GroupDefaultsOverride))
            {
                groups.Add(new(decay, weight_decay: WeightDecay));
                groups.Add(new(noDecay, weight_decay: 0.0));
            }
            else
            {
                // Options with only weight_decay set: lr, betas and eps come from the optimizer's arguments below.
                groups.Add(new(decay, new AdamW.Options { weight_decay = WeightDecay }));
                if (noDecay.Count > 0)
                    groups.Add(new(noDecay, new AdamW.Options { weight_decay = 0.0 }));
            }
            return optim.AdamW(groups, lr: LearningRate, beta1: 0.9, beta2: 0.95, eps: eps);
        }

        /// <summary>
        /// One training step on a batch of token ids and their next tokens, returning the loss: zero_grad, forward, mean
        /// cross-entropy, backward, clipping, optimizer.step(), scheduler.step().
        /// </summary>
        public Tensor Step(Tensor input, Tensor target)
        {
            if (!_mistakes.HasFlag(TrainingMistakes.GradientsNotZeroed))
                Optimizer.zero_grad();
            using Tensor logits = Model.call(input);
            var reduction = _mistakes.HasFlag(TrainingMistakes.SumInsteadOfMean) ? nn.Reduction.Sum : nn.Reduction.Mean;
            Tensor loss = nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), target.view(-1), reduction: reduction);
            loss.backward();
            if (!_mistakes.HasFlag(TrainingMistakes.ClippingLeftOut))
                nn.utils.clip_grad_norm_(Model.parameters(), MaxGradNorm);
            if (_mistakes.HasFlag(TrainingMistakes.SchedulerBeforeOptimizer))
                Scheduler.step();
            Optimizer.step();
            if (!_mistakes.HasFlag(TrainingMistakes.SchedulerBeforeOptimizer))
                Scheduler.step();
            return loss;
        }

        /// <summary>Frees the optimizer's state and the model.</summary>
        public void Dispose()
        {
            Optimizer.Dispose();
            Model.Dispose();
        }
    }
}
