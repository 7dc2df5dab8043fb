"""The model of Ports/MergedClasses (make_ports.py writes its port): two instances of each case of export_port.py's
one-class-per-PyTorch-class rule. A module of its own, so that the generated port's comments (file and line of each
Python statement) change only when this file does.
"""
import torch
from torch import nn


class MaybeNorm(nn.Module):
    """Instances with and without a submodule, as torchvision's BasicBlock with and without downsample."""

    def __init__(self, width, norm):
        super().__init__()
        self.fc = nn.Linear(4, width)
        self.back = nn.Linear(width, 4)
        self.norm = nn.LayerNorm(4) if norm else None

    def forward(self, x):
        y = self.back(self.fc(x))
        if self.norm is not None:
            y = self.norm(y)
        return y * 2.0


class MaybeResidual(nn.Module):
    """Instances with and without a residual, told apart by a bool attribute (MobileNetV2's use_res_connect)."""

    def __init__(self, residual):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.residual = residual

    def forward(self, x):
        if self.residual:
            return x + self.fc(x)
        return self.fc(x)


class Activation(nn.Module):
    """Instances whose forwards differ by a statement that nothing (no bool attribute, no submodule) tells: two classes."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        return x + torch.relu(x) if self.kind == "residual" else torch.relu(x)


class Unary(nn.Module):
    """Instances whose forwards are different operations: two classes."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        return torch.relu(x) if self.kind == "relu" else torch.tanh(x)


class MergedClasses(nn.Module):
    """Two instances of each: one class with an optional submodule, one with a bool flag, one class each."""

    def __init__(self):
        super().__init__()
        self.a = MaybeNorm(8, True)
        self.b = MaybeNorm(16, False)
        self.c = MaybeResidual(True)
        self.d = MaybeResidual(False)
        self.e = Activation("residual")
        self.f = Activation("plain")
        self.g = Unary("relu")
        self.h = Unary("tanh")

    def forward(self, x):
        return self.h(self.g(self.f(self.e(self.d(self.c(self.b(self.a(x))))))))


def merged_classes():
    torch.manual_seed(5)
    model = MergedClasses()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval(), torch.randn(2, 3, 4), torch.randn(1, 5, 4)
