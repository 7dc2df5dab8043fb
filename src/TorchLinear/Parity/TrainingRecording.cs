using System;
using System.Collections.Generic;
using System.Linq;
using System.Text;
using System.Text.Json;
using static TorchSharp.torch;

namespace TorchLinear
{
    /// <summary>
    /// A training run of a PyTorch model, recorded by <c>record_training</c> in <c>tools/pytorch/record_parity.py</c>: the
    /// state_dict before the first step, the optimizer's class and every parameter's group settings, and for every step the
    /// batch, the loss, every module call of the forward, the gradients as the optimizer saw them, the learning rate used,
    /// the parameters after the step and the optimizer's state. Read with the checked checkpoint readers; replay it with
    /// <see cref="Parity.ReplayTraining(TorchSharp.torch.nn.Module{Tensor, Tensor}, TrainingRecording, TorchSharp.torch.optim.Optimizer, Func{Tensor, Tensor, Tensor}, TrainingParityOptions?)"/>.
    /// </summary>
    public sealed class TrainingRecording : IDisposable
    {
        private readonly Dictionary<string, Tensor> _tensors;
        private readonly List<JsonElement> _steps;
        private readonly Dictionary<string, (int Group, JsonElement Settings)> _groupOf = new(StringComparer.Ordinal);
        private readonly Lazy<Dictionary<(int Step, string Parameter), List<string>>> _optimizerState;

        private TrainingRecording(string path, Dictionary<string, Tensor> tensors, JsonElement metadata)
        {
            Path = path;
            _tensors = tensors;
            TorchVersion = metadata.GetProperty("torch_version").GetString() ?? "?";
            ModuleType = metadata.GetProperty("module_type").GetString() ?? "?";
            Optimizer = metadata.GetProperty("optimizer").GetString() ?? "?";
            Scheduler = metadata.TryGetProperty("scheduler", out var scheduler) && scheduler.ValueKind == JsonValueKind.String ? scheduler.GetString() : null;
            MaxGradNorm = metadata.TryGetProperty("max_grad_norm", out var norm) && norm.ValueKind == JsonValueKind.Number ? norm.GetDouble() : null;
            LossFunction = metadata.TryGetProperty("loss_fn", out var loss) ? loss.GetString() ?? "?" : "?";
            Parameters = metadata.GetProperty("parameters").EnumerateArray().Select(e => e.GetString()!).ToList();
            int g = 0;
            foreach (var group in metadata.GetProperty("groups").EnumerateArray())
            {
                foreach (var name in group.GetProperty("parameters").EnumerateArray())
                    _groupOf[name.GetString()!] = (g, group);
                g++;
            }
            _steps = metadata.GetProperty("steps").EnumerateArray().ToList();
            _optimizerState = new Lazy<Dictionary<(int, string), List<string>>>(IndexOptimizerState);
        }

        /// <summary>step/&lt;s&gt;/optim/&lt;name&gt;/&lt;field&gt; keys by step and parameter, read once: a replay asks for them every step.</summary>
        private Dictionary<(int, string), List<string>> IndexOptimizerState()
        {
            var index = new Dictionary<(int, string), List<string>>();
            var names = new HashSet<string>(Parameters, StringComparer.Ordinal);
            foreach (string key in _tensors.Keys)
            {
                const string optim = "/optim/";
                int at = key.IndexOf(optim, StringComparison.Ordinal);
                int slash = key.LastIndexOf('/');
                if (!key.StartsWith("step/", StringComparison.Ordinal) || at < 0 || slash <= at + optim.Length ||
                    !int.TryParse(key.AsSpan(5, at - 5), System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out int step))
                    continue;
                string parameter = key[(at + optim.Length)..slash];
                if (!names.Contains(parameter))
                    continue;
                if (!index.TryGetValue((step, parameter), out var fields))
                    index[(step, parameter)] = fields = new List<string>();
                fields.Add(key[(slash + 1)..]);
            }
            return index;
        }

        /// <summary>Reads a recording.</summary>
        /// <exception cref="CheckpointFormatException">The file is not a valid checkpoint, or not a training recording.</exception>
        /// <exception cref="System.IO.FileNotFoundException">There is no such file.</exception>
        public static TrainingRecording Load(string path)
        {
            ArgumentNullException.ThrowIfNull(path);
            var tensors = StateDicts.ReadPyTorchFile(path);
            try
            {
                if (!tensors.TryGetValue("metadata", out Tensor? raw) || raw.dtype != ScalarType.Byte || raw.dim() != 1)
                    throw new CheckpointFormatException(path, "it is not a training recording (no 'metadata' entry of bytes): record one with record_training in tools/pytorch/record_parity.py.", "metadata");
                string json = Encoding.UTF8.GetString(raw.bytes);
                try
                {
                    var metadata = JsonDocument.Parse(json).RootElement.Clone();
                    string? format = metadata.GetProperty("format").GetString();
                    if (format != "torchlinear-training/1")
                        throw new CheckpointFormatException(path, $"its metadata has format '{format}', not torchlinear-training/1" +
                            (format == "torchlinear-parity/1" ? ": it records one forward and backward; replay it with Parity.Replay." : "."), "metadata");
                    var recording = new TrainingRecording(path, tensors, metadata);
                    recording.Check();
                    return recording;
                }
                catch (Exception error) when (error is JsonException or KeyNotFoundException or InvalidOperationException or FormatException)
                {
                    throw new CheckpointFormatException(path, $"its metadata is not a training recording's: {error.Message}", "metadata", inner: error);
                }
            }
            catch
            {
                foreach (Tensor tensor in tensors.Values)
                    tensor.Dispose();
                throw;
            }
        }

        /// <summary>Every step must hold what a replay reads: refused at load, not half way through a replay.</summary>
        private void Check()
        {
            if (_steps.Count == 0)
                throw new CheckpointFormatException(Path, "it records no step.", "metadata");
            for (int s = 0; s < _steps.Count; s++)
            {
                foreach (string part in new[] { "input", "target", "loss" })
                {
                    if (!_tensors.ContainsKey($"step/{s}/{part}"))
                        throw new CheckpointFormatException(Path, $"step {s} has no {part}.", $"step/{s}/{part}");
                }
                foreach (string name in Parameters)
                {
                    if (!_tensors.ContainsKey($"step/{s}/param/{name}"))
                        throw new CheckpointFormatException(Path, $"step {s} has no value of {name} after the step.", $"step/{s}/param/{name}");
                }
            }
            foreach (string name in Parameters)
            {
                if (!_groupOf.ContainsKey(name))
                    throw new CheckpointFormatException(Path, $"the parameter {name} is in no parameter group of the optimizer.", "metadata");
            }
        }

        /// <summary>The file it was read from.</summary>
        public string Path { get; }

        /// <summary>The PyTorch version that recorded it.</summary>
        public string TorchVersion { get; }

        /// <summary>The recorded model's class name.</summary>
        public string ModuleType { get; }

        /// <summary>The recorded optimizer's class name (<c>AdamW</c>, <c>SGD</c>, ...).</summary>
        public string Optimizer { get; }

        /// <summary>The learning-rate scheduler's class name, if one stepped after each optimizer step.</summary>
        public string? Scheduler { get; }

        /// <summary>The norm the gradients were clipped to before each step, if they were.</summary>
        public double? MaxGradNorm { get; }

        /// <summary>The loss function's name.</summary>
        public string LossFunction { get; }

        /// <summary>The model's parameters, by state_dict name, in its order.</summary>
        public IReadOnlyList<string> Parameters { get; }

        /// <summary>How many steps were recorded.</summary>
        public int StepCount => _steps.Count;

        /// <summary>The state_dict before the first step.</summary>
        public IReadOnlyDictionary<string, Tensor> StateDict() =>
            _tensors.Where(kv => kv.Key.StartsWith("state/", StringComparison.Ordinal)).ToDictionary(kv => kv.Key["state/".Length..], kv => kv.Value);

        /// <summary>The loss recorded at a step.</summary>
        public double Loss(int step) => _steps[step].GetProperty("loss").GetDouble();

        /// <summary>The learning rate the parameter's group used at a step.</summary>
        public double LearningRate(int step, string parameter) => _steps[step].GetProperty("lr")[_groupOf[parameter].Group].GetDouble();

        /// <summary>The settings of the parameter's group (lr as at the start, betas, eps, weight_decay, momentum, ...).</summary>
        internal IEnumerable<(string Key, JsonElement Value)> Settings(string parameter) =>
            _groupOf[parameter].Settings.EnumerateObject().Where(p => p.Name != "parameters").Select(p => (p.Name, p.Value));

        /// <summary>The batch of a step, <c>(input, target)</c>, as PyTorch's loop was given it; owned by the recording.</summary>
        /// <exception cref="ArgumentOutOfRangeException">There is no such step.</exception>
        public (Tensor Input, Tensor Target) Batch(int step)
        {
            if (step < 0 || step >= StepCount)
                throw new ArgumentOutOfRangeException(nameof(step), step, $"'{Path}' records steps 0 to {StepCount - 1}.");
            return (_tensors[$"step/{step}/input"], _tensors[$"step/{step}/target"]);
        }

        /// <summary>A parameter's value after a step (PyTorch's), by state_dict name; owned by the recording.</summary>
        /// <exception cref="ArgumentOutOfRangeException">There is no such step.</exception>
        /// <exception cref="KeyNotFoundException">There is no such parameter.</exception>
        public Tensor ParameterAfter(int step, string name)
        {
            ArgumentNullException.ThrowIfNull(name);
            if (step < 0 || step >= StepCount)
                throw new ArgumentOutOfRangeException(nameof(step), step, $"'{Path}' records steps 0 to {StepCount - 1}.");
            return _tensors.TryGetValue($"step/{step}/param/{name}", out Tensor? value)
                ? value
                : throw new KeyNotFoundException($"'{Path}' has no parameter {name}; its parameters: {string.Join(", ", Parameters)}.");
        }

        internal Tensor Get(string key) => _tensors[key];

        internal Tensor? Find(string key) => _tensors.TryGetValue(key, out Tensor? tensor) ? tensor : null;

        internal IReadOnlyList<string> CallOrder(int step) => _steps[step].GetProperty("call_order").EnumerateArray().Select(e => e.GetString()!).ToList();

        internal IReadOnlyDictionary<string, string> ModuleTypes(int step) =>
            _steps[step].GetProperty("module_types").EnumerateObject().ToDictionary(p => p.Name, p => p.Value.GetString()!);

        internal List<Tensor> CallInputs(int step, string call)
        {
            var inputs = new List<Tensor>();
            for (int j = 0; Find($"step/{step}/call/{call}/input/{j}") is { } input; j++)
                inputs.Add(input);
            return inputs;
        }

        /// <summary>The optimizer's state of a parameter after a step: its tensors (<c>exp_avg</c>, ...) and numbers (<c>step</c>).</summary>
        internal (Dictionary<string, Tensor> Tensors, Dictionary<string, double> Numbers) OptimizerState(int step, string parameter)
        {
            var tensors = new Dictionary<string, Tensor>(StringComparer.Ordinal);
            if (_optimizerState.Value.TryGetValue((step, parameter), out var fields))
            {
                foreach (string field in fields)
                    tensors[field] = _tensors[$"step/{step}/optim/{parameter}/{field}"];
            }
            var numbers = new Dictionary<string, double>();
            if (_steps[step].TryGetProperty("optimizer_numbers", out var all) && all.TryGetProperty(parameter, out var own))
            {
                foreach (var field in own.EnumerateObject())
                    numbers[field.Name] = field.Value.GetDouble();
            }
            return (tensors, numbers);
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
