#!/bin/sh
# Generates the port of torchvision.models.resnet18() that GeneratedResNet18Benchmarks times against TorchVision.NET's
# hand-written resnet18 (docs/benchmarks.md, "A generated port against a hand-written one"):
#
#     sh tests/TorchLinear.Benchmarks/Ports/generate_resnet18.sh
#
# It writes tests/TorchLinear.Benchmarks/Ports/Generated/ResNet18.cs with tools/pytorch/export_port.py (Debian's
# PyTorch 1.13 and torchvision 0.14: apt-get install python3-torch python3-torchvision). The folder is git-ignored and
# the benchmark project compiles it, and the benchmark class, only when it is there: neither the generated code nor
# weights are committed (the benchmark loads TorchVision.NET's resnet18 state_dict into the generated port, so both run
# the same weights). Delete the folder to build the project without it again.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
exec /usr/bin/python3 - "$root" "$here/Generated" <<'PYTHON'
import os
import sys

root, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, os.path.join(root, "tools", "pytorch"))
import torch
import torchvision
from export_port import export_port

torch.manual_seed(0)
model = torchvision.models.resnet18().eval()   # torchvision's own architecture, 1000 classes; the weights do not matter
# A small example image: the port reads sizes from its input, so it runs at 224 x 224 all the same.
paths = export_port(model, (torch.randn(1, 3, 64, 64),), out, "ResNet18", namespace="TorchLinear.Benchmarks.Ports.Generated",
                    weights=False, recording=False)
print("wrote " + paths["cs"])
PYTHON
