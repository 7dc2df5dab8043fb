using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Text.Json;
using TorchLinear.Samples;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.PyBridge;
using Xunit;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace TorchLinear.Tests
{
    /// <summary>
    /// Checkpoints written by real PyTorch (ReferenceData/Interop, made by make_interop.py) load into our modules and
    /// give PyTorch's answers; files that do not fit are refused without changing anything; files written from .NET
    /// hold the same tensors (and make_interop.py --check confirmed PyTorch reads them).
    /// </summary>
    public class StateDictsTests
    {
        // Outputs on random inputs may differ in the last bits: PyTorch 1.13 from Debian and libtorch 2.10 use different
        // GEMM kernels. Measured here: at most 2 ULP of the output's largest magnitude (64 ULP element by element, where an
        // output is near zero); the bound leaves room for other CPUs.
        private const int UlpAtScaleBound = 4;

        private static readonly string Folder = Path.Combine(AppContext.BaseDirectory, "ReferenceData", "Interop");
        private readonly ITestOutputHelper _output;

        public StateDictsTests(ITestOutputHelper output) => _output = output;

        // ---- The content decides the reader, not the name ------------------------------------------------------------

        [Theory]
        [InlineData("mlp.safetensors", ".bin")]
        [InlineData("mlp.safetensors", ".pt")]
        [InlineData("mlp.pt", ".safetensors")]
        [InlineData("mlp.pt", ".bin")]
        public void AFileNamedForTheOtherFormat_IsReadByItsContent(string original, string extension)
        {
            // The readers were chosen by the extension: a safetensors file named .bin was refused as a broken zip archive,
            // and a torch.save archive named .safetensors as a broken safetensors header.
            string renamed = Path.Combine(Path.GetTempPath(), $"torchlinear-renamed-{Guid.NewGuid():N}{extension}");
            File.Copy(Path.Combine(Folder, original), renamed);
            try
            {
                using var scope = NewDisposeScope();
                var expected = StateDicts.ReadPyTorchFile(Path.Combine(Folder, "mlp.safetensors"));
                var loaded = StateDicts.ReadPyTorchFile(renamed);
                Assert.Equal(expected.Keys.OrderBy(k => k), loaded.Keys.OrderBy(k => k));
                foreach (var (key, tensor) in expected)
                    Assert.True(Equivalence.Compare(tensor, loaded[key]).BitExact, key);
            }
            finally
            {
                File.Delete(renamed);
            }
        }

        [Theory]
        [InlineData(".pt", "{\"weight\": [1, 2]}", "it looks like JSON text")]
        [InlineData(".bin", "\u0093NUMPY\u0001\u0000v\u0000{'descr': '<f4'}", "it looks like a NumPy .npy file")]
        [InlineData(".safetensors", "GIF8", "it begins with the bytes 47494638")]
        [InlineData(".ckpt", "", "it is empty")]
        public void AFileThatIsNeitherFormat_IsRefusedSayingWhatItLooksLike(string extension, string content, string says)
        {
            string file = Path.Combine(Path.GetTempPath(), $"torchlinear-neither-{Guid.NewGuid():N}{extension}");
            File.WriteAllBytes(file, content.Select(c => (byte)c).ToArray());
            try
            {
                var error = Assert.Throws<CheckpointFormatException>(() => StateDicts.ReadPyTorchFile(file));
                Assert.Equal(file, error.Path);
                Assert.Contains(says, error.Message);
                if (content.Length < 8 || extension != ".safetensors")
                    Assert.Contains("neither a safetensors file", error.Message);
            }
            finally
            {
                File.Delete(file);
            }
        }

        public static IEnumerable<object[]> Models() =>
            from model in new[] { "article", "linear_3_2", "linear_nobias", "linear_f64", "mlp", "lora" }
            from format in new[] { "pt", "safetensors" }
            select new object[] { model, format };

        /// <summary>Our module for each checkpoint of make_interop.py.</summary>
        private static nn.Module<Tensor, Tensor> OurModule(string model) => model switch
        {
            "article" or "linear_3_2" => new CustomLinear(3, 2),
            "linear_nobias" => new CustomLinear(4, 3, bias: false),
            "linear_f64" => new CustomLinear(5, 2, dtype: ScalarType.Float64),
            "mlp" => Mlp(),
            "lora" => new LoraLinear(6, 5, r: 2, lora_alpha: 4),
            _ => throw new ArgumentException(model),
        };

        private static nn.Module<Tensor, Tensor> Mlp() =>
            nn.Sequential(("0", new CustomLinear(8, 16)), ("1", nn.ReLU()), ("2", new CustomLinear(16, 4)));

        private static string FileOf(string model, string format) => Path.Combine(Folder, $"{model}.{format}");

        [Theory]
        [MemberData(nameof(Models))]
        public void PyTorchCheckpoint_LoadsExactly_AndGivesPyTorchsAnswers(string model, string format)
        {
            using var scope = NewDisposeScope();
            var module = OurModule(model);
            var file = StateDicts.ReadPyTorchFile(FileOf(model, format));

            StateDicts.LoadPyTorchFile(module, FileOf(model, format));

            var loaded = module.state_dict();
            Assert.Equal(file.Keys.OrderBy(k => k, StringComparer.Ordinal), loaded.Keys.OrderBy(k => k, StringComparer.Ordinal));
            foreach (var (key, tensor) in file)
                Assert.True(Equivalence.Compare(tensor, loaded[key]).BitExact, $"{key} differs from the file");

            module.eval();
            var cases = StateDicts.ReadPyTorchFile(Path.Combine(Folder, "cases.safetensors"));
            var keys = Manifest().GetProperty("models").GetProperty(model).GetProperty("cases").EnumerateArray().Select(e => e.GetString()!).ToList();
            Assert.Equal(6, keys.Count);
            using var _ = no_grad();
            foreach (string key in keys)
            {
                var expected = cases[key + "/output"];
                var actual = module.forward(cases[key + "/input"]);
                var comparison = Equivalence.Compare(expected, actual);
                double ulpAtScale = UlpsAtScale(expected, comparison);
                _output.WriteLine($"{model}.{format} {key}: {comparison} ({ulpAtScale:F2} ULP of the largest |output|)");
                Assert.True(comparison.Comparable, comparison.ToString());
                if (model == "article" && key.Contains("/int/"))
                    Assert.True(comparison.BitExact, $"{key}: integer weights and inputs must give PyTorch's result exactly: {comparison}");
                else
                    Assert.True(ulpAtScale <= UlpAtScaleBound, $"{key}: {comparison}, {ulpAtScale:F2} ULP at scale > {UlpAtScaleBound}");
            }
        }

        [Theory]
        [InlineData("linear_3_2", "pt")]
        [InlineData("linear_3_2", "safetensors")]
        [InlineData("mlp", "pt")]
        [InlineData("mlp", "safetensors")]
        public void PyBridgesOwnLoaders_ReadTheSameTensors(string model, string format)
        {
            using var scope = NewDisposeScope();
            var ours = OurModule(model);
            var theirs = OurModule(model);
            StateDicts.LoadPyTorchFile(ours, FileOf(model, format));
            if (format == "pt")
                theirs.load_py(FileOf(model, format));
            else
                theirs.load_safetensors(FileOf(model, format));

            var expected = ours.state_dict();
            foreach (var (key, tensor) in theirs.state_dict())
                Assert.True(Equivalence.Compare(expected[key], tensor).BitExact, key);
        }

        [Theory]
        [InlineData("bad_shape", "pt", "'bias' has shape [3], this module's has shape [2]")]
        [InlineData("bad_shape", "safetensors", "'bias' has shape [3], this module's has shape [2]")]
        [InlineData("bad_missing", "pt", "missing key 'bias'")]
        [InlineData("bad_missing", "safetensors", "missing key 'bias'")]
        [InlineData("linear_f64", "pt", "'weight' Float64 (this module's Float32)")]
        public void FileThatDoesNotFit_IsRefused_AndNothingChanges(string file, string format, string reason)
        {
            using var scope = NewDisposeScope();
            foreach (var module in new nn.Module<Tensor, Tensor>[] { new CustomLinear(3, 2), nn.Linear(3, 2) })
            {
                var before = module.state_dict().ToDictionary(kv => kv.Key, kv => TensorText.Bits(kv.Value));

                var error = Assert.Throws<StateDictMismatchException>(() => StateDicts.LoadPyTorchFile(module, FileOf(file, format)));

                Assert.Contains(reason, error.Message);
                Assert.Contains("nothing was changed", error.Message);
                Assert.Contains($"{file}.{format}", error.Message);
                foreach (var (key, tensor) in module.state_dict())
                    Assert.Equal(before[key], TensorText.Bits(tensor));
            }
        }

        [Fact]
        public void MlpCheckpoint_IntoAModuleOfAnotherShape_IsRefusedForEveryMismatch()
        {
            using var scope = NewDisposeScope();
            var wrong = nn.Sequential(("0", new CustomLinear(8, 12)), ("1", nn.ReLU()), ("2", new CustomLinear(12, 4)));
            var error = Assert.Throws<StateDictMismatchException>(() => StateDicts.LoadPyTorchFile(wrong, FileOf("mlp", "pt")));
            Assert.Contains("'0.weight' has shape [16, 8], this module's has shape [12, 8]", error.Message);
            Assert.Contains("'2.weight' has shape [4, 16], this module's has shape [4, 12]", error.Message);
        }

        [Fact]
        public void NonStrictLoad_ReportsMissingKeys_AndLoadsTheRest()
        {
            using var scope = NewDisposeScope();
            var layer = new CustomLinear(3, 2);
            var missing = StateDicts.LoadPyTorchFile(layer, FileOf("bad_missing", "safetensors"), strict: false);
            Assert.Equal(new[] { "bias" }, missing);
            Assert.True(Equivalence.Compare(StateDicts.ReadPyTorchFile(FileOf("linear_3_2", "pt"))["weight"], layer.weight).BitExact);
        }

        [Fact]
        public void MissingFile_IsReportedByName()
        {
            var error = Assert.Throws<FileNotFoundException>(() => StateDicts.LoadPyTorchFile(new CustomLinear(3, 2), "no-such-file.pt"));
            Assert.Contains("no-such-file.pt", error.Message);
        }

        // ---- Drop-in: the exception TorchSharp throws for the same fault ------------------------------------------
        // Ported from TorchSharp's own TestLoadSave (TestSaveLoadSequential_error1, _error2, _lax), with CustomLinear
        // for Linear and a CustomLinear stack for the Conv2d: code that catches what nn.Linear throws catches ours.

        private static Sequential Stack() => nn.Sequential(("0", new CustomLinear(10, 5)), ("1", new CustomLinear(5, 10)));

        [Fact]
        public void MissingKey_IsAnInvalidOperationException_AsInTorchSharp()
        {
            using var source = Stack();
            var sd = source.state_dict();
            sd.Remove("0.bias");
            using var loaded = Stack();
            Assert.IsAssignableFrom<InvalidOperationException>(Assert.Throws<StateDictMismatchException>(() => StateDicts.LoadChecked(loaded, sd)));
            Assert.Throws<StateDictMismatchException>(() => ((CustomLinear)loaded[0]).load_state_dict(new Dictionary<string, Tensor> { ["weight"] = sd["0.weight"] }));
            // The anchor, TorchSharp's own modules:
            using var builtIn = nn.Sequential(("0", nn.Linear(10, 5)), ("1", nn.Linear(5, 10)));
            Assert.Throws<InvalidOperationException>(() => builtIn.load_state_dict(sd));
        }

        [Fact]
        public void UnexpectedKey_IsAnInvalidOperationException_AsInTorchSharp()
        {
            using var source = Stack();
            var sd = source.state_dict();
            sd.Add("2.bias", sd["0.bias"]);
            using var loaded = Stack();
            Assert.IsAssignableFrom<InvalidOperationException>(Assert.Throws<StateDictMismatchException>(() => StateDicts.LoadChecked(loaded, sd)));
            using var builtIn = nn.Sequential(("0", nn.Linear(10, 5)), ("1", nn.Linear(5, 10)));
            Assert.Throws<InvalidOperationException>(() => builtIn.load_state_dict(sd));
        }

        [Fact]
        public void ShapeAndDtypeMismatches_WhichTorchSharpDoesNotDetect_UseTheSameType()
        {
            using var loaded = Stack();
            var before = loaded.state_dict().ToDictionary(kv => kv.Key, kv => TensorText.Bits(kv.Value));
            var wrongShape = loaded.state_dict().ToDictionary(kv => kv.Key, kv => kv.Key == "0.bias" ? ones(1) : kv.Value.clone());
            var wrongDtype = loaded.state_dict().ToDictionary(kv => kv.Key, kv => kv.Key == "1.weight" ? kv.Value.to(ScalarType.Float64) : kv.Value.clone());
            Assert.Contains("'0.bias' has shape [1]", Assert.Throws<StateDictMismatchException>(() => StateDicts.LoadChecked(loaded, wrongShape)).Message);
            Assert.Contains("'1.weight' is Float64", Assert.Throws<StateDictMismatchException>(() => StateDicts.LoadChecked(loaded, wrongDtype)).Message);
            foreach (var (key, tensor) in loaded.state_dict())
                Assert.Equal(before[key], TensorText.Bits(tensor));
            // What TorchSharp does with the same input: broadcasts the (1) bias and converts the dtype, silently.
            using var builtIn = nn.Sequential(("0", nn.Linear(10, 5)), ("1", nn.Linear(5, 10)));
            builtIn.load_state_dict(wrongShape);
            builtIn.load_state_dict(wrongDtype);
        }

        [Fact]
        public void Lax_ReportsMissingKeys_LikeTorchSharp()
        {
            using var source = Stack();
            var sd = source.state_dict();
            sd.Remove("0.bias");
            sd.Add("2.bias", source.state_dict()["1.bias"]);
            using var loaded = Stack();
            var missing = StateDicts.LoadChecked(loaded, sd, strict: false);
            Assert.Equal(new[] { "0.bias" }, missing);
            Assert.Equal(TensorText.Bits(sd["0.weight"]), TensorText.Bits(loaded.state_dict()["0.weight"]));
        }

        // ---- Files that are not PyTorch checkpoints ------------------------------------------------------------

        [Fact]
        public void TorchSharpsOwnFile_IsRecognised_AndTheRightLoaderNamed()
        {
            string path = Path.Combine(Path.GetTempPath(), $"torchlinear-ts-{Guid.NewGuid():N}.pt");
            try
            {
                using var layer = new CustomLinear(3, 2);
                layer.save(path);
                using var target = new CustomLinear(3, 2);
                var before = TensorText.Bits(target.weight);
                var error = Assert.Throws<CheckpointFormatException>(() => StateDicts.LoadPyTorchFile(target, path));
                Assert.Contains("written by TorchSharp's Module.save", error.Message);
                Assert.Contains($"module.load(\"{path}\")", error.Message);
                Assert.Equal(path, error.Path);
                Assert.Equal(before, TensorText.Bits(target.weight));
                // The advice works.
                target.load(path);
                Assert.Equal(TensorText.Bits(layer.weight), TensorText.Bits(target.weight));
            }
            finally
            {
                File.Delete(path);
            }
        }

        [Theory]
        [InlineData("empty.pt", new byte[0])]
        [InlineData("gzip.pt", new byte[] { 0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3 })]
        [InlineData("text.safetensors", new byte[] { (byte)'h', (byte)'e', (byte)'l', (byte)'l', (byte)'o' })]
        public void UnreadableFile_IsACheckpointFormatException_NamingTheFile(string name, byte[] bytes)
        {
            string path = Path.Combine(Path.GetTempPath(), $"torchlinear-{Guid.NewGuid():N}-{name}");
            try
            {
                File.WriteAllBytes(path, bytes);
                using var target = new CustomLinear(3, 2);
                var before = TensorText.Bits(target.weight);
                var error = Assert.Throws<CheckpointFormatException>(() => StateDicts.LoadPyTorchFile(target, path));
                Assert.Contains(path, error.Message);
                Assert.DoesNotContain("TorchSharp's Module.save", error.Message);
                Assert.Equal(before, TensorText.Bits(target.weight));
            }
            finally
            {
                File.Delete(path);
            }
        }

        // ---- The other direction: files written from .NET ------------------------------------------------------

        /// <summary>
        /// Saves our modules, loaded from PyTorch's checkpoints, with PyBridge's save_py and save_safetensors. Run the
        /// tests with TORCHLINEAR_WRITE_FROM_DOTNET=1 to (re)write the committed copies in the source tree, then run
        /// make_interop.py --check.
        /// </summary>
        private static void WriteFromDotnet(string folder)
        {
            Directory.CreateDirectory(folder);
            foreach (string model in new[] { "linear_3_2", "mlp", "lora" })
            {
                using var scope = NewDisposeScope();
                var module = OurModule(model);
                StateDicts.LoadPyTorchFile(module, FileOf(model, "pt"));
                module.save_py(Path.Combine(folder, model + ".pt"));
                module.save_safetensors(Path.Combine(folder, model + ".safetensors"));
            }
        }

        [Fact]
        public void DotnetWrittenFiles_HoldTheCommittedTensors_WhichArePyTorchsOwn()
        {
            string fresh = Directory.CreateTempSubdirectory("torchlinear-from-dotnet-").FullName;
            try
            {
                WriteFromDotnet(fresh);
                if (Environment.GetEnvironmentVariable("TORCHLINEAR_WRITE_FROM_DOTNET") == "1")
                    WriteFromDotnet(Path.Combine(Snapshots.RepositoryRoot, "tests", "TorchLinear.Tests", "ReferenceData", "Interop", "from_dotnet"));

                string committed = Path.Combine(Folder, "from_dotnet");
                foreach (string model in new[] { "linear_3_2", "mlp", "lora" })
                foreach (string format in new[] { "pt", "safetensors" })
                {
                    using var scope = NewDisposeScope();
                    var rewritten = StateDicts.ReadPyTorchFile(Path.Combine(fresh, $"{model}.{format}"));
                    var stored = StateDicts.ReadPyTorchFile(Path.Combine(committed, $"{model}.{format}"));
                    var original = StateDicts.ReadPyTorchFile(FileOf(model, "pt"));
                    Assert.Equal(original.Keys.OrderBy(k => k, StringComparer.Ordinal), stored.Keys.OrderBy(k => k, StringComparer.Ordinal));
                    Assert.Equal(stored.Keys.OrderBy(k => k, StringComparer.Ordinal), rewritten.Keys.OrderBy(k => k, StringComparer.Ordinal));
                    foreach (string key in original.Keys)
                    {
                        Assert.True(Equivalence.Compare(original[key], stored[key]).BitExact, $"{model}.{format} {key}: committed file differs from PyTorch's");
                        Assert.True(Equivalence.Compare(stored[key], rewritten[key]).BitExact, $"{model}.{format} {key}: .NET now writes other values");
                    }
                }

                // make_interop.py --check loaded the committed files in PyTorch and wrote this report.
                string report = File.ReadAllText(Path.Combine(committed, "check_report.txt"));
                Assert.Contains("result: all identical", report);
                Assert.Equal(6, report.Split('\n').Count(l => l.EndsWith("keys match, tensors identical", StringComparison.Ordinal)));
            }
            finally
            {
                Directory.Delete(fresh, recursive: true);
            }
        }

        private static JsonElement Manifest() =>
            JsonDocument.Parse(File.ReadAllText(Path.Combine(Folder, "manifest.json"))).RootElement;

        /// <summary>The largest difference in units of the last place of the expected tensor's largest magnitude.</summary>
        private static double UlpsAtScale(Tensor expected, TensorComparison comparison)
        {
            if (comparison.BitExact || comparison.MaxAbsDiff == 0)
                return 0;
            double scale = expected.abs().max().to(ScalarType.Float64).item<double>();
            double ulp = expected.dtype == ScalarType.Float64
                ? Math.BitIncrement(scale) - scale
                : MathF.BitIncrement((float)scale) - (float)scale;
            return comparison.MaxAbsDiff / ulp;
        }
    }
}
