#!/usr/bin/python3
"""Writes pytorch_init.json: the parameters real PyTorch's nn.Linear holds right after
construction under torch.manual_seed(seed), as exact IEEE bit patterns.

The .NET tests compare CustomLinear's seeded initialisation against this file; they never run
Python. To regenerate (Debian 12: apt-get install python3-torch), use Debian's own interpreter,
not a pyenv/venv python3 that may come first on PATH:

    /usr/bin/python3 tests/TorchLinear.Tests/ReferenceData/pytorch_init.py
"""
import json
import os
import struct

import torch

# (seed, in_features, out_features, bias, dtype)
CASES = [
    (0, 3, 2, True, torch.float32),
    (1, 3, 2, True, torch.float32),
    (42, 3, 2, False, torch.float32),
    (7, 5, 4, True, torch.float32),
    (123, 16, 8, True, torch.float32),
    (2024, 1, 1, True, torch.float32),
    (0, 0, 3, True, torch.float32),
    (0, 3, 2, True, torch.float64),
    (99, 10, 6, True, torch.float64),
]


def bits(tensor):
    if tensor.dtype == torch.float32:
        return ["%08x" % struct.unpack("<I", struct.pack("<f", v))[0] for v in tensor.flatten().tolist()]
    return ["%016x" % struct.unpack("<Q", struct.pack("<d", v))[0] for v in tensor.flatten().tolist()]


def main():
    cases = []
    for seed, fan_in, fan_out, has_bias, dtype in CASES:
        torch.manual_seed(seed)
        layer = torch.nn.Linear(fan_in, fan_out, bias=has_bias, dtype=dtype)
        cases.append({
            "seed": seed,
            "in_features": fan_in,
            "out_features": fan_out,
            "bias": has_bias,
            "dtype": "Float32" if dtype == torch.float32 else "Float64",
            "weight_bits": bits(layer.weight.detach()),
            "bias_bits": bits(layer.bias.detach()) if has_bias else None,
        })
    out = {"generator": "pytorch_init.py", "torch_version": torch.__version__, "cases": cases}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pytorch_init.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
