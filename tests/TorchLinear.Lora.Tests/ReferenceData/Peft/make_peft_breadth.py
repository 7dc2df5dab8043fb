"""Reference data for the LoRA features beyond one adapter — several named adapters, mixed-adapter batches, weighted
combinations, DoRA and embedding adapters — made, saved, reloaded and run by real Hugging Face PEFT 0.18.1.

As make_peft_adapters.py (which says how to run PEFT here): each folder's adapters are PEFT's get_peft_model /
add_adapter, trained a few Adam steps, written by PEFT's save_pretrained (the "default" adapter in the folder, another
in a sub-folder named after it); every recorded output comes from PEFT's PeftModel.from_pretrained / load_adapter of
the saved folders on a fresh copy of the pretrained model. PEFT's mixed batches (model(x, adapter_names=[...])) need
realpeft_compat (../shared/realpeft: torch 1.13 lacks forward pre-hooks with keyword arguments).

    source /work/realpeft-site/env.sh
    LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu/blas:/usr/lib/x86_64-linux-gnu/lapack \\
        /usr/bin/python3 tests/TorchLinear.Lora.Tests/ReferenceData/Peft/make_peft_breadth.py
(reference BLAS: the committed files are reproduced byte for byte.) Then, under PEFT v0.19.1 (setup.sh with
PEFT_REF=v0.19.1 into another folder, e.g. /tmp/realpeft-019; source its env.sh), the same command with
--linear-negative writes named/linear_mix_peft_0.19.1.safetensors (see linear_negative).

named/: "default" (r 4 on q_proj, v_proj), "other" (r 8, alpha 4 on q_proj, k_proj, o_proj), "third" (r 4, alpha 16 on
  q_proj, v_proj); cases: output_<name> with one adapter active, output_default_other with two (LoraModel.set_adapter
  of a list), output_mixed (adapter_names = mixed_rows.json), output_{cat,linear,svd}_mix (add_weighted_adapter; PEFT's
  svd weighs each update, which holds its scaling already, by its scaling again), merged_default_other (merge_adapter
  with both active), unloaded_other (merge_and_unload with "other" active).
dora/: use_dora on every projection, trained 15 steps; adapted_output, merged_output (merge_adapter), unloaded_output
  (merge_and_unload), target and grad/<path>.<tensor>: one step's gradients with PEFT's from_pretrained(is_trainable).
embedding/: an nn.Embedding and a Linear adapted; adapted_output, output_mixed, merged_output, unloaded_output.
"""
import json
import os
import sys

# PEFT keeps target_modules as a set and writes it as a list in the set's order, which follows Python's string hashes:
# a fixed hash seed makes adapter_config.json the same on every run.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import torch
from torch import nn
from torch.nn import functional as F
from safetensors.torch import load_file

import realpeft_compat  # noqa: F401  (PEFT's mixed batches on torch 1.13)
import peft
from peft import LoraConfig, PeftModel, get_peft_model

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "TorchLinear.Tests", "ReferenceData"))
from safetensors_writer import write_safetensors  # noqa: E402
from make_peft_adapters import Classifier, outputs, pretrained, save, train  # noqa: E402


def base(folder, build):
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(0)
    write_safetensors(build().state_dict(), os.path.join(folder, "base.safetensors"))


def named_and_weighted():
    """Three adapters on the attention classifier, each trained alone; PEFT's outputs of each active, of two active
    together, of a mixed batch, of add_weighted_adapter's cat, linear and svd, merged and unloaded."""
    folder = os.path.join(HERE, "named")
    base(folder, Classifier)
    specs = {
        "default": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "other": dict(r=8, lora_alpha=4, target_modules=["q_proj", "k_proj", "o_proj"]),
        "third": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    }
    torch.manual_seed(11)
    x = torch.randn(4, 5, 24)
    model = None
    for seed, (name, spec) in enumerate(specs.items(), start=20):
        torch.manual_seed(seed)
        if model is None:
            model = get_peft_model(pretrained(Classifier, folder), LoraConfig(**spec))
        else:
            model.add_adapter(name, LoraConfig(**spec))
            model.set_adapter(name)   # trains this one alone
        train(model, x, steps=20)
    save(model, folder)

    fresh = pretrained(Classifier, folder)
    cases = {"input": x, "base_output": outputs(fresh, x)}
    loaded = PeftModel.from_pretrained(fresh, folder)
    for name in list(specs)[1:]:
        loaded.load_adapter(os.path.join(folder, name), adapter_name=name)
    loaded.eval()
    for name in specs:
        loaded.set_adapter(name)
        cases[f"output_{name}"] = outputs(loaded, x)
    loaded.base_model.set_adapter(["default", "other"])
    cases["output_default_other"] = outputs(loaded, x)
    loaded.merge_adapter()
    cases["merged_default_other"] = outputs(loaded, x)
    loaded.unmerge_adapter()
    loaded.set_adapter("default")
    rows = ["other", "__base__", "default", "other"]
    with torch.no_grad():
        cases["output_mixed"] = loaded(x, adapter_names=rows).detach().clone()
    for name, adapters, weights, combination, svd_rank in [
            ("cat_mix", ["default", "other"], [1.0, 0.5], "cat", None),
            ("linear_mix", ["default", "third"], [0.7, -0.4], "linear", None),
            ("linear_pos", ["default", "third"], [0.7, 0.4], "linear", None),
            ("svd_mix", ["default", "other"], [0.6, 0.8], "svd", 6)]:
        loaded.add_weighted_adapter(adapters, weights, name, combination_type=combination, svd_rank=svd_rank)
        loaded.set_adapter(name)
        cases[f"output_{name}"] = outputs(loaded, x)
    loaded.set_adapter("other")
    cases["unloaded_other"] = outputs(loaded.merge_and_unload(adapter_names=["other"]), x)
    write_safetensors(cases, os.path.join(folder, "cases.safetensors"))
    with open(os.path.join(folder, "mixed_rows.json"), "w") as f:
        json.dump(rows, f)
    print(f"named: {', '.join(specs)}; {sorted(cases)}")


def dora():
    """A DoRA adapter on every projection of the attention classifier, trained so the magnitudes move away from the
    norms; PEFT's outputs unmerged and merged, and the gradients of one step."""
    folder = os.path.join(HERE, "dora")
    base(folder, Classifier)
    torch.manual_seed(12)
    x = torch.randn(3, 5, 24)
    model = get_peft_model(pretrained(Classifier, folder),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_dora=True))
    train(model, x, steps=15)
    save(model, folder)

    fresh = pretrained(Classifier, folder)
    cases = {"input": x, "base_output": outputs(fresh, x)}
    loaded = PeftModel.from_pretrained(fresh, folder, is_trainable=True).eval()
    cases["adapted_output"] = outputs(loaded, x)
    # One training step's gradients (eval mode: lora_dropout is 0), for a target that does not depend on the model.
    torch.manual_seed(13)
    target = torch.randn(3, 3)
    F.mse_loss(loaded(x), target).backward()
    cases["target"] = target
    moved = 0.0
    for path, module in loaded.base_model.model.named_modules():
        if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_magnitude_vector:
            cases[f"grad/{path}.lora_A"] = module.lora_A["default"].weight.grad.clone()
            cases[f"grad/{path}.lora_B"] = module.lora_B["default"].weight.grad.clone()
            magnitude = module.lora_magnitude_vector["default"].weight
            cases[f"grad/{path}.lora_magnitude_vector"] = magnitude.grad.clone()
            moved = max(moved, float((magnitude - module.base_layer.weight.norm(dim=1)).abs().max()))
    loaded.merge_adapter()
    cases["merged_output"] = outputs(loaded, x)
    loaded.unmerge_adapter()
    cases["unloaded_output"] = outputs(loaded.merge_and_unload(), x)
    write_safetensors(cases, os.path.join(folder, "cases.safetensors"))
    print(f"dora: magnitudes up to {moved:.3f} from the base weight's row norms; {sorted(k for k in cases if not k.startswith('grad/'))}")


class EmbedModel(nn.Module):
    """emb (an Embedding), fc and head (Linear): an embedding adapter beside a linear one."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 12)
        self.fc = nn.Linear(12, 12)
        self.head = nn.Linear(12, 4)

    def forward(self, idx):
        return self.head(torch.tanh(self.fc(self.emb(idx)))).mean(dim=-2)


def embedding():
    """LoRA on an nn.Embedding (lora_embedding_A/B) and a Linear, trained; PEFT's outputs unmerged, merged, mixed."""
    folder = os.path.join(HERE, "embedding")
    base(folder, EmbedModel)
    torch.manual_seed(14)
    x = torch.randint(0, 10, (3, 7))
    model = get_peft_model(pretrained(EmbedModel, folder), LoraConfig(r=4, lora_alpha=8, target_modules=["emb", "fc"]))
    train(model, x, steps=20)
    save(model, folder)

    fresh = pretrained(EmbedModel, folder)
    cases = {"input": x, "base_output": outputs(fresh, x)}
    loaded = PeftModel.from_pretrained(fresh, folder).eval()
    cases["adapted_output"] = outputs(loaded, x)
    rows = ["default", "__base__", "default"]
    with torch.no_grad():
        cases["output_mixed"] = loaded(x, adapter_names=rows).detach().clone()
    loaded.merge_adapter()
    cases["merged_output"] = outputs(loaded, x)
    loaded.unmerge_adapter()
    cases["unloaded_output"] = outputs(loaded.merge_and_unload(), x)
    write_safetensors(cases, os.path.join(folder, "cases.safetensors"))
    print(f"embedding: {sorted(cases)}")


def linear_negative():
    """PEFT 0.18.1's "linear" combination gives sqrt|w s| the weight's sign on BOTH lora_A and lora_B, so a negative
    weight's sign cancels in B A (PEFT's bug, fixed in v0.19.0 by #2918, "apply sign only on one side"). Run under
    PEFT v0.19.1 (a second export of ../shared/realpeft/setup.sh with PEFT_REF=v0.19.1), this records the fixed
    combination of the folders PEFT 0.18.1 wrote into named/linear_mix_peft_0.19.1.safetensors."""
    assert peft.__version__ == "0.19.1", f"--linear-negative runs under PEFT 0.19.1, this is {peft.__version__}"
    folder = os.path.join(HERE, "named")
    loaded = PeftModel.from_pretrained(pretrained(Classifier, folder), folder)
    loaded.load_adapter(os.path.join(folder, "third"), adapter_name="third")
    loaded.eval()
    loaded.add_weighted_adapter(["default", "third"], [0.7, -0.4], "linear_mix", combination_type="linear")
    loaded.set_adapter("linear_mix")
    x = load_file(os.path.join(folder, "cases.safetensors"))["input"]
    write_safetensors({"output_linear_mix": outputs(loaded, x)}, os.path.join(folder, "linear_mix_peft_0.19.1.safetensors"))
    print(f"linear_mix under PEFT {peft.__version__}")


def main():
    if "--linear-negative" in sys.argv[1:]:
        linear_negative()
        return
    assert peft.__version__ == "0.18.1", f"made with PEFT 0.18.1, this is {peft.__version__} (source /work/realpeft-site/env.sh)"
    named_and_weighted()
    dora()
    embedding()


if __name__ == "__main__":
    main()
