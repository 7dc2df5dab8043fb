using System;
using static TorchSharp.torch;

namespace TorchLinear.Samples
{
    /// <summary>
    /// The article's other ways to write <c>y = x Wᵀ + b</c>, for the walkthrough to measure against the exact one. They
    /// compute the same mathematics as <see cref="LinearFunctional.linear(Tensor, Tensor, Tensor)"/> but round differently
    /// in some cases: teaching code, kept out of the TorchLinear package, whose layer and functional form are the exact ones.
    /// </summary>
    public static class LinearFormulas
    {
        /// <summary>
        /// The textbook formula <c>torch.matmul(x, W.T) + b</c>. For a 2-D input with a bias, TorchSharp's
        /// <c>nn.Linear</c> uses the fused <c>addmm</c> instead, whose result can differ in the last bits.
        /// </summary>
        /// <exception cref="ArgumentException">The tensors do not fit together.</exception>
        public static Tensor Article(Tensor input, Tensor weight, Tensor? bias = null)
        {
            // Checked first: TorchSharp's matmul aborts the process on a libtorch error instead of throwing.
            Check(input, weight);
            using Tensor weightT = weight.t();
            if (bias is null)
                return matmul(input, weightT);
            using Tensor product = matmul(input, weightT);
            return product + bias;
        }

        /// <summary>
        /// Flattens every leading dimension into one, applies the fused <c>addmm(b, x, Wᵀ)</c>, and restores the shape:
        /// <c>(*, in) → (N, in) → (N, out) → (*, out)</c>. This is how PyTorch's Python <c>F.linear</c> treats a contiguous
        /// N-D input with a bias (<see cref="LinearDispatch.PyTorch"/> follows it in the library).
        /// </summary>
        /// <exception cref="ArgumentException">The tensors do not fit together.</exception>
        public static Tensor FlattenedAddmm(Tensor input, Tensor weight, Tensor? bias = null)
        {
            if (bias is null)
                return Article(input, weight, null);
            Check(input, weight);
            long[] sizes = input.shape;
            long rows = 1;
            for (int i = 0; i < sizes.Length - 1; i++)
                rows *= sizes[i];  // not view(-1, in): -1 is ambiguous when a dimension is 0
            using Tensor flat = input.reshape(rows, sizes[^1]);
            using Tensor weightT = weight.t();
            using Tensor product = bias.addmm(flat, weightT);
            sizes[^1] = product.size(1);
            return product.view(sizes);
        }

        private static void Check(Tensor input, Tensor weight)
        {
            if (input.dim() < 1 || weight.dim() != 2 || input.size(-1) != weight.size(1))
                throw new ArgumentException($"LinearFormulas: input of shape [{string.Join(", ", input.shape)}] does not fit a weight of shape [{string.Join(", ", weight.shape)}].", nameof(input));
            if (input.dtype != weight.dtype || input.device_type != weight.device_type)
                throw new ArgumentException($"LinearFormulas: input is {input.dtype} on {input.device}, the weight {weight.dtype} on {weight.device}.", nameof(input));
        }
    }
}
