// The child process of the checkpoint fuzz suite (tests/TorchLinear.Tests/Checkpoints/CheckpointFuzzTests.cs).
// Usage: TorchLinear.CheckpointFuzz <manifest>. Each manifest line is "<file>\t<module>", where <module> names a module
// that fits the file's original (mlp, linear_3_2, none), or "adapter" for a PEFT adapter folder, which is loaded with
// LoraModel.load_adapter into the port of the reference adapter's model. For each file it prints "start <i>", then one JSON
// line: the outcome of StateDicts.LoadPyTorchFile (or ReadPyTorchFile for "none"), the exception's type and message,
// whether the module kept every bit on a refusal, the time taken, the growth of peak resident memory, whether the
// file was left open, and for a load, every tensor's dtype, shape and SHA-256 of its values.
using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.IO;
using System.Linq;
using System.Security.Cryptography;
using System.Text.Json;
using TorchLinear;
using TorchLinear.Lora;
using TorchLinear.Lora.Tests;
using TorchSharp;
using static TorchSharp.torch;

var lines = File.ReadAllLines(args[0]);
// Warm up TorchSharp and the readers, so the first file is not charged for loading libtorch.
using (var warm = nn.Sequential(("0", new CustomLinear(2, 2))))
    _ = warm.state_dict();

for (int i = 0; i < lines.Length; i++)
{
    var parts = lines[i].Split('\t');
    string file = parts[0], moduleName = parts[1];
    Console.WriteLine($"start {i}");
    Console.Out.Flush();
    using var scope = NewDisposeScope();
    var module = Module(moduleName);
    var before = module?.state_dict().ToDictionary(kv => kv.Key, kv => Hash(kv.Value));

    long rssBefore = Status("VmRSS");
    File.WriteAllText("/proc/self/clear_refs", "5");  // peak resident memory starts again from now
    var clock = Stopwatch.StartNew();
    string outcome, type = "", message = "";
    Dictionary<string, string>? tensors = null;
    try
    {
        if (module is null)
        {
            tensors = StateDicts.ReadPyTorchFile(file).ToDictionary(kv => kv.Key, kv => Hash(kv.Value));
        }
        else if (moduleName == "adapter")
        {
            LoraModel.load_adapter(module, file);
            tensors = module.state_dict().ToDictionary(kv => kv.Key, kv => Hash(kv.Value));
        }
        else
        {
            StateDicts.LoadPyTorchFile(module, file);
            tensors = module.state_dict().ToDictionary(kv => kv.Key, kv => Hash(kv.Value));
        }
        outcome = "loaded";
    }
    catch (Exception error)
    {
        outcome = "refused";
        type = error.GetType().FullName!;
        message = error.Message;
    }
    double elapsed = clock.Elapsed.TotalMilliseconds;
    long peakGrowth = Status("VmHWM") - rssBefore;
    bool unchanged = module is null || outcome == "loaded" || module.state_dict().All(kv => before![kv.Key] == Hash(kv.Value));
    bool leftOpen = Directory.EnumerateFileSystemEntries("/proc/self/fd").Any(fd =>
    {
        try { return new FileInfo(fd).LinkTarget == file; } catch (IOException) { return false; }
    });
    Console.WriteLine(JsonSerializer.Serialize(new
    {
        index = i, outcome, type, message, unchanged, elapsedMs = elapsed, peakGrowthKiB = peakGrowth, leftOpen, tensors,
    }));
    Console.Out.Flush();
}

static nn.Module? Module(string name) => name switch
{
    "mlp" => nn.Sequential(("0", new CustomLinear(8, 16)), ("1", nn.ReLU()), ("2", new CustomLinear(16, 4))),
    "linear_3_2" => new CustomLinear(3, 2),
    // The attention model the reference adapter was trained on, with CustomLinear projections (adapters run in forward).
    "adapter" => Ports.Pretrained("attention", PortStyle.CustomForward),
    "none" => null,
    _ => throw new ArgumentException(name),
};

// dtype, shape and the SHA-256 of the values in row-major order (non-contiguous tensors are made contiguous first).
static string Hash(Tensor tensor)
{
    using var contiguous = tensor.detach().contiguous();
    byte[] bytes = contiguous.numel() == 0 ? Array.Empty<byte>() : contiguous.bytes.ToArray();
    return $"{tensor.dtype} [{string.Join(", ", tensor.shape)}] {Convert.ToHexString(SHA256.HashData(bytes))}";
}

// A line of /proc/self/status in KiB.
static long Status(string field)
{
    foreach (string line in File.ReadLines("/proc/self/status"))
        if (line.StartsWith(field + ":", StringComparison.Ordinal))
            return long.Parse(line[(field.Length + 1)..].Trim().Split(' ')[0]);
    return 0;
}
