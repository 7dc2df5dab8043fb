"""LoraConvBenchmarks' conv net and adapters, timed with real PEFT in PyTorch: the Python column beside the .NET one.

The same net as tests/TorchLinear.Benchmarks/LoraConvBenchmarks.cs: stem Conv2d(3, 32, 3, padding=1), down
Conv2d(32, 64, 3, stride=2, padding=1, bias=False), block Conv2d(64, 64, 3, padding=1), mix Conv2d(64, 64, 1), ReLU
between, the mean over the plane, head Linear(64, 10); a batch of 16 images 3x32x32. The adapters are PEFT's own
(get_peft_model with target_modules stem, down, block, mix; r = 8, lora_alpha = 16; init_lora_weights=False so that
lora_B is not zero), from PEFT 0.18.1's sources (../../../../shared/realpeft, `source SITE/env.sh`).
Cases, as in the .NET class: the base model, the base model again (the control: its ratio is this machine's noise),
PEFT's model with the adapters unmerged, and after merge_and_unload (a plain model with W + delta).

Like the .NET benchmarks, every case runs once per round, rounds one after the other, the order of the cases rotated by
one place per round; each case's time in a round is the median of 5 batches of about 50 ms; the ratio to the base model
is taken within each round and reported as median (min-max) over the rounds.

Run with Debian's PyTorch 1.13 and OpenBLAS (apt-get install python3-torch libopenblas0-pthread), one thread,
OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset:
    source /work/realpeft-site/env.sh
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS=1 /usr/bin/python3 \\
        tests/TorchLinear.Benchmarks/pytorch/lora_conv.py --rounds 5
"""
import argparse
import platform
import statistics

import torch
from torch import nn
from torch.nn import functional as F

import peft
from peft import LoraConfig, get_peft_model

from timing import blas_libraries, per_call

BATCH, RANK, ALPHA = 16, 8, 16
TARGETS = ["stem", "down", "block", "mix"]


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.down = nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False)
        self.block = nn.Conv2d(64, 64, 3, padding=1)
        self.mix = nn.Conv2d(64, 64, 1)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.down(x))
        x = F.relu(self.block(x))
        x = self.mix(x)
        return self.head(x.mean((2, 3)))


def model():
    torch.manual_seed(0)
    return ConvNet().eval()


def adapted():
    m = model()
    torch.manual_seed(1)
    return get_peft_model(m, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)).eval()


def cases():
    torch.manual_seed(2)
    x = torch.randn(BATCH, 3, 32, 32)
    base, control, unmerged = model(), model(), adapted()
    merged = adapted().merge_and_unload().eval()

    def forward(m):
        def run():
            with torch.no_grad():
                m(x)
        return run

    return [("base model", forward(base)), ("base model again (control)", forward(control)),
            ("merge_and_unload'ed", forward(merged)), ("adapters unmerged", forward(unmerged))]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.randn(64, 64) @ torch.randn(64, 64)   # loads the BLAS library Debian's alternatives point at
    blas = blas_libraries()
    print(f"PyTorch {torch.__version__}, PEFT {peft.__version__}, {torch.get_num_threads()} thread, {platform.machine()}; "
          f"BLAS loaded: {', '.join(blas)}")
    print()
    print("| case | median per call | ratio to the base model, median (min-max) over rounds |")
    print("|---|---:|---:|")
    named = cases()
    times = {name: [] for name, _ in named}
    for r in range(args.rounds):
        order = named[r % len(named):] + named[:r % len(named)]
        for name, run in order:
            times[name].append(per_call(run))
    for name, _ in named:
        ratios = [t / b for t, b in zip(times[name], times["base model"])]
        print(f"| {name} | {statistics.median(times[name]) * 1e6:.0f} µs | {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
