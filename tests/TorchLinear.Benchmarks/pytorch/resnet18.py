"""GeneratedResNet18Benchmarks' model timed in PyTorch: the Python column beside docs/benchmarks.md's .NET one.

torchvision.models.resnet18() (torchvision 0.14, 1000 classes, seeded random weights: the weights do not change the
time), eval mode, torch.no_grad(), 224 x 224 images in batches of 1 and 8; the forward only, as the .NET class times
TorchVision.NET's hand-written resnet18 and the port tools/pytorch/export_port.py generates from this same model.
Cases: the model, and the model again (the control: its ratio is this machine's noise).

Like the .NET benchmarks, every case runs once per round, rounds one after the other, the order of the cases rotated by
one place per round; each case's time in a round is the median of 5 batches of about 0.5 s; the ratio to the model is
taken within each round and reported as median (min-max) over the rounds.

Run with Debian's PyTorch 1.13 and OpenBLAS (apt-get install python3-torch python3-torchvision libopenblas0-pthread;
Debian's default BLAS is the reference one, far slower), OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset, on one thread
(OPENBLAS_NUM_THREADS=1 only in this command) and, for the .NET class's two-thread column, on two:
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS=1 /usr/bin/python3 \\
        tests/TorchLinear.Benchmarks/pytorch/resnet18.py --rounds 5 --threads 1
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS=2 /usr/bin/python3 \\
        tests/TorchLinear.Benchmarks/pytorch/resnet18.py --rounds 5 --threads 2
"""
import argparse
import platform
import statistics

import torch
import torchvision

from timing import blas_libraries, per_call


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.randn(64, 64) @ torch.randn(64, 64)   # loads the BLAS library Debian's alternatives point at
    blas = blas_libraries()
    print(f"PyTorch {torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} thread(s), "
          f"{platform.machine()}; BLAS loaded: {', '.join(blas)}")
    print()
    print("| batch | case | median per call | ratio to the model, median (min-max) over rounds |")
    print("|---:|---|---:|---:|")
    for batch in args.batches:
        torch.manual_seed(0)
        model, control = torchvision.models.resnet18().eval(), torchvision.models.resnet18().eval()
        x = torch.randn(batch, 3, 224, 224)

        def forward(m):
            def run():
                with torch.no_grad():
                    m(x)
            return run

        named = [("resnet18", forward(model)), ("resnet18 again (control)", forward(control))]
        times = {name: [] for name, _ in named}
        for r in range(args.rounds):
            for name, run in named[r % len(named):] + named[:r % len(named)]:
                times[name].append(per_call(run, batch_seconds=0.5, warmups=3))
        for name, _ in named:
            ratios = [t / b for t, b in zip(times[name], times["resnet18"])]
            print(f"| {batch} | {name} | {statistics.median(times[name]) * 1e3:.2f} ms | "
                  f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
