using System;
using System.Collections.Generic;
using System.Globalization;
using System.IO;
using System.IO.Compression;
using System.Linq;
using System.Text;
using System.Text.Json;
using Xunit;
using static TorchSharp.torch;

namespace TorchLinear.Tests
{
    /// <summary>
    /// Legitimate torch.save files that a strict reader must still read as PyTorch reads them (ReferenceData/Checkpoints,
    /// written by real PyTorch 1.13 with make_checkpoints.py), and refusals that name what is wrong.
    /// </summary>
    public class TorchSaveFileTests
    {
        private static readonly string Folder = Path.Combine(AppContext.BaseDirectory, "ReferenceData", "Checkpoints");

        [Theory]
        [InlineData("shared.pt")]
        [InlineData("byteorder.pt")]
        [InlineData("zip64.bin")]
        [InlineData("deflated.pt")]
        public void LegitimateVariants_LoadAsTorchLoadReadsThem_WithTheirStridesAndOffsets(string file)
        {
            using var scope = NewDisposeScope();
            var expected = JsonDocument.Parse(File.ReadAllText(Path.Combine(Folder, "expected.json"))).RootElement.GetProperty("tensors");
            var loaded = StateDicts.ReadPyTorchFile(Path.Combine(Folder, file));

            Assert.Equal(expected.EnumerateObject().Select(p => p.Name).OrderBy(k => k, StringComparer.Ordinal), loaded.Keys.OrderBy(k => k, StringComparer.Ordinal));
            foreach (var property in expected.EnumerateObject())
            {
                Tensor tensor = loaded[property.Name];
                var e = property.Value;
                Assert.Equal(e.GetProperty("dtype").GetString(), DTypeName(tensor.dtype));
                Assert.Equal(e.GetProperty("shape").EnumerateArray().Select(v => v.GetInt64()), tensor.shape);
                // As PyTorch loads them: a view keeps its strides and its offset into the shared storage.
                Assert.Equal(e.GetProperty("stride").EnumerateArray().Select(v => v.GetInt64()), tensor.stride());
                Assert.Equal(e.GetProperty("offset").GetInt64(), tensor.storage_offset());
                Assert.Equal(e.GetProperty("values").EnumerateArray().Select(Value), Values(tensor));
            }
        }

        [Fact]
        public void TiedWeights_ShareOneStorage_AsInPyTorch()
        {
            using var scope = NewDisposeScope();
            var loaded = StateDicts.ReadPyTorchFile(Path.Combine(Folder, "shared.pt"));
            // Writing through one key shows through the other, and the view of "base" sees base's storage.
            loaded["encoder.weight"][0, 0] = tensor(42f);
            Assert.Equal(42f, loaded["decoder.weight"][0, 0].item<float>());
            loaded["base"][1, 2] = tensor(-7f);
            Assert.Equal(-7f, loaded["slice"][0, 0].item<float>());
            Assert.Equal(-7f, loaded["transposed"][2, 1].item<float>());
        }

        [Fact]
        public void ExpectedSafetensors_HoldsTheSameValues_ReadByTheSafetensorsReader()
        {
            using var scope = NewDisposeScope();
            var fromPt = StateDicts.ReadPyTorchFile(Path.Combine(Folder, "shared.pt"));
            var fromSafetensors = StateDicts.ReadPyTorchFile(Path.Combine(Folder, "expected.safetensors"));
            Assert.Equal(fromPt.Keys.OrderBy(k => k, StringComparer.Ordinal), fromSafetensors.Keys.OrderBy(k => k, StringComparer.Ordinal));
            foreach (var (key, tensor) in fromPt)
                Assert.True(Equivalence.Compare(tensor.contiguous(), fromSafetensors[key]).BitExact, key);
        }

        [Fact]
        public void PickleNamingAnythingElse_IsRefusedByName_AndNothingIsCalled()
        {
            string marker = Path.Combine(Path.GetTempPath(), $"torchlinear-pwned-{Guid.NewGuid():N}");
            // GLOBAL posix system, the argument tuple ("touch <marker>",), REDUCE, STOP.
            byte[] pickle = new byte[] { 0x80, 2 }.Concat(Encoding.ASCII.GetBytes("cposix\nsystem\nX"))
                .Concat(BitConverter.GetBytes(("touch " + marker).Length)).Concat(Encoding.ASCII.GetBytes("touch " + marker))
                .Concat(new byte[] { 0x85, (byte)'R', (byte)'.' }).ToArray();
            string path = Archive(("archive/data.pkl", pickle), ("archive/version", Encoding.ASCII.GetBytes("3\n")));
            try
            {
                var error = Assert.Throws<CheckpointFormatException>(() => StateDicts.ReadPyTorchFile(path));
                Assert.Contains("posix.system", error.Message);
                Assert.Contains(path, error.Message);
                Assert.Equal("archive/data.pkl", error.Key);
                Assert.False(File.Exists(marker));
            }
            finally
            {
                File.Delete(path);
            }
        }

        [Fact]
        public void ACheckpointHoldingMoreThanTensors_IsRefusedNamingTheKey()
        {
            // {"epoch": 3}: a training checkpoint's counter, where a state_dict holds tensors only.
            byte[] pickle = new byte[] { 0x80, 2, (byte)'}', (byte)'X', 5, 0, 0, 0 }.Concat(Encoding.ASCII.GetBytes("epoch"))
                .Concat(new byte[] { (byte)'K', 3, (byte)'s', (byte)'.' }).ToArray();
            string path = Archive(("archive/data.pkl", pickle));
            try
            {
                var error = Assert.Throws<CheckpointFormatException>(() => StateDicts.ReadPyTorchFile(path));
                Assert.Equal("epoch", error.Key);
                Assert.Contains("an integer, not a tensor", error.Message);
            }
            finally
            {
                File.Delete(path);
            }
        }

        /// <summary>A zip archive of the given entries, written by .NET's ZipArchive (stored, correct CRCs).</summary>
        internal static string Archive(params (string Name, byte[] Data)[] entries)
        {
            string path = Path.Combine(Path.GetTempPath(), $"torchlinear-{Guid.NewGuid():N}.pt");
            using (var zip = ZipFile.Open(path, ZipArchiveMode.Create))
            {
                foreach (var (name, data) in entries)
                {
                    using var stream = zip.CreateEntry(name, CompressionLevel.NoCompression).Open();
                    stream.Write(data);
                }
            }
            return path;
        }

        private static string DTypeName(ScalarType dtype) => dtype switch
        {
            ScalarType.Float32 => "float32",
            ScalarType.Float64 => "float64",
            ScalarType.Float16 => "float16",
            ScalarType.BFloat16 => "bfloat16",
            ScalarType.Int64 => "int64",
            ScalarType.Bool => "bool",
            _ => dtype.ToString(),
        };

        private static string Value(JsonElement value) => value.ValueKind switch
        {
            JsonValueKind.True => "True",
            JsonValueKind.False => "False",
            JsonValueKind.Number => value.GetInt64().ToString(CultureInfo.InvariantCulture),
            _ => HexFloat(value.GetString()!).ToString("R", CultureInfo.InvariantCulture),
        };

        private static IEnumerable<string> Values(Tensor tensor)
        {
            using var flat = tensor.contiguous().flatten();
            if (tensor.dtype == ScalarType.Bool)
                return flat.data<bool>().ToArray().Select(v => v ? "True" : "False");
            if (tensor.dtype == ScalarType.Int64)
                return flat.data<long>().ToArray().Select(v => v.ToString(CultureInfo.InvariantCulture));
            using var wide = flat.to(ScalarType.Float64);
            return wide.data<double>().ToArray().Select(v => v.ToString("R", CultureInfo.InvariantCulture));
        }

        /// <summary>Python's float.hex(): [-]0x1.hhhhp±e (or 0x0.0p+0).</summary>
        private static double HexFloat(string text)
        {
            bool negative = text.StartsWith('-');
            string body = text.TrimStart('-')[2..];
            int p = body.IndexOf('p');
            string[] mantissa = body[..p].Split('.');
            int exponent = int.Parse(body[(p + 1)..], CultureInfo.InvariantCulture);
            double value = long.Parse(mantissa[0], NumberStyles.HexNumber, CultureInfo.InvariantCulture);
            string fraction = mantissa.Length > 1 ? mantissa[1] : "";
            for (int i = 0; i < fraction.Length; i++)
                value += Convert.ToInt32(fraction[i].ToString(), 16) * Math.Pow(16, -(i + 1));
            value = Math.ScaleB(value, exponent);
            return negative ? -value : value;
        }
    }
}
