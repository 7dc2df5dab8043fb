using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using TorchSharp;
using TorchSharp.PyBridge;
using static TorchSharp.torch;

namespace TorchLinear.Lora
{
    /// <summary>
    /// PEFT's adapter folder (PEFT's <c>utils/save_and_load.py</c>): <c>adapter_config.json</c>, and the tensors in
    /// <c>adapter_model.safetensors</c> (or <c>adapter_model.bin</c>, a <c>torch.save</c> file) under the keys
    /// <c>base_model.model.&lt;path&gt;.lora_A.weight</c> / <c>.lora_B.weight</c> (no adapter name), the trained biases and
    /// every <c>modules_to_save</c> module's state under their plain names.
    /// </summary>
    internal static class PeftFolder
    {
        internal const string Prefix = "base_model.model.";
        internal const string ConfigFile = "adapter_config.json";
        internal const string SafetensorsFile = "adapter_model.safetensors";
        internal const string BinFile = "adapter_model.bin";

        internal static string LoraKey(string path, string part) => $"{Prefix}{path}.{part}.weight";

        /// <summary>The folder's tensor file: the safetensors one, or without it the .bin one.</summary>
        internal static string AdapterFile(string directory)
        {
            string file = Path.Combine(directory, SafetensorsFile);
            if (!File.Exists(file))
                file = Path.Combine(directory, BinFile);
            if (!File.Exists(file))
                throw new FileNotFoundException($"{directory} has neither {SafetensorsFile} nor {BinFile}.", file);
            return file;
        }

        /// <summary>
        /// Checks every tensor of an adapter file against the targets and the model before anything changes, and returns
        /// the tensors that are not adapter weights paired with the model's tensors they load into.
        /// </summary>
        /// <exception cref="InvalidOperationException">Anything does not fit; the message lists every problem.</exception>
        internal static List<(string Key, Tensor Target)> Plan(nn.Module model, LoraConfig config, List<LoraModel.Target> targets,
                                                               Dictionary<string, Tensor> tensors, string file)
        {
            var problems = new List<string>();
            var own = model.state_dict();
            var targetByPath = targets.ToDictionary(t => t.Path);
            var plan = new List<(string, Tensor)>();
            foreach (var (key, tensor) in tensors.OrderBy(kv => kv.Key, StringComparer.Ordinal))
            {
                if (!key.StartsWith(Prefix, StringComparison.Ordinal))
                {
                    problems.Add($"'{key}' does not start with '{Prefix}' (not a PEFT key)");
                    continue;
                }
                string name = key[Prefix.Length..];
                if (name.Contains("lora_embedding_", StringComparison.Ordinal))
                    throw new NotSupportedException($"{file}: '{key}' is a LoRA on an embedding, which TorchLinear.Lora does not implement.");
                if (name.EndsWith("lora_magnitude_vector", StringComparison.Ordinal) || name.Contains(".lora_magnitude_vector.", StringComparison.Ordinal))
                    throw new NotSupportedException($"{file}: '{key}' is a DoRA magnitude, which TorchLinear.Lora does not implement.");
                if (name.Contains(".modules_to_save.", StringComparison.Ordinal) || name.Contains(".original_module.", StringComparison.Ordinal))
                {
                    problems.Add($"'{key}' puts LoRA or weights inside a saved module's wrapper (a broken adapter: modules_to_save modules are saved under their plain names)");
                    continue;
                }
                bool isA = name.EndsWith(".lora_A.weight", StringComparison.Ordinal), isB = name.EndsWith(".lora_B.weight", StringComparison.Ordinal);
                if (isA || isB)
                {
                    string path = name[..^".lora_A.weight".Length];
                    if (!targetByPath.TryGetValue(path, out var target))
                    {
                        problems.Add($"'{key}' is an adapter for {path}, which the config's target_modules does not select in this model");
                        continue;
                    }
                    var weight = target.Weight;
                    long[] expected = isA ? new[] { (long)target.Rank, weight.size(1) } : new[] { weight.size(0), (long)target.Rank };
                    if (!tensor.shape.SequenceEqual(expected))
                        problems.Add($"'{key}' has shape [{string.Join(", ", tensor.shape)}], {path} needs [{string.Join(", ", expected)}] (r = {target.Rank})");
                    else if (!is_floating_point(tensor.dtype))
                        problems.Add($"'{key}' is {tensor.dtype}, not a floating-point tensor");
                    else if (!Finite(tensor))
                        problems.Add($"'{key}' holds NaN or infinity");
                    continue;
                }
                if (name.Contains(".lora_", StringComparison.Ordinal) || name.StartsWith("lora_", StringComparison.Ordinal))
                {
                    problems.Add($"'{key}' is an adapter tensor TorchLinear.Lora does not read (a bias on lora_B, or another PEFT feature)");
                    continue;
                }
                if (!own.TryGetValue(name, out Tensor? destination))
                {
                    problems.Add($"'{key}' names no parameter or buffer of the model ('{name}')");
                    continue;
                }
                if (!tensor.shape.SequenceEqual(destination.shape))
                    problems.Add($"'{key}' has shape [{string.Join(", ", tensor.shape)}], the model's {name} [{string.Join(", ", destination.shape)}]");
                else if (is_floating_point(destination.dtype) ? !is_floating_point(tensor.dtype) : tensor.dtype != destination.dtype)
                    problems.Add($"'{key}' is {tensor.dtype}, the model's {name} is {destination.dtype}");
                else if (is_floating_point(tensor.dtype) && !Finite(tensor))
                    problems.Add($"'{key}' holds NaN or infinity");
                else
                    plan.Add((key, destination));
            }
            foreach (var target in targets)
            {
                foreach (string part in new[] { "lora_A", "lora_B" })
                {
                    if (!tensors.ContainsKey(LoraKey(target.Path, part)))
                        problems.Add($"missing '{LoraKey(target.Path, part)}' for the targeted {target.Path}");
                }
            }
            if (problems.Count > 0)
                throw new InvalidOperationException($"LoraModel.load_adapter: refused {file}, nothing was changed: {string.Join("; ", problems)}.");
            _ = config;
            return plan;
        }

        private static bool Finite(Tensor tensor)
        {
            using var scope = NewDisposeScope();
            return tensor.numel() == 0 || isfinite(tensor).all().item<bool>();
        }

        /// <summary>Writes the model's adapter into <paramref name="directory"/>, as PEFT's <c>save_pretrained</c> lays it out.</summary>
        internal static void Save(AdaptedModel state, nn.Module model, string directory)
        {
            var config = state.Config;
            var dtypes = state.FileDtypes;
            using var scope = NewDisposeScope();
            var tensors = new Dictionary<string, Tensor>();
            void Put(string key, Tensor tensor) =>
                tensors[key] = (dtypes.TryGetValue(key, out ScalarType dtype) && dtype != tensor.dtype ? tensor.detach().to(dtype) : tensor.detach()).contiguous();
            var adapterParameters = new HashSet<IntPtr>();
            foreach (var layer in state.Layers)
            {
                Put(LoraKey(layer.Path, "lora_A"), layer.Layer.lora_A.weight);
                Put(LoraKey(layer.Path, "lora_B"), layer.Layer.lora_B.weight);
                adapterParameters.Add(layer.Layer.lora_A.weight.Handle);
                adapterParameters.Add(layer.Layer.lora_B.weight.Handle);
            }
            var adaptedBiases = new HashSet<string>(state.Layers.Select(l => l.Path + ".bias"), StringComparer.Ordinal);
            foreach (var (name, parameter) in model.named_parameters())
            {
                if (adapterParameters.Contains(parameter.Handle))
                    continue;
                bool isBias = name == "bias" || name.EndsWith(".bias", StringComparison.Ordinal);
                if ((config.bias == "all" && isBias) || (config.bias == "lora_only" && adaptedBiases.Contains(name)))
                    Put(Prefix + name, parameter);
            }
            foreach (var saved in state.Saved)
            {
                foreach (var (name, tensor) in saved.Module.state_dict())
                    Put($"{Prefix}{saved.Path}.{name}", tensor);
            }
            Directory.CreateDirectory(directory);
            config.save(Path.Combine(directory, ConfigFile));
            Safetensors.SaveStateDict(Path.Combine(directory, SafetensorsFile), tensors);
        }
    }
}
