namespace TorchLinear
{
    /// <summary>
    /// Which libtorch primitives a linear layer is computed with. Both compute <c>y = x Wᵀ + b</c>; they differ in
    /// where the bias is added, and therefore, for some inputs, in the last bits of the result.
    /// </summary>
    public enum LinearDispatch
    {
        /// <summary>
        /// As TorchSharp's <c>nn.Linear</c> and <c>functional.linear</c>, which call libtorch's C++
        /// <c>torch::nn::functional::linear</c>: a 2-D input with a bias goes through the fused
        /// <c>addmm(b, x, Wᵀ)</c>; everything else through <c>matmul(x, Wᵀ)</c>, then the bias is added in place.
        /// The default: bit-identical to the built-ins.
        /// </summary>
        TorchSharp,

        /// <summary>
        /// As PyTorch's Python <c>F.linear</c> / <c>nn.Linear</c>, which call <c>at::linear</c>
        /// (<c>aten/src/ATen/native/Linear.cpp</c>, as shipped in libtorch 2.10). For a dense input:
        /// <list type="number">
        /// <item>a 2-D input with a bias: <c>addmm(b, x, Wᵀ)</c>;</item>
        /// <item>otherwise, if the bias is "likely fusable" — it is 1-D (or becomes 1-D when squeezed) and
        /// contiguous — and the input is contiguous, of any rank including 1-D: flatten every leading dimension,
        /// <c>x.view(N, in)</c>, then <c>addmm(b, x, Wᵀ)</c>, then <c>view(*, out)</c>;</item>
        /// <item>otherwise (no bias, or a non-contiguous input): <c>matmul(x, Wᵀ)</c>, then the bias in place.</item>
        /// </list>
        /// Not mirrored: PyTorch's <c>TORCH_LINEAR_FLATTEN_3D=1</c> switch (which also flattens non-contiguous input
        /// after copying it), and the special paths for MKLDNN, XLA, mobile and sparse weights. PyTorch releases
        /// before 2.10 flatten fewer cases (1.13 only contiguous 3-D input).
        /// </summary>
        PyTorch,
    }
}
