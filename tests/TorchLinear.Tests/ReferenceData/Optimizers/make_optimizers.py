"""PyTorch's optimizers stepped on fixed gradients, for OptimizerParityTests: how close TorchSharp's optimizers come to
PyTorch's, step by step, when both see the same gradients (docs/parity.md reports what the test measures).

For every case: a float32 parameter (24 x 16, seeded), 10 gradients (seeded; scales from 1e-6 to 10, a few exact zeros)
and the parameter after each step. CPU, single-tensor implementations (PyTorch's default for CPU tensors). Run with
Debian's PyTorch 1.13 (the committed file is reproduced byte for byte):
    /usr/bin/python3 tests/TorchLinear.Tests/ReferenceData/Optimizers/make_optimizers.py
"""
import json
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 10

# name -> (class, settings): the settings are PyTorch's argument names.
CASES = {
    "sgd": ("SGD", {"lr": 0.1}),
    "sgd_momentum": ("SGD", {"lr": 0.1, "momentum": 0.9}),
    "sgd_nesterov_decay": ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    "sgd_dampening": ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.5}),
    "adam": ("Adam", {"lr": 1e-2}),
    "adam_decay_amsgrad": ("Adam", {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1, "amsgrad": True}),
    "adamw": ("AdamW", {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.1}),
    "adamw_amsgrad": ("AdamW", {"lr": 1e-2, "weight_decay": 0.01, "amsgrad": True}),
    "rmsprop": ("RMSprop", {"lr": 1e-2}),
    "rmsprop_centered_momentum": ("RMSprop", {"lr": 1e-2, "alpha": 0.9, "momentum": 0.9, "centered": True, "weight_decay": 0.01}),
    "adagrad": ("Adagrad", {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.01}),
}


def gradients(g):
    result = []
    for s in range(STEPS):
        scale = 10.0 ** (s % 8 - 6)  # 1e-6 ... 10
        grad = torch.randn(24, 16, generator=g) * scale
        grad[0, : s + 1] = 0.0  # exact zeros, more each step
        result.append(grad)
    return result


def main():
    tensors, cases = {}, {}
    for index, (name, (kind, settings)) in enumerate(CASES.items()):
        g = torch.Generator().manual_seed(100 + index)
        param = torch.nn.Parameter(torch.randn(24, 16, generator=g))
        tensors[f"{name}/initial"] = param.detach().clone()
        optimizer = getattr(torch.optim, kind)([param], **settings)
        for s, grad in enumerate(gradients(g)):
            param.grad = grad.clone()
            optimizer.step()
            tensors[f"{name}/grad/{s}"] = grad
            tensors[f"{name}/param/{s}"] = param.detach().clone()
        cases[name] = {"optimizer": kind, "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}}
    metadata = {"torch_version": torch.__version__, "steps": STEPS, "cases": cases}
    tensors["metadata"] = torch.tensor(list(json.dumps(metadata).encode()), dtype=torch.uint8)
    torch.save(tensors, os.path.join(HERE, "optimizers.pt"))
    print(f"{len(cases)} cases, {STEPS} steps each, PyTorch {torch.__version__}")


if __name__ == "__main__":
    main()
