using System.Collections.Generic;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace TorchLinear.Lora
{
    /// <summary>
    /// DoRA on a linear layer (PEFT's <c>DoraLinearVariant</c> and <c>DoraLinearLayer</c>, <c>variants.py</c> and
    /// <c>dora.py</c>): a trainable magnitude per output row, <c>lora_magnitude_vector</c>, rescales the adapted weight's
    /// rows to it. The rows' norm ‖W + scaling · B A‖ is computed afresh in every forward and detached from the graph, as
    /// the DoRA paper (section 4.3) and PEFT do; <c>x Wᵀ</c> is not detached, so the gradient reaches the input through
    /// both terms.
    /// </summary>
    internal sealed class DoraLinear : ILoraVariant<LoraLayer>
    {
        private static readonly Scalar One = 1;

        /// <summary>
        /// PEFT's <c>DoraLinearVariant.init</c>: the magnitude starts as the rows' norm of <c>W + scaling · B A</c>, so the
        /// layer computes what it did; for an adapter whose tensors are loaded next, <paramref name="compute"/> is false
        /// and the magnitude is only allocated.
        /// </summary>
        internal DoraLinear(LoraLayer adapter, Tensor weight, bool compute)
        {
            using var noGrad = no_grad();
            using var scope = NewDisposeScope();
            Tensor norm = compute
                ? WeightNorm(weight.detach(), LoraWeight(adapter), adapter.scaling)
                : zeros(weight.size(0), dtype: weight.dtype, device: weight.device);
            Magnitude = new DoraMagnitude(norm);
        }

        /// <summary>PEFT's <c>lora_magnitude_vector</c>.</summary>
        internal DoraMagnitude Magnitude { get; }

        public string? ConfigKey => "use_dora";

        public IEnumerable<(string Attribute, nn.Module Module, Parameter Parameter)> Parts()
        {
            yield return ("lora_magnitude_vector", Magnitude, Magnitude.weight);
        }

        /// <summary>B A (out_features, in_features), unscaled: DoRA's lora_weight.</summary>
        private static Tensor LoraWeight(LoraLayer adapter) => adapter.lora_B.weight.matmul(adapter.lora_A.weight);

        /// <summary>
        /// DoRA's ‖W + scaling · lora_weight‖ over each output row (<c>torch.linalg.norm(weight, dim=1)</c>), in W's dtype,
        /// as PEFT's <c>get_weight_norm</c> computes it.
        /// </summary>
        private static Tensor WeightNorm(Tensor weight, Tensor loraWeight, double scaling) =>
            linalg.vector_norm(weight + loraWeight * scaling, 2, new long[] { 1 }).to(weight.dtype);

        /// <summary>
        /// Adds <c>(m / ‖W + scaling · B A‖ − 1) · (x Wᵀ) + m / ‖W + scaling · B A‖ · lora_B(lora_A(x)) · scaling</c>, PEFT's
        /// <c>DoraLinearLayer.forward</c>, where x Wᵀ is the output without its bias (or, with dropout in training,
        /// computed again from the dropped input).
        /// </summary>
        public void AddTerm(LoraLayer adapter, Tensor output, Tensor x, bool dropped, Tensor weight, Tensor? bias)
        {
            System.ArgumentNullException.ThrowIfNull(weight);
            Tensor a = adapter.lora_A.weight, b = adapter.lora_B.weight;
            Tensor norm;
            using (no_grad())
                norm = WeightNorm(weight.detach().to(x.dtype), LoraWeight(adapter).to(x.dtype), adapter.scaling);
            Tensor scale = (Magnitude.weight / norm).view(1, -1);
            Tensor loraResult = x.matmul(a.t()).matmul(b.t());
            // Not detached: as in PEFT, the gradient reaches the input (and a trainable weight) through x Wᵀ too. Without
            // a bias, a copy: the product below keeps it for the magnitude's gradient, and output is written next.
            Tensor baseResult = dropped ? LinearFunctional.linear(x, weight) : bias is null ? output.clone() : output - bias;
            output.add_((scale - 1) * baseResult + scale * loraResult * adapter.scaling, One);
        }

        /// <summary>
        /// PEFT's <c>DoraLinearVariant.merge</c>: W' = m / ‖W₀ + Δ‖ · (W + Δ), row by row, W₀ the weight before any adapter of
        /// this merge (<paramref name="normBase"/>; the weight itself when the adapter merges alone): the rows' norm its
        /// unmerged forward takes, so that after other adapters of the layer merged first the layer still computes what
        /// the adapters computed unmerged, in their order (huggingface/peft#3609).
        /// </summary>
        public void Merge(LoraLayer adapter, Tensor weight, Tensor normBase)
        {
            using var scope = NewDisposeScope();
            Tensor delta = adapter.DeltaOutIn().to(weight.dtype);
            Tensor adapted = weight + delta;
            // Merging alone, W₀ is the weight: its norm is the adapted weight's, computed once (PEFT's bits).
            Tensor norm = linalg.vector_norm(ReferenceEquals(normBase, weight) ? adapted : normBase + delta, 2, new long[] { 1 }).to(weight.dtype);
            weight.copy_((Magnitude.weight.detach() / norm).view(-1, 1) * adapted);
        }

        public bool MergeIsAdditive => false;

        /// <summary>DoRA rescales the base output and the term per row of the weight: not a plain low-rank product.</summary>
        public bool Stackable => false;

        public (string Formula, string Part)? Rescaled => ("the DoRA weight m / ‖W + ΔW‖ · (W + ΔW)", "lora_magnitude_vector");

        public void Dispose() => Magnitude.Dispose();
    }

    /// <summary>
    /// DoRA's magnitude vector (PEFT's <c>DoraLinearLayer</c>): one parameter, <c>weight</c> (out_features), so that an
    /// adapted layer's state_dict has PEFT's key <c>&lt;path&gt;.lora_magnitude_vector.&lt;adapter&gt;.weight</c>.
    /// </summary>
    public sealed class DoraMagnitude : nn.Module
    {
        internal DoraMagnitude(Tensor norm) : base(nameof(DoraMagnitude))
        {
            using (NewDisposeScope())
                weight = (Parameter)new Parameter(norm.detach().clone()).DetachFromDisposeScope();
            register_parameter("weight", weight);
        }

        /// <summary>The magnitude of each output row of the adapted weight.</summary>
        public Parameter weight { get; }

        /// <summary>Registers nothing beyond <c>weight</c>.</summary>
        protected override void RegisterComponents()
        {
        }
    }
}
