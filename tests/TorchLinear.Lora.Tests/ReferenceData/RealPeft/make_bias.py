"""Adapters with trained biases, made and checked by real PEFT 0.18.1 (not a re-implementation of its formulas).

PEFT's LoRA layer holds its Linear as `base_layer`, and save_pretrained keeps every state_dict key that contains "bias":
the bias of an ADAPTED layer is saved as `base_model.model.<path>.base_layer.bias`, the bias of a layer no adapter
adapts (bias="all") as `base_model.model.<path>.bias`. PEFT loads with strict=False, so a plain `<path>.bias` for an
adapted layer is dropped without a word. With bias="lora_only", PEFT 0.18.1 saves no bias at all (its
`k.split("lora_")[0] + "bias"` names `<path>.bias`, which a LoRA layer does not have), although it trains them.

The model is the tests' Mlp port (Ports.Mlp: Linear(16, 32), ReLU, Linear(32, 8); paths "0" and "2"), adapted at "0".

    source /work/realpeft-site/env.sh          # PEFT 0.18.1 and transformers from source (see the README of realpeft)
    LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu/blas:/usr/lib/x86_64-linux-gnu/lapack /usr/bin/python3 make_bias.py
        writes base.safetensors, bias_all/, bias_lora_only/ and bias_all_saved/ (PEFT's save_pretrained) and cases.safetensors:
        input; <name>_trained, PEFT's output of the model it trained; <name>_loaded, PEFT's output after
        PeftModel.from_pretrained of the saved folder on a fresh base model.
    /usr/bin/python3 make_bias.py --check
        after `TORCHLINEAR_WRITE_FROM_DOTNET=1 dotnet test tests/TorchLinear.Lora.Tests --filter RealPeft` has written
        from_dotnet/: loads each .NET-written folder with PeftModel.from_pretrained, compares PEFT's output with the one
        .NET computed (from_dotnet/outputs.safetensors), and writes from_dotnet/check_report.txt (commit it).
"""
import os
import shutil
import sys
import tempfile

import torch
from torch import nn

import peft
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import load_peft_weights, set_peft_model_state_dict
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "TorchLinear.Tests", "ReferenceData"))
from safetensors_writer import write_safetensors  # noqa: E402

NAMES = ("bias_all", "bias_lora_only")
# PEFT's save of bias="all" with modules_to_save also keeps the wrapper's "<module>.modules_to_save.bias" and
# "<module>.original_module.bias" (they contain "bias"); loading, PEFT drops the first and puts the second into the
# original module. Made here, not written from .NET.
MADE = NAMES + ("bias_all_saved",)


class Mlp(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def base_model():
    model = Mlp()
    model.load_state_dict(load_file(os.path.join(HERE, "base.safetensors")))
    return model.eval()


def make():
    torch.manual_seed(0)
    write_safetensors(Mlp().state_dict(), os.path.join(HERE, "base.safetensors"))
    torch.manual_seed(1)
    cases = {"input": torch.randn(6, 16)}
    for name in MADE:
        bias = "all" if name == "bias_all_saved" else name[len("bias_"):]
        saved_modules = ["2"] if name == "bias_all_saved" else None
        torch.manual_seed(2)
        model = get_peft_model(base_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["0"], bias=bias, modules_to_save=saved_modules))
        with torch.no_grad():
            # As if trained: lora_B away from zero, and every bias PEFT trains for this mode moved.
            layer = model.base_model.model[0]
            layer.lora_B["default"].weight.copy_(torch.randn(32, 4) * 0.1)
            for key, parameter in model.named_parameters():
                if parameter.requires_grad and (key.endswith("bias") or ".modules_to_save." in key):
                    parameter.add_(torch.randn_like(parameter) * 0.1)
        trained = sorted(k for k, p in model.named_parameters() if p.requires_grad)
        model.eval()
        folder = os.path.join(HERE, name)
        shutil.rmtree(folder, ignore_errors=True)
        model.save_pretrained(folder)
        os.remove(os.path.join(folder, "README.md"))  # PEFT's model card: nothing the tests read
        with torch.no_grad():
            cases[f"{name}_trained"] = model(cases["input"])
            cases[f"{name}_loaded"] = PeftModel.from_pretrained(base_model(), folder).eval()(cases["input"])
        saved = sorted(load_file(os.path.join(folder, "adapter_model.safetensors")))
        print(f"{name}: trained {trained}; saved {saved}; loaded differs from trained by "
              f"{float((cases[f'{name}_loaded'] - cases[f'{name}_trained']).abs().max()):.3g}")
    write_safetensors(cases, os.path.join(HERE, "cases.safetensors"))


def check():
    """PEFT's own loading of the folders .NET wrote: every key used, and PEFT's outputs against .NET's."""
    folder = os.path.join(HERE, "from_dotnet")
    outputs = load_file(os.path.join(folder, "outputs.safetensors"))
    lines = [f"check of .NET-written adapters by make_bias.py --check, peft {peft.__version__}, torch {torch.__version__}"]
    ok = True
    for name in NAMES:
        path = os.path.join(folder, name)
        model = PeftModel.from_pretrained(base_model(), path).eval()
        # The keys PEFT's load_state_dict(strict=False) would leave out without a word.
        unexpected = set_peft_model_state_dict(model, load_peft_weights(path)).unexpected_keys
        with torch.no_grad():
            got = model(outputs["input"])
        expected = outputs[name]
        diff = float((got - expected).abs().max())
        try:
            torch.testing.assert_close(got, expected)
            matched = not unexpected
        except AssertionError:
            matched = False
        ok &= matched
        lines.append(f"{name}: {'matched' if matched else 'DIFFERS'}: PeftModel.from_pretrained gives .NET's output "
                     f"within assert_close (max abs diff {diff:.3g}); unexpected keys: {sorted(unexpected) or 'none'}")
        # The control: the same folder with the adapted layer's bias under its plain key, as this library wrote it before.
        with tempfile.TemporaryDirectory() as old:
            weights = load_file(os.path.join(path, "adapter_model.safetensors"))
            write_safetensors({k.replace(".base_layer.bias", ".bias"): v for k, v in weights.items()},
                              os.path.join(old, "adapter_model.safetensors"))
            shutil.copy(os.path.join(path, "adapter_config.json"), old)
            with torch.no_grad():
                dropped = PeftModel.from_pretrained(base_model(), old).eval()(outputs["input"])
            lines.append(f"{name}: control, the plain '<path>.bias' key: PEFT's output off by "
                         f"{float((dropped - expected).abs().max()):.3g}")
    lines.append("result: " + ("all matched" if ok else "MISMATCH"))
    with open(os.path.join(folder, "check_report.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(check() if "--check" in sys.argv[1:] else make())
