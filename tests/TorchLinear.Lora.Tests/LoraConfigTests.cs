using System;
using System.IO;
using System.Linq;
using Xunit;

namespace TorchLinear.Lora.Tests
{
    /// <summary>adapter_config.json as PEFT writes it, and as a stranger might: every bad file one documented exception, naming file and key.</summary>
    public class LoraConfigTests
    {
        private static string Write(string json)
        {
            string file = Path.Combine(Path.GetTempPath(), $"torchlinear-config-{Guid.NewGuid():N}.json");
            File.WriteAllText(file, json);
            return file;
        }

        private static LoraConfig Load(string json)
        {
            string file = Write(json);
            try
            {
                return LoraConfig.from_pretrained(file);
            }
            finally
            {
                File.Delete(file);
            }
        }

        private static CheckpointFormatException Refused(string json)
        {
            string file = Write(json);
            try
            {
                var error = Assert.Throws<CheckpointFormatException>(() => LoraConfig.from_pretrained(file));
                Assert.Equal(file, error.Path);
                Assert.Contains(file, error.Message);
                return error;
            }
            finally
            {
                File.Delete(file);
            }
        }

        [Fact]
        public void Config_OfEveryGeneration_ReadsWithPeftsDefaults_AndIgnoresUnknownKeys()
        {
            // A 16-key config from an early PEFT (no use_rslora, rank_pattern, peft_version).
            var old = Load("""{"base_model_name_or_path": "gpt2", "bias": "none", "enable_lora": null, "fan_in_fan_out": true, "inference_mode": true, "init_lora_weights": true, "lora_alpha": 32, "lora_dropout": 0.1, "merge_weights": false, "modules_to_save": null, "peft_type": "LORA", "r": 16, "target_modules": ["c_attn"], "task_type": "CAUSAL_LM", "revision": null, "layers_to_transform": null}""");
            Assert.Equal(16, old.r);
            Assert.Equal(32, old.lora_alpha);
            Assert.True(old.fan_in_fan_out);
            Assert.False(old.use_rslora);
            Assert.Empty(old.rank_pattern);
            // A recent one with many new keys set to null or their defaults, and modules_to_save with a duplicate.
            var recent = Load("""{"alora_invocation_tokens": null, "alpha_pattern": {}, "arrow_config": null, "auto_mapping": null, "base_model_name_or_path": "Qwen/Qwen2-0.5B", "bias": "none", "corda_config": null, "ensure_weight_tying": false, "eva_config": null, "exclude_modules": null, "fan_in_fan_out": false, "inference_mode": true, "init_lora_weights": true, "layer_replication": null, "layers_pattern": null, "layers_to_transform": null, "loftq_config": {}, "lora_alpha": 16, "lora_bias": false, "lora_dropout": 0.05, "megatron_config": null, "megatron_core": "megatron.core", "modules_to_save": ["score", "score", "classifier"], "peft_type": "LORA", "peft_version": "0.17.1", "qalora_group_size": 16, "r": 8, "rank_pattern": {}, "revision": null, "target_modules": ["k_proj", "attn.c_attn"], "target_parameters": null, "task_type": "SEQ_CLS", "trainable_token_indices": null, "use_dora": false, "use_qalora": false, "use_rslora": true}""");
            Assert.Equal(new[] { "score", "classifier" }, recent.modules_to_save);
            Assert.True(recent.use_rslora);
            Assert.Equal(16 / Math.Sqrt(8), recent.ScalingFor("model.layers.0.self_attn.k_proj"));
            Assert.True(recent.Targets("transformer.h.0.attn.c_attn"));
            Assert.False(recent.Targets("transformer.h.0.c_attn"));
        }

        [Fact]
        public void ExcludeModulesAsAString_IsAFullMatchRegex_AsPeftWritesIt()
        {
            // The old sample took the string as a literal name, so a real PEFT folder with it was refused.
            var config = Load("""{"r": 4, "target_modules": ["q_proj", "v_proj"], "exclude_modules": "model\\.layers\\.1\\..*"}""");
            Assert.Equal(@"model\.layers\.1\..*", config.ExcludeModulesRegex);
            Assert.Null(config.exclude_modules);
            Assert.True(config.Targets("model.layers.0.self_attn.q_proj"));
            Assert.False(config.Targets("model.layers.1.self_attn.q_proj"));
        }

        [Theory]
        [InlineData("\"init_lora_weights\": \"pissa\"", "init_lora_weights: \"pissa\"")]
        [InlineData("\"layers_to_transform\": [0, 1]", "layers_to_transform: [0, 1]")]
        [InlineData("\"peft_type\": \"IA3\"", "peft_type: \"IA3\"")]
        [InlineData("\"lora_bias\": true", "lora_bias: true")]
        public void Config_WithAFeatureNotImplemented_IsRefusedByName(string setting, string named)
        {
            string file = Write($"{{\"r\": 4, \"target_modules\": [\"q\"], {setting}}}");
            try
            {
                var error = Assert.Throws<NotSupportedException>(() => LoraConfig.from_pretrained(file));
                Assert.Contains(named, error.Message);
            }
            finally
            {
                File.Delete(file);
            }
        }

        [Theory]
        // Values the old sample loaded and then computed NaN with, or failed on only at the first training forward.
        [InlineData("\"rank_pattern\": {\"q_proj\": 0}", "rank_pattern.q_proj", "the rank must be 1 or more, but is 0")]
        [InlineData("\"r\": 0", "r", "the rank must be 1 or more, but is 0")]
        [InlineData("\"r\": -4", "r", "the rank must be 1 or more, but is -4")]
        [InlineData("\"lora_dropout\": 2.0", "lora_dropout", "lora_dropout must be in [0, 1), but is 2")]
        [InlineData("\"lora_dropout\": -0.5", "lora_dropout", "lora_dropout must be in [0, 1), but is -0.5")]
        [InlineData("\"lora_alpha\": 1e400", "lora_alpha", "lora_alpha must be a finite number")]
        [InlineData("\"alpha_pattern\": {\"q_proj\": 1e999}", "alpha_pattern.q_proj", "lora_alpha must be a finite number")]
        [InlineData("\"bias\": \"some\"", "bias", "bias must be \"none\", \"all\" or \"lora_only\"")]
        [InlineData("\"r\": \"8\"", "r", "r must be an integer, but is a JSON string (\"8\")")]
        [InlineData("\"r\": 4.5", "r", "r must be an integer")]
        [InlineData("\"lora_alpha\": [8]", "lora_alpha", "lora_alpha must be a number, but is a JSON array")]
        [InlineData("\"use_rslora\": \"yes\"", "use_rslora", "use_rslora must be true or false")]
        [InlineData("\"target_modules\": 4", "target_modules", "target_modules must be a list of module names or a string")]
        [InlineData("\"target_modules\": [\"q\", 4]", "target_modules[1]", "must be a module name (a string)")]
        [InlineData("\"target_modules\": \"q_proj(\"", "target_modules", "'q_proj(' is not a valid regular expression")]
        [InlineData("\"rank_pattern\": {\"(q\": 2}", "rank_pattern.(q", "'(q' is not a valid regular expression")]
        [InlineData("\"rank_pattern\": [2]", "rank_pattern", "rank_pattern must be an object")]
        [InlineData("\"modules_to_save\": \"classifier\"", "modules_to_save", "modules_to_save must be a list of module names")]
        public void AFieldOfTheWrongTypeOrOutOfRange_IsRefusedNamingTheFileKeyAndRule(string setting, string key, string rule)
        {
            // A valid config with the one setting put in (replacing the field if it is there).
            var json = System.Text.Json.Nodes.JsonNode.Parse("""{"r": 4, "target_modules": ["q_proj"]}""")!.AsObject();
            foreach (var (name, value) in System.Text.Json.Nodes.JsonNode.Parse($"{{{setting}}}")!.AsObject().ToList())
                json[name] = value?.DeepClone();
            var error = Refused(json.ToJsonString());
            Assert.Equal(key, error.Key);
            Assert.Contains(rule, error.Message);
        }

        [Theory]
        [InlineData("[{\"r\": 4}]", "it holds a JSON array, not an object of LoRA settings")]
        [InlineData("\"r\"", "it holds a JSON string, not an object")]
        [InlineData("{\"r\": 4, \"target_modules\": [\"q\"],}", "it is not valid JSON")]
        [InlineData("{\"r\": 4, /* PEFT */ \"target_modules\": [\"q\"]}", "it is not valid JSON")]
        [InlineData("{\"r\": 4, \"lora_alpha\": NaN, \"target_modules\": [\"q\"]}", "it is not valid JSON")]
        [InlineData("{\"r\": 4, \"target_modules\": [\"q\"], \"r\": 16}", "a key is given twice in one object")]
        [InlineData("{\"r\": 4, \"target_modules\": [\"q\"]", "it is not valid JSON")]
        [InlineData("", "it is not valid JSON")]
        [InlineData("{\"r\": 4}", "target_modules is not set")]
        public void AFileThatIsNotAStrictJsonObjectOfSettings_IsRefused(string json, string rule)
        {
            Assert.Contains(rule, Refused(json).Message);
        }

        [Fact]
        public void InvalidUtf8_OrAByteOrderMark_IsRefused()
        {
            // Found by the fuzz suite: System.Text.Json reads a string's bytes only when asked, and then threw an
            // InvalidOperationException that named no file.
            foreach (var bytes in new[]
            {
                System.Text.Encoding.UTF8.GetBytes("{\"r\": 4, \"target_modules\": [\"q\"], \"task_type\": \"X\"}").Select(b => b == (byte)'X' ? (byte)0xC3 : b).ToArray(),
                new byte[] { 0xEF, 0xBB, 0xBF }.Concat(System.Text.Encoding.UTF8.GetBytes("{\"r\": 4, \"target_modules\": [\"q\"]}")).ToArray(),
            })
            {
                string file = Path.Combine(Path.GetTempPath(), $"torchlinear-config-{Guid.NewGuid():N}.json");
                File.WriteAllBytes(file, bytes);
                try
                {
                    var error = Assert.Throws<CheckpointFormatException>(() => LoraConfig.from_pretrained(file));
                    Assert.Equal(file, error.Path);
                }
                finally
                {
                    File.Delete(file);
                }
            }
        }

        [Fact]
        public void DeepNesting_IsRefused()
        {
            string deep = new string('[', 10_000) + new string(']', 10_000);
            Assert.Contains("it is not valid JSON", Refused($"{{\"r\": 4, \"target_modules\": [\"q\"], \"x\": {deep}}}").Message);
        }

        [Fact]
        public void AFileLinkedToADevice_OrTooLarge_IsRefusedWithoutReadingIt()
        {
            // The old sample followed a link to /dev/zero and failed with OutOfMemoryException after reading 4 GB.
            string folder = Directory.CreateTempSubdirectory("torchlinear-config-").FullName;
            try
            {
                string link = Path.Combine(folder, "adapter_config.json");
                File.CreateSymbolicLink(link, "/dev/zero");
                var error = Assert.Throws<CheckpointFormatException>(() => LoraConfig.from_pretrained(folder));
                Assert.Contains("not a regular file (a character device)", error.Message);
                File.Delete(link);
                using (var big = File.Create(link))
                    big.SetLength(LoraConfig.MaxFileBytes + 1);
                Assert.Contains($"an adapter_config.json is read up to {LoraConfig.MaxFileBytes} bytes", Assert.Throws<CheckpointFormatException>(() => LoraConfig.from_pretrained(link)).Message);
            }
            finally
            {
                Directory.Delete(folder, recursive: true);
            }
        }

        [Fact]
        public void AConfigWrittenBySave_ReadsBackTheSame()
        {
            var config = new LoraConfig
            {
                r = 6, lora_alpha = 12.5, lora_dropout = 0.1, TargetModulesRegex = @".*\.(q|v)_proj", exclude_modules = new[] { "layers.0.q_proj" },
                bias = "lora_only", use_rslora = true, fan_in_fan_out = true, init_lora_weights = "gaussian",
                rank_pattern = new() { ["v_proj"] = 2 }, alpha_pattern = new() { ["q_proj"] = 3 }, modules_to_save = new[] { "head" },
                task_type = "SEQ_CLS", base_model_name_or_path = "some/model",
            };
            string file = Path.Combine(Path.GetTempPath(), $"torchlinear-config-{Guid.NewGuid():N}.json");
            try
            {
                config.save_pretrained(file);
                var back = LoraConfig.from_pretrained(file);
                Assert.Equal((config.r, config.lora_alpha, config.lora_dropout, config.TargetModulesRegex, config.bias, config.use_rslora, config.fan_in_fan_out, config.init_lora_weights, config.task_type, config.base_model_name_or_path),
                             (back.r, back.lora_alpha, back.lora_dropout, back.TargetModulesRegex, back.bias, back.use_rslora, back.fan_in_fan_out, back.init_lora_weights, back.task_type, back.base_model_name_or_path));
                Assert.Equal(config.exclude_modules, back.exclude_modules);
                Assert.Equal(config.modules_to_save, back.modules_to_save);
                Assert.Equal(config.rank_pattern, back.rank_pattern);
                Assert.Equal(config.alpha_pattern, back.alpha_pattern);
                Assert.Contains("\"init_lora_weights\": \"gaussian\"", File.ReadAllText(file));
            }
            finally
            {
                File.Delete(file);
            }
        }
    }
}
