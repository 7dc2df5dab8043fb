using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Text.Json;
using TorchSharp;
using TorchSharp.Modules;
using Xunit;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace TorchLinear.Tests
{
    /// <summary>
    /// Checkpoints as users meet them (ReferenceData/Checkpoints/real_*.pt, written by PyTorch 1.13 with
    /// make_real_checkpoints.py): a DataParallel state_dict ('module.' on every key), a .half() copy, num_batches_tracked
    /// stored as int32, and a checkpoint from before num_batches_tracked existed. Each is refused with a short message
    /// that says first what it is and which <see cref="StateDictLoadOptions"/> loads it; the option then loads it exactly.
    /// </summary>
    public class RealCheckpointsTests
    {
        // The longest message any of these refusals may have, whatever the number of keys: the header, the recognised
        // cases, 5 keys of each kind and one line of dtype advice. The messages measured here are 1,000-1,600
        // characters (80 keys each side); before, the same refusals listed every key (15,218 characters for 244 keys).
        private const int LongestMessage = 2_000;

        private static readonly string Folder = Path.Combine(AppContext.BaseDirectory, "ReferenceData", "Checkpoints");
        private static readonly JsonElement Facts = JsonDocument.Parse(File.ReadAllText(Path.Combine(Folder, "real_checkpoints.json"))).RootElement;
        private readonly ITestOutputHelper _output;

        public RealCheckpointsTests(ITestOutputHelper output) => _output = output;

        // ---- The port of make_real_checkpoints.py's SmallNet ----------------------------------------------------

        private sealed class Block : nn.Module<Tensor, Tensor>
        {
            private readonly Conv2d conv = nn.Conv2d(2, 2, 3, padding: 1, bias: false);
            private readonly BatchNorm2d bn = nn.BatchNorm2d(2);

            public Block() : base(nameof(Block)) => RegisterComponents();

            public override Tensor forward(Tensor x) => nn.functional.relu(bn.call(conv.call(x)));
        }

        private sealed class SmallNet : nn.Module<Tensor, Tensor>
        {
            private readonly Conv2d stem = nn.Conv2d(3, 2, 3, padding: 1, bias: false);
            private readonly BatchNorm2d stem_bn = nn.BatchNorm2d(2);
            private readonly Sequential blocks = nn.Sequential(Enumerable.Range(0, 12).Select(i => ($"{i}", (nn.Module<Tensor, Tensor>)new Block())).ToArray());
            private readonly Linear head = nn.Linear(2, 2);

            public SmallNet() : base(nameof(SmallNet)) => RegisterComponents();

            public override Tensor forward(Tensor x) =>
                head.call(blocks.call(nn.functional.relu(stem_bn.call(stem.call(x)))).mean(new long[] { 2, 3 }));
        }

        /// <summary>A module holding the saved model as its child "model", as training frameworks' wrappers do.</summary>
        private sealed class Wrapper : nn.Module<Tensor, Tensor>
        {
            private readonly SmallNet model = new();

            public Wrapper() : base(nameof(Wrapper)) => RegisterComponents();

            public override Tensor forward(Tensor x) => model.call(x);
        }

        private static string FileOf(string name) => Path.Combine(Folder, $"real_{name}.pt");

        private static Dictionary<string, string[]> Bits(nn.Module module) =>
            module.state_dict().ToDictionary(kv => kv.Key, kv => Bits(kv.Value));

        /// <summary>Floating-point bit patterns (TensorText), or integers' values, with the dtype first.</summary>
        private static string[] Bits(Tensor tensor)
        {
            string[] values = is_integral(tensor.dtype)
                ? tensor.to(ScalarType.Int64).data<long>().ToArray().Select(v => v.ToString(System.Globalization.CultureInfo.InvariantCulture)).ToArray()
                : TensorText.Bits(tensor);
            return values.Prepend(tensor.dtype.ToString()).ToArray();
        }

        private static int Keys => Facts.GetProperty("keys").GetInt32();

        private static int TrackedCounts => Facts.GetProperty("num_batches_tracked_keys").GetInt32();

        /// <summary>Refused with the new exception, which is an InvalidOperationException; the module unchanged.</summary>
        private StateDictMismatchException Refused(nn.Module module, Action load)
        {
            var before = Bits(module);
            var thrown = Assert.ThrowsAny<InvalidOperationException>(load);
            var error = Assert.IsType<StateDictMismatchException>(thrown);
            _output.WriteLine($"{error.Message.Length} characters: {error.Message}");
            Assert.Contains("nothing was changed", error.Message);
            Assert.InRange(error.Message.Length, 1, LongestMessage);
            // Never advice TorchSharp refuses: Module.to takes floating-point and complex dtypes only.
            Assert.DoesNotContain(".to(Int", error.Message);
            Assert.DoesNotContain(".to(ScalarType.Int", error.Message);
            Assert.DoesNotContain(".to(Bool", error.Message);
            var after = Bits(module);
            Assert.Equal(before.Keys, after.Keys);
            foreach (var (key, bits) in before)
                Assert.True(bits.SequenceEqual(after[key]), $"{key} changed although the load was refused");
            return error;
        }

        /// <summary>Every tensor of the module is bit for bit the plain file's tensor under <paramref name="prefix"/> + key.</summary>
        private static void AssertHoldsThePlainFile(nn.Module module, string prefix = "", IEnumerable<string>? except = null)
        {
            using var scope = NewDisposeScope();
            var plain = StateDicts.ReadPyTorchFile(FileOf("plain"));
            var own = module.state_dict();
            Assert.Equal(plain.Keys.Select(k => prefix + k).OrderBy(k => k, StringComparer.Ordinal), own.Keys.OrderBy(k => k, StringComparer.Ordinal));
            var skipped = new HashSet<string>(except ?? Array.Empty<string>());
            foreach (var (key, tensor) in plain)
            {
                if (skipped.Contains(key))
                    continue;
                Assert.Equal(tensor.dtype, own[prefix + key].dtype);
                Assert.True(Bits(tensor).SequenceEqual(Bits(own[prefix + key])), $"{prefix + key} differs from the file");
            }
        }

        // ---- DataParallel: 'module.' on every key -----------------------------------------------------------------

        [Fact]
        public void DataParallelFile_IsRefused_SayingThePrefixFirst_InAShortMessage_WithEveryKeyInTheProperties()
        {
            using var net = new SmallNet();
            var error = Refused(net, () => StateDicts.LoadPyTorchFile(net, FileOf("dataparallel")));

            string prefix = "every unexpected key is 'module.' followed by a missing key";
            Assert.Contains(prefix, error.Message);
            Assert.Contains("new StateDictLoadOptions { StripPrefix = \"module.\" }", error.Message);
            Assert.Contains($"{Keys} keys missing, {Keys} keys unexpected", error.Message);
            Assert.True(error.Message.IndexOf(prefix, StringComparison.Ordinal) < error.Message.IndexOf("keys missing", StringComparison.Ordinal),
                "the prefix must be said before the lists");
            Assert.Contains($"... ({Keys - 5} more)", error.Message);
            Assert.Contains("MissingKeys, UnexpectedKeys", error.Message);
            Assert.Equal(FileOf("dataparallel"), error.Path);
            // The full lists: the module's keys, and the file's (each the prefix and a missing key).
            Assert.Equal(net.state_dict().Keys, error.MissingKeys);
            Assert.Equal(error.MissingKeys.Select(k => "module." + k).OrderBy(k => k, StringComparer.Ordinal), error.UnexpectedKeys.OrderBy(k => k, StringComparer.Ordinal));
            Assert.Empty(error.ShapeMismatches);
            Assert.Empty(error.DtypeMismatches);
        }

        [Fact]
        public void DataParallelFile_WithStripPrefix_LoadsBitExactly()
        {
            using var net = new SmallNet();
            var missing = StateDicts.LoadPyTorchFile(net, FileOf("dataparallel"), options: new StateDictLoadOptions { StripPrefix = "module." });
            Assert.Empty(missing);
            AssertHoldsThePlainFile(net);
        }

        [Fact]
        public void AModuleThatHoldsTheModelUnderAPrefix_IsToldToAddIt_AndAddPrefixLoadsBitExactly()
        {
            using var wrapper = new Wrapper();
            var error = Refused(wrapper, () => StateDicts.LoadPyTorchFile(wrapper, FileOf("plain")));
            Assert.StartsWith($"{wrapper}: refused to load '{FileOf("plain")}', nothing was changed: every missing key is 'model.' followed by an unexpected key", error.Message);
            Assert.Contains("new StateDictLoadOptions { AddPrefix = \"model.\" }", error.Message);

            StateDicts.LoadPyTorchFile(wrapper, FileOf("plain"), options: new StateDictLoadOptions { AddPrefix = "model." });
            AssertHoldsThePlainFile(wrapper, prefix: "model.");
        }

        [Theory]
        [InlineData("_orig_mod.")]
        [InlineData("model.")]
        [InlineData("encoder.backbone.")]
        [InlineData("net_")]
        public void AnyPrefix_IsRecognised_AndStripped(string prefix)
        {
            using var scope = NewDisposeScope();
            var prefixed = StateDicts.ReadPyTorchFile(FileOf("plain")).ToDictionary(kv => prefix + kv.Key, kv => kv.Value);
            using var net = new SmallNet();
            var error = Refused(net, () => StateDicts.LoadChecked(net, prefixed));
            Assert.Contains($"every unexpected key is '{prefix}' followed by a missing key", error.Message);
            Assert.Contains($"StripPrefix = \"{prefix}\"", error.Message);
            Assert.Null(error.Path);

            StateDicts.LoadChecked(net, prefixed, options: new StateDictLoadOptions { StripPrefix = prefix });
            AssertHoldsThePlainFile(net);
        }

        [Fact]
        public void StripThenAdd_ReplacesOnePrefixWithAnother()
        {
            using var wrapper = new Wrapper();
            StateDicts.LoadPyTorchFile(wrapper, FileOf("dataparallel"), options: new StateDictLoadOptions { StripPrefix = "module.", AddPrefix = "model." });
            AssertHoldsThePlainFile(wrapper, prefix: "model.");
        }

        [Fact]
        public void TwoKeysThatBecomeOne_AreRefused_NamingBoth()
        {
            using var scope = NewDisposeScope();
            var plain = StateDicts.ReadPyTorchFile(FileOf("plain"));
            var both = plain.ToDictionary(kv => kv.Key, kv => kv.Value);
            both["module.head.bias"] = plain["head.bias"];
            using var net = new SmallNet();
            var before = Bits(net);
            var error = Assert.Throws<InvalidOperationException>(() => StateDicts.LoadChecked(net, both, options: new StateDictLoadOptions { StripPrefix = "module." }));
            Assert.Contains("'head.bias' and 'module.head.bias' both become 'head.bias' with StripPrefix = \"module.\"", error.Message);
            Assert.Contains("nothing was changed", error.Message);
            Assert.All(Bits(net), kv => Assert.Equal(before[kv.Key], kv.Value));
        }

        // ---- A .half() copy into a float32 model ------------------------------------------------------------------

        [Fact]
        public void HalfFile_IsRefused_WithOneLineOfAdvice_ThatWorks()
        {
            using var net = new SmallNet();
            var error = Refused(net, () => StateDicts.LoadPyTorchFile(net, FileOf("half")));
            int floating = Keys - TrackedCounts;  // .half() converts every tensor but the integer num_batches_tracked
            Assert.Equal(floating, error.DtypeMismatches.Count);
            Assert.All(error.DtypeMismatches, d => Assert.Equal((ScalarType.Float16, ScalarType.Float32, (string?)null), (d.LoadedDtype, d.ModuleDtype, d.Reason)));
            Assert.Contains($"{floating} keys of another dtype", error.Message);
            // One piece of advice for all of them, not one per key.
            Assert.Single(error.Message.Split("CastDtypes = true").Skip(1));
            Assert.Single(error.Message.Split("module.to(").Skip(1));
            Assert.Contains("module.to(ScalarType.Float16)", error.Message);
            Assert.Empty(error.MissingKeys);
            Assert.Empty(error.UnexpectedKeys);

            // The advice works: a float16 module loads the file as it is.
            using var half = new SmallNet();
            half.to(ScalarType.Float16);
            StateDicts.LoadPyTorchFile(half, FileOf("half"));
        }

        [Fact]
        public void HalfFile_WithCastDtypes_LoadsEveryValueExactly_AsFloat32()
        {
            using var scope = NewDisposeScope();
            using var net = new SmallNet();
            StateDicts.LoadPyTorchFile(net, FileOf("half"), options: new StateDictLoadOptions { CastDtypes = true });
            var file = StateDicts.ReadPyTorchFile(FileOf("half"));
            foreach (var (key, tensor) in net.state_dict())
            {
                Assert.Equal(key.EndsWith("num_batches_tracked", StringComparison.Ordinal) ? ScalarType.Int64 : ScalarType.Float32, tensor.dtype);
                // float16 -> float32 is exact, so converting back gives the file's bits.
                Assert.True(Bits(file[key]).SequenceEqual(Bits(tensor.to(file[key].dtype))), key);
            }
        }

        // ---- num_batches_tracked stored as int32 ------------------------------------------------------------------

        [Fact]
        public void Int32Counts_AreRefused_WithoutAdviceTorchSharpRefuses_AndCastDtypesLoadsThem()
        {
            using var net = new SmallNet();
            var error = Refused(net, () => StateDicts.LoadPyTorchFile(net, FileOf("nbt_int32")));
            Assert.Equal(TrackedCounts, error.DtypeMismatches.Count);
            Assert.All(error.DtypeMismatches, d => Assert.EndsWith("num_batches_tracked", d.Key));
            Assert.Contains("13 keys of another dtype: 'stem_bn.num_batches_tracked' Int32 (this module's Int64)".Replace("13", TrackedCounts.ToString()), error.Message);
            Assert.Contains("CastDtypes = true", error.Message);
            Assert.DoesNotContain("module.to(", error.Message);

            StateDicts.LoadPyTorchFile(net, FileOf("nbt_int32"), options: new StateDictLoadOptions { CastDtypes = true });
            AssertHoldsThePlainFile(net);  // int64 counts equal to PyTorch's own
            Assert.Equal(Facts.GetProperty("num_batches_tracked").GetInt64(), net.state_dict()["stem_bn.num_batches_tracked"].item<long>());
        }

        [Fact]
        public void CastDtypes_RefusesWhatWouldNotSurvive_AndConversionsBetweenKinds()
        {
            using var scope = NewDisposeScope();
            var plain = StateDicts.ReadPyTorchFile(FileOf("plain"));
            var overflow = plain.ToDictionary(kv => kv.Key, kv => kv.Value);
            overflow["head.bias"] = tensor(new double[] { 1e300, 0.5 });
            var across = plain.ToDictionary(kv => kv.Key, kv => kv.Value);
            across["stem_bn.num_batches_tracked"] = tensor(3.0f);
            var options = new StateDictLoadOptions { CastDtypes = true };
            using var net = new SmallNet();

            var error = Refused(net, () => StateDicts.LoadChecked(net, overflow, options: options));
            Assert.Contains("'head.bias' is Float64, this module's is Float32 (not converted: 1 of its finite values overflow to infinity in Float32)", error.Message);
            Assert.Equal("head.bias", Assert.Single(error.DtypeMismatches).Key);

            error = Refused(net, () => StateDicts.LoadChecked(net, across, options: options));
            Assert.Contains("'stem_bn.num_batches_tracked' is Float32, this module's is Int64 (not converted: Float32 to Int64 is a conversion between kinds", error.Message);

            // An integer that wraps into the target and back (int8 -1 is uint8 255, uint8 200 is int8 -56) is lost too.
            using var flags = new ByteBuffer();
            error = Refused(flags, () => StateDicts.LoadChecked(flags, new Dictionary<string, Tensor> { ["flags"] = tensor(new sbyte[] { -1, 0, 1 }) }, options: options));
            Assert.Contains("'flags' is Int8, this module's is Byte (not converted: 1 of its values do not fit in Byte)", error.Message);
            StateDicts.LoadChecked(flags, new Dictionary<string, Tensor> { ["flags"] = tensor(new sbyte[] { 7, 0, 1 }) }, options: options);
            Assert.Equal(new byte[] { 7, 0, 1 }, flags.get_buffer("flags")!.data<byte>().ToArray());

            // Without the option, the same float tensor for an integer buffer: no option converts it, and none is offered.
            error = Refused(net, () => StateDicts.LoadChecked(net, across));
            Assert.Contains("which no option converts", error.Message);
            Assert.DoesNotContain("CastDtypes = true", error.Message);
        }

        /// <summary>A module whose one state entry is a uint8 buffer.</summary>
        private sealed class ByteBuffer : nn.Module
        {
            public ByteBuffer() : base(nameof(ByteBuffer)) => register_buffer("flags", zeros(3, dtype: ScalarType.Byte));
        }

        // ---- A checkpoint from before num_batches_tracked ---------------------------------------------------------

        [Fact]
        public void OldBatchNormFile_IsNamedAsTheHarmlessCase_AndTheOptionFillsWhatPyTorchFills()
        {
            using var net = new SmallNet();
            var error = Refused(net, () => StateDicts.LoadPyTorchFile(net, FileOf("no_nbt")));
            Assert.Contains($"the missing keys are all the num_batches_tracked of BatchNorm modules ({TrackedCounts})", error.Message);
            Assert.Contains("before PyTorch 0.4.1", error.Message);
            Assert.Contains("AllowMissingNumBatchesTracked = true", error.Message);
            Assert.Equal(TrackedCounts, error.MissingKeys.Count);

            // As make_real_checkpoints.py did in PyTorch: counts that are not 0 before the load, which the load overwrites.
            using (no_grad())
                foreach (var (name, buffer) in net.named_buffers().Where(b => b.name.EndsWith("num_batches_tracked", StringComparison.Ordinal)))
                    buffer.fill_(7);
            StateDicts.LoadPyTorchFile(net, FileOf("no_nbt"), options: new StateDictLoadOptions { AllowMissingNumBatchesTracked = true });
            var counts = net.state_dict().Where(kv => kv.Key.EndsWith("num_batches_tracked", StringComparison.Ordinal)).Select(kv => kv.Value.item<long>()).Distinct();
            Assert.Equal(Facts.GetProperty("pytorch_fills_missing_num_batches_tracked_with").EnumerateArray().Select(e => e.GetInt64()), counts);
            AssertHoldsThePlainFile(net, except: net.state_dict().Keys.Where(k => k.EndsWith("num_batches_tracked", StringComparison.Ordinal)));
        }

        [Fact]
        public void AllowMissingNumBatchesTracked_AllowsNothingElse()
        {
            using var scope = NewDisposeScope();
            var old = StateDicts.ReadPyTorchFile(FileOf("no_nbt"));
            old.Remove("stem_bn.running_var");
            using var net = new SmallNet();
            var error = Refused(net, () => StateDicts.LoadChecked(net, old, options: new StateDictLoadOptions { AllowMissingNumBatchesTracked = true }));
            Assert.Equal(new[] { "stem_bn.running_var" }, error.MissingKeys);
            Assert.Contains("missing key 'stem_bn.running_var'", error.Message);
            Assert.DoesNotContain("num_batches_tracked", error.Message);
        }

        [Fact]
        public void DataParallelAndOld_BothAreSaid_AndBothOptionsTogetherLoad()
        {
            using var scope = NewDisposeScope();
            var file = StateDicts.ReadPyTorchFile(FileOf("no_nbt")).ToDictionary(kv => "module." + kv.Key, kv => kv.Value);
            using var net = new SmallNet();
            var error = Refused(net, () => StateDicts.LoadChecked(net, file));
            Assert.Contains("StripPrefix = \"module.\" }, after which 13 keys would still be missing", error.Message.Replace(TrackedCounts.ToString(), "13"));
            Assert.Contains("would still be missing. Those would be all the num_batches_tracked of BatchNorm modules", error.Message);

            StateDicts.LoadChecked(net, file, options: new StateDictLoadOptions { StripPrefix = "module.", AllowMissingNumBatchesTracked = true });
            AssertHoldsThePlainFile(net, except: net.state_dict().Keys.Where(k => k.EndsWith("num_batches_tracked", StringComparison.Ordinal)));
        }

        // ---- Bounded, whatever the key count ----------------------------------------------------------------------

        [Theory]
        [InlineData(10)]
        [InlineData(1_000)]
        public void TheMessage_StaysShort_WhateverTheNumberOfKeys(int layers)
        {
            using var scope = NewDisposeScope();
            var model = nn.Sequential(Enumerable.Range(0, layers).Select(i => ($"{i}", (nn.Module<Tensor, Tensor>)nn.Linear(1, 1))).ToArray());
            var prefixed = model.state_dict().ToDictionary(kv => "module." + kv.Key, kv => kv.Value.to(ScalarType.Float16));
            prefixed["module.0.weight"] = ones(2, 2);
            var error = Refused(model, () => StateDicts.LoadChecked(model, prefixed));
            Assert.Equal(2 * layers, error.MissingKeys.Count);
            Assert.Equal(2 * layers, error.UnexpectedKeys.Count);
            Assert.StartsWith($"{model}: refused to load the state_dict, nothing was changed: every unexpected key is 'module.' followed by a missing key", error.Message);
        }

        [Fact]
        public void AVeryLongKey_IsShortenedInTheMessage_AndWholeInTheProperties()
        {
            using var scope = NewDisposeScope();
            using var layer = new CustomLinear(3, 2);
            string key = new string('k', 100_000);
            var state = layer.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value);
            state[key] = ones(1);
            var error = Refused(layer, () => StateDicts.LoadChecked(layer, state));
            Assert.Equal(key, Assert.Single(error.UnexpectedKeys));
            Assert.Contains("(99900 characters)", error.Message);
        }

        [Fact]
        public void AMegabytePrefix_IsFound_InLinearTime()
        {
            // The prefix search looks at the first key's suffixes of the module's key lengths only: trying every suffix
            // of a 1,000,000-character key (as the first version did) copies about 10^12 characters.
            using var scope = NewDisposeScope();
            using var layer = new CustomLinear(3, 2);
            string prefix = new string('p', 1_000_000) + ".";
            var state = layer.state_dict().ToDictionary(kv => prefix + kv.Key, kv => kv.Value.clone());
            var clock = System.Diagnostics.Stopwatch.StartNew();
            var error = Refused(layer, () => StateDicts.LoadChecked(layer, state));
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(10), $"took {clock.Elapsed}");
            Assert.Contains("every unexpected key is 'pppp", error.Message);
            StateDicts.LoadChecked(layer, state, options: new StateDictLoadOptions { StripPrefix = prefix });
            Assert.True(Bits(state[prefix + "weight"]).SequenceEqual(Bits(layer.weight)));
        }
    }
}
