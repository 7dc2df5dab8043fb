#!/usr/bin/python3
"""Reference data for TorchLinear's PyTorch interop tests, made with real PyTorch.

    /usr/bin/python3 make_interop.py           # write the checkpoints, inputs and PyTorch's outputs
    /usr/bin/python3 make_interop.py --check   # load the files .NET wrote (from_dotnet/) and compare

Use Debian's interpreter (apt-get install python3-torch: PyTorch 1.13), not a pyenv/venv python3 that may
come first on PATH. The .NET tests read only the files written here; they never run Python.

Debian has no safetensors package, so this script writes and reads that format itself: an 8-byte
little-endian header length, a JSON header naming each tensor's dtype, shape and byte range, then the raw
little-endian data.
"""
import json
import os
import struct
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = {torch.float32: "F32", torch.float64: "F64"}
TORCH_DTYPES = {v: k for k, v in DTYPES.items()}

LORA_R = 2
LORA_ALPHA = 4.0


def write_safetensors(path, tensors, metadata=None):
    header, blobs, offset = {}, [], 0
    for name, tensor in tensors.items():
        data = tensor.detach().contiguous().numpy().astype(tensor.numpy().dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the format allows padding the header with spaces
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for blob in blobs:
            f.write(blob)


def read_safetensors(path):
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
        data = f.read()
    header.pop("__metadata__", None)
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        dtype = TORCH_DTYPES[entry["dtype"]]
        flat = torch.frombuffer(bytearray(data[begin:end]), dtype=dtype) if end > begin else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(entry["shape"])
    return tensors


def save_both(name, state_dict, metadata=None):
    state_dict = {k: v.detach().clone() for k, v in state_dict.items()}
    torch.save(state_dict, os.path.join(HERE, name + ".pt"))  # zip format, as torch.save writes since 1.6
    write_safetensors(os.path.join(HERE, name + ".safetensors"), state_dict, metadata)


class LoraLinear(nn.Module):
    """loralib.Linear's forward for one adapter, without dropout (eval mode)."""

    def __init__(self, in_features, out_features, r, alpha):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, r))
        self.scaling = alpha / r

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + (x @ self.lora_A.transpose(0, 1) @ self.lora_B.transpose(0, 1)) * self.scaling


def models():
    # The article's layer: integer weights and bias, so integer-valued inputs give results that are exact
    # on every machine, whatever order the BLAS kernel sums in.
    article = nn.Linear(3, 2)
    with torch.no_grad():
        article.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
        article.bias.copy_(torch.tensor([0.0, 1.0]))
    torch.manual_seed(0)
    linear = nn.Linear(3, 2)
    torch.manual_seed(1)
    no_bias = nn.Linear(4, 3, bias=False)
    torch.manual_seed(2)
    wide = nn.Linear(5, 2, dtype=torch.float64)

    # A two-layer MLP, briefly trained on a fixed synthetic task.
    torch.manual_seed(3)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(256, 8)
    y = torch.stack([x[:, 0] * x[:, 1], x[:, 2].abs(), x[:, 3] - x[:, 4], x[:, 5:].sum(1)], dim=1)
    optimizer = torch.optim.Adam(mlp.parameters(), lr=0.01)
    for _ in range(200):
        optimizer.zero_grad()
        F.mse_loss(mlp(x), y).backward()
        optimizer.step()

    torch.manual_seed(4)
    lora = LoraLinear(6, 5, LORA_R, LORA_ALPHA)
    with torch.no_grad():
        base = nn.Linear(6, 5)
        lora.weight.copy_(base.weight)
        lora.bias.copy_(base.bias)
        nn.init.kaiming_uniform_(lora.lora_A, a=5 ** 0.5)
        lora.lora_B.normal_(0, 0.5)  # non-zero, as after fine-tuning
    return {"article": article, "linear_3_2": linear, "linear_nobias": no_bias, "linear_f64": wide, "mlp": mlp, "lora": lora}


def inputs_for(in_features, dtype, generator):
    cases = {}
    for rank, shape in ((1, (in_features,)), (2, (4, in_features)), (3, (2, 3, in_features))):
        # Integer-valued inputs: with small integer weights these would be exact everywhere; with real weights
        # they still avoid input rounding. Random inputs exercise everything else.
        cases["int/rank%d" % rank] = torch.randint(-3, 4, shape, generator=generator).to(dtype)
        cases["random/rank%d" % rank] = torch.randn(shape, generator=generator, dtype=dtype)
    return cases


def generate():
    built = models()
    manifest = {"generator": "make_interop.py", "torch_version": torch.__version__, "lora": {"r": LORA_R, "lora_alpha": LORA_ALPHA}, "models": {}}
    cases = {}
    generator = torch.Generator().manual_seed(5)
    for name, model in built.items():
        save_both(name, model.state_dict(), {"source": "make_interop.py", "model": name})
        first = next(iter(model.state_dict().values()))
        in_features = first.shape[1]
        keys = []
        with torch.no_grad():
            for case, x in inputs_for(in_features, first.dtype, generator).items():
                key = "%s/%s" % (name, case)
                cases[key + "/input"] = x
                cases[key + "/output"] = model(x)
                keys.append(key)
        manifest["models"][name] = {"keys": list(model.state_dict().keys()), "cases": keys}

    # Files that must be refused: a bias of the wrong shape, and a missing key.
    state = built["linear_3_2"].state_dict()
    save_both("bad_shape", {"weight": state["weight"], "bias": torch.zeros(3)})
    save_both("bad_missing", {"weight": state["weight"]})

    write_safetensors(os.path.join(HERE, "cases.safetensors"), cases)
    with open(os.path.join(HERE, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")


def check():
    """Loads what .NET saved (from_dotnet/) and confirms it holds PyTorch's original tensors, bit for bit."""
    folder = os.path.join(HERE, "from_dotnet")
    lines = ["check of .NET-written files by make_interop.py --check, torch %s" % torch.__version__]
    failures = 0
    for name in ("linear_3_2", "mlp", "lora"):
        original = torch.load(os.path.join(HERE, name + ".pt"))
        for kind, loaded in (("pt", torch.load(os.path.join(folder, name + ".pt"))),
                             ("safetensors", read_safetensors(os.path.join(folder, name + ".safetensors")))):
            same_keys = sorted(loaded) == sorted(original)
            same = same_keys and all(loaded[k].dtype == original[k].dtype and torch.equal(loaded[k], original[k]) for k in original)
            failures += not same
            lines.append("%s.%s: keys %s, tensors %s" % (name, kind, "match" if same_keys else "DIFFER", "identical" if same else "DIFFER"))
    lines.append("result: %s" % ("all identical" if failures == 0 else "%d files differ" % failures))
    with open(os.path.join(folder, "check_report.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return failures == 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        sys.exit(0 if check() else 1)
    generate()
