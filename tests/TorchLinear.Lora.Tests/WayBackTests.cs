using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Security.Cryptography;
using System.Text.Json.Nodes;
using TorchLinear.Tests;
using TorchSharp;
using TorchSharp.PyBridge;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Lora.Tests
{
    /// <summary>
    /// The way back: adapter folders written by this library (ReferenceData/RealPeft/from_dotnet), loaded by real PEFT
    /// 0.18.1's <c>PeftModel.from_pretrained</c> / <c>load_adapter</c> in <c>check_from_dotnet.py</c> (run by hand), which
    /// compares PEFT's outputs with the ones .NET computed (<c>from_dotnet/outputs.safetensors</c>) and writes
    /// <c>from_dotnet/results.json</c> with the sha256 of every file it checked and its own. This test fails on any
    /// disagreement PEFT found, on a folder the results do not cover, on a results file older than the folders or the
    /// script, on a case whose checks are not the expected ones, and when the library now writes other tensors or
    /// computes other outputs than the ones PEFT checked.
    /// Rewrite the folders with <c>TORCHLINEAR_WRITE_FROM_DOTNET=1 dotnet test tests/TorchLinear.Lora.Tests --filter WayBack</c>
    /// (it writes into the source tree, and the same run fails if any adapter file changed, as PEFT has not checked it yet), then
    /// run <c>check_from_dotnet.py</c> (its docstring), run these tests again, and commit the folders with results.json
    /// (ReferenceData/RealPeft/README.md).
    /// </summary>
    public class WayBackTests
    {
        private static readonly string RealPeft = Path.Combine(AppContext.BaseDirectory, "ReferenceData", "RealPeft");
        private static readonly string Committed = Path.Combine(RealPeft, "from_dotnet");

        /// <summary>
        /// Each folder written here and what PEFT is asked to compare: the adapters to activate one after the other (or a
        /// mixed batch's rows). A case here is a case in check_from_dotnet.py's CASES.
        /// </summary>
        internal static readonly string[] CaseNames = { "plain", "rslora", "dora", "embedding", "named", "bias_all", "bias_lora_only", "conv", "gpt2", "gpt2_dora" };

        internal static readonly string[] NamedMixedRows = { "third", LoraModel.BaseModel, "default", "third" };

        internal static readonly string[] ConvMixedRows = { "second", "default", LoraModel.BaseModel, "default" };

        /// <summary>
        /// The comparisons check_from_dotnet.py must have made for a case, in its order, with the key of the .NET output
        /// each compared: one "default" (output &lt;case&gt;) unless listed here (outputs &lt;case&gt;/&lt;what&gt;).
        /// </summary>
        private static (string What, string Output)[] ExpectedChecks(string name) => name switch
        {
            "named" => new[] { ("default", "named/default"), ("third", "named/third"), ("mixed", "named/mixed") },
            "conv" => new[] { ("default", "conv/default"), ("second", "conv/second"), ("mixed", "conv/mixed") },
            _ => new[] { ("default", name) },
        };

        /// <summary>
        /// Sets every selected parameter to small exact values (multiples of 1/64, different for each parameter), as if
        /// trained: the files' bytes are then the same on every machine. Biases are moved by such values instead.
        /// </summary>
        private static void Fill(nn.Module model, Func<string, bool> select, string magnitudeMarker = ".lora_magnitude_vector.")
        {
            long offset = 0;
            using var _ = no_grad();
            foreach (var (key, parameter) in model.named_parameters().Where(p => select(p.name)))
            {
                using var values = ((arange(parameter.numel(), ScalarType.Float64) + offset) * 7 % 11 - 5).div(64).to(parameter.dtype).reshape(parameter.shape);
                offset += 3;
                if (key.EndsWith(".bias", StringComparison.Ordinal))
                    parameter.add_(values);
                else if (key.Contains(magnitudeMarker, StringComparison.Ordinal))
                    parameter.copy_(values + 1);   // a magnitude per row, near the rows' norms' size
                else
                    parameter.copy_(values);
            }
        }

        private static nn.Module<Tensor, Tensor> Classifier() => Ports.Pretrained("named");

        private static nn.Module<Tensor, Tensor> MlpWithBase()
        {
            var model = Ports.Mlp();
            StateDicts.LoadPyTorchFile(model, Path.Combine(RealPeft, "base.safetensors"));
            model.eval();
            return model;
        }

        /// <summary>
        /// The generated GPT-2 port (tests/TorchLinear.Tests/Ports/Gpt2: export_port.py writes transformers' Conv1D as
        /// TorchLinear's Conv1D) with the weights make_ports.py exported, in eval mode.
        /// </summary>
        private static TorchLinear.Tests.Ports.Gpt2.GPT2LMHeadModel Gpt2()
        {
            var model = new TorchLinear.Tests.Ports.Gpt2.GPT2LMHeadModel();
            StateDicts.LoadPyTorchFile(model, Path.Combine(AppContext.BaseDirectory, "ReferenceData", "Gpt2", "GPT2LMHeadModel.safetensors"));
            model.eval();
            return model;
        }

        /// <summary>Writes every case's folder into <paramref name="folder"/> and returns the inputs and .NET's outputs.</summary>
        internal static Dictionary<string, Tensor> Write(string folder)
        {
            Directory.CreateDirectory(folder);
            var classifierInput = Ports.Cases("named")["input"];
            var embeddingInput = Ports.Cases("embedding")["input"];
            var mlpInput = StateDicts.ReadPyTorchFile(Path.Combine(RealPeft, "cases.safetensors"))["input"];
            var convInput = ConvNets.Cases()["conv2d.mixed_input"];
            var gpt2Input = StateDicts.ReadPyTorchFile(Path.Combine(AppContext.BaseDirectory, "ReferenceData", "Gpt2", "cases.pt"))["input"];
            var outputs = new Dictionary<string, Tensor>
            {
                ["input/classifier"] = classifierInput,
                ["input/embedding"] = embeddingInput,
                ["input/mlp"] = mlpInput,
                ["input/conv2d"] = convInput,
                ["input/gpt2"] = gpt2Input,
            };
            static bool Trained(nn.Module model, string name) => model.named_parameters().Single(p => p.name == name).parameter.requires_grad;

            // plain: the defaults, q_proj and v_proj.
            using (var model = Classifier())
            {
                LoraModel.Inject(model, new LoraConfig { r = 4, lora_alpha = 8, target_modules = new[] { "q_proj", "v_proj" } });
                Fill(model, name => Trained(model, name));
                LoraModel.save_pretrained(model, Path.Combine(folder, "plain"));
                outputs["plain"] = Ports.Run(model, classifierInput);
            }
            // rslora: rsLoRA, rank and alpha patterns, a saved classifier head.
            using (var model = Classifier())
            {
                LoraModel.Inject(model, new LoraConfig
                {
                    r = 4, lora_alpha = 8, use_rslora = true, target_modules = new[] { "q_proj", "v_proj", "self_attn.o_proj" },
                    rank_pattern = new() { ["o_proj"] = 2 }, alpha_pattern = new() { ["layers.1.self_attn.v_proj"] = 32 },
                    modules_to_save = new[] { "classifier" },
                });
                Fill(model, name => Trained(model, name));
                LoraModel.save_pretrained(model, Path.Combine(folder, "rslora"));
                outputs["rslora"] = Ports.Run(model, classifierInput);
            }
            // dora: DoRA on every projection, magnitudes away from the norms.
            using (var model = Classifier())
            {
                LoraModel.Inject(model, new LoraConfig { r = 4, lora_alpha = 8, use_dora = true, target_modules = new[] { "q_proj", "k_proj", "v_proj", "o_proj" } });
                Fill(model, name => Trained(model, name));
                LoraModel.save_pretrained(model, Path.Combine(folder, "dora"));
                outputs["dora"] = Ports.Run(model, classifierInput);
            }
            // embedding: an nn.Embedding and a Linear.
            using (var model = Ports.Pretrained("embedding"))
            {
                LoraModel.Inject(model, new LoraConfig { r = 4, lora_alpha = 8, target_modules = new[] { "emb", "fc" } });
                Fill(model, name => Trained(model, name));
                LoraModel.save_pretrained(model, Path.Combine(folder, "embedding"));
                outputs["embedding"] = Ports.Run(model, embeddingInput);
            }
            // named: three adapters, two of them saved (selected_adapters), each run alone and in a mixed batch.
            using (var model = Classifier())
            {
                LoraModel.Inject(model, new LoraConfig { r = 4, lora_alpha = 8, target_modules = new[] { "q_proj", "v_proj" } });
                LoraModel.Inject(model, new LoraConfig { r = 8, lora_alpha = 4, target_modules = new[] { "q_proj", "k_proj", "o_proj" } }, "other");
                LoraModel.Inject(model, new LoraConfig { r = 2, lora_alpha = 6, target_modules = new[] { "q_proj", "o_proj" } }, "third");
                Fill(model, name => name.Contains(".lora_", StringComparison.Ordinal));
                LoraModel.save_pretrained(model, Path.Combine(folder, "named"), new[] { "default", "third" });
                foreach (string name in new[] { "default", "third" })
                {
                    LoraModel.set_adapter(model, name);
                    outputs[$"named/{name}"] = Ports.Run(model, classifierInput);
                }
                using (LoraModel.MixedBatch(model, NamedMixedRows))
                    outputs["named/mixed"] = Ports.Run(model, classifierInput);
            }
            // bias_all, bias_lora_only: trained biases on the Mlp adapted at 0 (PEFT's key: <path>.base_layer.bias).
            foreach (string bias in new[] { "all", "lora_only" })
            {
                using var model = MlpWithBase();
                LoraModel.Inject(model, new LoraConfig { r = 4, lora_alpha = 8, target_modules = new[] { "0" }, bias = bias });
                Fill(model, name => Trained(model, name));
                LoraModel.save_pretrained(model, Path.Combine(folder, $"bias_{bias}"));
                outputs[$"bias_{bias}"] = Ports.Run(model, mlpInput);
            }
            // conv: make_conv.py's ConvNet2d (Conv2d fields and module-typed fields), LoRA on its four convolutions and a
            // second adapter on a conv and the Linear head, saved together, each run alone and in a mixed batch.
            using (var model = ConvNets.Base("conv2d"))
            {
                LoraModel.Inject(model, new LoraConfig { r = 4, lora_alpha = 8, target_modules = ConvNets.Targets["conv2d"] });
                LoraModel.Inject(model, new LoraConfig { r = 2, lora_alpha = 6, target_modules = new[] { "stem", "head" } }, "second");
                Fill(model, name => name.Contains(".lora_", StringComparison.Ordinal));
                LoraModel.save_pretrained(model, Path.Combine(folder, "conv"));
                foreach (string name in new[] { "default", "second" })
                {
                    LoraModel.set_adapter(model, name);
                    outputs[$"conv/{name}"] = Ports.Run(model, convInput);
                }
                using (LoraModel.MixedBatch(model, ConvMixedRows))
                    outputs["conv/mixed"] = Ports.Run(model, convInput);
            }
            // gpt2: the generated GPT-2 port, LoRA on its Conv1D layers c_attn, c_proj and c_fc (PEFT: lora.Linear with
            // fan_in_fan_out; the saved config says fan_in_fan_out true, as PEFT's would).
            using (var model = Gpt2())
            {
                LoraModel.Inject(model, new LoraConfig { r = 4, lora_alpha = 8, target_modules = new[] { "c_attn", "c_proj", "c_fc" } });
                Fill(model, name => Trained(model, name));
                LoraModel.save_pretrained(model, Path.Combine(folder, "gpt2"));
                outputs["gpt2"] = Ports.Run(model, gpt2Input);
            }
            // gpt2_dora: DoRA on c_attn and c_fc; A and B filled, and the magnitudes set to exact values near the rows' norms
            // (about 0.11 here: 6/64 to 10/64), not to computed norms, whose last bits are the CPU's.
            using (var model = Gpt2())
            {
                LoraModel.Inject(model, new LoraConfig { r = 2, lora_alpha = 4, use_dora = true, target_modules = new[] { "c_attn", "c_fc" } });
                Fill(model, name => name.Contains(".lora_A.", StringComparison.Ordinal) || name.Contains(".lora_B.", StringComparison.Ordinal));
                using (no_grad())
                {
                    foreach (var (_, magnitude) in model.named_parameters().Where(p => p.name.Contains(".lora_magnitude_vector.", StringComparison.Ordinal)))
                    {
                        using var values = (arange(magnitude.numel(), ScalarType.Float64) % 5 + 6).div(64).to(magnitude.dtype);
                        magnitude.copy_(values);
                    }
                }
                LoraModel.save_pretrained(model, Path.Combine(folder, "gpt2_dora"));
                outputs["gpt2_dora"] = Ports.Run(model, gpt2Input);
            }
            Safetensors.SaveStateDict(Path.Combine(folder, "outputs.safetensors"), outputs);
            return outputs;
        }

        private static string RepositoryRoot()
        {
            for (var directory = new DirectoryInfo(AppContext.BaseDirectory); directory is not null; directory = directory.Parent)
            {
                if (File.Exists(Path.Combine(directory.FullName, "TorchLinear.sln")))
                    return directory.FullName;
            }
            throw new InvalidOperationException($"No TorchLinear.sln above {AppContext.BaseDirectory}.");
        }

        /// <summary>sha256 of every file under a folder, by its path relative to the folder with '/' separators.</summary>
        internal static SortedDictionary<string, string> Hashes(string folder) => new(
            Directory.EnumerateFiles(folder, "*", SearchOption.AllDirectories)
                     .ToDictionary(f => Path.GetRelativePath(folder, f).Replace(Path.DirectorySeparatorChar, '/'), Sha256),
            StringComparer.Ordinal);

        private static string Sha256(string file) => Convert.ToHexString(SHA256.HashData(File.ReadAllBytes(file))).ToLowerInvariant();

        private static Dictionary<string, JsonObject> RecordedCases() =>
            JsonNode.Parse(File.ReadAllText(Path.Combine(Committed, "results.json")))!["cases"]!.AsArray()
                    .Select(c => c!.AsObject()).ToDictionary(c => (string)c["name"]!);

        private static SortedDictionary<string, string> RecordedFiles(JsonObject recordedCase) => new(
            recordedCase["files"]!.AsObject().ToDictionary(kv => kv.Key, kv => (string)kv.Value!), StringComparer.Ordinal);

        /// <summary>What differs between a committed file and the one written now, for the failure message.</summary>
        private static string Difference(string committed, string written)
        {
            if (!written.EndsWith(".safetensors", StringComparison.Ordinal))
                return "another config (or the committed file is not the one checked)";
            using var scope = NewDisposeScope();
            var before = StateDicts.ReadPyTorchFile(committed);
            var after = StateDicts.ReadPyTorchFile(written);
            if (!before.Keys.OrderBy(k => k, StringComparer.Ordinal).SequenceEqual(after.Keys.OrderBy(k => k, StringComparer.Ordinal), StringComparer.Ordinal))
                return $"other keys: {string.Join(", ", after.Keys.Except(before.Keys).Concat(before.Keys.Except(after.Keys)))}";
            var changed = after.Where(kv => kv.Value.dtype != before[kv.Key].dtype || !Equivalence.Compare(before[kv.Key], kv.Value).BitExact).Select(kv => kv.Key).ToList();
            return changed.Count > 0 ? $"other values or dtypes in {string.Join(", ", changed)}" : "the same tensors, another header or __metadata__";
        }

        [Fact]
        public void FoldersWrittenHere_AreWhatThisLibraryWritesNow_AndComputesNow()
        {
            using var scope = NewDisposeScope();
            string fresh = Directory.CreateTempSubdirectory("torchlinear-wayback-").FullName;
            try
            {
                var outputs = Write(fresh);
                if (Environment.GetEnvironmentVariable("TORCHLINEAR_WRITE_FROM_DOTNET") == "1")
                {
                    string target = Path.Combine(RepositoryRoot(), "tests", "TorchLinear.Lora.Tests", "ReferenceData", "RealPeft", "from_dotnet");
                    foreach (string name in CaseNames)
                    {
                        if (Directory.Exists(Path.Combine(target, name)))
                            Directory.Delete(Path.Combine(target, name), recursive: true);
                    }
                    Write(target);
                }

                var committedOutputs = StateDicts.ReadPyTorchFile(Path.Combine(Committed, "outputs.safetensors"));
                Assert.Equal(outputs.Keys.OrderBy(k => k, StringComparer.Ordinal), committedOutputs.Keys.OrderBy(k => k, StringComparer.Ordinal));
                foreach (var (key, output) in outputs)
                {
                    // The inputs bit for bit; the outputs PEFT was compared with are those .NET computes now (a GEMM's last
                    // bits are the CPU's).
                    if (key.StartsWith("input/", StringComparison.Ordinal))
                        Assert.True(Equivalence.Compare(committedOutputs[key], output).BitExact, key);
                    else
                        Equivalence.AssertClose(output, committedOutputs[key], msg: $"{key}: .NET now computes other outputs than the ones PEFT checked");
                }
                // The folders byte for byte as check_from_dotnet.py hashed them (results.json), header and __metadata__ included.
                var recordedCases = RecordedCases();
                foreach (string name in CaseNames)
                {
                    Assert.True(recordedCases.ContainsKey(name), $"results.json has no case '{name}': run check_from_dotnet.py");
                    var recorded = RecordedFiles(recordedCases[name]);
                    var written = Hashes(Path.Combine(fresh, name));
                    Assert.True(written.Keys.SequenceEqual(recorded.Keys),
                                $"{name}: .NET now writes the files {string.Join(", ", written.Keys)}; PEFT checked {string.Join(", ", recorded.Keys)}");
                    foreach (var (file, sha) in written)
                        Assert.True(sha == recorded[file],
                                    $"{name}/{file}: .NET now writes other bytes than the file PEFT checked (sha256 {sha}, results.json {recorded[file]}): {Difference(Path.Combine(Committed, name, file), Path.Combine(fresh, name, file))}");
                }
            }
            finally
            {
                Directory.Delete(fresh, recursive: true);
            }
        }

        [Fact]
        public void RealPeft_LoadedEveryFolderWrittenHere_AndGaveTheLibrarysOutputs()
        {
            var results = JsonNode.Parse(File.ReadAllText(Path.Combine(Committed, "results.json")))!.AsObject();
            Assert.Equal("0.18.1", (string?)results["peft"]);
            Assert.Equal("all matched", (string?)results["result"]);
            // The results are the committed script's: a script changed (a check loosened, a case dropped) fails here until
            // it is rerun.
            Assert.True(Sha256(Path.Combine(RealPeft, "check_from_dotnet.py")) == (string?)results["script_sha256"],
                        "check_from_dotnet.py changed since it wrote results.json: rerun it");
            // The results are of these very files: a folder rewritten after the check fails here until it is checked again.
            Assert.Equal(Hashes(Committed)["outputs.safetensors"], (string?)results["outputs_sha256"]);
            var cases = RecordedCases();
            var folders = Directory.EnumerateDirectories(Committed).Select(Path.GetFileName).OrderBy(n => n, StringComparer.Ordinal);
            Assert.Equal(folders, cases.Keys.OrderBy(n => n, StringComparer.Ordinal));
            Assert.Equal(CaseNames.OrderBy(n => n, StringComparer.Ordinal), cases.Keys.OrderBy(n => n, StringComparer.Ordinal));
            foreach (var (name, result) in cases)
            {
                var recorded = RecordedFiles(result);
                var now = Hashes(Path.Combine(Committed, name));
                Assert.True(now.Count == recorded.Count && now.All(kv => recorded.TryGetValue(kv.Key, out var sha) && sha == kv.Value),
                            $"from_dotnet/{name} is not the folder check_from_dotnet.py checked (rerun it): files now {string.Join(", ", now.Keys)}");
                var checks = result["checks"]!.AsArray().Select(c => c!.AsObject()).ToList();
                var made = checks.Select(c => ((string)c["what"]!, (string)c["output"]!)).ToArray();
                Assert.True(made.SequenceEqual(ExpectedChecks(name)),
                            $"{name}: check_from_dotnet.py compared {string.Join(", ", made)}; expected {string.Join(", ", ExpectedChecks(name))} (what, output)");
                foreach (var check in checks)
                {
                    // One rule: matched is torch.testing.assert_close's float32 tolerances (the script's), no key unused, none missing.
                    string what = $"{name}: {(string?)check["what"]}";
                    Assert.True((bool)check["matched"]!, $"{what}: PEFT's output differs from .NET's by {(double)check["max_abs_diff"]!}");
                    Assert.Empty(check["unexpected_keys"]!.AsArray());
                    Assert.Empty(check["missing_adapter_keys"]!.AsArray());
                }
                Assert.True((bool)result["matched"]!, name);
            }
            // The controls: under the older plain key '<path>.bias', PEFT drops the trained bias of the adapted layer.
            foreach (string name in new[] { "bias_all", "bias_lora_only" })
                Assert.True((double)cases[name]["control_plain_bias_key_max_abs_diff"]! > 0.01, name);
            // The mixed batch was PEFT's adapter_names= on the same rows.
            var rows = cases["named"]["checks"]!.AsArray().Single(c => (string?)c!["what"] == "mixed")!["rows"]!.AsArray().Select(r => (string)r!);
            Assert.Equal(NamedMixedRows, rows);
            rows = cases["conv"]["checks"]!.AsArray().Single(c => (string?)c!["what"] == "mixed")!["rows"]!.AsArray().Select(r => (string)r!);
            Assert.Equal(ConvMixedRows, rows);
        }
    }
}
