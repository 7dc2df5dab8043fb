"""Small recordings for ParityTests, made with tools/pytorch/record_parity.py and Debian's PyTorch 1.13:

    /usr/bin/python3 tests/TorchLinear.Tests/ReferenceData/Parity/make_parity.py

mlp.parity.pt     Sequential(Linear(6, 12), ReLU(), Linear(12, 3)) on a (5, 6) input, backward from output.sum();
reused.parity.pt  one ReLU module called twice (recorded as "act" and "act#1"), through the command-line entry point,
                  with an explicit grad_output.
tuple.parity.pt   a module ("halves") that returns a tuple, not a tensor: its recorded call has no output to compare.
"""
import os
import subprocess
import sys

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
TOOLS = os.path.join(HERE, "..", "..", "..", "..", "tools", "pytorch")
sys.path.insert(0, TOOLS)

from record_parity import record  # noqa: E402


class Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.act = nn.ReLU()
        self.second = nn.Linear(4, 2)

    def forward(self, x):
        return self.second(self.act(self.first(self.act(x))))


class Halves(nn.Module):
    def forward(self, x):
        return x[..., :2], x[..., 2:]


class TupleUser(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.halves = Halves()
        self.second = nn.Linear(2, 2)

    def forward(self, x):
        a, b = self.halves(self.first(x))
        return self.second(a + b)


def build_reused():
    torch.manual_seed(2)
    return Reused().eval(), torch.randn(3, 4), torch.randn(3, 2)


def main():
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    record(mlp, torch.randn(5, 6), os.path.join(HERE, "mlp.parity.pt"))
    torch.manual_seed(3)
    record(TupleUser().eval(), torch.randn(3, 4), os.path.join(HERE, "tuple.parity.pt"))
    # The command-line form, on a builder function in this file.
    subprocess.run([sys.executable, os.path.join(TOOLS, "record_parity.py"), f"{os.path.abspath(__file__)}:build_reused",
                    os.path.join(HERE, "reused.parity.pt")], check=True)


if __name__ == "__main__":
    main()
