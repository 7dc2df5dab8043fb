"""Reference data for several adapters of one layer with a DoRA one among them, made and run by real PEFT 0.18.1:
dora_stack/ holds a DoRA adapter "default" (r 4 on the Mlp's "0" and "2") and a plain one "plain" (sub-folder plain/, r
4 on "0"), each trained 15 Adam steps, saved by PEFT's save_pretrained, and cases.safetensors with PEFT's unmerged
outputs of both active together in each order (output_default_plain, output_plain_default: an unmerged DoRA adapter
rescales what the layer computed before it) and PEFT 0.18.1's merged output of the second order
(merged_plain_default_peft_0_18_1), which takes the DoRA norm from the weight with "plain" merged and so differs
(huggingface/peft#3608, fixed after 0.18.1 by #3609). DoraTests.SeveralAdaptersOfALayerWithDora_* checks this library
against the unmerged outputs, unmerged and merged. Run as make_peft_breadth.py says (env.sh of ../shared/realpeft,
reference BLAS for byte-identical files): (An adapter named "b" is avoided: PEFT 0.18.1 saves every key containing the
adapter's name, and "b" is in "base_model".)

    source /work/realpeft-site/env.sh
    LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu/blas:/usr/lib/x86_64-linux-gnu/lapack \\
        /usr/bin/python3 tests/TorchLinear.Lora.Tests/ReferenceData/Peft/make_dora_stack.py
"""
import os
import sys

# PEFT writes target_modules in a set's order, which follows Python's string hashes: a fixed seed, the same bytes.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import torch  # noqa: E402

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "TorchLinear.Tests", "ReferenceData"))
from safetensors_writer import write_safetensors  # noqa: E402
from make_peft_adapters import Mlp, outputs, pretrained, save, train  # noqa: E402


def main():
    folder = os.path.join(HERE, "dora_stack")
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(0)
    write_safetensors(Mlp().state_dict(), os.path.join(folder, "base.safetensors"))
    torch.manual_seed(21)
    x = torch.randn(5, 16)
    model = get_peft_model(pretrained(Mlp, folder), LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], use_dora=True))
    model.add_adapter("plain", LoraConfig(r=4, lora_alpha=4, target_modules=["0"]))
    torch.manual_seed(22)
    train(model, x, steps=15)
    model.base_model.set_adapter("plain")
    torch.manual_seed(23)
    train(model, x, steps=15)
    save(model, folder)

    loaded = PeftModel.from_pretrained(pretrained(Mlp, folder), folder)
    loaded.load_adapter(os.path.join(folder, "plain"), adapter_name="plain")
    loaded.eval()
    cases = {"input": x}
    for order in (["default", "plain"], ["plain", "default"]):
        loaded.base_model.set_adapter(order)
        cases["output_" + "_".join(order)] = outputs(loaded, x)
    loaded.base_model.set_adapter(["plain", "default"])   # PEFT merges in this order: plain first, DoRA's norm over it
    loaded.merge_adapter()
    cases["merged_plain_default_peft_0_18_1"] = outputs(loaded, x)
    write_safetensors(cases, os.path.join(folder, "cases.safetensors"))
    off = float((cases["merged_plain_default_peft_0_18_1"] - cases["output_plain_default"]).abs().max())
    print(f"dora_stack: PEFT {__import__('peft').__version__}'s merge is {off:.3g} off its unmerged output")


if __name__ == "__main__":
    main()
