"""LoRA adapters in Hugging Face PEFT's file layout, made with real PyTorch, for the TorchLinear.Lora tests.

PEFT itself is not installable on the machine that made these files, so this script applies LoRA as PEFT's
documentation and source define it, and writes PEFT's files by hand:
  * a LoRA layer computes  base(x) + lora_B(lora_A(dropout(x))) * scaling,  scaling = lora_alpha / r, or
    lora_alpha / sqrt(r) with use_rslora; lora_A is nn.Linear(in, r, bias=False), kaiming-uniform (a = sqrt(5)),
    lora_B nn.Linear(r, out, bias=False), zeros; rank_pattern / alpha_pattern override r / lora_alpha for the modules
    whose path ends with (or, as a regex, fully matches the end of) a pattern key;
  * adapter_config.json holds the LoraConfig fields; adapter_model.safetensors (or adapter_model.bin, a torch.save
    file) holds the tensors under "base_model.model.<module path>.lora_A.weight" / ".lora_B.weight" (no adapter name),
    the biases that bias="lora_only"/"all" trains under their plain names, and each modules_to_save module's full
    state under its plain names. (Real PEFT, since its layers hold the Linear as base_layer, saves an ADAPTED layer's
    bias as "<path>.base_layer.bias", and with bias="lora_only" none at all: these folders stand for older ones, which
    TorchLinear.Lora still reads; ../RealPeft/make_bias.py has PEFT 0.18.1's own.)
Run with Debian's PyTorch 1.13 (apt-get install python3-torch):
    /usr/bin/python3 tests/TorchLinear.Lora.Tests/ReferenceData/Peft/make_peft_adapters.py
For each adapter folder it also writes base.safetensors (the pretrained model), and cases.safetensors: inputs, the base
model's outputs, the adapted model's outputs, and the outputs with the adapter disabled as PEFT's disable_adapter() does. Python only generates these files; the tests read the committed copies.
"""
import json
import math
import os
import re
import sys

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
# The one hand-written safetensors writer of the repository's reference-data scripts.
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


class LoraLayer(nn.Module):
    """PEFT's lora.Linear for one adapter, as its source computes it."""

    def __init__(self, base, r, alpha, rslora):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.enabled = True

    def forward(self, x):
        if not self.enabled:
            return self.base_layer(x)
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling


def names(entries, path):
    return path in entries or any(path.endswith("." + e) for e in entries)


def matches(config, path):
    # PEFT's check_target_module_exists: exclude_modules first (a string is a full-match regex, a list names).
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str) and re.fullmatch(exclude, path) is not None:
        return False
    if isinstance(exclude, list) and names(exclude, path):
        return False
    target = config["target_modules"]
    if isinstance(target, str):
        return re.fullmatch(target, path) is not None
    return names(target, path)


def pattern(patterns, path, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def inject(model, config):
    adapted = []
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and matches(config, path) and not any(
                path == m or path.endswith("." + m) for m in (config.get("modules_to_save") or [])):
            r = pattern(config["rank_pattern"], path, config["r"])
            alpha = pattern(config["alpha_pattern"], path, config["lora_alpha"])
            parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
            setattr(parent, path.rsplit(".", 1)[-1], LoraLayer(module, r, alpha, config["use_rslora"]))
            adapted.append(path)
    return adapted


def make(name, build, config, inputs, file="adapter_model.safetensors", dtype=torch.float32, steps=25):
    folder = os.path.join(HERE, name)
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(0)
    model = build().eval()
    write_safetensors(model.state_dict(), os.path.join(folder, "base.safetensors"))
    with torch.no_grad():
        base_out = model(inputs)
    torch.manual_seed(1)
    originals = {m: {k: v.clone() for k, v in model.get_submodule(m).state_dict().items()} for m in config.get("modules_to_save") or []}
    adapted = inject(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = []
    for path in adapted:
        layer = model.get_submodule(path)
        trainable += [layer.lora_A.weight, layer.lora_B.weight]
        if config["bias"] in ("lora_only", "all") and layer.base_layer.bias is not None:
            trainable.append(layer.base_layer.bias)
    if config["bias"] == "all":
        trainable += [p for n, p in model.named_parameters() if n.endswith("bias")]
    for m in config.get("modules_to_save") or []:
        trainable += list(model.get_submodule(m).parameters())
    trainable = list({id(p): p for p in trainable}.values())  # bias="all" names the adapted layers' biases twice
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(trainable, lr=0.05)
    target = torch.randn_like(base_out)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), target).backward()
        optimizer.step()
    with torch.no_grad():
        # The file holds the adapter in `dtype`: the outputs are those of the weights as saved.
        for p in trainable:
            p.copy_(p.to(dtype).to(p.dtype))
        adapted_out = model(inputs)
        # What PEFT's disable_adapter() computes: no low-rank updates, and each modules_to_save module as it was before
        # training; biases trained with bias="all"/"lora_only" are the base layers' own and stay trained.
        for path in adapted:
            model.get_submodule(path).enabled = False
        trained = {m: {k: v.clone() for k, v in model.get_submodule(m).state_dict().items()} for m in originals}
        for m, state in originals.items():
            model.get_submodule(m).load_state_dict(state)
        disabled_out = model(inputs)
        for m, state in trained.items():
            model.get_submodule(m).load_state_dict(state)
        for path in adapted:
            model.get_submodule(path).enabled = True

    # PEFT's adapter state: lora weights under the base model's paths, trained biases, modules_to_save in full.
    state = {}
    for path in adapted:
        layer = model.get_submodule(path)
        state[f"base_model.model.{path}.lora_A.weight"] = layer.lora_A.weight
        state[f"base_model.model.{path}.lora_B.weight"] = layer.lora_B.weight
        if config["bias"] == "lora_only" and layer.base_layer.bias is not None:
            state[f"base_model.model.{path}.bias"] = layer.base_layer.bias
    if config["bias"] == "all":
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                state["base_model.model." + n.replace(".base_layer", "")] = p
    for m in config.get("modules_to_save") or []:
        for n, p in model.get_submodule(m).state_dict().items():
            state[f"base_model.model.{m}.{n}"] = p
    state = {k: v.detach().to(dtype) for k, v in state.items()}
    if file.endswith(".safetensors"):
        write_safetensors(state, os.path.join(folder, file), {"format": "pt"})
    else:
        torch.save(state, os.path.join(folder, file))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    write_safetensors({"input": inputs, "base_output": base_out, "adapted_output": adapted_out, "disabled_output": disabled_out},
                      os.path.join(folder, "cases.safetensors"))
    print(f"{name}: adapted {', '.join(adapted)}; {len(state)} tensors; output moved by {float((adapted_out - base_out).abs().max()):.3f}")


def config(**fields):
    # A configuration as PEFT 0.13 writes it: about 30 keys, some of which TorchLinear does not read.
    base = {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": None, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8, "lora_dropout": 0.0,
        "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None, "peft_type": "LORA", "r": 8,
        "rank_pattern": {}, "revision": None, "target_modules": None, "task_type": None, "use_dora": False,
        "use_rslora": False,
    }
    base.update(fields)
    return base


def seeded_init():
    """lora_A of a fresh adapter under torch.manual_seed(123), drawn in PEFT's order: lora_A and lora_B made as
    nn.Linear layers, then lora_A reset with kaiming-uniform and lora_B zeroed (LoraLayer above)."""
    torch.manual_seed(0)
    model = Classifier().eval()
    torch.manual_seed(123)
    adapted = inject(model, config(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    state = {f"{path}.lora_A.weight": model.get_submodule(path).lora_A.weight.detach() for path in adapted}
    write_safetensors(state, os.path.join(HERE, "seeded_init.safetensors"))
    print(f"seeded_init: lora_A of {', '.join(adapted)}")


def main():
    seeded_init()
    torch.manual_seed(5)
    make("mlp", Mlp, config(r=4, lora_alpha=8, target_modules=["0", "2"], bias="all"), torch.randn(6, 16))
    make("attention", Classifier,
         config(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "self_attn.o_proj"], rank_pattern={"o_proj": 2},
                alpha_pattern={"layers.1.self_attn.v_proj": 32}, use_rslora=True, bias="lora_only",
                modules_to_save=["classifier"], task_type="SEQ_CLS"),
         torch.randn(2, 5, 24))
    make("attention_bf16_bin", Classifier,
         config(r=2, lora_alpha=4, target_modules=r".*\.self_attn\.(q|k)_proj"),
         torch.randn(2, 5, 24), file="adapter_model.bin", dtype=torch.bfloat16)
    # exclude_modules as PEFT writes it for a string: a regular expression the whole path must match.
    make("attention_excluded", Classifier,
         config(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], exclude_modules=r"model\.layers\.1\..*"),
         torch.randn(2, 5, 24))


if __name__ == "__main__":
    main()
