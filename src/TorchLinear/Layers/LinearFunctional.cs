using System;
using System.Runtime.InteropServices;
using TorchSharp;
using static TorchSharp.torch;

namespace TorchLinear
{
    /// <summary>
    /// The functional form of <see cref="CustomLinear"/>: <c>y = x Wᵀ + b</c> for explicitly given tensors,
    /// bit-for-bit identical to <c>torch.nn.functional.linear</c>.
    /// </summary>
    public static class LinearFunctional
    {
        private static readonly Scalar One = 1;

        /// <summary>
        /// Applies a linear transformation to the incoming data: <c>y = x Wᵀ + b</c>.
        /// </summary>
        /// <remarks>
        /// Built from the primitives <c>addmm</c>, <c>matmul</c> and <c>add_</c>, dispatched exactly as
        /// libtorch's C++ <c>torch::nn::functional::linear</c> (which TorchSharp's <c>nn.Linear</c> and
        /// <c>functional.linear</c> call), so the result and its gradients have the same bits:
        /// a 2-D input with a bias takes the fused <c>addmm(b, x, Wᵀ)</c>; every other case computes
        /// <c>matmul(x, Wᵀ)</c> and then adds the bias in place.
        /// <code>
        /// var y = LinearFunctional.linear(x, weight, bias);   // x: (*, in), weight: (out, in), bias: (out)
        /// </code>
        /// </remarks>
        /// <param name="input">Input of shape <c>(*, in_features)</c>, at least 1-D.</param>
        /// <param name="weight">Weight of shape <c>(out_features, in_features)</c> (or <c>(in_features)</c>, as in <c>functional.linear</c>).</param>
        /// <param name="bias">Optional bias of shape <c>(out_features)</c>.</param>
        /// <returns>A new tensor of shape <c>(*, out_features)</c>; no other tensor is left alive.</returns>
        /// <exception cref="ArgumentException">The input is 0-d, its last dimension is not <c>in_features</c>,
        /// or the dtypes or devices of the tensors differ. The message names both sides.</exception>
        public static Tensor linear(Tensor input, Tensor weight, Tensor? bias = null)
        {
            ArgumentNullException.ThrowIfNull(input);
            ArgumentNullException.ThrowIfNull(weight);
            return Compute("LinearFunctional.linear", input, weight, bias);
        }

        /// <summary>
        /// <c>y = x Wᵀ + b</c>, dispatched onto libtorch primitives as <paramref name="dispatch"/> says:
        /// <see cref="LinearDispatch.TorchSharp"/> matches TorchSharp's <c>functional.linear</c> bit for bit,
        /// <see cref="LinearDispatch.PyTorch"/> PyTorch's Python <c>F.linear</c>.
        /// </summary>
        /// <param name="input">Input of shape <c>(*, in_features)</c>, at least 1-D.</param>
        /// <param name="weight">Weight of shape <c>(out_features, in_features)</c>.</param>
        /// <param name="bias">Optional bias of shape <c>(out_features)</c>.</param>
        /// <param name="dispatch">Which primitive sequence to follow.</param>
        /// <returns>A new tensor of shape <c>(*, out_features)</c>; no other tensor is left alive.</returns>
        /// <exception cref="ArgumentException">The tensors do not fit together; the message names both sides.</exception>
        public static Tensor linear(Tensor input, Tensor weight, Tensor? bias, LinearDispatch dispatch)
        {
            ArgumentNullException.ThrowIfNull(input);
            ArgumentNullException.ThrowIfNull(weight);
            return Compute("LinearFunctional.linear", input, weight, bias, dispatch);
        }

        /// <summary>
        /// The dispatch itself, shared with <see cref="CustomLinear.forward"/>. <paramref name="caller"/> names the
        /// module or function in error messages; its <c>ToString()</c> is only called when input is refused.
        /// <paramref name="weightT"/> is a ready-made <c>weight.t()</c> that the caller keeps between calls; when null,
        /// a fresh view is made and released here.
        /// </summary>
        internal static Tensor Compute(object caller, Tensor input, Tensor weight, Tensor? bias,
                                       LinearDispatch dispatch = LinearDispatch.TorchSharp, Tensor? weightT = null)
        {
            // Wᵀ is a view (no copy): the caller's kept one, or one made here and released on the way out.
            using Tensor? ownT = weightT is null ? TransposedWeight(caller, input, weight, bias) : null;
            Tensor transposed = weightT ?? ownT!;

            if (bias is not null && input.dim() == 2)
            {
                // libtorch's addmm lets a meta-device input through with CPU parameters; refuse it here.
                if (input.device_type != weight.device_type)
                    LinearDiagnostics.ThrowIfInvalid(caller, input, weight, bias);
                // libtorch fuses the 2-D case (and so does PyTorch): addmm rounds the bias into the GEMM's
                // accumulation, which can differ in the last bit from matmul followed by an addition. TorchSharp's
                // addmm entry point turns a libtorch refusal into an exception, so bad input is diagnosed only after
                // it fails, and the happy path pays for no shape or dtype queries.
                try
                {
                    return bias.addmm(input, transposed);
                }
                catch (ExternalException) when (IsIntegerWithoutFeatures(input, weight))
                {
                    return MatmulThenAdd(caller, input, weight, bias, transposed);
                }
                catch (ExternalException error)
                {
                    throw LinearDiagnostics.Explain(caller, input, weight, bias, error);
                }
            }

            if (dispatch == LinearDispatch.PyTorch && bias is not null && IsLikelyFusable(bias) && input.is_contiguous())
                return FlattenedAddmm(caller, input, weight, bias, transposed);

            return MatmulThenAdd(caller, input, weight, bias, transposed);
        }

        /// <summary>libtorch's unfused path: <c>matmul(x, Wᵀ)</c>, then the bias added in place.</summary>
        private static Tensor MatmulThenAdd(object caller, Tensor input, Tensor weight, Tensor? bias, Tensor transposed)
        {
            // TorchSharp 0.107's native matmul entry point (THSTensor_matmul) does not catch libtorch errors:
            // a shape or dtype error there terminates the whole process instead of throwing. So on this path
            // the input is checked before matmul is called.
            LinearDiagnostics.ThrowIfInvalid(caller, input, weight, bias);
            Tensor output = input.matmul(transposed);
            if (bias is not null)
            {
                try
                {
                    // In place, like libtorch's `output += bias`: same bits, one tensor fewer. The alpha of 1 is
                    // made once: add_(bias) would allocate a new Scalar (and a finalizer) on every call.
                    output.add_(bias, One);
                }
                catch (ExternalException error)
                {
                    output.Dispose();
                    throw LinearDiagnostics.Explain(caller, input, weight, bias, error);
                }
            }
            return output;
        }

        /// <summary>
        /// TorchSharp hands addmm its beta and alpha as floating-point numbers, and libtorch's addmm, when the inner
        /// dimension is 0, multiplies the bias by beta, which an integer result cannot hold ("result type Float can't
        /// be cast to ... Long"); functional.linear passes integer ones and succeeds. Integer arithmetic does not
        /// round, so matmul + add gives addmm's bits there.
        /// </summary>
        private static bool IsIntegerWithoutFeatures(Tensor input, Tensor weight) =>
            is_integral(weight.dtype) && input.dtype == weight.dtype && weight.dim() == 2 && weight.size(1) == 0 && input.size(-1) == 0;

        /// <summary>PyTorch's test for flattening: a bias that is 1-D (or 1-D once squeezed) and contiguous.</summary>
        private static bool IsLikelyFusable(Tensor bias)
        {
            if (!bias.is_contiguous())
                return false;
            if (bias.dim() == 1)
                return true;
            using Tensor squeezed = bias.squeeze();
            return squeezed.dim() == 1;
        }

        /// <summary>PyTorch's <c>_flatten_nd_linear</c>: <c>(*, in) → (N, in) → addmm → (N, out) → (*, out)</c>.</summary>
        internal static Tensor FlattenedAddmm(object caller, Tensor input, Tensor weight, Tensor bias, Tensor? weightT = null)
        {
            LinearDiagnostics.ThrowIfInvalid(caller, input, weight, bias);
            long[] sizes = input.shape;
            long rows = 1;
            for (int i = 0; i < sizes.Length - 1; i++)
                rows *= sizes[i];  // not view(-1, in): -1 is ambiguous when a dimension is 0
            try
            {
                // reshape is view for the contiguous input PyTorch flattens; LinearFormulas.FlattenedAddmm also
                // accepts other layouts, which reshape copies first.
                using Tensor flat = input.reshape(rows, sizes[^1]);
                using Tensor? ownT = weightT is null ? weight.t() : null;
                using Tensor product = bias.addmm(flat, weightT ?? ownT!);
                sizes[^1] = product.size(1);
                return product.view(sizes);
            }
            catch (ExternalException) when (IsIntegerWithoutFeatures(input, weight))
            {
                using Tensor transposed = weightT is null ? weight.t() : weightT.alias();
                return MatmulThenAdd(caller, input, weight, bias, transposed);
            }
            catch (ExternalException error)
            {
                throw LinearDiagnostics.Explain(caller, input, weight, bias, error);
            }
        }

        private static Tensor TransposedWeight(object caller, Tensor input, Tensor weight, Tensor? bias)
        {
            try
            {
                return weight.t();
            }
            catch (ExternalException error)
            {
                throw LinearDiagnostics.Explain(caller, input, weight, bias, error);
            }
        }
    }
}
