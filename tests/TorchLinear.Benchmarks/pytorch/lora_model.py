"""LoraModelBenchmarks' model and adapters, timed in PyTorch: the Python column beside docs/benchmarks.md's .NET one.

The same model as tests/TorchLinear.Benchmarks/LoraModelBenchmarks.cs: four square nn.Linear layers (512 or 1024 wide)
with ReLU between, an r = 8, alpha = 16 adapter on every one, a 64-row batch. The adapters compute what PEFT's
lora.Linear computes for one adapter, base(x) + lora_B(lora_A(x)) * scaling (PEFT itself is not installable on the
machine these figures come from, so the layer is written here from PEFT's source, as the reference-data scripts do).
Cases, as in the .NET class: the base model, the base model again (the control: its ratio is this machine's noise), the
model after merge_and_unload (W + B A * scaling, a plain Sequential), the adapters unmerged, and a training step that
trains the adapters alone with Adam (zero_grad, forward, MSE loss, backward, step).

Like the .NET benchmarks, every case runs once per round, rounds one after the other, the order of the cases rotated by
one place per round; each case's time in a round is the median of 5 batches of about 50 ms; the ratio to the base model
is taken within each round and reported as median (min-max) over the rounds.

Run with Debian's PyTorch 1.13 and OpenBLAS (apt-get install python3-torch libopenblas0-pthread; Debian's default BLAS
is the reference one, about 30x slower), one thread, OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset:
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS=1 /usr/bin/python3 \\
        tests/TorchLinear.Benchmarks/pytorch/lora_model.py --rounds 5
"""
import argparse
import math
import platform
import statistics

import torch
from torch import nn

from timing import blas_libraries, per_call

ROWS, RANK, ALPHA = 64, 8, 16


class LoraLinear(nn.Module):
    """PEFT's lora.Linear for one adapter: base(x) + lora_B(lora_A(x)) * scaling."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, RANK, bias=False)
        self.lora_B = nn.Linear(RANK, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.normal_(self.lora_B.weight, 0, 0.01)   # a trained-looking adapter: B is not zero
        self.scaling = ALPHA / RANK

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling


def model(width):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)).eval()


def adapted(width):
    m = model(width)
    torch.manual_seed(1)
    for i in (0, 2, 4, 6):
        m[i] = LoraLinear(m[i])
    for p in m.parameters():
        p.requires_grad_(False)
    for i in (0, 2, 4, 6):
        m[i].lora_A.weight.requires_grad_(True)
        m[i].lora_B.weight.requires_grad_(True)
    return m


def merged(width):
    m = adapted(width)
    with torch.no_grad():
        for i in (0, 2, 4, 6):
            layer = m[i]
            layer.base_layer.weight += (layer.lora_B.weight @ layer.lora_A.weight) * layer.scaling
            m[i] = layer.base_layer
    return m


def cases(width):
    torch.manual_seed(2)
    x = torch.randn(ROWS, width)
    y = torch.randn(ROWS, width)
    base, control, folded, unmerged, trained = model(width), model(width), merged(width), adapted(width), adapted(width).train()
    optimizer = torch.optim.Adam([p for p in trained.parameters() if p.requires_grad], lr=1e-3)

    def forward(m):
        def run():
            with torch.no_grad():
                m(x)
        return run

    def train_step():
        optimizer.zero_grad()
        nn.functional.mse_loss(trained(x), y).backward()
        optimizer.step()

    return [("base model", forward(base)), ("base model again (control)", forward(control)),
            ("merge_and_unload'ed", forward(folded)), ("adapters unmerged", forward(unmerged)),
            ("adapters-only Adam step", train_step)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 1024])
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.randn(64, 64) @ torch.randn(64, 64)   # loads the BLAS library Debian's alternatives point at
    blas = blas_libraries()
    print(f"PyTorch {torch.__version__}, {torch.get_num_threads()} thread, {platform.machine()}; BLAS loaded: {', '.join(blas)}")
    print()
    print("| width | case | median per call | ratio to the base model, median (min-max) over rounds |")
    print("|---:|---|---:|---:|")
    for width in args.widths:
        named = cases(width)
        times = {name: [] for name, _ in named}
        for r in range(args.rounds):
            order = named[r % len(named):] + named[:r % len(named)]
            for name, run in order:
                times[name].append(per_call(run))
        for name, _ in named:
            ratios = [t / b for t, b in zip(times[name], times["base model"])]
            median_time = statistics.median(times[name])
            print(f"| {width} | {name} | {median_time * 1e6:.0f} µs | {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
