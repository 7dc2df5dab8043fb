"""LoRA adapters made, saved, reloaded and run by real Hugging Face PEFT 0.18.1, for the TorchLinear.Lora tests.

Every folder here is PEFT's own: get_peft_model on a small PyTorch model, a few Adam steps, save_pretrained (PEFT's
model card README.md removed: nothing reads it); the recorded outputs come from PEFT's PeftModel.from_pretrained of
the saved folder on a fresh copy of the pretrained model (so they are what PEFT computes FROM THE FOLDER the tests
load: with bias="lora_only" PEFT 0.18.1 trains the adapted layers' biases but saves none, and its reloaded model keeps
the pretrained ones). No formula of PEFT's is re-implemented here. PEFT's version is in each folder's
adapter_config.json ("peft_version", written by PEFT) and in README.md.

    source /work/realpeft-site/env.sh        # PEFT 0.18.1 and transformers from source: ../../../../../shared/realpeft
    LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu/blas:/usr/lib/x86_64-linux-gnu/lapack \\
        /usr/bin/python3 tests/TorchLinear.Lora.Tests/ReferenceData/Peft/make_peft_adapters.py
(Debian's PyTorch 1.13 with its reference BLAS: rerunning reproduces the committed files byte for byte.)

Folders (each: base.safetensors, the pretrained model; adapter_config.json and adapter_model.safetensors/.bin, PEFT's;
cases.safetensors): mlp (bias "all", paths "0" and "2"), attention (rsLoRA, rank_pattern, alpha_pattern, bias
"lora_only", modules_to_save, task_type SEQ_CLS), attention_bf16_bin (a target regex, a bfloat16 adapter in PEFT's
adapter_model.bin), attention_excluded (exclude_modules as a regex). cases.safetensors holds: input; base_output (the
pretrained model); adapted_output (PeftModel.from_pretrained of the folder); disabled_output (inside PEFT's
disable_adapter()); merged_output (after PEFT's merge_adapter()); unloaded_output (PEFT's merge_and_unload()); and
trained_output (PEFT's model as trained, before saving: differs from adapted_output where PEFT's save drops something).
seeded_init.safetensors: lora_A of the adapters PEFT's get_peft_model puts in under torch.manual_seed(123).
make_peft_breadth.py makes the named, dora and embedding folders the same way.
"""
import json
import math
import os
import shutil
import sys

# PEFT keeps target_modules as a set and writes it as a list in the set's order, which follows Python's string hashes:
# a fixed hash seed makes adapter_config.json the same on every run.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import torch
from torch import nn

import peft
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
# The one hand-written safetensors writer of the repository's reference-data scripts (for base and cases files only).
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "TorchLinear.Tests", "ReferenceData"))
from safetensors_writer import write_safetensors  # noqa: E402  (tests/TorchLinear.Tests/ReferenceData/safetensors_writer.py)


class Mlp(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(24, 24)
        self.k_proj = nn.Linear(24, 8)   # non-square projections, as in grouped-query attention
        self.v_proj = nn.Linear(24, 8)
        self.o_proj = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.q_proj(x)[..., :8], self.k_proj(x), self.v_proj(x)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1)
        return self.o_proj(weights @ v)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = SelfAttention()

    def forward(self, x):
        return x + self.self_attn(x)


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Layer(), Layer()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class Classifier(nn.Module):
    """model.layers.N.self_attn.{q,k,v,o}_proj, then a classifier head on the mean over time."""

    def __init__(self):
        super().__init__()
        self.model = Inner()
        self.classifier = nn.Linear(24, 3)

    def forward(self, x):
        return self.classifier(self.model(x).mean(dim=-2))


def pretrained(build, folder):
    """A fresh copy of the pretrained model of a folder, in eval mode."""
    model = build()
    model.load_state_dict(load_file(os.path.join(folder, "base.safetensors")))
    return model.eval()


def call(model, x, **kwargs):
    # PeftModelForSequenceClassification's forward takes transformers' keyword arguments; these models take x alone.
    # Its base_model (PEFT's LoraModel) runs the adapted model as PeftModel's forward does.
    if isinstance(model, PeftModel) and type(model) is not PeftModel:
        return model.base_model(x, **kwargs)
    return model(x, **kwargs)


def train(model, x, steps, lr=0.05):
    """Adam on what PEFT made trainable, towards a random target (seeded by the caller)."""
    with torch.no_grad():
        target = torch.randn_like(call(model, x))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(call(model, x), target).backward()
        optimizer.step()
    model.eval()


def save(model, folder, **kwargs):
    """PEFT's save_pretrained into a clean folder, its model card removed."""
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        if name.startswith("adapter_") or name == "README.md":
            os.remove(path)
        elif os.path.isdir(path):
            shutil.rmtree(path)
    model.save_pretrained(folder, **kwargs)
    for root, _, files in os.walk(folder):
        if "README.md" in files:
            os.remove(os.path.join(root, "README.md"))


def outputs(model, x):
    with torch.no_grad():
        return call(model, x).detach().clone()


def make(name, build, config, x, safe_serialization=True, dtype=None, steps=25):
    folder = os.path.join(HERE, name)
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(0)
    write_safetensors(build().state_dict(), os.path.join(folder, "base.safetensors"))
    torch.manual_seed(1)
    model = get_peft_model(pretrained(build, folder), config)
    train(model, x, steps)
    if dtype is not None:
        # An adapter kept in another dtype (as published adapters are): PEFT saves each tensor in its own dtype.
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.to(dtype)
    cases = {"input": x, "trained_output": outputs(model, x)}
    save(model, folder, safe_serialization=safe_serialization)

    # What PEFT computes from the folder: a fresh pretrained model, PeftModel.from_pretrained, each operation.
    fresh = pretrained(build, folder)
    cases["base_output"] = outputs(fresh, x)
    loaded = PeftModel.from_pretrained(fresh, folder).eval()
    cases["adapted_output"] = outputs(loaded, x)
    with loaded.disable_adapter():
        cases["disabled_output"] = outputs(loaded, x)
    loaded.merge_adapter()
    cases["merged_output"] = outputs(loaded, x)
    loaded.unmerge_adapter()
    unloaded = loaded.merge_and_unload()
    cases["unloaded_output"] = outputs(unloaded, x)
    write_safetensors(cases, os.path.join(folder, "cases.safetensors"))
    saved = sorted(os.listdir(folder))
    print(f"{name}: {saved}; adapted output moved by {float((cases['adapted_output'] - cases['base_output']).abs().max()):.3f}")


def seeded_init():
    """lora_A of a fresh adapter under torch.manual_seed(123), as PEFT's get_peft_model draws it."""
    torch.manual_seed(0)
    model = Classifier().eval()
    torch.manual_seed(123)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    state = {k.replace("base_model.model.", "").replace(".default.", "."): v.detach().clone()
             for k, v in model.state_dict().items() if ".lora_A." in k}
    write_safetensors(state, os.path.join(HERE, "seeded_init.safetensors"))
    print(f"seeded_init: {', '.join(state)}")


def main():
    assert peft.__version__ == "0.18.1", f"made with PEFT 0.18.1, this is {peft.__version__} (source /work/realpeft-site/env.sh)"
    seeded_init()
    torch.manual_seed(5)
    make("mlp", Mlp, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], bias="all"), torch.randn(6, 16))
    make("attention", Classifier,
         LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "self_attn.o_proj"], rank_pattern={"o_proj": 2},
                    alpha_pattern={"layers.1.self_attn.v_proj": 32}, use_rslora=True, bias="lora_only",
                    modules_to_save=["classifier"], task_type="SEQ_CLS"),
         torch.randn(2, 5, 24))
    make("attention_bf16_bin", Classifier,
         LoraConfig(r=2, lora_alpha=4, target_modules=r".*\.self_attn\.(q|k)_proj"),
         torch.randn(2, 5, 24), safe_serialization=False, dtype=torch.bfloat16)
    # exclude_modules as PEFT writes it for a string: a regular expression the whole path must match.
    make("attention_excluded", Classifier,
         LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], exclude_modules=r"model\.layers\.1\..*"),
         torch.randn(2, 5, 24))


if __name__ == "__main__":
    main()
