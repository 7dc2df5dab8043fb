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
The way back (folders written by TorchLinear.Lora, loaded by PEFT): check_from_dotnet.py, results in from_dotnet/.
"""
import os
import shutil
import sys

import torch
from torch import nn

from peft import LoraConfig, PeftModel, get_peft_model
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


if __name__ == "__main__":
    make()
