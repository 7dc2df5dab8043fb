"""What PEFT 0.18.1 keeps (and saves) as a config's fan_in_fan_out when nn.Linear and transformers' Conv1D are both
targeted, step by step. Writes fan_in_fan_out.json, read by Conv1DLoraTests (which replays each case in .NET).

Run: source /work/realpeft-site/env.sh; /usr/bin/python3 measure.py   (no random number matters: only the configs).

A case is a model of two layers, a then b (each "Linear" or "Conv1D", 8 -> 8), and steps: get_peft_model / add_adapter
with target_modules and the fan_in_fan_out given, or add_weighted_adapter (svd, cat) of two adapters; after each step
the recorded value is peft_config[name].fan_in_fan_out.
"""
import json
import os
import warnings

import peft
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

warnings.simplefilter("ignore")


class M(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a = a
        self.b = b

    def forward(self, x):
        return self.b(self.a(x))


def layer(kind):
    return nn.Linear(8, 8) if kind == "Linear" else Conv1D(8, 8)


def run(layers, steps):
    model = M(layer(layers[0]), layer(layers[1]))
    peft_model = None
    for step in steps:
        if step["op"] == "get_peft_model":
            peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=step["targets"], fan_in_fan_out=step["given"]), adapter_name=step["name"])
        elif step["op"] == "add_adapter":
            peft_model.add_adapter(step["name"], LoraConfig(r=2, target_modules=step["targets"], fan_in_fan_out=step["given"]))
        else:
            peft_model.add_weighted_adapter(step["adapters"], [1.0, 1.0], step["name"], combination_type=step["op"])
        step["fan_in_fan_out"] = peft_model.peft_config[step["name"]].fan_in_fan_out
    return {"layers": layers, "steps": steps}


def first(targets, given):
    return {"op": "get_peft_model", "name": "default", "targets": targets, "given": given}


def add(name, targets, given):
    return {"op": "add_adapter", "name": name, "targets": targets, "given": given}


cases = []
for layers in (["Linear", "Conv1D"], ["Conv1D", "Linear"]):
    for given in (False, True):
        # Both targeted: the last first-adapted layer in model order decides; later adapters on the same layers keep
        # what they were given; a combination takes its first adapter's config.
        cases.append(run(layers, [first(["a", "b"], given), add("second", ["a", "b"], not given), add("third", ["a", "b"], given),
                                  {"op": "svd", "name": "mix", "adapters": ["default", "second"]},
                                  {"op": "cat", "name": "joined", "adapters": ["second", "default"]}]))
    # Only a first; then both, where only b is adapted for the first time; then both again, nothing new.
    cases.append(run(layers, [first(["a"], False), add("both", ["a", "b"], False), add("again", ["a", "b"], True), add("again_false", ["a", "b"], False)]))
    cases.append(run(layers, [first(["a"], True), add("both", ["a", "b"], True)]))

out = {"peft": peft.__version__, "torch": torch.__version__, "cases": cases}
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fan_in_fan_out.json"), "w") as f:
    json.dump(out, f, indent=1)
    f.write("\n")
for case in cases:
    print(case["layers"], [(s["name"], s.get("given"), s["fan_in_fan_out"]) for s in case["steps"]])
