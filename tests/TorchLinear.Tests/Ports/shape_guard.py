"""The model of Ports/ShapeGuard (make_ports.py writes its port): branches on sizes only, which the trace evaluates once
and the port has one side of. export_port.py writes each as a guard where Python evaluated it: the port throws on an
input that takes the other side. A module of its own, so that the generated port's comments (file and line of each
Python statement) change only when this file does.
"""
import torch
from torch import nn


class Wide(nn.Module):
    """Doubles wide inputs, adds one to narrow ones; keeps at most four positions of the sequence."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[1] > 4:
            y = self.fc(x) * 2.0
        else:
            y = self.fc(x) + 1.0
        keep = min(x.shape[1], 4)
        return y[:, :keep]


class ShapeGuard(nn.Module):
    """A size branch taken (Wide's `x.shape[1] > 4`, True at the traced shapes) and one not taken (`x.shape[0] == 1`,
    False at them)."""

    def __init__(self):
        super().__init__()
        self.wide = Wide()
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        if x.shape[0] == 1:
            x = x * 0.5
        return self.out(self.wide(x))


def shape_guard():
    torch.manual_seed(7)
    return ShapeGuard().eval(), torch.randn(2, 6, 4), torch.randn(3, 5, 4)
