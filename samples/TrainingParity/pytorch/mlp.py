"""The README's training-parity example: a two-layer MLP trained 5 steps on one batch, to fit a linear map, with SGD (momentum 0.9, weight decay 1e-3),
recorded by record_training for Parity.ReplayTraining. The README's C# block ports it and replays mlp.training.pt.
Run with Debian's PyTorch 1.13 (the committed file is reproduced byte for byte; reference BLAS, see DEVELOPERS.md):
    LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu/blas:/usr/lib/x86_64-linux-gnu/lapack /usr/bin/python3 samples/TrainingParity/pytorch/mlp.py
"""
import os
import sys

import torch
from torch import nn
from torch.nn import functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "tools", "pytorch"))
from record_parity import record_training  # noqa: E402


def main():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    x = torch.randn(32, 4)
    batches = [(x, x @ torch.randn(4, 2))] * 5
    metadata = record_training(model, optimizer, batches, F.mse_loss, os.path.join(HERE, "mlp.training.pt"))
    print("losses:", ", ".join(f"{s['loss']:.4f}" for s in metadata["steps"]))


if __name__ == "__main__":
    main()
