"""LoRA on Conv2d and Conv1d, made and computed by real PEFT 0.18.1 (lora.Conv2d / lora.Conv1d), not a re-implementation.

PEFT's _ConvNd.update_layer builds lora_A as a convolution of the base's type with the base's kernel_size, stride and
padding (no dilation, no groups, no padding_mode: those keep their defaults) and lora_B as a 1x1 (Conv2d) or kernel-1
(Conv1d) convolution without bias; forward adds lora_B(lora_A(dropout(x))) * scaling; get_delta_weight is
(B A) for a 1x1 Conv2d kernel and conv_fn(A.transpose(0, 1), B).transpose(0, 1) otherwise, times scaling.

Two nets, twins of the tests' ConvNet2d and ConvNet1d (ConvLoraTests.cs):
  ConvNet2d: stem Conv2d(3, 8, 3, padding=1); down Conv2d(8, 16, 3, stride=2, padding=1, bias=False);
             side Conv2d(16, 16, (3, 1), stride=(1, 2), padding=(0, 1)); mix Conv2d(16, 16, 1) (PEFT's 1x1 case);
             head Linear(16, 5); relu between the convs, the mean over the plane before the head.
  ConvNet1d: conv1 Conv1d(4, 8, 3, padding=1); conv2 Conv1d(8, 8, 3, stride=2, bias=False); head Linear(8, 3).

    source /work/realpeft-site/env.sh
    LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu/blas:/usr/lib/x86_64-linux-gnu/lapack /usr/bin/python3 make_conv.py
        writes base_conv2d.safetensors, base_conv1d.safetensors, the adapter folders conv2d/ (with its second adapter
        in conv2d/second/) and conv1d/ (PEFT's save_pretrained), cases.safetensors and peft_facts.json.
        cases.safetensors: <net>.input; <net>.base (PEFT's base model), <net>.unmerged (get_peft_model, the adapter
        set as if trained), <net>.merged (after merge_adapter()), <net>.unmerged_back (after unmerge_adapter()),
        <net>.merged.<path>.weight (each adapted conv's weight while merged: W + get_delta_weight), <net>.loaded
        (PeftModel.from_pretrained of the saved folder on a fresh base), conv2d.second (the second adapter active),
        conv2d.mixed (a mixed batch of conv2d.mixed_input, adapters MIXED by row), conv2d.cat and conv2d.svd
        (add_weighted_adapter of default and second with WEIGHTS; not saved).
        peft_facts.json: what PEFT 0.18.1 does with a groups > 1 conv and with a dilated conv (its messages).
    /usr/bin/python3 make_conv.py --check
        after `TORCHLINEAR_WRITE_FROM_DOTNET=1 dotnet test tests/TorchLinear.Lora.Tests --filter ConvLora` has written
        from_dotnet/: loads each .NET-written folder with PeftModel.from_pretrained, compares PEFT's output with the one
        .NET computed (from_dotnet/outputs.safetensors), and writes from_dotnet/check_report.txt (commit it), which ends
        with the sha256 of every file it checked and of this script.
"""
import hashlib
import json
import os
import shutil
import sys
import warnings

import torch
from torch import nn
from torch.nn import functional as F

import peft
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import load_peft_weights, set_peft_model_state_dict
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "..", "TorchLinear.Tests", "ReferenceData"))
from safetensors_writer import write_safetensors  # noqa: E402


class ConvNet2d(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.side = nn.Conv2d(16, 16, (3, 1), stride=(1, 2), padding=(0, 1))
        self.mix = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.down(x))
        x = F.relu(self.side(x))
        x = self.mix(x)
        return self.head(x.mean((2, 3)))


class ConvNet1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv1d(8, 8, 3, stride=2, bias=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.head(x.mean(2))


NETS = {
    # name: (class, input shape, target_modules)
    "conv2d": (ConvNet2d, (2, 3, 9, 10), ["stem", "down", "side", "mix"]),
    "conv1d": (ConvNet1d, (3, 4, 11), ["conv1", "conv2"]),
}
MIXED = ("second", "default", "__base__", "default")
WEIGHTS = (0.7, -0.4)
SECOND = LoraConfig(r=2, lora_alpha=6, target_modules=["stem", "head"], init_lora_weights=False)


def base_model(name):
    cls = NETS[name][0]
    model = cls()
    model.load_state_dict(load_file(os.path.join(HERE, f"base_{name}.safetensors")))
    return model.eval()


def adapt_and_record(name, cases):
    _, shape, targets = NETS[name]
    torch.manual_seed(10)
    cases[f"{name}.input"] = torch.randn(*shape)
    x = cases[f"{name}.input"]
    with torch.no_grad():
        cases[f"{name}.base"] = base_model(name)(x)
    # init_lora_weights=False: lora_B keeps its kaiming-uniform draw (non-zero), as if trained.
    torch.manual_seed(11)
    model = get_peft_model(base_model(name), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    if name == "conv2d":
        torch.manual_seed(12)
        model.add_adapter("second", SECOND)
    model.eval()
    layers = {path: model.base_model.model.get_submodule(path) for path in targets}
    kinds = sorted({type(layer).__module__ + "." + type(layer).__name__ for layer in layers.values()})
    with torch.no_grad():
        cases[f"{name}.unmerged"] = model(x)
        model.merge_adapter()
        cases[f"{name}.merged"] = model(x)
        for path, layer in layers.items():
            cases[f"{name}.merged.{path}.weight"] = layer.base_layer.weight.detach().clone()
        model.unmerge_adapter()
        cases[f"{name}.unmerged_back"] = model(x)
        if name == "conv2d":
            model.set_adapter("second")
            cases[f"{name}.second"] = model(x)
            model.set_adapter("default")
            # A mixed batch (PEFT's adapter_names; torch 1.13 needs realpeft's hook shim): row i gets MIXED[i]'s update.
            import realpeft_compat  # noqa: F401
            torch.manual_seed(13)
            cases[f"{name}.mixed_input"] = torch.randn(len(MIXED), *shape[1:])
            cases[f"{name}.mixed"] = model(cases[f"{name}.mixed_input"], adapter_names=list(MIXED))
    if name == "conv2d":
        # Weighted combinations of the two adapters (their targets joined), saved with the rest (cat/, svd/).
        for combination in ("cat", "svd"):
            model.add_weighted_adapter(["default", "second"], list(WEIGHTS), combination, combination_type=combination)
            model.set_adapter(combination)
            with torch.no_grad():
                cases[f"{name}.{combination}"] = model(x)
        model.set_adapter("default")
    folder = os.path.join(HERE, name)
    shutil.rmtree(folder, ignore_errors=True)
    # Not the combinations: PEFT 0.18.1's svd combination of a conv leaves lora_A non-contiguous (a reshape of a slice
    # of Vh), which its save_pretrained refuses ("You are trying to save a non contiguous tensor").
    model.save_pretrained(folder, selected_adapters=[a for a in ("default", "second") if a in model.peft_config])
    for root, _, files in os.walk(folder):
        if "README.md" in files:
            os.remove(os.path.join(root, "README.md"))  # PEFT's model card: nothing the tests read
    with torch.no_grad():
        cases[f"{name}.loaded"] = PeftModel.from_pretrained(base_model(name), folder).eval()(x)
    print(f"{name}: {kinds}; saved {sorted(load_file(os.path.join(folder, 'adapter_model.safetensors')))}")


def facts():
    """What PEFT does with what this library refuses: groups > 1 and a dilated conv."""
    out = {"peft": peft.__version__, "torch": torch.__version__}

    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)

        def forward(self, x):
            return self.conv(x)

    try:
        get_peft_model(Grouped(), LoraConfig(r=3, target_modules=["conv"]))
        out["groups2_r3"] = "accepted"
    except ValueError as error:
        out["groups2_r3"] = f"ValueError: {error}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grouped = get_peft_model(Grouped(), LoraConfig(r=4, target_modules=["conv"], init_lora_weights=False))
    out["groups2_r4_warnings"] = sorted({str(w.message) for w in caught if "groups" in str(w.message)})
    out["groups2_r4_lora_B_groups"] = grouped.base_model.model.conv.lora_B["default"].groups
    try:
        grouped.merge_adapter()
        out["groups2_r4_merge"] = "merged"
    except NotImplementedError as error:
        out["groups2_r4_merge"] = f"NotImplementedError: {error}"

    class Dilated(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, padding=2, dilation=2)

        def forward(self, x):
            return self.conv(x)

    dilated = get_peft_model(Dilated(), LoraConfig(r=4, target_modules=["conv"], init_lora_weights=False))
    out["dilated_lora_A_dilation"] = list(dilated.base_model.model.conv.lora_A["default"].dilation)
    try:
        with torch.no_grad():
            dilated(torch.randn(1, 4, 7, 7))
        out["dilated_forward"] = "ran"
    except RuntimeError as error:
        out["dilated_forward"] = f"RuntimeError: {str(error).splitlines()[0]}"
    return out


def make():
    torch.manual_seed(0)
    write_safetensors(ConvNet2d().state_dict(), os.path.join(HERE, "base_conv2d.safetensors"))
    torch.manual_seed(1)
    write_safetensors(ConvNet1d().state_dict(), os.path.join(HERE, "base_conv1d.safetensors"))
    cases = {}
    for name in NETS:
        adapt_and_record(name, cases)
    write_safetensors(cases, os.path.join(HERE, "cases.safetensors"))
    with open(os.path.join(HERE, "peft_facts.json"), "w") as f:
        json.dump(facts(), f, indent=1, sort_keys=True)
        f.write("\n")


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check():
    """PEFT's own loading of the folders .NET wrote, and PEFT's outputs against .NET's."""
    folder = os.path.join(HERE, "from_dotnet")
    outputs = load_file(os.path.join(folder, "outputs.safetensors"))
    lines = [f"check of .NET-written conv adapters by make_conv.py --check, peft {peft.__version__}, torch {torch.__version__}"]
    ok = True
    for name in NETS:
        path = os.path.join(folder, name)
        model = PeftModel.from_pretrained(base_model(name), path).eval()
        kinds = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.endswith("lora.layer")})
        unexpected = set_peft_model_state_dict(model, load_peft_weights(path)).unexpected_keys
        x = outputs[f"{name}.input"]
        with torch.no_grad():
            got = model(x)
            model.merge_adapter()
            merged = model(x)
        for label, value in (("unmerged", got), ("merged", merged)):
            expected = outputs[f"{name}.output"]
            diff = float((value - expected).abs().max())
            try:
                torch.testing.assert_close(value, expected)
                matched = not unexpected
            except AssertionError:
                matched = False
            ok &= matched
            lines.append(f"{name} {label}: {'matched' if matched else 'DIFFERS'}: PeftModel.from_pretrained ({', '.join(kinds)}) "
                         f"gives .NET's output within assert_close (max abs diff {diff:.3g}); unexpected keys: {sorted(unexpected) or 'none'}")
        with torch.no_grad():
            base_diff = float((base_model(name)(x) - outputs[f"{name}.output"]).abs().max())
        lines.append(f"{name}: control, the base model without the adapter: off by {base_diff:.3g}")
    lines.append("result: " + ("all matched" if ok else "MISMATCH"))
    # What was checked, by sha256 (as check_from_dotnet.py's results.json): ConvLoraTests fails when a file differs from
    # the one checked here, when a file is not covered, and when this script changed after the check.
    for rel in sorted(os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/")
                      for d, _, files in os.walk(folder) for f in files if f != "check_report.txt"):
        lines.append(f"sha256 {sha256(os.path.join(folder, rel))} {rel}")
    lines.append(f"sha256 {sha256(os.path.abspath(__file__))} make_conv.py")
    with open(os.path.join(folder, "check_report.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    # PEFT keeps target_modules as a set: its order in adapter_config.json follows the string hash seed.
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, "PYTHONHASHSEED": "0"})
    sys.exit(check() if "--check" in sys.argv[1:] else make())
