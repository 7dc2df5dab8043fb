"""The way back: real PEFT 0.18.1 loads the adapter folders TorchLinear.Lora wrote (from_dotnet/) and must give the
outputs .NET computed with them.

    TORCHLINEAR_WRITE_FROM_DOTNET=1 dotnet test tests/TorchLinear.Lora.Tests --filter WayBack
        rewrites from_dotnet/<case>/ (PEFT's folder layout, written by LoraModel.save_adapter) and
        from_dotnet/outputs.safetensors (the inputs, input/<model>, and .NET's outputs, <case> or <case>/<what>);
    source /work/realpeft-site/env.sh          # PEFT 0.18.1 from source (../shared/realpeft)
    /usr/bin/python3 tests/TorchLinear.Lora.Tests/ReferenceData/RealPeft/check_from_dotnet.py
        loads each folder with PeftModel.from_pretrained (and load_adapter for the other named adapters) on a fresh
        pretrained model, runs PEFT, compares with .NET's outputs (torch.testing.assert_close's float32 tolerances), and
        writes from_dotnet/results.json: per case the sha256 of every file it read, each comparison's largest difference,
        the adapter keys PEFT left unused (load_state_dict(strict=False) drops them silently) and the adapter tensors PEFT
        did not find in the folder (counted on a separate instance: the compared one is loaded once); the sha256 of
        outputs.safetensors and of this script. Commit the folders and results.json together:
        WayBackTests fails on a disagreement, on a folder the results do not cover, on a results file older than the
        folders or than this script (their hashes differ), and on a case whose checks are not the ones it expects.
Exit status 0 when everything matched.

Cases (CASES below; WayBackTests.CaseNames lists the same): plain, rslora (rank/alpha patterns, modules_to_save),
dora, embedding, named (three adapters in .NET, two saved with selected_adapters, each run alone and in a mixed batch),
bias_all and bias_lora_only (trained biases, with the control: the same folder with the adapted layer's bias under the
older plain key '<path>.bias', which PEFT drops), conv (make_conv.py's ConvNet2d: LoRA on its Conv2d layers and a second
adapter on a conv and the Linear head, each run alone and in a mixed batch; conv/make_conv.py --check also has PEFT merge
.NET-written conv adapters, Conv1d included), gpt2 and gpt2_dora (the generated GPT-2 port of
tests/TorchLinear.Tests/Ports/Gpt2, LoRA on its transformers Conv1D layers c_attn, c_proj, c_fc, and DoRA on c_attn and
c_fc; PEFT runs transformers' GPT-2 with the same weights, make_ports.py's gpt2()).
"""
import hashlib
import json
import os
import shutil
import sys
import tempfile

import torch

import peft
from peft import PeftModel
from peft.utils import load_peft_weights, set_peft_model_state_dict
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
PEFT_DATA = os.path.join(HERE, "..", "Peft")
FROM_DOTNET = os.path.join(HERE, "from_dotnet")
sys.path.insert(0, PEFT_DATA)
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "TorchLinear.Tests", "ReferenceData"))
import realpeft_compat  # noqa: E402,F401  (PEFT's mixed batches on torch 1.13)
from make_peft_adapters import Classifier, pretrained  # noqa: E402
from make_peft_breadth import EmbedModel  # noqa: E402
from make_bias import base_model as mlp  # noqa: E402
sys.path.insert(0, os.path.join(HERE, "conv"))
from make_conv import base_model as conv_net  # noqa: E402
from safetensors_writer import write_safetensors  # noqa: E402

PORTS = os.path.join(HERE, "..", "..", "..", "TorchLinear.Tests", "Ports")


def gpt2():
    """make_ports.py's tiny transformers GPT-2 (its Conv1D layers), with the weights its generated port loads."""
    sys.path.insert(0, PORTS)
    from make_ports import gpt2 as build
    model = build()[0]
    model.load_state_dict(load_file(os.path.join(PORTS, "Gpt2", "GPT2LMHeadModel.safetensors")))
    return model.eval()


# name: (the pretrained model, the input's key in outputs.safetensors, the named adapters beside "default" in
# sub-folders, the comparisons: (what, adapter to activate or None, mixed-batch rows or None))
CASES = {
    "plain": (lambda: pretrained(Classifier, os.path.join(PEFT_DATA, "named")), "input/classifier", [], [("default", None, None)]),
    "rslora": (lambda: pretrained(Classifier, os.path.join(PEFT_DATA, "named")), "input/classifier", [], [("default", None, None)]),
    "dora": (lambda: pretrained(Classifier, os.path.join(PEFT_DATA, "named")), "input/classifier", [], [("default", None, None)]),
    "embedding": (lambda: pretrained(EmbedModel, os.path.join(PEFT_DATA, "embedding")), "input/embedding", [], [("default", None, None)]),
    "named": (lambda: pretrained(Classifier, os.path.join(PEFT_DATA, "named")), "input/classifier", ["third"],
              [("default", "default", None), ("third", "third", None), ("mixed", None, ["third", "__base__", "default", "third"])]),
    "bias_all": (mlp, "input/mlp", [], [("default", None, None)]),
    "bias_lora_only": (mlp, "input/mlp", [], [("default", None, None)]),
    "conv": (lambda: conv_net("conv2d"), "input/conv2d", ["second"],
             [("default", "default", None), ("second", "second", None), ("mixed", None, ["second", "default", "__base__", "default"])]),
    "gpt2": (gpt2, "input/gpt2", [], [("default", None, None)]),
    "gpt2_dora": (gpt2, "input/gpt2", [], [("default", None, None)]),
}


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def hashes(folder):
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder).replace(os.sep, "/")] = sha256(path)
    return dict(sorted(found.items()))


def load(build, folder, others):
    """The model whose outputs are compared: PeftModel.from_pretrained of the folder on a fresh model, the other adapters
    with load_adapter, nothing loaded twice."""
    model = PeftModel.from_pretrained(build(), folder)
    for name in others:
        model.load_adapter(os.path.join(folder, name), adapter_name=name)
    return model.eval()


def key_check(build, folder, others):
    """On a separate instance loaded the same way: the adapter keys PEFT did not use and the adapter tensors of its model
    the folder did not give (from_pretrained discards its load result; set_peft_model_state_dict is what its load_adapter
    calls, with the same arguments)."""
    model = load(build, folder, others)
    unexpected, missing = [], []
    for name, path in [("default", folder)] + [(n, os.path.join(folder, n)) for n in others]:
        result = set_peft_model_state_dict(model, load_peft_weights(path), adapter_name=name)
        unexpected += sorted(result.unexpected_keys)
        missing += sorted(k for k in result.missing_keys if f".{name}" in k and ("lora_" in k or "modules_to_save" in k))
    return unexpected, missing


def plain_key_control(build, folder, x, expected):
    """The same folder with the adapted layers' biases under the plain key '<path>.bias' (this library's older key):
    PEFT drops them; how far its output then is from .NET's."""
    with tempfile.TemporaryDirectory() as old:
        weights = load_file(os.path.join(folder, "adapter_model.safetensors"))
        write_safetensors({k.replace(".base_layer.bias", ".bias"): v for k, v in weights.items()},
                          os.path.join(old, "adapter_model.safetensors"))
        shutil.copy(os.path.join(folder, "adapter_config.json"), old)
        with torch.no_grad():
            dropped = PeftModel.from_pretrained(build(), old).eval()(x)
        return float((dropped - expected).abs().max())


def main():
    outputs_file = os.path.join(FROM_DOTNET, "outputs.safetensors")
    outputs = load_file(outputs_file)
    folders = sorted(n for n in os.listdir(FROM_DOTNET) if os.path.isdir(os.path.join(FROM_DOTNET, n)))
    unknown = [n for n in folders if n not in CASES]
    assert not unknown, f"from_dotnet has folders no case describes: {unknown} (add them to CASES)"
    # The script's own sha256: WayBackTests compares it with the committed script's, so a script changed (a check
    # loosened, a case dropped) without being rerun fails there.
    results = {"checked_by": "check_from_dotnet.py", "script_sha256": sha256(os.path.abspath(__file__)),
               "peft": peft.__version__, "torch": torch.__version__, "outputs_sha256": sha256(outputs_file), "cases": []}
    ok = True
    for name in folders:
        build, input_key, others, comparisons = CASES[name]
        folder = os.path.join(FROM_DOTNET, name)
        x = outputs[input_key]
        model = load(build, folder, others)
        unexpected, missing = key_check(build, folder, others)
        case = {"name": name, "files": hashes(folder), "checks": []}
        for what, adapter, rows in comparisons:
            key = name if what == "default" and not others else f"{name}/{what}"
            expected = outputs[key]
            with torch.no_grad():
                if rows is not None:
                    got = model(x, adapter_names=rows)
                else:
                    if adapter is not None:
                        model.set_adapter(adapter)
                    got = model(x)
            if isinstance(got, tuple):   # transformers' return_dict=False: the logits first
                got = got[0]
            try:
                torch.testing.assert_close(got, expected)
                close = True
            except AssertionError:
                close = False
            check = {"what": what, "output": key, "max_abs_diff": float((got - expected).abs().max()),
                     "matched": close and not unexpected and not missing, "unexpected_keys": unexpected,
                     "missing_adapter_keys": missing}
            if rows is not None:
                check["rows"] = rows
            case["checks"].append(check)
        case["matched"] = all(c["matched"] for c in case["checks"])
        if name.startswith("bias_"):
            case["control_plain_bias_key_max_abs_diff"] = plain_key_control(build, folder, x, outputs[name])
        ok &= case["matched"]
        results["cases"].append(case)
        print(f"{name}: {'matched' if case['matched'] else 'DIFFERS'}: "
              + "; ".join(f"{c['what']} max abs diff {c['max_abs_diff']:.3g}" for c in case["checks"])
              + (f"; unexpected keys {unexpected}" if unexpected else "") + (f"; missing {missing}" if missing else ""))
    results["result"] = "all matched" if ok else "MISMATCH"
    with open(os.path.join(FROM_DOTNET, "results.json"), "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
        f.write("\n")
    print(results["result"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
