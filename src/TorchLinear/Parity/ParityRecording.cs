using System;
using System.Collections.Generic;
using System.Linq;
using System.Text;
using System.Text.Json;
using static TorchSharp.torch;

namespace TorchLinear
{
    /// <summary>
    /// One run of a PyTorch module, recorded by <c>tools/pytorch/record_parity.py</c>: its state_dict, its inputs, every
    /// submodule call's inputs and output in call order, the upstream gradient and the gradients of the inputs and
    /// parameters. Read with the checked checkpoint readers (<see cref="StateDicts.ReadPyTorchFile"/>); load it once and
    /// replay it as often as needed with <see cref="Parity.Replay(TorchSharp.torch.nn.Module, ParityRecording, ParityOptions?)"/>.
    /// </summary>
    public sealed class ParityRecording : IDisposable
    {
        private readonly Dictionary<string, Tensor> _tensors;

        private ParityRecording(string path, Dictionary<string, Tensor> tensors, JsonElement metadata)
        {
            Path = path;
            _tensors = tensors;
            TorchVersion = metadata.GetProperty("torch_version").GetString() ?? "?";
            ModuleType = metadata.GetProperty("module_type").GetString() ?? "?";
            CallOrder = metadata.GetProperty("call_order").EnumerateArray().Select(e => e.GetString()!).ToList();
            ModuleTypes = metadata.GetProperty("module_types").EnumerateObject().ToDictionary(p => p.Name, p => p.Value.GetString()!);
            InputCount = metadata.GetProperty("inputs").GetArrayLength();
        }

        /// <summary>Reads a recording.</summary>
        /// <exception cref="CheckpointFormatException">The file is not a valid checkpoint, or not a parity recording.</exception>
        /// <exception cref="System.IO.FileNotFoundException">There is no such file.</exception>
        public static ParityRecording Load(string path)
        {
            ArgumentNullException.ThrowIfNull(path);
            var tensors = StateDicts.ReadPyTorchFile(path);
            try
            {
                if (!tensors.TryGetValue("metadata", out Tensor? raw) || raw.dtype != ScalarType.Byte || raw.dim() != 1)
                    throw new CheckpointFormatException(path, "it is not a parity recording (no 'metadata' entry of bytes): record one with tools/pytorch/record_parity.py.", "metadata");
                string json = Encoding.UTF8.GetString(raw.bytes);
                JsonElement metadata;
                try
                {
                    metadata = JsonDocument.Parse(json).RootElement.Clone();
                    if (metadata.GetProperty("format").GetString() != "torchlinear-parity/1")
                        throw new CheckpointFormatException(path, $"its metadata has format '{metadata.GetProperty("format").GetString()}', not torchlinear-parity/1.", "metadata");
                    return new ParityRecording(path, tensors, metadata);
                }
                catch (Exception error) when (error is JsonException or KeyNotFoundException or InvalidOperationException)
                {
                    throw new CheckpointFormatException(path, $"its metadata is not a parity recording's: {error.Message}", "metadata", inner: error);
                }
            }
            catch
            {
                foreach (Tensor tensor in tensors.Values)
                    tensor.Dispose();
                throw;
            }
        }

        /// <summary>The file it was read from.</summary>
        public string Path { get; }

        /// <summary>The PyTorch version that recorded it.</summary>
        public string TorchVersion { get; }

        /// <summary>The recorded module's class name.</summary>
        public string ModuleType { get; }

        /// <summary>Module paths in the order their calls finished (children before parents); the root is "".</summary>
        public IReadOnlyList<string> CallOrder { get; }

        /// <summary>The class name of each recorded call's module, by call key.</summary>
        public IReadOnlyDictionary<string, string> ModuleTypes { get; }

        /// <summary>How many inputs the recorded run took.</summary>
        public int InputCount { get; }

        /// <summary>The recorded state_dict, under the module's own keys.</summary>
        public IReadOnlyDictionary<string, Tensor> StateDict() =>
            _tensors.Where(kv => kv.Key.StartsWith("state/", StringComparison.Ordinal)).ToDictionary(kv => kv.Key["state/".Length..], kv => kv.Value);

        internal Tensor? Get(string key) => _tensors.TryGetValue(key, out Tensor? tensor) ? tensor : null;

        /// <summary>The recorded tensor inputs of one call, in order.</summary>
        internal List<Tensor> CallInputs(string call)
        {
            var inputs = new List<Tensor>();
            for (int j = 0; Get($"call/{call}/input/{j}") is { } input; j++)
                inputs.Add(input);
            return inputs;
        }

        /// <summary>Frees the recording's tensors.</summary>
        public void Dispose()
        {
            foreach (Tensor tensor in _tensors.Values)
                tensor.Dispose();
            _tensors.Clear();
        }
    }
}
