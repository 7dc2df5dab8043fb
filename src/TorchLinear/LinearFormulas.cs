using System;
using static TorchSharp.torch;

namespace TorchLinear
{
    /// <summary>
    /// Other ways to write <c>y = x Wᵀ + b</c>. They compute the same mathematics as
    /// <see cref="LinearFunctional.linear(Tensor, Tensor, Tensor)"/> but round differently in some cases: they exist to measure
    /// that difference (see <see cref="Equivalence.Compare"/>), not to replace the exact implementation.
    /// </summary>
    public static class LinearFormulas
    {
        /// <summary>
        /// The textbook formula <c>torch.matmul(x, W.T) + b</c>. For a 2-D input with a bias, TorchSharp's
        /// <c>nn.Linear</c> uses the fused <c>addmm</c> instead, whose result can differ in the last bits.
        /// </summary>
        /// <exception cref="ArgumentException">The tensors do not fit together, as for <see cref="LinearFunctional.linear(Tensor, Tensor, Tensor)"/>.</exception>
        public static Tensor Article(Tensor input, Tensor weight, Tensor? bias = null)
        {
            // Checked first: TorchSharp's matmul aborts the process on a libtorch error instead of throwing.
            LinearDiagnostics.ThrowIfInvalid("LinearFormulas.Article", input, weight, bias);
            using Tensor weightT = weight.t();
            if (bias is null)
                return matmul(input, weightT);
            using Tensor product = matmul(input, weightT);
            return product + bias;
        }

        /// <summary>
        /// Flattens every leading dimension into one, applies the fused <c>addmm(b, x, Wᵀ)</c>, and restores
        /// the shape: <c>(*, in) → (N, in) → (N, out) → (*, out)</c>. This is how PyTorch's Python
        /// <c>F.linear</c> treats a contiguous N-D input with a bias.
        /// </summary>
        /// <exception cref="ArgumentException">The tensors do not fit together, as for <see cref="LinearFunctional.linear(Tensor, Tensor, Tensor)"/>.</exception>
        public static Tensor FlattenedAddmm(Tensor input, Tensor weight, Tensor? bias = null)
        {
            if (bias is null)
                return Article(input, weight, null);
            return LinearFunctional.FlattenedAddmm("LinearFormulas.FlattenedAddmm", input, weight, bias);
        }
    }
}
