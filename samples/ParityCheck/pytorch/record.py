"""Records TinyTransformer for samples/ParityCheck: seeded weights (LayerNorms perturbed away from 1 and 0, so that
a wrong epsilon or a missing affine shows), a (2, 6, 8) input, forward and backward.

    /usr/bin/python3 samples/ParityCheck/pytorch/record.py      # writes tiny_transformer.parity.pt beside this file
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "tools", "pytorch"))

from record_parity import record  # noqa: E402
from tiny_transformer import TinyTransformer  # noqa: E402


def main():
    torch.manual_seed(0)
    model = TinyTransformer()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "ln" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    model.eval()
    x = torch.randn(2, 6, 8)
    metadata = record(model, x, os.path.join(HERE, "tiny_transformer.parity.pt"))
    print(f"{len(metadata['call_order'])} calls: {', '.join(metadata['call_order'])}")


if __name__ == "__main__":
    main()
