"""Reference data for the LoRA features beyond one adapter: several named adapters, mixed-adapter batches, weighted
combinations, DoRA and embedding adapters — made with real PyTorch, for the TorchLinear.Lora tests.

PEFT itself is not installable on the machine that made these files. This script applies the formulas of PEFT's source
(src/peft/tuners/lora/layer.py, dora.py, variants.py, model.py; read at commit 5d602fdbf) by hand and writes PEFT's
files (save_and_load.py's layout: no adapter name in the keys; DoRA's magnitude under
"base_model.model.<path>.lora_magnitude_vector", an embedding's under ".lora_embedding_A" / ".lora_embedding_B"; the
"default" adapter in the folder, another in a sub-folder named after it, as save_pretrained writes them):
  * Linear: base(x) + lora_B(lora_A(dropout(x))) * scaling for each active adapter in order; a mixed batch adds each
    sub-batch's own adapter (_mixed_batch_forward);
  * DoRA (DoraLinearLayer.forward): with W the base weight, lora_weight = B A and
    norm = ||W + scaling * lora_weight||_row (detached), m / norm = mag:  result + (mag - 1) * (result - bias) +
    mag * lora_B(lora_A(x)) * scaling;  merge: W' = (m / ||W + delta||_row) * (W + delta), delta = B A scaling;
  * Embedding: base(x) + embedding(x, A^T) @ B^T * scaling; delta = (B A)^T * scaling;
  * add_weighted_adapter: cat (A = [w_i s_i A_i], B = [B_i]), linear (A = sum sign(w_i s_i) sqrt|w_i s_i| A_i,
    B = sum sqrt|w_i s_i| B_i), svd (the top-r SVD of sum (w_i s_i) delta_i, delta_i already holding s_i: PEFT's source
    weighs it by its scaling twice); the new adapter has lora_alpha = r.
Run with Debian's PyTorch 1.13 and its reference BLAS (the committed files are reproduced byte for byte):
    LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu/blas:/usr/lib/x86_64-linux-gnu/lapack \\
        /usr/bin/python3 tests/TorchLinear.Lora.Tests/ReferenceData/Peft/make_peft_breadth.py
Python only generates these files; the tests read the committed copies.
"""
import json
import math
import os
import sys

import torch
from torch import nn
from torch.nn import functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "TorchLinear.Tests", "ReferenceData"))
from safetensors_writer import write_safetensors  # noqa: E402
from make_peft_adapters import Classifier, config  # noqa: E402


class Adapted(nn.Module):
    """PEFT's lora.Linear / lora.Embedding with several named adapters."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base
        self.embedding = isinstance(base, nn.Embedding)
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        self.magnitude = nn.ParameterDict()
        self.scaling = {}
        self.active = []
        self.merged = []

    def add(self, name, r, alpha, dora=False):
        if self.embedding:
            a, b = torch.zeros(r, self.base_layer.num_embeddings), torch.randn(self.base_layer.embedding_dim, r)
        else:
            a, b = torch.empty(r, self.base_layer.in_features), torch.zeros(self.base_layer.out_features, r)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.A[name], self.B[name] = nn.Parameter(a), nn.Parameter(b)
        self.scaling[name] = alpha / r
        if dora:
            with torch.no_grad():
                weight = self.base_layer.weight + self.scaling[name] * (self.B[name] @ self.A[name])
                self.magnitude[name] = nn.Parameter(torch.linalg.norm(weight, dim=1))

    def delta(self, name):
        d = self.B[name] @ self.A[name]
        return (d.T if self.embedding else d) * self.scaling[name]

    def term(self, name, x, result):
        a, b, s = self.A[name], self.B[name], self.scaling[name]
        if self.embedding:
            return result + (F.embedding(x, a.T) @ b.T) * s
        if name in self.magnitude:
            weight = self.base_layer.weight
            norm = torch.linalg.norm(weight + s * (b @ a).detach(), dim=1).detach()
            mag = (self.magnitude[name] / norm).view(1, -1)
            base = result - self.base_layer.bias if self.base_layer.bias is not None else result
            return result + ((mag - 1) * base + mag * F.linear(F.linear(x, a), b) * s)
        return result + F.linear(F.linear(x, a), b) * s

    def forward(self, x, adapter_names=None):
        result = self.base_layer(x)
        if adapter_names is not None:
            for name in sorted(set(adapter_names)):
                if name == "__base__" or name not in self.A:
                    continue
                index = [i for i, n in enumerate(adapter_names) if n == name]
                result[index] = self.term(name, x[index], result[index])
            return result
        for name in self.active:
            if name in self.A and name not in self.merged:
                result = self.term(name, x, result)
        return result

    def merge(self, name):
        with torch.no_grad():
            weight = self.base_layer.weight
            delta = self.delta(name)
            if name in self.magnitude:
                norm = torch.linalg.norm(weight + delta, dim=1).detach()
                weight.copy_((self.magnitude[name] / norm).view(-1, 1) * (weight + delta))
            else:
                weight += delta
        self.merged.append(name)


class Wrapped(nn.Module):
    """A model whose adapted layers pass adapter_names on (PEFT does it with forward pre-hooks)."""

    def __init__(self, model, paths):
        super().__init__()
        self.model = model
        self.paths = paths
        for path in paths:
            parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
            setattr(parent, path.rsplit(".", 1)[-1], Adapted(model.get_submodule(path)))

    def layer(self, path):
        return self.model.get_submodule(path)

    def set_active(self, names):
        for path in self.paths:
            self.layer(path).active = list(names)

    def forward(self, x, adapter_names=None):
        handles = []
        if adapter_names is not None:
            for path in self.paths:
                layer = self.layer(path)
                handles.append(layer.register_forward_pre_hook(lambda m, args: (args[0], adapter_names)))
        try:
            return self.model(x)
        finally:
            for h in handles:
                h.remove()


def targets(model, names):
    return [p for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding)) and any(p == n or p.endswith("." + n) for n in names)]


def add(wrapped, name, paths, r, alpha, dora=False):
    for path in paths:
        wrapped.layer(path).add(name, r, alpha, dora)


def train(wrapped, name, paths, x, steps, lr=0.05, dora=False):
    wrapped.set_active([name])
    params = []
    for path in paths:
        layer = wrapped.layer(path)
        params += [layer.A[name], layer.B[name]] + ([layer.magnitude[name]] if name in layer.magnitude else [])
    optimizer = torch.optim.Adam(params, lr=lr)
    with torch.no_grad():
        target = torch.randn_like(wrapped(x))
    for _ in range(steps):
        optimizer.zero_grad()
        F.mse_loss(wrapped(x), target).backward()
        optimizer.step()


def adapter_state(wrapped, name, paths):
    state = {}
    for path in paths:
        layer = wrapped.layer(path)
        if name not in layer.A:
            continue
        if layer.embedding:
            state[f"base_model.model.{path}.lora_embedding_A"] = layer.A[name]
            state[f"base_model.model.{path}.lora_embedding_B"] = layer.B[name]
        else:
            state[f"base_model.model.{path}.lora_A.weight"] = layer.A[name]
            state[f"base_model.model.{path}.lora_B.weight"] = layer.B[name]
            if name in layer.magnitude:
                state[f"base_model.model.{path}.lora_magnitude_vector"] = layer.magnitude[name]
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def save(folder, cfg, state):
    os.makedirs(folder, exist_ok=True)
    write_safetensors(state, os.path.join(folder, "adapter_model.safetensors"), {"format": "pt"})
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def run(wrapped, x, active=None, adapter_names=None):
    with torch.no_grad():
        if active is not None:
            wrapped.set_active(active)
        return wrapped(x, adapter_names).detach().clone()


def named_and_weighted():
    """Three adapters on the attention classifier (ranks 4, 8 and 4; targets differ), each trained alone; the outputs
    of each active, of two active together, of a mixed batch; and of add_weighted_adapter's cat, linear and svd."""
    folder = os.path.join(HERE, "named")
    torch.manual_seed(0)
    model = Classifier().eval()
    os.makedirs(folder, exist_ok=True)
    write_safetensors(model.state_dict(), os.path.join(folder, "base.safetensors"))
    specs = {
        "default": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "other": dict(r=8, lora_alpha=4, target_modules=["q_proj", "k_proj", "o_proj"]),
        "third": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    }
    paths_of = {name: targets(model, spec["target_modules"]) for name, spec in specs.items()}
    every = sorted({p for paths in paths_of.values() for p in paths})
    all_paths = targets(model, ["q_proj", "k_proj", "v_proj", "o_proj"])
    wrapped = Wrapped(model, every)
    torch.manual_seed(11)
    x = torch.randn(4, 5, 24)
    for name, spec in specs.items():
        paths = paths_of[name]
        add(wrapped, name, paths, spec["r"], spec["lora_alpha"])
        train(wrapped, name, paths, x, steps=20)
        save(folder if name == "default" else os.path.join(folder, name), config(**spec), adapter_state(wrapped, name, paths))
    cases = {"input": x, "base_output": run(wrapped, x, active=[])}
    for name in specs:
        cases[f"output_{name}"] = run(wrapped, x, active=[name])
    cases["output_default_other"] = run(wrapped, x, active=["default", "other"])
    rows = ["other", "__base__", "default", "other"]
    cases["output_mixed"] = run(wrapped, x, adapter_names=rows)

    # add_weighted_adapter, PEFT's formulas; the new adapter has lora_alpha = r, so its scaling is 1.
    def weighted(name, parts, combination, rank=None):
        paths = sorted({p for a, _ in parts for p in paths_of[a]}, key=all_paths.index)
        ranks = [specs[a]["r"] for a, _ in parts]
        new_rank = {"cat": sum(ranks), "linear": ranks[0]}.get(combination, rank or max(ranks))
        for path in paths:
            layer = wrapped.layer(path)
            present = [(a, w) for a, w in parts if a in layer.A]
            a_new = torch.zeros(new_rank, layer.A[present[0][0]].shape[1])
            b_new = torch.zeros(layer.B[present[0][0]].shape[0], new_rank)
            with torch.no_grad():
                if combination == "cat":
                    a_cat = torch.cat([layer.A[a] * w * layer.scaling[a] for a, w in present], 0)
                    b_cat = torch.cat([layer.B[a] for a, _ in present], 1)
                    a_new[: a_cat.shape[0]] = a_cat
                    b_new[:, : b_cat.shape[1]] = b_cat
                elif combination == "linear":
                    wa = torch.tensor([math.sqrt(abs(w * layer.scaling[a])) * (1 if w * layer.scaling[a] >= 0 else -1) for a, w in present])
                    wb = torch.tensor([math.sqrt(abs(w * layer.scaling[a])) for a, w in present])
                    a_new = (torch.stack([layer.A[a] for a, _ in present]) * wa.view(-1, 1, 1)).sum(0)
                    b_new = (torch.stack([layer.B[a] for a, _ in present]) * wb.view(-1, 1, 1)).sum(0)
                else:
                    weights = torch.tensor([w * layer.scaling[a] for a, w in present])
                    delta = (torch.stack([layer.delta(a) for a, _ in present]) * weights.view(-1, 1, 1)).sum(0)
                    u, s, vh = torch.linalg.svd(delta, full_matrices=True)
                    b_new = u[:, :new_rank] @ torch.diag(s[:new_rank])
                    a_new = vh[:new_rank, :]
            layer.A[name], layer.B[name] = nn.Parameter(a_new), nn.Parameter(b_new)
            layer.scaling[name] = 1.0
        cases[f"output_{name}"] = run(wrapped, x, active=[name])

    weighted("cat_mix", [("default", 1.0), ("other", 0.5)], "cat")
    weighted("linear_mix", [("default", 0.7), ("third", -0.4)], "linear")
    weighted("svd_mix", [("default", 0.6), ("other", 0.8)], "svd", rank=6)
    write_safetensors(cases, os.path.join(folder, "cases.safetensors"))
    with open(os.path.join(folder, "mixed_rows.json"), "w") as f:
        json.dump(rows, f)
    print(f"named: {', '.join(specs)} on {', '.join(every)}; weighted cat_mix, linear_mix, svd_mix")


def dora():
    """A DoRA adapter on every projection of the attention classifier, trained so the magnitudes move away from the
    norms; the outputs unmerged and merged, and the gradients of one step."""
    folder = os.path.join(HERE, "dora")
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(0)
    model = Classifier().eval()
    write_safetensors(model.state_dict(), os.path.join(folder, "base.safetensors"))
    spec = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_dora=True)
    paths = targets(model, spec["target_modules"])
    wrapped = Wrapped(model, paths)
    torch.manual_seed(12)
    x = torch.randn(3, 5, 24)
    add(wrapped, "default", paths, 4, 8, dora=True)
    initial = {p: wrapped.layer(p).magnitude["default"].detach().clone() for p in paths}
    train(wrapped, "default", paths, x, steps=15)
    save(folder, config(**spec), adapter_state(wrapped, "default", paths))
    cases = {"input": x, "base_output": run(wrapped, x, active=[]), "adapted_output": run(wrapped, x, active=["default"])}
    # One training step's gradients, for a target that does not depend on the model.
    wrapped.set_active(["default"])
    torch.manual_seed(13)
    target = torch.randn(3, 3)
    for p in paths:
        layer = wrapped.layer(p)
        for t in (layer.A["default"], layer.B["default"], layer.magnitude["default"]):
            t.grad = None
    F.mse_loss(wrapped(x), target).backward()
    cases["target"] = target
    for p in paths:
        layer = wrapped.layer(p)
        cases[f"grad/{p}.lora_A"] = layer.A["default"].grad.clone()
        cases[f"grad/{p}.lora_B"] = layer.B["default"].grad.clone()
        cases[f"grad/{p}.lora_magnitude_vector"] = layer.magnitude["default"].grad.clone()
    for p in paths:
        wrapped.layer(p).merge("default")
    cases["merged_output"] = run(wrapped, x, active=["default"])
    write_safetensors(cases, os.path.join(folder, "cases.safetensors"))
    moved = max(float((wrapped.layer(p).magnitude["default"] - initial[p]).abs().max()) for p in paths)
    print(f"dora: {', '.join(paths)}; magnitudes moved by up to {moved:.3f}")


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
    """LoRA on an nn.Embedding (lora_embedding_A/B) and a Linear, trained; outputs unmerged and merged."""
    folder = os.path.join(HERE, "embedding")
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(0)
    model = EmbedModel().eval()
    write_safetensors(model.state_dict(), os.path.join(folder, "base.safetensors"))
    spec = dict(r=4, lora_alpha=8, target_modules=["emb", "fc"])
    paths = targets(model, spec["target_modules"])
    wrapped = Wrapped(model, paths)
    torch.manual_seed(14)
    x = torch.randint(0, 10, (3, 7))
    add(wrapped, "default", paths, 4, 8)
    train(wrapped, "default", paths, x, steps=20)
    save(folder, config(**spec), adapter_state(wrapped, "default", paths))
    cases = {"input": x, "base_output": run(wrapped, x, active=[]), "adapted_output": run(wrapped, x, active=["default"])}
    rows = ["default", "__base__", "default"]
    cases["output_mixed"] = run(wrapped, x, adapter_names=rows)
    for p in paths:
        wrapped.layer(p).merge("default")
    cases["merged_output"] = run(wrapped, x, active=["default"])
    write_safetensors(cases, os.path.join(folder, "cases.safetensors"))
    print(f"embedding: {', '.join(paths)}")


def main():
    named_and_weighted()
    dora()
    embedding()


if __name__ == "__main__":
    main()
