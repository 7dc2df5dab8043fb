using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace TorchLinear.IntegrationTests.Checkpoints
{
    /// <summary>
    /// The adapter-folder family of the checkpoint fuzz suite: PEFT adapter folders (TorchLinear.Lora's reference
    /// "attention" adapter) with their adapter_config.json or adapter_model.safetensors damaged or made hostile, each loaded
    /// by the child with LoraModel.load_adapter into the port the adapter was made for. Each must be refused with one of the
    /// documented exceptions, naming a file of the folder, the model bitwise unchanged; or load exactly the base model's
    /// tensors with the folder's tensors in place, as an independent reader finds them in the file.
    /// </summary>
    public partial class CheckpointFuzzTests
    {
        private static readonly string Adapter = Path.Combine(AppContext.BaseDirectory, "ReferenceData", "Peft", "attention");

        private static readonly string[] AdapterRefusals =
        {
            typeof(CheckpointFormatException).FullName!, typeof(InvalidOperationException).FullName!, typeof(NotSupportedException).FullName!,
            typeof(ArgumentException).FullName!, typeof(FileNotFoundException).FullName!,
        };

        private static IEnumerable<Mutant> AdapterFolders(string root, Random random)
        {
            byte[] config = File.ReadAllBytes(Path.Combine(Adapter, "adapter_config.json"));
            byte[] tensors = File.ReadAllBytes(Path.Combine(Adapter, "adapter_model.safetensors"));
            var baseHashes = Strict.Hashes(File.ReadAllBytes(Path.Combine(Adapter, "base.safetensors")))!;
            int counter = 0;

            // A folder of the two files; what it may load is the base model with the file's tensors in place.
            Mutant Folder(string family, byte[]? configBytes, byte[]? tensorBytes)
            {
                string folder = Path.Combine(root, $"adapter{counter++:D4}");
                Directory.CreateDirectory(folder);
                if (configBytes is not null)
                    File.WriteAllBytes(Path.Combine(folder, "adapter_config.json"), configBytes);
                if (tensorBytes is not null)
                    File.WriteAllBytes(Path.Combine(folder, "adapter_model.safetensors"), tensorBytes);
                var file = tensorBytes is null ? null : Strict.Hashes(tensorBytes);
                Dictionary<string, string>? expected = null;
                if (file is not null)
                {
                    expected = new Dictionary<string, string>(baseHashes);
                    foreach (var (key, hash) in file)
                        expected[ModelKey(key)] = hash;
                }
                return new Mutant(family, folder, "adapter", expected);
            }
            byte[] Config(Action<JsonObject> edit)
            {
                var json = JsonNode.Parse(config)!.AsObject();
                edit(json);
                return Encoding.UTF8.GetBytes(json.ToJsonString());
            }

            yield return Folder("adapter-original", config, tensors);
            for (int i = 0; i < 100; i++)
            {
                byte[] bytes = (byte[])config.Clone();
                int at = random.Next(bytes.Length);
                bytes[at] = (byte)(bytes[at] ^ random.Next(1, 256));
                yield return Folder("adapter-config-byte-flip", bytes, tensors);
            }
            for (int i = 0; i < 30; i++)
                yield return Folder("adapter-config-truncated", config[..random.Next(config.Length)], tensors);

            // Every field the library reads, given values of every JSON kind and the edges of its range.
            string[] fields = { "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "modules_to_save", "rank_pattern", "alpha_pattern",
                                "bias", "use_rslora", "init_lora_weights", "peft_type", "use_dora", "layers_to_transform", "fan_in_fan_out" };
            string[] values = { "null", "true", "false", "\"x\"", "\"\"", "[]", "{}", "[\"q_proj\"]", "{\"q_proj\": 0}", "-1", "0", "1", "2.5", "1e39", "1e400",
                                "\"(.*)*x\"", "[\"(.*)*x\"]", "{\"(.*)*x\": 2}", "\"q_proj(\"", "[[[[[[[[1]]]]]]]]" };
            foreach (string field in fields)
                foreach (string value in values)
                    yield return Folder("adapter-config-fields", Config(json => json[field] = JsonNode.Parse(value)), tensors);

            // Whole files from strangers.
            string text = Encoding.UTF8.GetString(config);
            yield return Folder("adapter-config-hostile", Encoding.UTF8.GetBytes("[" + text + "]"), tensors);
            yield return Folder("adapter-config-hostile", Encoding.UTF8.GetBytes("\"LORA\""), tensors);
            yield return Folder("adapter-config-hostile", Array.Empty<byte>(), tensors);
            yield return Folder("adapter-config-hostile", new byte[] { 0xEF, 0xBB, 0xBF }.Concat(config).ToArray(), tensors);
            yield return Folder("adapter-config-hostile", Encoding.UTF8.GetBytes(text.TrimEnd().TrimEnd('}') + ", \"r\": 16}"), tensors);
            yield return Folder("adapter-config-hostile", Encoding.UTF8.GetBytes(text.TrimEnd().TrimEnd('}') + "," + new string(' ', 2 << 20) + "\"pad\": 1}"), tensors);
            yield return Folder("adapter-config-hostile", Config(json => json["modules_to_save"] = new JsonArray(Enumerable.Range(0, 44_000).Select(i => (JsonNode?)$"module_{i}").Append("classifier").ToArray())), tensors);
            yield return Folder("adapter-config-hostile", Config(json => json["target_modules"] = ".*(q|v|o)_proj|" + string.Concat(Enumerable.Repeat("(a|aa)*", 50)) + "b"), tensors);
            yield return Folder("adapter-config-hostile", Config(json => json["target_modules"] = @"(?=(\w+\w+)+!)x"), tensors);
            yield return Folder("adapter-config-hostile", Config(json => json["exclude_modules"] = "(x+x+)+y"), tensors);
            yield return Folder("adapter-config-hostile", Config(json => json["rank_pattern"] = new JsonObject(Enumerable.Range(0, 5000).Select(i => KeyValuePair.Create($"layers\\.{i}\\.(.*)*z", (JsonNode?)2)).Append(KeyValuePair.Create("o_proj", (JsonNode?)2)))), tensors);
            yield return Folder("adapter-config-hostile", Encoding.UTF8.GetBytes("{" + string.Concat(Enumerable.Repeat("\"a\":{", 5000)) + string.Concat(Enumerable.Repeat("}", 5000)) + "}"), tensors);

            // The tensor file damaged in its data (values change, or turn NaN), and cut short.
            var header = BitConverter.ToUInt64(tensors, 0);
            int dataStart = 8 + (int)header;
            for (int i = 0; i < 60; i++)
            {
                byte[] bytes = (byte[])tensors.Clone();
                int at = dataStart + random.Next(bytes.Length - dataStart);
                bytes[at] = (byte)(bytes[at] ^ random.Next(1, 256));
                yield return Folder("adapter-tensors-byte-flip", config, bytes);
            }
            for (int i = 0; i < 20; i++)
                yield return Folder("adapter-tensors-truncated", config, tensors[..random.Next(tensors.Length)]);

            // Files that are missing, or not files.
            yield return Folder("adapter-special", null, tensors);
            yield return Folder("adapter-special", config, null);
            var zero = Folder("adapter-special", null, tensors);
            File.CreateSymbolicLink(Path.Combine(zero.File, "adapter_config.json"), "/dev/zero");
            yield return zero;
            var zeroTensors = Folder("adapter-special", config, null);
            File.CreateSymbolicLink(Path.Combine(zeroTensors.File, "adapter_model.safetensors"), "/dev/zero");
            yield return zeroTensors;
            var fifo = Folder("adapter-special", null, tensors);
            if (mkfifo(Path.Combine(fifo.File, "adapter_config.json"), Convert.ToInt32("600", 8)) == 0)
                yield return fifo;
            var directory = Folder("adapter-special", null, tensors);
            Directory.CreateDirectory(Path.Combine(directory.File, "adapter_config.json"));
            yield return directory;
        }

        private static IEnumerable<string> CheckAdapter(Mutant m, JsonElement r)
        {
            string outcome = r.GetProperty("outcome").GetString()!;
            double elapsed = r.GetProperty("elapsedMs").GetDouble();
            if (elapsed > 2000)
                yield return $"took {elapsed:F0} ms";
            long growth = r.GetProperty("peakGrowthKiB").GetInt64() * 1024;
            if (growth > 256 * OneMiB)
                yield return $"peak memory grew by {growth / OneMiB} MiB";
            if (outcome == "refused")
            {
                string type = r.GetProperty("type").GetString()!;
                string message = r.GetProperty("message").GetString()!;
                if (!AdapterRefusals.Contains(type))
                    yield return $"refused with {type}: {message}";
                if (!message.Contains(m.File, StringComparison.Ordinal))
                    yield return $"the refusal names no file of the folder: {message}";
                if (!r.GetProperty("unchanged").GetBoolean())
                    yield return "refused, but the model changed";
                if (type == typeof(InvalidOperationException).FullName && !message.Contains("nothing was changed", StringComparison.Ordinal))
                    yield return $"refused without saying nothing changed: {message}";
                yield break;
            }
            if (m.Expected is null)
            {
                yield return "loaded a folder whose tensor file the independent reader refuses (a silent wrong load)";
                yield break;
            }
            var loaded = r.GetProperty("tensors").EnumerateObject().ToDictionary(p => p.Name, p => p.Value.GetString()!);
            var wrong = loaded.Where(kv => !m.Expected.TryGetValue(kv.Key, out var e) || e != kv.Value).Select(kv => kv.Key).ToList();
            var missing = m.Expected.Keys.Where(k => !loaded.ContainsKey(k)).ToList();
            if (wrong.Count > 0 || missing.Count > 0)
                yield return $"loaded other values than the folder holds: {string.Join("; ", wrong.Concat(missing).Take(5))}";
        }

        /// <summary>PEFT's file key as the model's state_dict names it: without the prefix, with the adapter's name (default).</summary>
        private static string ModelKey(string key)
        {
            string name = key.StartsWith("base_model.model.", StringComparison.Ordinal) ? key["base_model.model.".Length..] : key;
            foreach (string part in new[] { ".lora_A.", ".lora_B." })
            {
                if (name.EndsWith(part + "weight", StringComparison.Ordinal))
                    return name[..^"weight".Length] + "default.weight";
            }
            return name;
        }
    }
}
