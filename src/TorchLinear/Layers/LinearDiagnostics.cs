using System;
using System.Runtime.InteropServices;
using TorchSharp;
using static TorchSharp.torch;

namespace TorchLinear
{
    /// <summary>
    /// Says, as an <see cref="ArgumentException"/>, what was expected and what came. On the fused addmm path it runs
    /// only after libtorch has refused, so that path pays for no shape or dtype queries; before a matmul it runs first,
    /// because TorchSharp's matmul cannot report a refusal without ending the process.
    /// </summary>
    internal static class LinearDiagnostics
    {
        internal static Exception Explain(object caller, Tensor input, Tensor weight, Tensor? bias, ExternalException error)
        {
            var problem = Describe(caller, input, weight, bias);
            return problem is null
                ? new ArgumentException($"{caller}: libtorch refused input of shape {TensorFacts.Shape(input)} ({input.dtype}) with weight {TensorFacts.Shape(weight)} ({weight.dtype}): {FirstLine(error.Message)}", nameof(input), error)
                : new ArgumentException($"{caller}: {problem.Value.Message}", problem.Value.Argument, error);
        }

        /// <summary>Checks, before the call, everything that would make libtorch's matmul refuse.</summary>
        internal static void ThrowIfInvalid(object caller, Tensor input, Tensor weight, Tensor? bias)
        {
            var problem = Describe(caller, input, weight, bias);
            if (problem is not null)
                throw new ArgumentException($"{caller}: {problem.Value.Message}", problem.Value.Argument);
        }

        /// <summary>
        /// What does not fit, and which argument is at fault: the weight is the reference that the input and the bias
        /// must agree with. A layer's own weight and bias are not arguments of its forward, so a layer blames the input.
        /// </summary>
        internal static (string Message, string Argument)? Describe(object caller, Tensor input, Tensor weight, Tensor? bias)
        {
            bool layer = caller is nn.Module;
            string Blame(string argument) => layer ? "input" : argument;

            if (weight.dim() is not (1 or 2))
                return ($"weight must be 2-D, shaped (out_features, in_features), but has shape {TensorFacts.Shape(weight)}.", Blame("weight"));
            if (input.dim() == 0)
                return ($"input must have at least 1 dimension, shaped (*, in_features), but got a 0-d tensor (a scalar). Give a vector of {InFeatures(weight)} values, or reshape the scalar with input.reshape(1).", "input");
            if (!IsSupported(weight.dtype))
                return ($"weight dtype {weight.dtype} is not supported: libtorch multiplies floating-point, complex and integer matrices, but has no {weight.dtype} kernel. Convert the weight, for example with weight.to(ScalarType.Float32).", Blame("weight"));
            if (input.dtype != weight.dtype)
                return ($"input dtype {input.dtype} does not match weight dtype {weight.dtype}. {HowToConvert(layer, input.dtype, weight.dtype)}", "input");
            if (bias is not null && bias.dtype != weight.dtype)
                return ($"bias dtype {bias.dtype} does not match weight dtype {weight.dtype}. Convert the bias with bias.to({weight.dtype}).", Blame("bias"));
            if (!TensorFacts.SameDevice(input, weight))
                return ($"input is on device {input.device} but the weight is on {weight.device}. Move the input with input.to(weight.device){(layer ? ", or the layer with .to(...)" : "")}.", "input");
            if (bias is not null && !TensorFacts.SameDevice(bias, weight))
                return ($"bias is on device {bias.device} but the weight is on {weight.device}. Move the bias with bias.to(weight.device).", Blame("bias"));
            long expected = InFeatures(weight);
            long last = input.size(-1);
            if (last != expected)
                return ($"the last dimension of the input must equal in_features = {expected}, but the input has shape {TensorFacts.Shape(input)} (last dimension {last}). Give inputs shaped (*, {expected}){(layer ? $", or build the layer with in_features = {last}" : "")}.", "input");
            // A bias broadcasts against the output (*, out_features), as in functional.linear: its last dimension
            // must be out_features or 1.
            if (bias is not null && weight.dim() == 2 && bias.dim() > 0 && bias.size(-1) != weight.size(0) && bias.size(-1) != 1)
                return ($"bias of shape {TensorFacts.Shape(bias)} does not fit out_features = {weight.size(0)}; expected shape [{weight.size(0)}].", Blame("bias"));
            return null;
        }

        /// <summary>The dtypes libtorch's CPU matrix multiply computes (it has no Bool kernel), as functional.linear accepts them.</summary>
        internal static bool IsSupported(ScalarType dtype) =>
            is_floating_point(dtype) || is_complex(dtype) || (is_integral(dtype) && dtype != ScalarType.Bool);

        /// <summary>
        /// Only advice that works: <c>Module.to(dtype)</c> accepts floating-point and complex dtypes only, so converting
        /// the layer is suggested only towards those.
        /// </summary>
        private static string HowToConvert(bool layer, ScalarType input, ScalarType weight)
        {
            bool layerCanTake = is_floating_point(input) || is_complex(input);
            if (layer)
                return layerCanTake
                    ? $"Convert the input with input.to({weight}), or the layer with .to({input})."
                    : $"Convert the input with input.to({weight}).";
            return $"Convert the input with input.to({weight}), or the weight and bias with .to({input}).";
        }

        private static string FirstLine(string message)
        {
            int end = message.IndexOf('\n');
            return end < 0 ? message : message[..end];
        }

        // size(i), not shape: TorchSharp's shape getter costs about 1.6 µs a call here, size(i) about 0.02 µs, and
        // this code runs before every matmul.
        private static long InFeatures(Tensor weight) => weight.size(-1);
    }
}
