"""Records TinyGpt's training in PyTorch for samples/TrainingParity, with tools/pytorch/record_parity.py's
record_training. Run with Debian's PyTorch 1.13 and its reference BLAS (the committed file is reproduced byte for byte):
    LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu/blas:/usr/lib/x86_64-linux-gnu/lapack /usr/bin/python3 samples/TrainingParity/pytorch/record.py
Python only makes the file; the sample and the tests read the committed copy."""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "tools", "pytorch"))
sys.path.insert(0, HERE)

from record_parity import record_training  # noqa: E402
import tiny_gpt  # noqa: E402


def main():
    torch.manual_seed(0)
    model = tiny_gpt.TinyGpt()
    optimizer = tiny_gpt.configure_optimizers(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, tiny_gpt.warmup)
    metadata = record_training(model, optimizer, tiny_gpt.batches(), tiny_gpt.loss_fn, os.path.join(HERE, "tiny_gpt.training.pt"),
                               scheduler=scheduler, max_grad_norm=1.0)
    losses = [f"{step['loss']:.4f}" for step in metadata["steps"]]
    print(f"recorded {len(metadata['steps'])} steps of {metadata['module_type']} with {metadata['optimizer']}: loss {losses[0]} -> {losses[-1]}")


if __name__ == "__main__":
    main()
