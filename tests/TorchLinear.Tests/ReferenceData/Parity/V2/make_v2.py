"""Small format-2 recordings for the replay of modules of several tensor inputs and outputs (ParityV2Tests), made with
tools/pytorch/record_parity.py (format torchlinear-parity/2) and Debian's PyTorch 1.13:

    LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu/blas:/usr/lib/x86_64-linux-gnu/lapack \\
        /usr/bin/python3 tests/TorchLinear.Tests/ReferenceData/Parity/V2/make_v2.py

two_inputs.parity.pt        TwoInputs: a root of two inputs returning a tuple (backward from its first tensor); "mix"
                            takes (a, b=...) with b a keyword argument and returns a tuple of two tensors; an in-place
                            ReLU; with the float64 reference (noise).
two_inputs_no64.parity.pt   the same run recorded with reference64=False: no rounding reference.
boundary_3.996.parity.pt    Twice (x * 2) on ones, its recorded output moved by hand by 2**-10 - 2**-20 and its noise set
boundary_4.008.parity.pt    to 2**-12, or moved by 2**-10 + 2**-19: the port's distance is a known multiple of the
                            noise (3.996 and 4.008), either side of NoiseFactor 4 (all exact in float32 near 2).
tied.parity.pt              TiedLm: an embedding whose weight is also the head's (lm_head tied to the embedding, as
                            GPT-2 and OPT tie them): state_dict and gradients under both names, metadata "tied".
"""
import json
import os
import sys

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
TOOLS = os.path.join(HERE, "..", "..", "..", "..", "..", "tools", "pytorch")
sys.path.insert(0, TOOLS)

from record_parity import record  # noqa: E402


class Mix(nn.Module):
    """(a, b) -> (a * w + b, a - b)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, a, b):
        return a * self.w + b, a - b


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = Mix()
        self.proj = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x, y):
        gate, difference = self.mix(x, b=y)
        return self.head(self.act(self.proj(gate))), difference


class TiedLm(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.norm(self.embed(ids)))


class Twice(nn.Module):
    def forward(self, x):
        return x * 2


def boundary(path, offset):
    """Twice's recording with its output moved by `offset` and its rounding noise set to 2**-12 by hand."""
    record(Twice().eval(), (torch.ones(2),), path)
    tensors = torch.load(path)
    tensors["call//output/0"] = tensors["call//output/0"] + offset
    metadata = json.loads(bytes(tensors["metadata"].tolist()))
    metadata["noise"]["call//output/0"] = 2.0 ** -12
    tensors["metadata"] = torch.tensor(list(json.dumps(metadata).encode()), dtype=torch.uint8)
    torch.save(tensors, path)


def main():
    torch.manual_seed(2)
    model = TwoInputs().eval()
    x, y = torch.randn(5, 4), torch.randn(5, 4)
    record(model, (x, y), os.path.join(HERE, "two_inputs.parity.pt"))
    record(model, (x, y), os.path.join(HERE, "two_inputs_no64.parity.pt"), reference64=False)
    boundary(os.path.join(HERE, "boundary_3.996.parity.pt"), 2.0 ** -10 - 2.0 ** -20)
    boundary(os.path.join(HERE, "boundary_4.008.parity.pt"), 2.0 ** -10 + 2.0 ** -19)
    torch.manual_seed(3)
    record(TiedLm().eval(), (torch.randint(0, 10, (2, 3)),), os.path.join(HERE, "tied.parity.pt"))


if __name__ == "__main__":
    main()
