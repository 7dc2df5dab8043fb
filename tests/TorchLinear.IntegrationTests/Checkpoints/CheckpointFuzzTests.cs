using System;
using System.Buffers.Binary;
using System.Collections.Generic;
using System.Diagnostics;
using System.IO;
using System.IO.Compression;
using System.Linq;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using Xunit;
using Xunit.Abstractions;

namespace TorchLinear.IntegrationTests.Checkpoints
{
    /// <summary>
    /// Checkpoints from strangers. Damaged and hostile variants of the committed reference files — generated
    /// deterministically from a seed, family by family, plus hand-written hostile pickles, bombs and special files — are
    /// each loaded by a child process (TorchLinear.CheckpointFuzz) under a time and memory limit. For every one: either it
    /// is refused with <see cref="CheckpointFormatException"/> naming the file, the module unchanged and the file closed;
    /// or it loads exactly the values an independent reader says it holds (a strict safetensors reader here, or, for
    /// torch.save archives, whose every byte is CRC-protected, the values PyTorch wrote). No file under 1 MB may take
    /// over 2 s, and none may grow the process's peak memory by more than the file, its tensors and 64 MiB.
    /// </summary>
    public partial class CheckpointFuzzTests
    {
        private const int Seed = 20261127;
        private const long OneMiB = 1 << 20;

        private static readonly string Interop = Path.Combine(AppContext.BaseDirectory, "ReferenceData", "Interop");
        private static readonly string Checkpoints = Path.Combine(AppContext.BaseDirectory, "ReferenceData", "Checkpoints");

        private readonly ITestOutputHelper _output;

        public CheckpointFuzzTests(ITestOutputHelper output) => _output = output;

        /// <summary>A file to load: its family, the module it is loaded into, and what loading it may give.</summary>
        private sealed record Mutant(string Family, string File, string Module, Dictionary<string, string>? Expected, bool ExpectNotFound = false);

        /// <summary>An original: the module it fits and, for torch.save archives, the PyTorch-written twin holding its values.</summary>
        private sealed record Source(string Path, string Module, string? Twin);

        private static readonly Source[] PtSources =
        {
            new(Path.Combine(Interop, "mlp.pt"), "mlp", Path.Combine(Interop, "mlp.safetensors")),
            new(Path.Combine(Interop, "linear_3_2.pt"), "linear_3_2", Path.Combine(Interop, "linear_3_2.safetensors")),
            new(Path.Combine(Interop, "from_dotnet", "mlp.pt"), "mlp", Path.Combine(Interop, "mlp.safetensors")),
            new(Path.Combine(Checkpoints, "shared.pt"), "none", Path.Combine(Checkpoints, "expected.safetensors")),
            new(Path.Combine(Checkpoints, "zip64.bin"), "none", Path.Combine(Checkpoints, "expected.safetensors")),
            new(Path.Combine(Checkpoints, "deflated.pt"), "none", Path.Combine(Checkpoints, "expected.safetensors")),
        };

        private static readonly Source[] SafetensorsSources =
        {
            new(Path.Combine(Interop, "mlp.safetensors"), "mlp", null),
            new(Path.Combine(Interop, "linear_3_2.safetensors"), "linear_3_2", null),
            new(Path.Combine(Interop, "from_dotnet", "mlp.safetensors"), "mlp", null),
            new(Path.Combine(Checkpoints, "expected.safetensors"), "none", null),
            new(Path.Combine(Interop, "cases.safetensors"), "none", null),
        };

        [Fact]
        public void EveryDamagedOrHostileFile_IsRefusedClearly_OrLoadsWhatItHolds_InBoundedTimeAndMemory()
        {
            string folder = Directory.CreateTempSubdirectory("torchlinear-fuzz-").FullName;
            try
            {
                var mutants = Generate(folder);
                var results = RunChild(folder, mutants);
                var failures = new List<string>();
                var counts = new SortedDictionary<string, (int Total, int Refused, int Loaded)>(StringComparer.Ordinal);
                for (int i = 0; i < mutants.Count; i++)
                {
                    var (m, r) = (mutants[i], results[i]);
                    string outcome = r.GetProperty("outcome").GetString()!;
                    var c = counts.GetValueOrDefault(m.Family);
                    counts[m.Family] = (c.Total + 1, c.Refused + (outcome == "refused" ? 1 : 0), c.Loaded + (outcome == "loaded" ? 1 : 0));
                    foreach (string problem in Check(m, r))
                        failures.Add($"{m.Family} #{i} {Path.GetFileName(m.File)}: {problem}");
                }

                _output.WriteLine($"{mutants.Count} files (seed {Seed}); per family: total, refused, loaded with the values an independent reader finds:");
                foreach (var (family, c) in counts)
                    _output.WriteLine($"  {family,-22} {c.Total,5} {c.Refused,5} {c.Loaded,5}");
                _output.WriteLine($"slowest: {results.Max(r => r.GetProperty("elapsedMs").GetDouble()):F0} ms; largest peak memory growth: {results.Max(r => r.GetProperty("peakGrowthKiB").GetInt64()) / 1024.0:F1} MiB");

                Assert.True(failures.Count == 0, $"{failures.Count} of {mutants.Count} files failed:{Environment.NewLine}{string.Join(Environment.NewLine, failures.Take(40))}");
                // The suite must reach what it is about: every family, refusals and loads both.
                Assert.True(mutants.Count >= 2000, $"only {mutants.Count} files");
                Assert.All(counts, kv => Assert.True(kv.Value.Total > 0));
                Assert.Contains(counts, kv => kv.Value.Loaded > 0);
            }
            finally
            {
                Directory.Delete(folder, recursive: true);
            }
        }

        private static IEnumerable<string> Check(Mutant m, JsonElement r)
        {
            if (m.Module == "adapter")
                return CheckAdapter(m, r);
            return CheckFile(m, r);
        }

        private static IEnumerable<string> CheckFile(Mutant m, JsonElement r)
        {
            string outcome = r.GetProperty("outcome").GetString()!;
            long size = File.Exists(m.File) ? new FileInfo(m.File).Length : 0;
            double elapsed = r.GetProperty("elapsedMs").GetDouble();
            long growth = r.GetProperty("peakGrowthKiB").GetInt64() * 1024;
            if (size < OneMiB && elapsed > 2000)
                yield return $"took {elapsed:F0} ms";
            long tensorBytes = m.Expected?.Values.Sum(TensorBytes) ?? 0;
            if (growth > Math.Min(1L << 30, size + tensorBytes + 64 * OneMiB))
                yield return $"peak memory grew by {growth / OneMiB} MiB for a {size}-byte file";
            if (r.GetProperty("leftOpen").GetBoolean())
                yield return "the file was left open";
            if (outcome == "refused")
            {
                string type = r.GetProperty("type").GetString()!;
                string message = r.GetProperty("message").GetString()!;
                if (!message.Contains(m.File, StringComparison.Ordinal))
                    yield return $"the refusal does not name the file: {message}";
                if (!r.GetProperty("unchanged").GetBoolean())
                    yield return "refused, but the module changed";
                if (type == typeof(CheckpointFormatException).FullName && !m.ExpectNotFound)
                {
                    if (m.Expected is not null && m.Family.StartsWith("safetensors", StringComparison.Ordinal))
                        yield return $"refused a file the independent reader accepts: {message}";
                }
                else if (type == typeof(StateDictMismatchException).FullName && m.Expected is not null && m.Module != "none")
                {
                    // A valid file whose keys or shapes do not fit the module (a flipped byte in a key name, say):
                    // refused by the checked load, which lists what does not fit.
                    if (!message.Contains("nothing was changed", StringComparison.Ordinal))
                        yield return $"refused without saying nothing changed: {message}";
                }
                else if (!(m.ExpectNotFound && type == typeof(FileNotFoundException).FullName))
                {
                    yield return $"refused with {type}: {message}";
                }
                yield break;
            }
            if (m.Expected is null)
            {
                yield return "loaded a file the independent reader refuses (a silent wrong load)";
                yield break;
            }
            var loaded = r.GetProperty("tensors").EnumerateObject().ToDictionary(p => p.Name, p => p.Value.GetString()!);
            if (!loaded.OrderBy(kv => kv.Key, StringComparer.Ordinal).SequenceEqual(m.Expected.OrderBy(kv => kv.Key, StringComparer.Ordinal)))
                yield return $"loaded other values than the file holds: {string.Join("; ", loaded.Where(kv => !m.Expected.TryGetValue(kv.Key, out var e) || e != kv.Value).Select(kv => kv.Key).Take(5))}";
        }

        private static long TensorBytes(string hash)
        {
            // "<dtype> [shape] <sha>": the element count times the element size.
            int open = hash.IndexOf('['), close = hash.IndexOf(']');
            long count = hash[(open + 1)..close].Split(", ", StringSplitOptions.RemoveEmptyEntries).Aggregate(1L, (p, s) => p * long.Parse(s));
            return count * 8;
        }

        // ---- The child process -------------------------------------------------------------------------------------

        private List<JsonElement> RunChild(string folder, List<Mutant> mutants)
        {
            string manifest = Path.Combine(folder, "manifest.tsv");
            File.WriteAllLines(manifest, mutants.Select(m => $"{m.File}\t{m.Module}"));
            string dll = Path.Combine(AppContext.BaseDirectory, "TorchLinear.CheckpointFuzz.dll");
            var start = new ProcessStartInfo(Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") ?? "dotnet")
            {
                RedirectStandardOutput = true,
                RedirectStandardError = true,
                WorkingDirectory = folder,
            };
            start.ArgumentList.Add(dll);
            start.ArgumentList.Add(manifest);
            using var process = Process.Start(start)!;
            var stderr = process.StandardError.ReadToEndAsync();
            var results = new List<JsonElement>();
            int current = -1;
            var clock = Stopwatch.StartNew();
            var limit = TimeSpan.FromSeconds(150);
            const long MemoryLimitKiB = 3L << 20;  // 3 GiB resident: a load that needs more is a failure, not a wait
            var reading = process.StandardOutput.ReadLineAsync();
            while (true)
            {
                if (!reading.Wait(TimeSpan.FromMilliseconds(100)))
                {
                    long rss = ResidentKiB(process.Id);
                    if (clock.Elapsed > limit || rss > MemoryLimitKiB)
                    {
                        process.Kill(entireProcessTree: true);
                        string what = current >= 0 ? $"{mutants[current].Family} #{current} {mutants[current].File}" : "startup";
                        Assert.Fail(rss > MemoryLimitKiB ? $"the child passed 3 GiB resident on {what}" : $"the child ran past {limit.TotalSeconds} s, on {what}");
                    }
                    continue;
                }
                string? line = reading.Result;
                if (line is null)
                    break;
                if (line.StartsWith("start ", StringComparison.Ordinal))
                    current = int.Parse(line[6..]);
                else if (line.StartsWith('{'))
                    results.Add(JsonDocument.Parse(line).RootElement.Clone());
                reading = process.StandardOutput.ReadLineAsync();
            }
            process.WaitForExit();
            string crashed = current >= 0 && results.Count <= current ? $" while on {mutants[current].Family} #{current} {mutants[current].File}" : "";
            Assert.True(process.ExitCode == 0 && results.Count == mutants.Count,
                $"the child exited with {process.ExitCode} after {results.Count} of {mutants.Count} files{crashed}:{Environment.NewLine}{stderr.Result}");
            _output.WriteLine($"child process: {mutants.Count} files in {clock.Elapsed.TotalSeconds:F1} s");
            return results;
        }

        private static long ResidentKiB(int pid)
        {
            try
            {
                foreach (string line in File.ReadLines($"/proc/{pid}/status"))
                    if (line.StartsWith("VmRSS:", StringComparison.Ordinal))
                        return long.Parse(line[6..].Trim().Split(' ')[0]);
            }
            catch (IOException)
            {
            }
            return 0;
        }

        // ---- The families ------------------------------------------------------------------------------------------

        private static List<Mutant> Generate(string folder)
        {
            var random = new Random(Seed);
            var mutants = new List<Mutant>();
            int counter = 0;
            string Write(byte[] bytes, string extension)
            {
                string path = Path.Combine(folder, $"m{counter++:D5}{extension}");
                File.WriteAllBytes(path, bytes);
                return path;
            }
            void AddPt(string family, Source source, byte[] bytes, bool mayLoad = true) =>
                mutants.Add(new Mutant(family, Write(bytes, ".pt"), source.Module, mayLoad ? Strict.Hashes(File.ReadAllBytes(source.Twin!)) : null));
            void AddSafetensors(string family, Source source, byte[] bytes) =>
                mutants.Add(new Mutant(family, Write(bytes, ".safetensors"), source.Module, Strict.Hashes(bytes)));

            foreach (Source source in PtSources.Concat(SafetensorsSources))
            {
                byte[] original = File.ReadAllBytes(source.Path);
                bool pt = source.Twin is not null;
                void Add(string family, byte[] bytes)
                {
                    if (pt)
                        AddPt("pt-" + family, source, bytes);
                    else
                        AddSafetensors("safetensors-" + family, source, bytes);
                }
                // The original itself must load.
                Add("original", original);
                for (int i = 0; i < 40; i++)
                    Add("truncated", original[..random.Next(original.Length)]);
                for (int i = 0; i < 70; i++)
                {
                    byte[] bytes = (byte[])original.Clone();
                    int at = random.Next(bytes.Length);
                    bytes[at] = (byte)(bytes[at] ^ random.Next(1, 256));
                    Add("byte-flip", bytes);
                }
                for (int i = 0; i < 50; i++)
                {
                    byte[] bytes = (byte[])original.Clone();
                    int at = random.Next(bytes.Length);
                    bytes[at] ^= (byte)(1 << random.Next(8));
                    Add("bit-flip", bytes);
                }
                if (pt)
                    ZipEdits(original, b => AddPt("pt-zip-directory", source, b), b => AddPt("pt-zip-local", source, b), b => AddPt("pt-zip-end", source, b));
                else
                    HeaderEdits(original, random, b => AddSafetensors("safetensors-header-length", source, b), b => AddSafetensors("safetensors-header-json", source, b));
            }

            foreach (Source source in PtSources)
                Shadowing(File.ReadAllBytes(source.Path), (bytes, mayLoad) => AddPt("pt-shadowing", source, bytes, mayLoad));

            Source mlp = PtSources[0];
            foreach (var (pickle, mayLoad) in HostilePickles(File.ReadAllBytes(mlp.Path)))
                AddPt("pt-hostile-pickle", mlp, Rearchive(File.ReadAllBytes(mlp.Path), "data.pkl", pickle), mayLoad);
            foreach (var (bytes, extension, loads) in Bombs(File.ReadAllBytes(mlp.Path)))
            {
                string path = Write(bytes, extension);
                mutants.Add(new Mutant("bombs", path, "none", loads ? (extension == ".safetensors" ? Strict.Hashes(bytes) : Strict.Hashes(bytes, fromArchive: true)) : null));
            }
            mutants.AddRange(SpecialFiles(folder));
            mutants.AddRange(AdapterFolders(folder, random));
            return mutants;
        }

        private static void HeaderEdits(byte[] original, Random random, Action<byte[]> length, Action<byte[]> json)
        {
            long n = (long)BinaryPrimitives.ReadUInt64LittleEndian(original);
            byte[] WithLength(long value)
            {
                byte[] bytes = (byte[])original.Clone();
                BinaryPrimitives.WriteUInt64LittleEndian(bytes, (ulong)value);
                return bytes;
            }
            // Shortened into the header's padding and beyond, lengthened into the data, and absurd.
            for (int d = 1; d <= 8; d++)
            {
                length(WithLength(n - d));
                length(WithLength(n + d));
            }
            foreach (long value in new[] { 0L, 1L, 2L << 28, 1L << 29, 1L << 30, (1L << 31) - 1, long.MaxValue, original.Length, original.Length - 8 })
                length(WithLength(value));

            string header = Encoding.UTF8.GetString(original, 8, (int)n);
            byte[] data = original[(8 + (int)n)..];
            byte[] Rebuild(string text, byte[]? newData = null)
            {
                byte[] h = Encoding.UTF8.GetBytes(text);
                return BitConverter.GetBytes((ulong)h.Length).Concat(h).Concat(newData ?? data).ToArray();
            }
            using var document = JsonDocument.Parse(header);
            var tensors = document.RootElement.EnumerateObject().Where(p => p.Name != "__metadata__").ToList();
            string Replace(string text, string from, string to) => text.Replace(from, to, StringComparison.Ordinal);
            foreach (var tensor in tensors.Take(4))
            {
                var offsets = tensor.Value.GetProperty("data_offsets");
                long begin = offsets[0].GetInt64(), end = offsets[1].GetInt64();
                string span = $"\"data_offsets\":[{begin},{end}]";
                if (!header.Contains(span, StringComparison.Ordinal))
                    span = offsets.GetRawText();
                json(Rebuild(Replace(header, span, $"\"data_offsets\":[{begin - 4},{end - 4}]")));      // overlap
                json(Rebuild(Replace(header, span, $"\"data_offsets\":[{-begin - 1},{end}]")));          // negative
                json(Rebuild(Replace(header, span, $"\"data_offsets\":[{begin},{end + 1000}]")));        // out of range
                json(Rebuild(Replace(header, span, $"\"data_offsets\":[{begin},{end},{end}]")));          // three offsets
                json(Rebuild(Replace(header, span, $"\"data_offsets\":[{begin}.0,{end}]")));              // a float
                string dtype = tensor.Value.GetProperty("dtype").GetString()!;
                json(Rebuild(Replace(header, $"\"{tensor.Name}\":{{\"dtype\":\"{dtype}\"", $"\"{tensor.Name}\":{{\"dtype\":\"F8_E4M3\"")));
                json(Rebuild(Replace(header, $"\"{tensor.Name}\":{{\"dtype\":\"{dtype}\"", $"\"{tensor.Name}\":{{\"dtype\":\"{(dtype == "F16" ? "F32" : "F16")}\"")));
            }
            if (tensors.Count >= 2)
            {
                // Two tensors swap places in the data: a valid file with other values, which must load as such.
                var (a, b) = (tensors[0], tensors[1]);
                if (a.Value.GetProperty("data_offsets")[1].GetInt64() - a.Value.GetProperty("data_offsets")[0].GetInt64()
                    == b.Value.GetProperty("data_offsets")[1].GetInt64() - b.Value.GetProperty("data_offsets")[0].GetInt64())
                {
                    string sa = a.Value.GetProperty("data_offsets").GetRawText(), sb = b.Value.GetProperty("data_offsets").GetRawText();
                    json(Rebuild(header.Replace(sa, "@A@").Replace(sb, sa).Replace("@A@", sb)));
                }
                // A duplicate key: the first tensor's entry again, under the second's name.
                string first = $"\"{a.Name}\":{a.Value.GetRawText()}";
                json(Rebuild("{" + $"\"{b.Name}\":{a.Value.GetRawText()}," + header.TrimStart('{')));
                json(Rebuild(header.TrimEnd(' ') + "x"));                                         // garbage after the object
                json(Rebuild(header.TrimEnd(' ') + "\0\0\0"));                                  // padding that is not spaces
                json(Rebuild("{\"__metadata__\":{\"a\":1}," + header.TrimStart('{')));          // metadata that is not strings
                json(Rebuild(header.Replace("\"shape\":[", "\"shape\":[-1,", StringComparison.Ordinal)));
                json(Rebuild(new string('[', 5000) + new string(']', 5000)));                  // nesting
                _ = first;
            }
            json(Rebuild(header, data.Concat(new byte[8]).ToArray()));                           // data the header does not cover
            json(Rebuild("\uFEFF" + header));                                                   // a byte-order mark
            json(Rebuild(header.Replace("{", "{ ", StringComparison.Ordinal)));                  // valid: spaces inside JSON
        }

        /// <summary>Structural edits of a zip archive, located with a small walker of its own.</summary>
        private static void ZipEdits(byte[] original, Action<byte[]> directory, Action<byte[]> local, Action<byte[]> end)
        {
            var walk = ZipWalk.Read(original);
            byte[] Edit(Action<byte[]> change)
            {
                byte[] bytes = (byte[])original.Clone();
                change(bytes);
                return bytes;
            }
            for (int i = 0; i < walk.Central.Count; i++)
            {
                var (c, l) = (walk.Central[i], walk.Local[i]);
                directory(Edit(b => b[c + 46] ^= 0x20));                                  // the name, in the directory
                directory(Edit(b => b[c + 16] ^= 1));                                     // CRC-32
                directory(Edit(b => b[c + 20] ^= 1));                                     // compressed size
                directory(Edit(b => b[c + 24] ^= 1));                                     // uncompressed size
                directory(Edit(b => b[c + 10] = 8));                                      // method: deflate
                directory(Edit(b => b[c + 10] = 12));                                     // method: bzip2
                directory(Edit(b => b[c + 8] |= 1));                                      // encrypted
                if (i + 1 < walk.Central.Count)
                {
                    int next = walk.Central[i + 1];
                    directory(Edit(b =>                                                     // two entries swap their data
                    {
                        var x = b.AsSpan(c + 42, 4).ToArray();
                        b.AsSpan(next + 42, 4).CopyTo(b.AsSpan(c + 42, 4));
                        x.CopyTo(b.AsSpan(next + 42, 4));
                    }));
                }
                local(Edit(b => b[l + 30] ^= 0x20));                                       // the name, in the local header
                local(Edit(b => b[l + 14] ^= 1));                                          // local CRC-32
                local(Edit(b => b[l + 18] ^= 1));                                          // local size
                local(Edit(b => b[l + 8] = 8));                                            // local method
                local(Edit(b => b[l] = 0));                                                // local signature
            }
            int e = walk.End;
            end(Edit(b => b[e + 10] ^= 1));                                                // entry count
            end(Edit(b => b[e + 12] ^= 1));                                                // directory size
            end(Edit(b => b[e + 16] ^= 1));                                                // directory offset
            end(Edit(b => b[e + 20] = 5));                                                 // a comment that is not there
            end(Edit(b => b[e] = 0));                                                      // the end signature
        }

        /// <summary>Archives rebuilt with an extra entry: one that shadows, one under another folder, harmless ones.</summary>
        private static void Shadowing(byte[] original, Action<byte[], bool> add)
        {
            var entries = Entries(original);
            string prefix = entries[0].Name[..(entries[0].Name.IndexOf('/') + 1)];
            var storage = entries.First(e => e.Name.StartsWith(prefix + "data/", StringComparison.Ordinal));
            var pickle = entries.First(e => e.Name == prefix + "data.pkl");
            byte[] other = storage.Data.Select(b => (byte)(b ^ 0x55)).ToArray();
            add(Zip(entries.Append((storage.Name, other))), false);                                   // same name twice, after
            add(Zip(entries.Prepend((storage.Name, other))), false);                                  // same name twice, before
            add(Zip(entries.Append(("other/" + storage.Name[prefix.Length..], other))), false);       // another folder
            add(Zip(entries.Append(("other/data.pkl", pickle.Data))), false);                         // another pickle
            add(Zip(entries.Append((prefix + "x" + storage.Name[prefix.Length..], other))), true);     // ends like a storage: ignored
            add(Zip(entries.Append((prefix + "data.pkl.bak", pickle.Data))), true);                   // ends like a pickle: ignored
            add(Zip(entries.Where(e => e.Name != storage.Name)), false);                              // a storage missing
        }

        /// <summary>Pickles that name what a weights-only load must never call, or that bend its rules.</summary>
        private static IEnumerable<(byte[] Pickle, bool MayLoad)> HostilePickles(byte[] mlp)
        {
            byte[] original = Entries(mlp).First(e => e.Name.EndsWith("/data.pkl", StringComparison.Ordinal)).Data;
            foreach (var (module, name) in new[]
            {
                ("os", "system"), ("posix", "system"), ("nt", "system"), ("builtins", "eval"), ("builtins", "exec"),
                ("__builtin__", "eval"), ("builtins", "getattr"), ("subprocess", "Popen"), ("subprocess", "check_output"),
                ("System.Diagnostics", "Process.Start"), ("copyreg", "_reconstructor"), ("numpy.core.multiarray", "_reconstruct"),
                ("torch", "load"), ("torch.serialization", "load"), ("torch._utils", "_rebuild_qtensor"),
            })
            {
                yield return (new Pickle().Global(module, name).Unicode("echo pwned").Op(0x85).Op('R').Op('.').Bytes(), false);
                yield return (new Pickle().Unicode(module).Unicode(name).Op(0x93).Unicode("echo pwned").Op(0x85).Op('R').Op('.').Bytes(), false);
            }
            yield return (new Pickle().Op('(').Unicode("echo pwned").Text("ios\nsystem\n").Op('.').Bytes(), false);   // INST
            yield return (new Pickle().Global("os", "system").Op('(').Unicode("echo pwned").Op('o').Op('.').Bytes(), false); // OBJ
            yield return (new Pickle().Text("L" + new string('9', 1_000_000) + "L\n").Op('.').Bytes(), false);              // a 10^6-digit LONG
            yield return (new Pickle().Op(0x8b).Int32(int.MaxValue).Text("abc").Op('.').Bytes(), false);                    // LONG4 of 2 GiB
            yield return (new Pickle().Op('X').Int32(int.MaxValue).Text("abc").Op('.').Bytes(), false);                     // BINUNICODE of 2 GiB
            yield return (new Pickle().Op('B').Int32(1 << 30).Text("abc").Op('.').Bytes(), false);                          // BINBYTES of 1 GiB
            yield return (new Pickle().Op(0x8a).Op(200).Raw(new byte[200]).Op('.').Bytes(), false);                          // a 200-byte integer
            yield return (new Pickle().Repeat('(', 200_000).Op('.').Bytes(), false);                                        // deep marks
            yield return (new Pickle().Op('h').Op(7).Op('.').Bytes(), false);                                               // memo never stored
            yield return (new Pickle().Op('.').Bytes(), false);                                                             // empty stack
            yield return (new Pickle().Op('}').Op('K').Op(1).Op('s').Op('.').Bytes(), false);                               // SETITEM without value
            // A BUILD after the dict is complete, whose state names a key: PyTorch sets attributes, never items, so the
            // original values load.
            int key = IndexOf(original, Encoding.ASCII.GetBytes("0.bias"));
            byte memo = original[key - 6];
            byte[] body = original[..^1];
            yield return (body.Concat(new Pickle().Op('}').Unicode("0.bias").Op('h').Op(memo).Op('s').Op('b').Op('.').Bytes()).ToArray(), true);
        }

        /// <summary>Files built to exhaust time or memory, and large valid ones that must load quickly.</summary>
        private static IEnumerable<(byte[] Bytes, string Extension, bool Loads)> Bombs(byte[] mlp)
        {
            // safetensors headers that claim half a GiB or more.
            foreach (long n in new[] { 1L << 29, 1L << 30, 3L << 29 })
                yield return (BitConverter.GetBytes((ulong)n).Concat(Encoding.ASCII.GetBytes("{}      ")).ToArray(), ".safetensors", false);
            // 10,000 tiny tensors, valid, in both formats: time linear in the count.
            var header = new StringBuilder("{");
            for (int i = 0; i < 10_000; i++)
                header.Append($"{(i == 0 ? "" : ",")}\"t{i}\":{{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[{4 * i},{4 * i + 4}]}}");
            header.Append('}');
            while (header.Length % 8 != 0)
                header.Append(' ');
            byte[] h = Encoding.ASCII.GetBytes(header.ToString());
            yield return (BitConverter.GetBytes((ulong)h.Length).Concat(h).Concat(Enumerable.Range(0, 10_000).SelectMany(i => BitConverter.GetBytes((float)i))).ToArray(), ".safetensors", true);
            yield return (ManyTensors(10_000), ".pt", true);
            // A deflated data.pkl of 256 MiB of zeros, and a deflated storage that claims 2 GiB from a few bytes.
            yield return (ZipWithZeros(new[] { ("archive/data.pkl", (byte[]?)null) }, zerosOf: 256 * OneMiB), ".pt", false);
            yield return (LyingDeflate(), ".pt", false);
            // A 3-byte pickle inside a valid archive that claims a storage of 2^40 floats.
            yield return (Zip(new[] { ("archive/data.pkl", TensorPickle(1, numel: 1L << 40)), ("archive/data/0", new byte[4]) }), ".pt", false);
        }

        private static IEnumerable<Mutant> SpecialFiles(string folder)
        {
            string fifo = Path.Combine(folder, "fifo.pt");
            string fifo2 = Path.Combine(folder, "fifo.safetensors");
            if (mkfifo(fifo, Convert.ToInt32("600", 8)) == 0)
                yield return new Mutant("special-files", fifo, "mlp", null);
            if (mkfifo(fifo2, Convert.ToInt32("600", 8)) == 0)
                yield return new Mutant("special-files", fifo2, "mlp", null);
            string device = Path.Combine(folder, "zero.pt");
            File.CreateSymbolicLink(device, "/dev/zero");
            yield return new Mutant("special-files", device, "mlp", null);
            string directory = Path.Combine(folder, "folder.pt");
            Directory.CreateDirectory(directory);
            yield return new Mutant("special-files", directory, "mlp", null, ExpectNotFound: true);
            string empty = Path.Combine(folder, "empty.safetensors");
            File.WriteAllBytes(empty, Array.Empty<byte>());
            yield return new Mutant("special-files", empty, "mlp", null);
        }

        [System.Runtime.InteropServices.DllImport("libc", SetLastError = true)]
        private static extern int mkfifo(string path, int mode);

        // ---- Building archives and pickles -------------------------------------------------------------------------

        private static List<(string Name, byte[] Data)> Entries(byte[] zip)
        {
            using var archive = new ZipArchive(new MemoryStream(zip), ZipArchiveMode.Read);
            return archive.Entries.Select(e =>
            {
                using var stream = e.Open();
                using var copy = new MemoryStream();
                stream.CopyTo(copy);
                return (e.FullName, copy.ToArray());
            }).ToList();
        }

        private static byte[] Rearchive(byte[] zip, string suffix, byte[] replacement) =>
            Zip(Entries(zip).Select(e => e.Name.EndsWith("/" + suffix, StringComparison.Ordinal) ? (e.Name, replacement) : e));

        private static byte[] Zip(IEnumerable<(string Name, byte[] Data)> entries) => ZipWithZeros(entries.Select(e => (e.Name, (byte[]?)e.Data)), 0);

        /// <summary>A zip of the entries (stored), or, for a null entry, <paramref name="zerosOf"/> zero bytes deflated.</summary>
        private static byte[] ZipWithZeros(IEnumerable<(string Name, byte[]? Data)> entries, long zerosOf)
        {
            var memory = new MemoryStream();
            using (var archive = new ZipArchive(memory, ZipArchiveMode.Create, leaveOpen: true))
            {
                foreach (var (name, data) in entries)
                {
                    using var stream = archive.CreateEntry(name, data is null ? CompressionLevel.Fastest : CompressionLevel.NoCompression).Open();
                    if (data is not null)
                        stream.Write(data);
                    else
                    {
                        byte[] zeros = new byte[OneMiB];
                        for (long written = 0; written < zerosOf; written += zeros.Length)
                            stream.Write(zeros);
                    }
                }
            }
            return memory.ToArray();
        }

        /// <summary>A valid archive whose storage entry is deflated but whose headers claim it inflates to 2 GiB.</summary>
        private static byte[] LyingDeflate()
        {
            byte[] zip = ZipWithZeros(new[] { ("archive/data.pkl", (byte[]?)TensorPickle(1, numel: 1L << 29)), ("archive/data/0", null) }, zerosOf: 4096);
            var walk = ZipWalk.Read(zip);
            int c = walk.Central[1], l = walk.Local[1];
            BinaryPrimitives.WriteUInt32LittleEndian(zip.AsSpan(c + 24), 1u << 31);
            BinaryPrimitives.WriteUInt32LittleEndian(zip.AsSpan(l + 22), 1u << 31);
            return zip;
        }

        /// <summary>An archive of <paramref name="count"/> one-element float tensors, t0 = 0, t1 = 1, ...</summary>
        private static byte[] ManyTensors(int count)
        {
            var entries = new List<(string, byte[])> { ("archive/data.pkl", TensorPickle(count, numel: 1)) };
            for (int i = 0; i < count; i++)
                entries.Add(($"archive/data/{i}", BitConverter.GetBytes((float)i)));
            return Zip(entries);
        }

        /// <summary>{"t0": tensor of storage "0", ...} as torch.save pickles it, each a 1-D float tensor of <paramref name="numel"/>.</summary>
        private static byte[] TensorPickle(int count, long numel)
        {
            var p = new Pickle().Op(0x80).Op(2).Op('}').Op('(');
            for (int i = 0; i < count; i++)
            {
                p.Unicode($"t{i}").Global("torch._utils", "_rebuild_tensor_v2").Op('(')
                    .Op('(').Unicode("storage").Global("torch", "FloatStorage").Unicode(i.ToString()).Unicode("cpu").Long(numel).Op('t').Op('Q')
                    .Long(0).Long(numel).Op(0x85).Long(1).Op(0x85).Op(0x89).Global("collections", "OrderedDict").Op(')').Op('R').Op('t').Op('R');
            }
            return p.Op('u').Op('.').Bytes();
        }

        private static int IndexOf(byte[] haystack, byte[] needle)
        {
            for (int i = 0; i + needle.Length <= haystack.Length; i++)
                if (haystack.AsSpan(i, needle.Length).SequenceEqual(needle))
                    return i;
            throw new InvalidOperationException("not found");
        }

        /// <summary>Writes pickle opcodes by hand.</summary>
        private sealed class Pickle
        {
            private readonly List<byte> _bytes = new();
            public Pickle Op(int opcode) { _bytes.Add((byte)opcode); return this; }
            public Pickle Op(char opcode) => Op((int)opcode);
            public Pickle Raw(byte[] bytes) { _bytes.AddRange(bytes); return this; }
            public Pickle Text(string text) => Raw(Encoding.ASCII.GetBytes(text));
            public Pickle Int32(int value) => Raw(BitConverter.GetBytes(value));
            public Pickle Repeat(char opcode, int count) => Raw(Enumerable.Repeat((byte)opcode, count).ToArray());
            public Pickle Global(string module, string name) => Op('c').Text($"{module}\n{name}\n");
            public Pickle Unicode(string text) { byte[] b = Encoding.UTF8.GetBytes(text); return Op('X').Int32(b.Length).Raw(b); }
            public Pickle Long(long value) => Op(0x8a).Op(8).Raw(BitConverter.GetBytes(value));
            public byte[] Bytes() => _bytes.ToArray();
        }

        /// <summary>The offsets of an archive's central entries, their local headers and its end record.</summary>
        private sealed record ZipWalk(List<int> Central, List<int> Local, int End)
        {
            public static ZipWalk Read(byte[] zip)
            {
                int end = zip.Length - 22;
                while (BinaryPrimitives.ReadUInt32LittleEndian(zip.AsSpan(end)) != 0x06054b50)
                    end--;
                long directory = BinaryPrimitives.ReadUInt32LittleEndian(zip.AsSpan(end + 16));
                int count = BinaryPrimitives.ReadUInt16LittleEndian(zip.AsSpan(end + 10));
                if (directory == 0xFFFFFFFF || count == 0xFFFF)
                {
                    // ZIP64: the locator sits just before the end record and points at the ZIP64 end record.
                    long record = (long)BinaryPrimitives.ReadUInt64LittleEndian(zip.AsSpan(end - 20 + 8));
                    count = (int)BinaryPrimitives.ReadUInt64LittleEndian(zip.AsSpan((int)record + 32));
                    directory = (long)BinaryPrimitives.ReadUInt64LittleEndian(zip.AsSpan((int)record + 48));
                }
                var central = new List<int>();
                var local = new List<int>();
                int at = (int)directory;
                for (int i = 0; i < count; i++)
                {
                    central.Add(at);
                    long offset = BinaryPrimitives.ReadUInt32LittleEndian(zip.AsSpan(at + 42));
                    int nameLength = BinaryPrimitives.ReadUInt16LittleEndian(zip.AsSpan(at + 28));
                    int extraLength = BinaryPrimitives.ReadUInt16LittleEndian(zip.AsSpan(at + 30));
                    if (offset == 0xFFFFFFFF)
                    {
                        // The ZIP64 extra field holds the offset after any sizes that are also all ones.
                        var extra = zip.AsSpan(at + 46 + nameLength, extraLength);
                        int skip = (BinaryPrimitives.ReadUInt32LittleEndian(zip.AsSpan(at + 24)) == 0xFFFFFFFF ? 8 : 0)
                                   + (BinaryPrimitives.ReadUInt32LittleEndian(zip.AsSpan(at + 20)) == 0xFFFFFFFF ? 8 : 0);
                        offset = (long)BinaryPrimitives.ReadUInt64LittleEndian(extra[(4 + skip)..]);
                    }
                    local.Add((int)offset);
                    at += 46 + nameLength + extraLength + BinaryPrimitives.ReadUInt16LittleEndian(zip.AsSpan(at + 32));
                }
                return new ZipWalk(central, local, end);
            }
        }

        // ---- The independent reader --------------------------------------------------------------------------------

        /// <summary>
        /// A strict safetensors reader written separately from the library's, from the format's specification: it says
        /// what a file holds (dtype, shape and SHA-256 of each tensor's bytes), or null where the format's rules are broken.
        /// </summary>
        private static class Strict
        {
            private static readonly Dictionary<string, (string Name, int Size)> DTypes = new()
            {
                ["BOOL"] = ("Bool", 1), ["U8"] = ("Byte", 1), ["I8"] = ("Int8", 1), ["I16"] = ("Int16", 2), ["I32"] = ("Int32", 4),
                ["I64"] = ("Int64", 8), ["F16"] = ("Float16", 2), ["BF16"] = ("BFloat16", 2), ["F32"] = ("Float32", 4),
                ["F64"] = ("Float64", 8), ["C64"] = ("ComplexFloat32", 8),
            };

            public static Dictionary<string, string>? Hashes(byte[] file, bool fromArchive = false)
            {
                if (fromArchive)
                    return ArchiveOfFloats(file);
                if (file.Length < 8)
                    return null;
                ulong n = BinaryPrimitives.ReadUInt64LittleEndian(file);
                if (n > 100_000_000 || n > (ulong)(file.Length - 8))
                    return null;
                byte[] header = file[8..(8 + (int)n)];
                string text;
                try
                {
                    text = new UTF8Encoding(false, true).GetString(header);
                }
                catch (DecoderFallbackException)
                {
                    return null;
                }
                string trimmed = text.TrimEnd(' ');
                if (!trimmed.StartsWith('{'))
                    return null;
                var entries = new List<(string Key, string DType, long[] Shape, long Begin, long End)>();
                try
                {
                    using var document = JsonDocument.Parse(trimmed, new JsonDocumentOptions { MaxDepth = 64 });
                    if (document.RootElement.ValueKind != JsonValueKind.Object)
                        return null;
                    var names = document.RootElement.EnumerateObject().Select(p => p.Name).ToList();
                    if (names.Distinct().Count() != names.Count)
                        return null;
                    foreach (var p in document.RootElement.EnumerateObject())
                    {
                        if (p.Name == "__metadata__")
                        {
                            if (p.Value.ValueKind != JsonValueKind.Object || p.Value.EnumerateObject().Any(m => m.Value.ValueKind != JsonValueKind.String))
                                return null;
                            continue;
                        }
                        if (p.Value.ValueKind != JsonValueKind.Object)
                            return null;
                        var fields = p.Value.EnumerateObject().Select(f => f.Name).ToList();
                        if (fields.Distinct().Count() != fields.Count)
                            return null;
                        string dtype = p.Value.GetProperty("dtype").GetString()!;
                        if (!DTypes.ContainsKey(dtype))
                            return null;
                        long[] shape = p.Value.GetProperty("shape").EnumerateArray().Select(v => v.GetInt64()).ToArray();
                        long[] offsets = p.Value.GetProperty("data_offsets").EnumerateArray().Select(v => v.GetInt64()).ToArray();
                        if (offsets.Length != 2 || shape.Any(s => s < 0))
                            return null;
                        entries.Add((p.Name, dtype, shape, offsets[0], offsets[1]));
                    }
                }
                catch (Exception error) when (error is JsonException or InvalidOperationException or FormatException or KeyNotFoundException)
                {
                    return null;
                }
                long dataStart = 8 + (long)n, cursor = 0;
                var result = new Dictionary<string, string>();
                foreach (var e in entries.OrderBy(e => e.Begin).ThenBy(e => e.End))
                {
                    decimal bytes = e.Shape.Aggregate(1m, (a, s) => a * s) * DTypes[e.DType].Size;
                    if (e.Begin != cursor || e.End - e.Begin != bytes || dataStart + e.End > file.Length)
                        return null;
                    cursor = e.End;
                    byte[] data = file[(int)(dataStart + e.Begin)..(int)(dataStart + e.End)];
                    result[e.Key] = $"{DTypes[e.DType].Name} [{string.Join(", ", e.Shape)}] {Convert.ToHexString(SHA256.HashData(data))}";
                }
                return dataStart + cursor == file.Length ? result : null;
            }

            /// <summary>What <see cref="ManyTensors"/> wrote: t{i} holds the float i.</summary>
            private static Dictionary<string, string> ArchiveOfFloats(byte[] file)
            {
                int count = Entries(file).Count - 1;
                return Enumerable.Range(0, count).ToDictionary(i => $"t{i}", i => $"Float32 [1] {Convert.ToHexString(SHA256.HashData(BitConverter.GetBytes((float)i)))}");
            }
        }
    }
}
