"""Real checkpoints as users meet them, written by real PyTorch, for the refusal messages and the load options.

Run with Debian's PyTorch 1.13 (apt-get install python3-torch), from any folder:
    /usr/bin/python3 tests/TorchLinear.Tests/ReferenceData/Checkpoints/make_real_checkpoints.py

One small convolutional network (a stem conv + BatchNorm2d, 12 blocks of conv + BatchNorm2d, a linear head: 80 keys,
every BatchNorm with running statistics after 3 training batches), saved with torch.save as:
  real_plain.pt        net.state_dict();
  real_dataparallel.pt nn.DataParallel(net).state_dict(): every key starts with 'module.';
  real_half.pt         a copy converted with .half(): floating-point tensors float16 (num_batches_tracked stays int64);
  real_nbt_int32.pt    the plain state_dict with each num_batches_tracked stored as int32;
  real_no_nbt.pt       the plain state_dict without num_batches_tracked, as BatchNorm saved before PyTorch 0.4.1;
  real_checkpoints.json facts measured here with PyTorch: the key count, the num_batches_tracked the net holds, and what
                       PyTorch's own load_state_dict (strict) puts into num_batches_tracked from real_no_nbt.pt.
About 130 KB in all; rerunning the script reproduces them byte for byte. Python only generates these files; the tests read the committed copies.
"""
import copy
import json
import os
from collections import OrderedDict

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
BLOCKS = 12
CHANNELS = 2


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(CHANNELS)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, CHANNELS, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(CHANNELS)
        self.blocks = nn.Sequential(*[Block() for _ in range(BLOCKS)])
        self.head = nn.Linear(CHANNELS, 2)

    def forward(self, x):
        x = self.blocks(torch.relu(self.stem_bn(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))


def save(state, name):
    torch.save(state, os.path.join(HERE, name))


def main():
    torch.manual_seed(0)
    net = SmallNet()
    net.train()
    for _ in range(3):  # running statistics that are not the initial ones, num_batches_tracked = 3
        net(torch.randn(4, 3, 5, 5))
    net.eval()
    plain = net.state_dict()
    save(plain, "real_plain.pt")

    wrapped = nn.DataParallel(net)  # on a machine without CUDA it only wraps: the keys get 'module.'
    dp = wrapped.state_dict()
    assert all(k.startswith("module.") for k in dp), list(dp)[:3]
    save(dp, "real_dataparallel.pt")

    half = copy.deepcopy(net).half().state_dict()
    assert half["stem.weight"].dtype == torch.float16 and half["stem_bn.num_batches_tracked"].dtype == torch.int64
    save(half, "real_half.pt")

    save(OrderedDict((k, v.to(torch.int32) if k.endswith("num_batches_tracked") else v) for k, v in plain.items()),
         "real_nbt_int32.pt")

    old = OrderedDict((k, v) for k, v in plain.items() if not k.endswith("num_batches_tracked"))
    save(old, "real_no_nbt.pt")

    # What PyTorch itself does with the old checkpoint: BatchNorm's _load_from_state_dict fills a missing
    # num_batches_tracked with 0 when the state_dict's metadata has no version >= 2 (a plain dict has none).
    fresh = SmallNet()
    for module in fresh.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.num_batches_tracked.fill_(7)  # a value the fill must overwrite
    fresh.load_state_dict(torch.load(os.path.join(HERE, "real_no_nbt.pt")), strict=True)
    filled = sorted({int(m.num_batches_tracked) for m in fresh.modules() if isinstance(m, nn.BatchNorm2d)})

    facts = {
        "torch": torch.__version__,
        "keys": len(plain),
        "num_batches_tracked_keys": sum(k.endswith("num_batches_tracked") for k in plain),
        "num_batches_tracked": int(plain["stem_bn.num_batches_tracked"]),
        "pytorch_fills_missing_num_batches_tracked_with": filled,
    }
    with open(os.path.join(HERE, "real_checkpoints.json"), "w") as f:
        json.dump(facts, f, indent=2)
        f.write("\n")
    print(facts)


if __name__ == "__main__":
    main()
