using System;
using System.Runtime.InteropServices;
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
            string? problem = Describe(input, weight, bias);
            return problem is null
                ? new ArgumentException($"{caller}: libtorch refused input of shape {Shape(input)} ({input.dtype}) with weight {Shape(weight)} ({weight.dtype}): {FirstLine(error.Message)}", nameof(input), error)
                : new ArgumentException($"{caller}: {problem}", nameof(input), error);
        }

        /// <summary>Checks, before the call, everything that would make libtorch's matmul refuse.</summary>
        internal static void ThrowIfInvalid(object caller, Tensor input, Tensor weight, Tensor? bias)
        {
            string? problem = Describe(input, weight, bias);
            if (problem is not null)
                throw new ArgumentException($"{caller}: {problem}", nameof(input));
        }

        internal static string? Describe(Tensor input, Tensor weight, Tensor? bias)
        {
            if (weight.dim() is not (1 or 2))
                return $"weight must be 2-D, shaped (out_features, in_features), but has shape {Shape(weight)}.";
            if (input.dim() == 0)
                return $"input must have at least 1 dimension, shaped (*, in_features), but got a 0-d tensor (a scalar). Give a vector of {InFeatures(weight)} values, or reshape the scalar with input.reshape(1).";
            if (!is_floating_point(weight.dtype) && !is_complex(weight.dtype))
                return $"weight dtype {weight.dtype} is not a floating-point or complex type; convert the weight, for example with weight.to(ScalarType.Float32).";
            if (input.dtype != weight.dtype)
                return $"input dtype {input.dtype} does not match weight dtype {weight.dtype}. Convert the input with input.to({weight.dtype}), or the layer with .to({input.dtype}).";
            if (bias is not null && bias.dtype != weight.dtype)
                return $"bias dtype {bias.dtype} does not match weight dtype {weight.dtype}. Convert the bias with bias.to({weight.dtype}).";
            if (!SameDevice(input, weight))
                return $"input is on device {input.device} but the weight is on {weight.device}. Move the input with input.to(weight.device), or the layer with .to(...).";
            if (bias is not null && !SameDevice(bias, weight))
                return $"bias is on device {bias.device} but the weight is on {weight.device}. Move the bias with bias.to(weight.device).";
            long expected = InFeatures(weight);
            long last = input.size(-1);
            if (last != expected)
                return $"the last dimension of the input must equal in_features = {expected}, but the input has shape {Shape(input)} (last dimension {last}). Give inputs shaped (*, {expected}), or build the layer with in_features = {last}.";
            // A bias broadcasts against the output (*, out_features), as in functional.linear: its last dimension
            // must be out_features or 1.
            if (bias is not null && weight.dim() == 2 && bias.dim() > 0 && bias.size(-1) != weight.size(0) && bias.size(-1) != 1)
                return $"bias of shape {Shape(bias)} does not fit out_features = {weight.size(0)}; expected shape [{weight.size(0)}].";
            return null;
        }

        internal static bool SameDevice(Tensor a, Tensor b) => a.device_type == b.device_type && a.device_index == b.device_index;

        private static string FirstLine(string message)
        {
            int end = message.IndexOf('\n');
            return end < 0 ? message : message[..end];
        }

        internal static string Shape(Tensor tensor) => "[" + string.Join(", ", tensor.shape) + "]";

        // size(i), not shape: TorchSharp's shape getter costs about 1.6 µs a call here, size(i) about 0.02 µs, and
        // this code runs before every matmul.
        private static long InFeatures(Tensor weight) => weight.size(-1);
    }
}
