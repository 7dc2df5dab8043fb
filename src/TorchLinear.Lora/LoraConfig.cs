using System;
using System.Collections.Generic;
using System.Globalization;
using System.IO;
using System.Linq;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace TorchLinear.Lora
{
    /// <summary>
    /// Hugging Face PEFT's <c>LoraConfig</c>: the fields that decide what a LoRA adapter computes, named as in
    /// <c>adapter_config.json</c> and defaulted as PEFT defaults them (PEFT's <c>tuners/lora/config.py</c>).
    /// </summary>
    /// <remarks>
    /// Which modules the fields name is decided by <see cref="ModuleMatching"/>. A config read with <see cref="from_pretrained"/> is
    /// checked as a file from a stranger: a regular file of at most <see cref="MaxFileBytes"/> bytes, strict JSON (no
    /// comments, trailing commas, NaN, or a key given twice), every field of its type and in its range, every regular
    /// expression valid; anything else is a <see cref="CheckpointFormatException"/> naming the file, the key and the rule.
    /// A feature this library does not implement (initialisations that change the base weights, layer selection by
    /// index, ...) is a <see cref="NotSupportedException"/> naming the key. Unknown keys are ignored.
    /// </remarks>
    public sealed class LoraConfig
    {
        /// <summary>The largest <c>adapter_config.json</c> read (PEFT writes a few kilobytes).</summary>
        public const int MaxFileBytes = 1 << 20;

        /// <summary>
        /// The most <c>rank_pattern</c> and <c>alpha_pattern</c> keys, together, that need the regular-expression engine
        /// (keys of literal characters and dots, as module paths are written, do not count): each costs milliseconds and
        /// hundreds of kilobytes to compile, so a config with thousands of them would take minutes and gigabytes to decide.
        /// </summary>
        public const int MaxPatternExpressions = 256;

        private IReadOnlyList<string>? _targetModules, _excludeModules, _modulesToSave;

        /// <summary>The adapter's rank, 1 or more (PEFT default 8).</summary>
        public int r { get; set; } = 8;

        /// <summary>Scale numerator (PEFT default 8): scaling = lora_alpha / r, or lora_alpha / √r with <see cref="use_rslora"/>.</summary>
        public double lora_alpha { get; set; } = 8;

        /// <summary>Dropout probability on the adapter's input, in [0, 1), in training mode only.</summary>
        public double lora_dropout { get; set; }

        /// <summary>
        /// The modules to adapt, as names: an entry matches a module whose path equals it or ends with "." + it (so
        /// <c>q_proj</c> and <c>self_attn.q_proj</c> both match <c>model.layers.0.self_attn.q_proj</c>). Null when
        /// <see cref="TargetModulesRegex"/> is used instead.
        /// </summary>
        public IReadOnlyList<string>? target_modules { get => _targetModules; set => _targetModules = value?.ToArray(); }

        /// <summary>
        /// The modules to adapt, as PEFT's single string: a regular expression that must match the whole path, or
        /// <c>"all-linear"</c>: every linear layer, except, as PEFT does for transformers models, the output layer
        /// (<see cref="AllLinearOutputLayer"/>) and, for <c>task_type</c> SEQ_CLS, a top-level <c>score</c> or
        /// <c>classifier</c> head.
        /// </summary>
        public string? TargetModulesRegex { get; set; }

        /// <summary>Modules never to adapt, as names matched like <see cref="target_modules"/>.</summary>
        public IReadOnlyList<string>? exclude_modules { get => _excludeModules; set => _excludeModules = value?.ToArray(); }

        /// <summary>Modules never to adapt, as PEFT's single string: a regular expression that must match the whole path.</summary>
        public string? ExcludeModulesRegex { get; set; }

        /// <summary>The old name of <c>TargetModulesRegex</c> (PEFT has no such field: its <c>target_modules</c> is a list or a string), which it reads and sets.</summary>
        [Obsolete("use LoraConfig.TargetModulesRegex")]
        public string? target_modules_regex { get => TargetModulesRegex; set => TargetModulesRegex = value; }

        /// <summary>The old name of <c>ExcludeModulesRegex</c>, which it reads and sets.</summary>
        [Obsolete("use LoraConfig.ExcludeModulesRegex")]
        public string? exclude_modules_regex { get => ExcludeModulesRegex; set => ExcludeModulesRegex = value; }

        /// <summary>Which biases train and are saved with the adapter: <c>none</c>, <c>all</c> or <c>lora_only</c>.</summary>
        public string bias { get; set; } = LoraBias.None;

        /// <summary>Rank-stabilised LoRA: scaling = lora_alpha / √r.</summary>
        public bool use_rslora { get; set; }

        /// <summary>
        /// DoRA (weight-decomposed LoRA, PEFT's <c>use_dora</c>): each adapted linear layer also learns a magnitude per
        /// output row, and the adapted weight's rows are rescaled to it (see <see cref="LoraLayer"/>). Not for
        /// embeddings here.
        /// </summary>
        public bool use_dora { get; set; }

        /// <summary>
        /// Whether the base layer stores its weight as (in, out), like GPT-2's Conv1D (PEFT's <c>fan_in_fan_out</c>). lora_A
        /// is (r, in) and lora_B (out, r) either way. As in PEFT 0.18.1, the layer decides, not the flag: a
        /// <see cref="Conv1D"/> is adapted with its (in, out) layout (a merge adds <c>(B A)ᵀ</c>), a Linear with its (out, in)
        /// one, and adapting them sets this flag in the config the model keeps and saves as PEFT sets it (true for a
        /// Conv1D, false for a Linear; with both, the last in the model's order), where PEFT warns.
        /// </summary>
        public bool fan_in_fan_out { get; set; }

        /// <summary>
        /// How <c>inject</c> initialises a fresh adapter, as PEFT: <c>"true"</c> (the default: A kaiming-uniform, B zero,
        /// so a fresh adapter changes nothing), <c>"gaussian"</c> (A normal with std 1/r, B zero) or <c>"false"</c> (A and
        /// B both as <c>nn.Linear</c> initialises its weight: the adapter changes the output from the start). The JSON
        /// file holds <c>true</c>, <c>false</c> or <c>"gaussian"</c>.
        /// </summary>
        public string init_lora_weights { get; set; } = LoraInit.True;

        /// <summary>Per-module ranks: a key matches a path that ends with it at a dot (PEFT's <c>(.*\.)?(key)$</c>, a regex).</summary>
        public Dictionary<string, int> rank_pattern { get; set; } = new();

        /// <summary>Per-module alphas, matched as <see cref="rank_pattern"/>.</summary>
        public Dictionary<string, double> alpha_pattern { get; set; } = new();

        /// <summary>
        /// Modules trained in full and saved whole with the adapter (a classifier head, say), as names matched like
        /// <see cref="target_modules"/> at any depth (<c>classifier</c> takes <c>head.classifier</c>).
        /// </summary>
        public IReadOnlyList<string>? modules_to_save { get => _modulesToSave; set => _modulesToSave = value?.ToArray(); }

        /// <summary>PEFT's task type (kept for saving; SEQ_CLS also shapes <c>all-linear</c>).</summary>
        public string? task_type { get; set; }

        /// <summary>The base model's name (kept for saving).</summary>
        public string? base_model_name_or_path { get; set; }

        /// <summary>
        /// For <c>"all-linear"</c>: the top-level name of the output layer that PEFT leaves out (a transformers model's
        /// output embedding, <c>lm_head</c> by convention). Not a PEFT field; not saved.
        /// </summary>
        public string AllLinearOutputLayer { get; set; } = "lm_head";

        /// <summary>The config's names and compiled expressions (see <see cref="ModuleMatching"/>).</summary>
        internal ConfigPatterns Patterns { get; private set; } = new();

        /// <summary>Whether the module at <paramref name="path"/> gets an adapter by PEFT's rules (<see cref="ModuleMatching.check_target_module_exists"/>).</summary>
        /// <exception cref="ArgumentException">A regular expression of the config is invalid or ran past its bound.</exception>
        public bool Targets(string path)
        {
            ArgumentNullException.ThrowIfNull(path);
            if (!ModuleMatching.check_target_module_exists(this, path))
                return false;
            if (TargetModulesRegex is { } regex && ModuleMatching.IsAllLinear(regex))
                return path != AllLinearOutputLayer && !(task_type == "SEQ_CLS" && path is "score" or "classifier");
            return true;
        }

        /// <summary>The rank for a module: <see cref="rank_pattern"/>'s first matching key, else <see cref="r"/>.</summary>
        public int RankFor(string path) =>
            ModuleMatching.get_pattern_key(this, "rank_pattern", rank_pattern.Keys, path) is { } key ? rank_pattern[key] : r;

        /// <summary>The alpha for a module: <see cref="alpha_pattern"/>'s first matching key, else <see cref="lora_alpha"/>.</summary>
        public double AlphaFor(string path) =>
            ModuleMatching.get_pattern_key(this, "alpha_pattern", alpha_pattern.Keys, path) is { } key ? alpha_pattern[key] : lora_alpha;

        /// <summary>The adapter's factor for a module: alpha / r, or alpha / √r with rsLoRA.</summary>
        public double ScalingFor(string path) => Scaling(AlphaFor(path), RankFor(path), use_rslora);

        /// <summary>alpha / r, or alpha / √r with rsLoRA: PEFT's <c>update_layer</c>.</summary>
        internal static double Scaling(double alpha, int r, bool rslora) => rslora ? alpha / Math.Sqrt(r) : alpha / r;

        /// <summary>
        /// The key of the field that sets the rank of the module at <paramref name="path"/> (<c>r</c>, or
        /// <c>rank_pattern.&lt;key&gt;</c>), for messages.
        /// </summary>
        internal string RankKey(string path) =>
            ModuleMatching.get_pattern_key(this, "rank_pattern", rank_pattern.Keys, path) is { } key ? $"rank_pattern.{key}" : "r";

        /// <summary>The key of the field that sets the alpha of the module at <paramref name="path"/>, for messages.</summary>
        internal string AlphaKey(string path) =>
            ModuleMatching.get_pattern_key(this, "alpha_pattern", alpha_pattern.Keys, path) is { } key ? $"alpha_pattern.{key}" : "lora_alpha";

        /// <summary>
        /// Every value's type and range, and every expression compiled: the problems, each as (key, rule). Empty for a
        /// config that can be used.
        /// </summary>
        internal List<(string Key, string Rule)> Problems()
        {
            var problems = new List<(string, string)>();
            if (r < 1)
                problems.Add(("r", $"the rank must be 1 or more, but is {r}"));
            foreach (var (key, rank) in rank_pattern)
            {
                if (rank < 1)
                    problems.Add(($"rank_pattern.{key}", $"the rank must be 1 or more, but is {rank}"));
            }
            if (!double.IsFinite(lora_alpha))
                problems.Add(("lora_alpha", $"lora_alpha must be a finite number, but is {lora_alpha.ToString(CultureInfo.InvariantCulture)}"));
            foreach (var (key, alpha) in alpha_pattern)
            {
                if (!double.IsFinite(alpha))
                    problems.Add(($"alpha_pattern.{key}", $"lora_alpha must be a finite number, but is {alpha.ToString(CultureInfo.InvariantCulture)}"));
            }
            if (!(lora_dropout >= 0 && lora_dropout < 1))
                problems.Add(("lora_dropout", $"lora_dropout must be in [0, 1), but is {lora_dropout.ToString(CultureInfo.InvariantCulture)}"));
            if (bias is not ("none" or "all" or "lora_only"))
                problems.Add(("bias", $"bias must be \"none\", \"all\" or \"lora_only\", but is \"{bias}\""));
            if (init_lora_weights is not ("true" or "false" or "gaussian"))
                problems.Add(("init_lora_weights", $"init_lora_weights must be true, false or \"gaussian\", but is \"{init_lora_weights}\""));
            if (target_modules is null && TargetModulesRegex is null)
                problems.Add(("target_modules", "target_modules is not set, so no module would get an adapter"));
            if (target_modules is not null && TargetModulesRegex is not null)
                problems.Add(("target_modules", "target_modules and TargetModulesRegex are both set; PEFT's field holds one or the other"));
            if (exclude_modules is not null && ExcludeModulesRegex is not null)
                problems.Add(("exclude_modules", "exclude_modules and ExcludeModulesRegex are both set; PEFT's field holds one or the other"));
            foreach (var (field, names) in new[] { ("target_modules", target_modules), ("exclude_modules", exclude_modules), ("modules_to_save", modules_to_save) })
            {
                if (names?.Any(n => n is null) == true)
                    problems.Add((field, "an entry is null"));
            }
            try
            {
                if (TargetModulesRegex is { } target && !ModuleMatching.IsAllLinear(target))
                    Patterns.Validate("target_modules", target, end: false);
                if (ExcludeModulesRegex is { } exclude)
                    Patterns.Validate("exclude_modules", exclude, end: false);
            }
            catch (PatternException error)
            {
                problems.Add((error.Field, error.Rule));
            }
            int expressions = rank_pattern.Keys.Concat(alpha_pattern.Keys).Count(ConfigPatterns.NeedsEngine);
            if (expressions > MaxPatternExpressions)
            {
                problems.Add((rank_pattern.Keys.Any(ConfigPatterns.NeedsEngine) ? "rank_pattern" : "alpha_pattern",
                              $"rank_pattern and alpha_pattern hold {expressions} keys that are regular expressions beyond module paths; at most {MaxPatternExpressions} are matched"));
                return problems;
            }
            foreach (var (field, keys) in new[] { ("rank_pattern", rank_pattern.Keys.ToList()), ("alpha_pattern", alpha_pattern.Keys.ToList()) })
            {
                foreach (string key in keys)
                {
                    try
                    {
                        Patterns.Validate($"{field}.{key}", key, end: true);
                    }
                    catch (PatternException error)
                    {
                        problems.Add((error.Field, error.Rule));
                    }
                }
            }
            return problems;
        }

        /// <summary>Throws an <see cref="ArgumentException"/> naming every key of <see cref="Problems"/>.</summary>
        internal void ThrowIfInvalid(string caller)
        {
            var problems = Problems();
            if (problems.Count > 0)
                throw new ArgumentException($"{caller}: the LoraConfig cannot be used: {string.Join("; ", problems.Select(p => $"{p.Key}: {p.Rule}"))}.");
        }

        /// <summary>A copy, so that a model keeps the config it was adapted with whatever happens to the caller's object.</summary>
        internal LoraConfig Clone()
        {
            var copy = (LoraConfig)MemberwiseClone();
            copy.rank_pattern = new Dictionary<string, int>(rank_pattern);
            copy.alpha_pattern = new Dictionary<string, double>(alpha_pattern);
            copy.Patterns = new ConfigPatterns();
            return copy;
        }

        // ---- The file ------------------------------------------------------------------------------------------------

        /// <summary>PEFT's <c>LoraConfig.from_pretrained</c>: reads <c>adapter_config.json</c> (or a folder that holds one), checked as described on the class.</summary>
        /// <exception cref="CheckpointFormatException">The file is not a usable LoRA configuration: not a regular file,
        /// too large, not strict JSON, not an object, a field of the wrong type or out of range, an invalid regular
        /// expression. The message names the file, the key and the rule.</exception>
        /// <exception cref="NotSupportedException">The configuration asks for a feature this library does not implement; the message names the key.</exception>
        /// <exception cref="FileNotFoundException">There is no such file.</exception>
        public static LoraConfig from_pretrained(string path)
        {
            ArgumentNullException.ThrowIfNull(path);
            string file = Directory.Exists(path) ? Path.Combine(path, "adapter_config.json") : path;
            byte[] bytes = ReadCapped(file);
            string text;
            try
            {
                // JSON text is UTF-8 (RFC 8259). System.Text.Json checks a string's bytes only when it is read, and then
                // throws an InvalidOperationException; checked here, a damaged byte is a refusal like any other.
                text = new UTF8Encoding(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true).GetString(bytes);
            }
            catch (DecoderFallbackException error)
            {
                throw new CheckpointFormatException(file, $"it is not UTF-8 text (invalid byte sequence at byte {error.Index})", inner: error);
            }
            JsonDocument document;
            try
            {
                document = JsonDocument.Parse(text, new JsonDocumentOptions { AllowTrailingCommas = false, CommentHandling = JsonCommentHandling.Disallow, MaxDepth = 64 });
            }
            catch (JsonException error)
            {
                throw new CheckpointFormatException(file, $"it is not valid JSON ({error.Message})", inner: error);
            }
            using (document)
            {
                if (document.RootElement.ValueKind != JsonValueKind.Object)
                    throw new CheckpointFormatException(file, $"it holds a JSON {Kind(document.RootElement)}, not an object of LoRA settings");
                if (FirstDuplicate(document.RootElement) is { } duplicate)
                    throw new CheckpointFormatException(file, "a key is given twice in one object (which value counts is not defined)", duplicate);
                return FromJson(document.RootElement, file);
            }
        }

        /// <summary>The old name of <see cref="from_pretrained"/>, which it calls.</summary>
        /// <param name="path">As <see cref="from_pretrained"/>'s.</param>
        [Obsolete("use LoraConfig.from_pretrained")]
        public static LoraConfig load(string path) => from_pretrained(path);

        /// <summary>The old name of <see cref="save_pretrained"/>, which it calls.</summary>
        /// <param name="path">As <see cref="save_pretrained"/>'s.</param>
        [Obsolete("use LoraConfig.save_pretrained")]
        public void save(string path) => save_pretrained(path);

        /// <summary>
        /// PEFT's <c>save_pretrained</c>: writes <c>adapter_config.json</c> into the folder <paramref name="save_directory"/>
        /// (made if missing), with PEFT's key names; a path ending in <c>.json</c> is the file itself.
        /// </summary>
        public void save_pretrained(string save_directory)
        {
            ArgumentNullException.ThrowIfNull(save_directory);
            string path = save_directory;
            if (!Directory.Exists(path) && !path.EndsWith(".json", StringComparison.OrdinalIgnoreCase))
                Directory.CreateDirectory(path);
            string file = Directory.Exists(path) ? Path.Combine(path, "adapter_config.json") : path;
            static JsonNode? List(IReadOnlyList<string>? names) => names is null ? null : new JsonArray(names.Select(t => (JsonNode?)t).ToArray());
            var json = new JsonObject
            {
                ["peft_type"] = "LORA",
                ["r"] = r,
                ["lora_alpha"] = lora_alpha,
                ["lora_dropout"] = lora_dropout,
                ["target_modules"] = TargetModulesRegex is not null ? JsonValue.Create(TargetModulesRegex) : List(target_modules),
                ["exclude_modules"] = ExcludeModulesRegex is not null ? JsonValue.Create(ExcludeModulesRegex) : List(exclude_modules),
                ["bias"] = bias,
                ["use_rslora"] = use_rslora,
                ["fan_in_fan_out"] = fan_in_fan_out,
                ["rank_pattern"] = new JsonObject(rank_pattern.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)kv.Value))),
                ["alpha_pattern"] = new JsonObject(alpha_pattern.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)kv.Value))),
                ["modules_to_save"] = List(modules_to_save),
                ["task_type"] = task_type,
                ["base_model_name_or_path"] = base_model_name_or_path,
                ["inference_mode"] = true,
                ["init_lora_weights"] = init_lora_weights switch { "true" => JsonValue.Create(true), "false" => JsonValue.Create(false), _ => JsonValue.Create(init_lora_weights) },
                ["use_dora"] = use_dora,
            };
            File.WriteAllText(file, json.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        }

        private static byte[] ReadCapped(string file)
        {
            using FileStream stream = CheckpointFile.OpenRegular(file);
            if (stream.Length > MaxFileBytes)
                throw new CheckpointFormatException(file, $"it is {stream.Length} bytes long; an adapter_config.json is read up to {MaxFileBytes} bytes");
            var bytes = new byte[stream.Length];
            stream.ReadExactly(bytes);
            return bytes;
        }

        private static string Kind(JsonElement element) => element.ValueKind switch
        {
            JsonValueKind.Array => "array",
            JsonValueKind.String => "string",
            JsonValueKind.Number => "number",
            JsonValueKind.True or JsonValueKind.False => "boolean",
            JsonValueKind.Null => "null",
            _ => "object",
        };

        private static string? FirstDuplicate(JsonElement element, string prefix = "")
        {
            if (element.ValueKind == JsonValueKind.Object)
            {
                var seen = new HashSet<string>(StringComparer.Ordinal);
                foreach (var property in element.EnumerateObject())
                {
                    string key = prefix.Length == 0 ? property.Name : $"{prefix}.{property.Name}";
                    if (!seen.Add(property.Name))
                        return key;
                    if (FirstDuplicate(property.Value, key) is { } inner)
                        return inner;
                }
            }
            else if (element.ValueKind == JsonValueKind.Array)
            {
                int index = 0;
                foreach (var item in element.EnumerateArray())
                {
                    if (FirstDuplicate(item, $"{prefix}[{index++}]") is { } inner)
                        return inner;
                }
            }
            return null;
        }

        /// <summary>The fields of a parsed file: each of its type, then the whole config's rules.</summary>
        private static LoraConfig FromJson(JsonElement json, string file)
        {
            // Features that change what the adapter computes, or which weights it changes, and that this library does not
            // implement: refused by name rather than silently ignored.
            var refused = new List<string>();
            void Refuse(string key, Func<JsonElement, bool> isSet, string why)
            {
                if (json.TryGetProperty(key, out JsonElement value) && isSet(value))
                    refused.Add($"{key}: {value.GetRawText()} ({why})");
            }
            static bool True(JsonElement v) => v.ValueKind == JsonValueKind.True;
            static bool NotNull(JsonElement v) => v.ValueKind switch
            {
                JsonValueKind.Null or JsonValueKind.False => false,
                JsonValueKind.Array => v.GetArrayLength() > 0,
                JsonValueKind.Object => v.EnumerateObject().Any(),
                _ => true,
            };
            Refuse("peft_type", v => !(v.ValueKind == JsonValueKind.String && v.GetString() == "LORA") && v.ValueKind != JsonValueKind.Null, "only LoRA adapters are read");
            Refuse("init_lora_weights", v => v.ValueKind == JsonValueKind.String && v.GetString() is not ("gaussian" or "true" or "false"),
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
                throw new NotSupportedException($"{file}: TorchLinear.Lora does not implement {string.Join("; ", refused)}.");

            var config = new LoraConfig();
            var reader = new Fields(json, file);
            if (reader.Int("r") is { } rank) config.r = rank;
            if (reader.Number("lora_alpha") is { } alpha) config.lora_alpha = alpha;
            if (reader.Number("lora_dropout") is { } dropout) config.lora_dropout = dropout;
            switch (reader.NamesOrString("target_modules"))
            {
                case (IReadOnlyList<string> names, _): config.target_modules = names; break;
                case (_, string pattern): config.TargetModulesRegex = pattern; break;
            }
            switch (reader.NamesOrString("exclude_modules"))
            {
                case (IReadOnlyList<string> names, _): config.exclude_modules = names; break;
                case (_, string pattern): config.ExcludeModulesRegex = pattern; break;
            }
            if (reader.String("bias") is { } bias) config.bias = bias;
            if (reader.Bool("use_rslora") is { } rslora) config.use_rslora = rslora;
            if (reader.Bool("use_dora") is { } dora) config.use_dora = dora;
            if (reader.Bool("fan_in_fan_out") is { } fan) config.fan_in_fan_out = fan;
            if (json.TryGetProperty("init_lora_weights", out var init))
            {
                config.init_lora_weights = init.ValueKind switch
                {
                    JsonValueKind.True or JsonValueKind.Null => "true",
                    JsonValueKind.False => "false",
                    JsonValueKind.String => init.GetString()!,
                    _ => throw reader.WrongType("init_lora_weights", init, "true, false or a string"),
                };
            }
            if (reader.Object("rank_pattern") is { } ranks)
                config.rank_pattern = ranks.ToDictionary(kv => kv.Key, kv => reader.IntValue($"rank_pattern.{kv.Key}", kv.Value), StringComparer.Ordinal);
            if (reader.Object("alpha_pattern") is { } alphas)
                config.alpha_pattern = alphas.ToDictionary(kv => kv.Key, kv => reader.NumberValue($"alpha_pattern.{kv.Key}", kv.Value), StringComparer.Ordinal);
            // Published configs list the same module twice, or modules the model lacks: duplicates are dropped here,
            // absent modules are skipped where the adapter is loaded.
            if (reader.NamesOrString("modules_to_save") is { } saved)
            {
                if (saved.Names is null)
                    throw new CheckpointFormatException(file, "modules_to_save must be a list of module names, but is a string", "modules_to_save");
                config.modules_to_save = saved.Names.Distinct(StringComparer.Ordinal).ToList();
            }
            if (reader.String("task_type") is { } task) config.task_type = task;
            if (reader.String("base_model_name_or_path") is { } name) config.base_model_name_or_path = name;

            var problems = config.Problems();
            if (problems.Count > 0)
                throw new CheckpointFormatException(file, string.Join("; ", problems.Select(p => p.Rule)), string.Join(", ", problems.Select(p => p.Key).Distinct()));
            return config;
        }

        /// <summary>Typed access to a JSON object's fields; a field of the wrong type is refused naming its key.</summary>
        private readonly struct Fields
        {
            private readonly JsonElement _json;
            private readonly string _file;

            internal Fields(JsonElement json, string file)
            {
                _json = json;
                _file = file;
            }

            private JsonElement? Get(string key) =>
                _json.TryGetProperty(key, out JsonElement value) && value.ValueKind != JsonValueKind.Null ? value : null;

            internal CheckpointFormatException WrongType(string key, JsonElement value, string expected) =>
                new(_file, $"{key} must be {expected}, but is a JSON {Kind(value)} ({Shorten(value.GetRawText())})", key);

            internal int? Int(string key) => Get(key) is { } value ? IntValue(key, value) : null;

            internal int IntValue(string key, JsonElement value)
            {
                if (value.ValueKind == JsonValueKind.Number && value.TryGetInt32(out int result))
                    return result;
                if (value.ValueKind == JsonValueKind.Number && value.TryGetDouble(out double real) && real == Math.Floor(real) && Math.Abs(real) <= int.MaxValue)
                    return (int)real;
                throw WrongType(key, value, "an integer");
            }

            internal double? Number(string key) => Get(key) is { } value ? NumberValue(key, value) : null;

            internal double NumberValue(string key, JsonElement value)
            {
                if (value.ValueKind == JsonValueKind.Number && value.TryGetDouble(out double result))
                    return result;
                if (value.ValueKind == JsonValueKind.Number)
                    throw new CheckpointFormatException(_file, $"{key} must be a finite number, but {Shorten(value.GetRawText())} is out of a double's range", key);
                throw WrongType(key, value, "a number");
            }

            internal string? String(string key)
            {
                if (Get(key) is not { } value)
                    return null;
                return value.ValueKind == JsonValueKind.String ? value.GetString() : throw WrongType(key, value, "a string");
            }

            internal bool? Bool(string key)
            {
                if (Get(key) is not { } value)
                    return null;
                return value.ValueKind switch
                {
                    JsonValueKind.True => true,
                    JsonValueKind.False => false,
                    _ => throw WrongType(key, value, "true or false"),
                };
            }

            internal List<KeyValuePair<string, JsonElement>>? Object(string key)
            {
                if (Get(key) is not { } value)
                    return null;
                if (value.ValueKind != JsonValueKind.Object)
                    throw WrongType(key, value, "an object");
                return value.EnumerateObject().Select(p => KeyValuePair.Create(p.Name, p.Value)).ToList();
            }

            /// <summary>A list of names, or one string (a regular expression), or neither (absent or null).</summary>
            internal (IReadOnlyList<string>? Names, string? Pattern)? NamesOrString(string key)
            {
                if (Get(key) is not { } value)
                    return null;
                switch (value.ValueKind)
                {
                    case JsonValueKind.String:
                        return (null, value.GetString()!);
                    case JsonValueKind.Array:
                        var names = new List<string>(value.GetArrayLength());
                        int index = 0;
                        foreach (var item in value.EnumerateArray())
                        {
                            if (item.ValueKind != JsonValueKind.String)
                                throw WrongType($"{key}[{index}]", item, "a module name (a string)");
                            names.Add(item.GetString()!);
                            index++;
                        }
                        return (names, null);
                    default:
                        throw WrongType(key, value, "a list of module names or a string");
                }
            }

            private static string Shorten(string text) => text.Length <= 80 ? text : text[..77] + "...";
        }
    }
}
