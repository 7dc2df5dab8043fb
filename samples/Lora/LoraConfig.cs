// LoraConfig: Hugging Face PEFT's LoRA configuration, read from and written to its adapter_config.json.
// Part of the LoRA sample (copy LoraConfig.cs, LoraModel.cs and LoraLinear.cs together); see LoraModel.cs.
using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;

namespace TorchLinear.Samples
{
    /// <summary>
    /// The fields of PEFT's <c>LoraConfig</c> that decide what a LoRA adapter computes, named as in
    /// <c>adapter_config.json</c> and defaulted as PEFT defaults them. Unknown keys are ignored; a feature this sample does
    /// not implement (DoRA, initialisations that change the base weights, layer selection by index, ...) is refused by name.
    /// </summary>
    public sealed class LoraConfig
    {
        /// <summary>The adapter's rank (PEFT default 8).</summary>
        public int r { get; set; } = 8;

        /// <summary>Scale numerator (PEFT default 8): scaling = lora_alpha / r, or lora_alpha / √r with <see cref="use_rslora"/>.</summary>
        public double lora_alpha { get; set; } = 8;

        /// <summary>Dropout on the adapter's input, in training mode only.</summary>
        public double lora_dropout { get; set; }

        /// <summary>
        /// The modules to adapt, as a list: an entry matches a module whose full path equals it or ends with "." + it
        /// (so <c>q_proj</c> and <c>self_attn.q_proj</c> both match <c>model.layers.0.self_attn.q_proj</c>). Null when
        /// <see cref="target_modules_regex"/> is used instead.
        /// </summary>
        public IReadOnlyList<string>? target_modules { get; set; }

        /// <summary>
        /// The modules to adapt, as PEFT's single string: a regular expression that must match the whole path, or
        /// <c>"all-linear"</c>: every Linear, except, as PEFT does for transformers models, the output layer
        /// (<see cref="AllLinearOutputLayer"/>) and, for <c>task_type</c> SEQ_CLS, a top-level <c>score</c> or
        /// <c>classifier</c> head.
        /// </summary>
        public string? target_modules_regex { get; set; }

        /// <summary>Modules never to adapt, matched like <see cref="target_modules"/> (a list) or as a full-path regex.</summary>
        public IReadOnlyList<string>? exclude_modules { get; set; }

        /// <summary>Which biases train and are saved with the adapter: <c>none</c>, <c>all</c> or <c>lora_only</c>.</summary>
        public string bias { get; set; } = "none";

        /// <summary>Rank-stabilised LoRA: scaling = lora_alpha / √r.</summary>
        public bool use_rslora { get; set; }

        /// <summary>
        /// Whether the Python base layer stored its weight as (in, out), like GPT-2's Conv1D. lora_A is (r, in) and
        /// lora_B (out, r) either way, and a .NET port of such a layer is a Linear with weight (out, in): the adapter
        /// applies unchanged, so the flag is accepted and kept for saving.
        /// </summary>
        public bool fan_in_fan_out { get; set; }

        /// <summary>Per-module ranks: a key matches a path that ends with it (PEFT's <c>(.*\.)?(key)$</c>, a regex).</summary>
        public Dictionary<string, int> rank_pattern { get; set; } = new();

        /// <summary>Per-module alphas, matched as <see cref="rank_pattern"/>.</summary>
        public Dictionary<string, double> alpha_pattern { get; set; } = new();

        /// <summary>Modules trained in full and saved whole with the adapter (a classifier head, say).</summary>
        public IReadOnlyList<string>? modules_to_save { get; set; }

        /// <summary>PEFT's task type (kept for saving).</summary>
        public string? task_type { get; set; }

        /// <summary>The base model's name (kept for saving).</summary>
        public string? base_model_name_or_path { get; set; }

        /// <summary>
        /// For <c>"all-linear"</c>: the top-level name of the output layer that PEFT leaves out (a transformers model's
        /// output embedding, <c>lm_head</c> by convention). Not a PEFT field; not saved.
        /// </summary>
        public string AllLinearOutputLayer { get; set; } = "lm_head";

        /// <summary>Reads <c>adapter_config.json</c> (or a folder that holds one).</summary>
        /// <exception cref="NotSupportedException">The configuration asks for a feature this sample does not implement; the message names it.</exception>
        /// <exception cref="InvalidDataException">The file is not a LoRA configuration.</exception>
        public static LoraConfig load(string path)
        {
            ArgumentNullException.ThrowIfNull(path);
            string file = Directory.Exists(path) ? Path.Combine(path, "adapter_config.json") : path;
            JsonObject json;
            try
            {
                json = JsonNode.Parse(File.ReadAllText(file))?.AsObject() ?? throw new InvalidDataException($"{file}: not a JSON object.");
            }
            catch (JsonException error)
            {
                throw new InvalidDataException($"{file}: not valid JSON: {error.Message}", error);
            }
            return FromJson(json, file);
        }

        /// <summary>Writes <c>adapter_config.json</c> (into <paramref name="path"/> when it is a folder), with PEFT's key names.</summary>
        public void save(string path)
        {
            ArgumentNullException.ThrowIfNull(path);
            string file = Directory.Exists(path) ? Path.Combine(path, "adapter_config.json") : path;
            var json = new JsonObject
            {
                ["peft_type"] = "LORA",
                ["r"] = r,
                ["lora_alpha"] = lora_alpha,
                ["lora_dropout"] = lora_dropout,
                ["target_modules"] = target_modules_regex is not null ? JsonValue.Create(target_modules_regex) : target_modules is null ? null : new JsonArray(target_modules.Select(t => (JsonNode?)t).ToArray()),
                ["exclude_modules"] = exclude_modules is null ? null : new JsonArray(exclude_modules.Select(t => (JsonNode?)t).ToArray()),
                ["bias"] = bias,
                ["use_rslora"] = use_rslora,
                ["fan_in_fan_out"] = fan_in_fan_out,
                ["rank_pattern"] = new JsonObject(rank_pattern.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)kv.Value))),
                ["alpha_pattern"] = new JsonObject(alpha_pattern.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)kv.Value))),
                ["modules_to_save"] = modules_to_save is null ? null : new JsonArray(modules_to_save.Select(t => (JsonNode?)t).ToArray()),
                ["task_type"] = task_type,
                ["base_model_name_or_path"] = base_model_name_or_path,
                ["inference_mode"] = true,
                ["init_lora_weights"] = true,
                ["use_dora"] = false,
            };
            File.WriteAllText(file, json.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        }

        /// <summary>Whether the module at <paramref name="path"/> gets an adapter, by PEFT's rules.</summary>
        public bool Targets(string path)
        {
            ArgumentNullException.ThrowIfNull(path);
            if (exclude_modules is not null && Matches(exclude_modules, path))
                return false;
            // An adapter never goes into a module that is saved whole.
            if (modules_to_save is not null && modules_to_save.Any(m => Regex.IsMatch(path, $@"(^|.*\.){m}($|\..*)")))
                return false;
            if (string.Equals(target_modules_regex, "all-linear", StringComparison.OrdinalIgnoreCase))
                return path != AllLinearOutputLayer && !(task_type == "SEQ_CLS" && path is "score" or "classifier");
            if (target_modules_regex is not null)
                return Regex.IsMatch(path, $"^(?:{target_modules_regex})$");
            return target_modules is not null && Matches(target_modules, path);
        }

        /// <summary>The rank for a module: <see cref="rank_pattern"/>'s first matching key, else <see cref="r"/>.</summary>
        public int RankFor(string path) => Pattern(rank_pattern, path) is { } key ? rank_pattern[key] : r;

        /// <summary>The alpha for a module: <see cref="alpha_pattern"/>'s first matching key, else <see cref="lora_alpha"/>.</summary>
        public double AlphaFor(string path) => Pattern(alpha_pattern, path) is { } key ? alpha_pattern[key] : lora_alpha;

        /// <summary>The adapter's factor for a module: alpha / r, or alpha / √r with rsLoRA.</summary>
        public double ScalingFor(string path) => use_rslora ? AlphaFor(path) / Math.Sqrt(RankFor(path)) : AlphaFor(path) / RankFor(path);

        private static bool Matches(IReadOnlyList<string> names, string path) =>
            names.Contains(path) || names.Any(name => path.EndsWith("." + name, StringComparison.Ordinal));

        private static string? Pattern<T>(Dictionary<string, T> patterns, string path) =>
            patterns.Keys.FirstOrDefault(key => Regex.IsMatch(path, $@"^(.*\.)?({key})$"));

        private static LoraConfig FromJson(JsonObject json, string file)
        {
            // Features that change what the adapter computes, or which weights it changes, and that this sample does not
            // implement: refused by name rather than silently ignored.
            var refused = new List<string>();
            void Refuse(string key, Func<JsonNode?, bool> isSet, string why)
            {
                if (json.TryGetPropertyValue(key, out JsonNode? value) && isSet(value))
                    refused.Add($"{key}: {value?.ToJsonString()} ({why})");
            }
            bool True(JsonNode? v) => v is JsonValue value && value.TryGetValue(out bool b) && b;
            bool NotNull(JsonNode? v) => v is not null && !(v is JsonArray { Count: 0 }) && !(v is JsonObject { Count: 0 });
            Refuse("peft_type", v => v?.GetValue<string>() is { } t && t != "LORA", "only LoRA adapters are read");
            Refuse("use_dora", True, "DoRA");
            Refuse("init_lora_weights", v => v is JsonValue value && value.TryGetValue(out string? s) && s != "gaussian",
                "an initialisation that changes the base model's weights when the adapter is created");
            Refuse("layers_to_transform", NotNull, "layer selection by index");
            Refuse("layers_pattern", NotNull, "layer selection by index");
            Refuse("target_parameters", NotNull, "adapters on parameters rather than modules");
            Refuse("layer_replication", NotNull, "layer replication");
            Refuse("lora_bias", True, "a bias on lora_B");
            Refuse("use_qalora", True, "QA-LoRA");
            Refuse("trainable_token_indices", NotNull, "trainable tokens");
            Refuse("alora_invocation_tokens", NotNull, "activated LoRA");
            Refuse("megatron_config", NotNull, "Megatron layers");
            if (refused.Count > 0)
                throw new NotSupportedException($"{file}: this LoRA sample does not implement {string.Join("; ", refused)}.");

            var config = new LoraConfig();
            try
            {
                if (json["r"] is { } rank) config.r = rank.GetValue<int>();
                if (json["lora_alpha"] is { } alpha) config.lora_alpha = alpha.GetValue<double>();
                if (json["lora_dropout"] is { } dropout) config.lora_dropout = dropout.GetValue<double>();
                switch (json["target_modules"])
                {
                    case JsonArray list: config.target_modules = list.Select(n => n!.GetValue<string>()).ToList(); break;
                    case JsonValue single: config.target_modules_regex = single.GetValue<string>(); break;
                }
                switch (json["exclude_modules"])
                {
                    case JsonArray list: config.exclude_modules = list.Select(n => n!.GetValue<string>()).ToList(); break;
                    case JsonValue single: config.exclude_modules = new[] { single.GetValue<string>() }; break;
                }
                if (json["bias"] is { } bias) config.bias = bias.GetValue<string>();
                if (json["use_rslora"] is { } rslora) config.use_rslora = rslora.GetValue<bool>();
                if (json["fan_in_fan_out"] is { } fan) config.fan_in_fan_out = fan.GetValue<bool>();
                if (json["rank_pattern"] is JsonObject ranks) config.rank_pattern = ranks.ToDictionary(kv => kv.Key, kv => kv.Value!.GetValue<int>());
                if (json["alpha_pattern"] is JsonObject alphas) config.alpha_pattern = alphas.ToDictionary(kv => kv.Key, kv => kv.Value!.GetValue<double>());
                // Published configs list the same module twice, or modules the model lacks: duplicates are dropped here,
                // absent modules are skipped where the adapter is loaded.
                if (json["modules_to_save"] is JsonArray save) config.modules_to_save = save.Select(n => n!.GetValue<string>()).Distinct().ToList();
                if (json["task_type"] is JsonValue task) config.task_type = task.GetValue<string>();
                if (json["base_model_name_or_path"] is JsonValue name) config.base_model_name_or_path = name.GetValue<string>();
            }
            catch (Exception error) when (error is InvalidOperationException or FormatException)
            {
                throw new InvalidDataException($"{file}: a LoRA field has the wrong type: {error.Message}", error);
            }
            if (config.r < 1)
                throw new InvalidDataException($"{file}: r must be 1 or more, but is {config.r}.");
            if (config.bias is not ("none" or "all" or "lora_only"))
                throw new InvalidDataException($"{file}: bias must be \"none\", \"all\" or \"lora_only\", but is \"{config.bias}\".");
            if (config.target_modules is null && config.target_modules_regex is null)
                throw new InvalidDataException($"{file}: target_modules is not set, so no module would get an adapter.");
            return config;
        }
    }
}
