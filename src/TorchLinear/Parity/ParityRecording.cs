using System;
using System.Collections.Generic;
using System.Globalization;
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
        private readonly Dictionary<string, (List<string> Inputs, List<string> Outputs)> _calls = new();

        private ParityRecording(string path, Dictionary<string, Tensor> tensors, JsonElement metadata)
        {
            Path = path;
            _tensors = tensors;
            TorchVersion = metadata.GetProperty("torch_version").GetString() ?? "?";
            ModuleType = metadata.GetProperty("module_type").GetString() ?? "?";
            CallOrder = metadata.GetProperty("call_order").EnumerateArray().Select(e => e.GetString()!).ToList();
            ModuleTypes = metadata.GetProperty("module_types").EnumerateObject().ToDictionary(p => p.Name, p => p.Value.GetString()!);
            InputCount = metadata.GetProperty("inputs").GetArrayLength();
            string format = metadata.GetProperty("format").GetString()!;
            FormatVersion = format == "torchlinear-parity/2" ? 2 : 1;
            if (FormatVersion == 1)
            {
                CallStartOrder = null;
                Training = null;
                Tied = new Dictionary<string, string>();
                Noise = new Dictionary<string, double>();
                OutputIndex = 0;
                foreach (string key in CallOrder)
                {
                    int inputs = 0;
                    while (tensors.ContainsKey($"call/{key}/input/{inputs}"))
                        inputs++;
                    _calls[key] = (Enumerable.Range(0, inputs).Select(j => j.ToString(CultureInfo.InvariantCulture)).ToList(),
                                   tensors.ContainsKey($"call/{key}/output") ? new List<string> { "0" } : new List<string>());
                }
                return;
            }
            CallStartOrder = metadata.GetProperty("call_start_order").EnumerateArray().Select(e => e.GetString()!).ToList();
            Training = metadata.GetProperty("training").EnumerateObject().ToDictionary(p => p.Name, p => p.Value.GetBoolean());
            Tied = Optional(metadata, "tied") is { ValueKind: JsonValueKind.Object } tied
                ? tied.EnumerateObject().ToDictionary(p => p.Name, p => p.Value.GetString()!)
                : new Dictionary<string, string>();
            Noise = Optional(metadata, "noise") is { ValueKind: JsonValueKind.Object } noise
                ? noise.EnumerateObject().ToDictionary(p => p.Name, p => p.Value.ValueKind == JsonValueKind.Number ? p.Value.GetDouble() : double.NaN)
                : new Dictionary<string, double>();
            NoiseReference = Optional(metadata, "noise_reference") is { ValueKind: JsonValueKind.String } reference ? reference.GetString() : null;
            NoiseUnavailable = Optional(metadata, "noise_unavailable") is { ValueKind: JsonValueKind.String } why ? why.GetString() : null;
            OutputIndex = Optional(metadata, "output_index") is { ValueKind: JsonValueKind.Number } index
                ? index.TryGetInt32(out int at) && at >= 0 ? at : throw new InvalidOperationException($"output_index {index.GetRawText()} is not an index of the root's output tensors")
                : 0;
            foreach (var call in metadata.GetProperty("calls").EnumerateObject())
            {
                var names = (call.Value.GetProperty("inputs").EnumerateArray().Select(e => e.GetString()!).ToList(),
                             call.Value.GetProperty("outputs").EnumerateArray().Select(e => e.GetString()!).ToList());
                for (int j = 0; j < names.Item1.Count; j++)
                {
                    if (!tensors.ContainsKey($"call/{call.Name}/input/{j}"))
                        throw new KeyNotFoundException($"the metadata names {names.Item1.Count} inputs of call '{call.Name}', but there is no tensor 'call/{call.Name}/input/{j}'");
                }
                for (int k = 0; k < names.Item2.Count; k++)
                {
                    if (!tensors.ContainsKey($"call/{call.Name}/output/{k}"))
                        throw new KeyNotFoundException($"the metadata names {names.Item2.Count} outputs of call '{call.Name}', but there is no tensor 'call/{call.Name}/output/{k}'");
                }
                _calls[call.Name] = names;
            }
            foreach (string key in CallOrder)
            {
                if (!_calls.ContainsKey(key))
                    throw new KeyNotFoundException($"call '{key}' is in call_order but not in calls");
            }
        }

        private static JsonElement? Optional(JsonElement metadata, string name) =>
            metadata.TryGetProperty(name, out JsonElement value) ? value : null;

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
                    string? format = metadata.GetProperty("format").GetString();
                    if (format is not ("torchlinear-parity/1" or "torchlinear-parity/2"))
                        throw new CheckpointFormatException(path, $"its metadata has format '{format}', not torchlinear-parity/1 or /2.", "metadata");
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

        /// <summary>The format's version: 1 (<c>torchlinear-parity/1</c>) or 2 (<c>torchlinear-parity/2</c>).</summary>
        public int FormatVersion { get; }

        /// <summary>Call keys in the order the calls started (parents before children); null for a version 1 recording.</summary>
        public IReadOnlyList<string>? CallStartOrder { get; }

        /// <summary>Every module's <c>training</c> flag by path (root ""), as named_modules lists them; null for a version 1 recording.</summary>
        public IReadOnlyDictionary<string, bool>? Training { get; }

        /// <summary>For each parameter name that is another name of an earlier parameter, that earlier name (empty for version 1).</summary>
        public IReadOnlyDictionary<string, string> Tied { get; }

        /// <summary>
        /// PyTorch's own rounding error of each recorded floating-point tensor, by tensor key (<c>call/&lt;key&gt;/output/&lt;k&gt;</c>,
        /// <c>call/&lt;key&gt;/input/&lt;j&gt;</c>, <c>grad/input/&lt;i&gt;</c>, <c>grad/param/&lt;name&gt;</c>): the largest
        /// |float32 value − the same value computed in float64|. Empty when there is no rounding reference.
        /// </summary>
        public IReadOnlyDictionary<string, double> Noise { get; }

        /// <summary>"float64" when the recorder also ran the model in float64 (so <see cref="Noise"/> is known), else null.</summary>
        public string? NoiseReference { get; }

        /// <summary>Why the recorder could not run the model in float64, or null.</summary>
        public string? NoiseUnavailable { get; }

        /// <summary>Whether the recording carries PyTorch's rounding error (<see cref="Noise"/>): false for version 1 and
        /// for a model that could not run in float64; the replay then judges by tolerances alone.</summary>
        public bool HasRoundingReference => NoiseReference is not null;

        /// <summary>The parameters whose gradients were recorded (<c>grad/param/&lt;name&gt;</c>), in the recording's order.</summary>
        internal IReadOnlyList<string> GradientNames =>
            _tensors.Keys.Where(k => k.StartsWith("grad/param/", StringComparison.Ordinal)).Select(k => k["grad/param/".Length..]).ToList();

        /// <summary>Which flattened output tensor of the root was taken as "the output" (for the upstream gradient).</summary>
        public int OutputIndex { get; }

        /// <summary>The names of a recorded call's tensor inputs, in order ("0", "1", "hidden_states", ...).</summary>
        public IReadOnlyList<string> CallInputNames(string call) => _calls.TryGetValue(call, out var names) ? names.Inputs : Array.Empty<string>();

        /// <summary>The names of a recorded call's tensor outputs, in order ("0", "1", "0.1", "last_hidden_state", ...).</summary>
        public IReadOnlyList<string> CallOutputNames(string call) => _calls.TryGetValue(call, out var names) ? names.Outputs : Array.Empty<string>();

        /// <summary>PyTorch's rounding error of the recorded tensor under <paramref name="key"/>, or null when not known.</summary>
        public double? NoiseOf(string key) => Noise.TryGetValue(key, out double noise) && !double.IsNaN(noise) ? noise : null;

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

        /// <summary>The recorded tensor outputs of one call, in order (version 1's single <c>call/&lt;key&gt;/output</c> is a list of one).</summary>
        internal List<Tensor> CallOutputs(string call)
        {
            if (FormatVersion == 1)
                return Get($"call/{call}/output") is { } output ? new List<Tensor> { output } : new List<Tensor>();
            var outputs = new List<Tensor>();
            for (int k = 0; Get($"call/{call}/output/{k}") is { } output; k++)
                outputs.Add(output);
            return outputs;
        }

        /// <summary>The tensor key of a call's k-th output, as <see cref="Noise"/> is keyed.</summary>
        internal static string OutputKey(string call, int k) => $"call/{call}/output/{k}";

        /// <summary>Frees the recording's tensors.</summary>
        public void Dispose()
        {
            foreach (Tensor tensor in _tensors.Values)
                tensor.Dispose();
            _tensors.Clear();
        }
    }
}
