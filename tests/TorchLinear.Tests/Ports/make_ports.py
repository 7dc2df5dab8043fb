"""Regenerates every generated port in this folder with tools/pytorch/export_port.py, and ports.sha256 (the manifest
PortFilesTests checks: the committed files are the ones this script last wrote; review a regeneration with git diff).

    LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu/blas:/usr/lib/x86_64-linux-gnu/lapack \\
        /usr/bin/python3 tests/TorchLinear.Tests/Ports/make_ports.py

(reference BLAS makes the weights and recordings byte for byte reproducible; the .cs files do not depend on it).

  TinyTransformer/  samples/ParityCheck/pytorch/tiny_transformer.py, weights as samples/ParityCheck/pytorch/record.py
                    makes them, input (2, 6, 8): TinyTransformer.cs, .safetensors, .parity.pt, and .second.parity.pt
                    (a recording at (1, 9, 8)); peft-adapter/: a LoRA adapter made by real PEFT on it (needs
                    `source /work/realpeft-site/env.sh`; without it the committed adapter is kept, and said)
  TinyGpt/          samples/TrainingParity/pytorch/tiny_gpt.py, seed 0, token ids (2, 6): the same four files, the
                    second recording at (1, 4)
  ResNet/           torchvision ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10) as ReferenceData/Parity/RealModels/
                    make_real_models.py builds it (same seed): ResNet.cs only (weights and recording at (2, 3, 32, 32)
                    are the RealModels recording's), and ResNet.second.pt: an input (1, 3, 48, 48), the model's output and its noise
                    (max |output - the float64 model's|)
  MobileNet/        torchvision mobilenet_v2(width_mult=0.25, num_classes=10), likewise: MobileNetV2.cs, MobileNetV2.second.pt
  MergedClasses/    merged_classes.py's MergedClasses: two instances of each class the generator merges (a submodule some lack, a
                    statement a bool attribute turns on) or keeps apart (a second class that says why), input (2, 3, 4):
                    the four files as TinyTransformer's, the second recording at (1, 5, 4)
  ShapeGuard/       shape_guard.py's ShapeGuard: branches on sizes only (one taken, one not, a min of a size), written as
                    guards that throw on an input taking the other side; input (2, 6, 4), the four files as TinyTransformer's,
                    the second recording at (3, 5, 4)
  Llama/            transformers LlamaForCausalLM, tiny and random (see llama()), token ids (2, 7): LlamaForCausalLM.cs,
                    .safetensors, .parity.pt, and .second.parity.pt at (3, 5) (needs `source /work/realpeft-site/env.sh`;
                    without it the committed files are kept, and said)
  Gpt2/             transformers GPT2LMHeadModel, tiny and random (see gpt2()), token ids (2, 7), likewise; the second
                    recording at (3, 5)
  Bert/             transformers BertForMaskedLM, tiny and random (see bert()), token ids (2, 7) and (3, 5), likewise
  Llama/peft-adapter/  a LoRA adapter made by real PEFT on that Llama (peft_llama_adapter()), as TinyTransformer's
  Gpt2/peft-adapter/, Gpt2/peft-dora/  LoRA and DoRA adapters made by real PEFT on that GPT-2's Conv1D layers
                    (peft_gpt2_adapters()), cases.pt with PEFT's merged output too
"""
import copy
import hashlib
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tools", "pytorch"))
sys.path.insert(0, os.path.join(ROOT, "samples", "ParityCheck", "pytorch"))
sys.path.insert(0, os.path.join(ROOT, "samples", "TrainingParity", "pytorch"))
sys.path.insert(0, os.path.join(ROOT, "tests", "TorchLinear.Tests", "ReferenceData", "Parity", "RealModels"))

from export_port import export_port  # noqa: E402
from record_parity import record  # noqa: E402
from merged_classes import merged_classes  # noqa: E402
from shape_guard import shape_guard  # noqa: E402


def tiny_transformer():
    from tiny_transformer import TinyTransformer

    torch.manual_seed(0)  # as samples/ParityCheck/pytorch/record.py
    model = TinyTransformer()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "ln" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    model.eval()
    return model, torch.randn(2, 6, 8), torch.randn(1, 9, 8)


def tiny_gpt():
    from tiny_gpt import TinyGpt

    torch.manual_seed(0)
    model = TinyGpt().eval()
    return model, torch.randint(0, 8, (2, 6)), torch.randint(0, 8, (1, 4))


def resnet():
    import make_real_models

    model, x = make_real_models.resnet_basic_1111()
    torch.manual_seed(48)
    return model, x, torch.randn(1, 3, 48, 48)


def mobilenet():
    import make_real_models

    model, x = make_real_models.mobilenet_v2_025()
    torch.manual_seed(48)
    return model, x, torch.randn(1, 3, 48, 48)


def llama():
    """transformers' LlamaForCausalLM (the real modeling_llama.py, needs `source /work/realpeft-site/env.sh`), tiny and
    random: hidden 32, 2 layers, 4 heads over 2 key/value heads (grouped-query attention), intermediate 64, vocab 100,
    eager attention, no cache, tuple output; RMSNorm weights drawn U(0.5, 1.5) as make_real_models.py does."""
    from transformers import LlamaConfig, LlamaForCausalLM
    import make_real_models

    torch.manual_seed(32)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         attn_implementation="eager", use_cache=False, return_dict=False)
    model = make_real_models.randomise_norms(LlamaForCausalLM(config)).eval()
    return model, torch.randint(0, 100, (2, 7)), torch.randint(0, 100, (3, 5))


def gpt2():
    """transformers' GPT2LMHeadModel (real modeling_gpt2.py), tiny and random: 32 wide, 2 layers, 4 heads, 32 positions,
    vocab 100, its Conv1D layers (weight stored (in, out)), the LM head tied to the token embedding; eager attention,
    no cache, tuple output; LayerNorm weights and biases drawn (seed 2) so that no normalisation is an identity."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    config = GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4, attn_implementation="eager",
                        use_cache=False, return_dict=False)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".ln_" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model, torch.randint(0, 100, (2, 7)), torch.randint(0, 100, (3, 5))


def bert():
    """transformers' BertForMaskedLM (real modeling_bert.py), tiny and random: hidden 32, 2 layers, 4 heads, intermediate
    64, 32 positions, vocab 100; eager attention, tuple output (the prediction scores); its decoder tied to the word
    embeddings and its bias to cls.predictions.bias as in transformers; LayerNorm weights and biases drawn (seed 3)."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(3)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=32, attn_implementation="eager", return_dict=False)
    model = BertForMaskedLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "LayerNorm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model, torch.randint(0, 100, (2, 7)), torch.randint(0, 100, (3, 5))


# folder, class name, builder, whether the weights and recordings are committed here (the tiny models) or are
# RealModels' (ResNet, MobileNetV2: a second input and output only)
PORTS = [
    ("TinyTransformer", "TinyTransformer", tiny_transformer, True),
    ("TinyGpt", "TinyGpt", tiny_gpt, True),
    ("ResNet", "ResNet", resnet, False),
    ("MobileNet", "MobileNetV2", mobilenet, False),
    ("MergedClasses", "MergedClasses", merged_classes, True),
    ("ShapeGuard", "ShapeGuard", shape_guard, True),
    ("Llama", "LlamaForCausalLM", llama, True),
    ("Gpt2", "GPT2LMHeadModel", gpt2, True),
    ("Bert", "BertForMaskedLM", bert, True),
]

# The transformers models: without transformers importable, their committed files are kept (and said).
NEEDS_TRANSFORMERS = {"Llama", "Gpt2", "Bert"}


def peft_adapter(folder):
    """A LoRA adapter made by real PEFT (through /work/shared/realpeft) on the TinyTransformer: r=4, alpha 8 on q_proj,
    v_proj and fc1, lora_B drawn (seed 11) so that it changes the output; PEFT's own folder (adapter_config.json,
    adapter_model.safetensors) and cases.pt: the input and PEFT's adapted output. Returns the files written, or the
    committed ones when PEFT is not importable (said, not silent)."""
    out = os.path.join(HERE, folder, "peft-adapter")
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        print(f"peft is not importable (source /work/realpeft-site/env.sh): kept the committed {os.path.relpath(out, HERE)}")
        return [os.path.join(out, f) for f in sorted(os.listdir(out))]
    model, x, _ = tiny_transformer()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"], lora_dropout=0.0))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=g))
    return save_peft(peft_model, out, x)


def save_peft(peft_model, out, x, merged=False):
    """PEFT's own folder for an adapted model, made reproducible, and cases.pt (the input and PEFT's adapted output,
    the first tensor of a tuple output; with merged, also PEFT's output after merge_adapter, as merged_output)."""
    peft_model.eval()
    peft_model.save_pretrained(out)
    os.remove(os.path.join(out, "README.md"))   # PEFT's model-card template: not part of the adapter
    # PEFT writes target_modules from a set, in hash order: sorted, the file is byte for byte reproducible.
    config_path = os.path.join(out, "adapter_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["target_modules"] = sorted(config["target_modules"])
    with open(config_path, "w", encoding="utf-8") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True))
    with torch.no_grad():
        adapted = peft_model(x)
    if isinstance(adapted, tuple):
        adapted = adapted[0]
    cases = {"input": x, "adapted_output": adapted}
    if merged:
        peft_model.merge_adapter()
        with torch.no_grad():
            output = peft_model(x)
        cases["merged_output"] = output[0] if isinstance(output, tuple) else output
        # Left merged (the model is not used again): PEFT 0.18.1's DoRA unmerge is wrong on a Conv1D (fan_in_fan_out):
        # variants.py divides the (in, out) weight by the magnitude as a column, which raises where in != out ("The size
        # of tensor a (32) must match the size of tensor b (96)") and gives another weight on a square one (c_proj).
    torch.save(cases, os.path.join(out, "cases.pt"))
    return [os.path.join(out, f) for f in ("adapter_config.json", "adapter_model.safetensors", "cases.pt")]


def peft_llama_adapter():
    """A LoRA adapter made by real PEFT on the Llama port's model (llama()): r=4, alpha 8 on every projection of
    attention and MLP (q, k, v, o, gate, up, down), init_lora_weights=False (PEFT draws B too, seed 12), so that it
    changes the output; PEFT's own folder and cases.pt as for the TinyTransformer. Needs PEFT (as peft_adapter)."""
    out = os.path.join(HERE, "Llama", "peft-adapter")
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        print(f"peft is not importable (source /work/realpeft-site/env.sh): kept the committed {os.path.relpath(out, HERE)}")
        return [os.path.join(out, f) for f in sorted(os.listdir(out))]
    model, x, _ = llama()
    torch.manual_seed(12)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                                                  init_lora_weights=False))
    return save_peft(peft_model, out, x)


def peft_gpt2_adapters():
    """LoRA adapters made by real PEFT on the GPT-2 port's model (gpt2()), whose c_attn, c_proj and c_fc are transformers'
    Conv1D (weight (in, out)): peft-adapter/, r=4, alpha 8 on all three (both layers), init_lora_weights=False (PEFT
    draws B too, seed 13), and the config's fan_in_fan_out left False, so that PEFT warns and sets it True as it does for
    Conv1D (the saved adapter_config.json says what it did); peft-dora/, DoRA (use_dora=True) r=2, alpha 4 on c_attn and
    c_fc, B drawn (seed 14) and the magnitudes scaled by 1 + 0.1 N(0, 1) so that they rescale the output. The LM head
    (tied to the token embedding) is not targeted. Each folder as the TinyTransformer's, cases.pt with PEFT's merged
    output too. Needs PEFT (as peft_adapter)."""
    outs = [os.path.join(HERE, "Gpt2", "peft-adapter"), os.path.join(HERE, "Gpt2", "peft-dora")]
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        print(f"peft is not importable (source /work/realpeft-site/env.sh): kept the committed Gpt2/peft-adapter, Gpt2/peft-dora")
        return [os.path.join(out, f) for out in outs for f in sorted(os.listdir(out))]
    written = []
    model, x, _ = gpt2()
    torch.manual_seed(13)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                                  lora_dropout=0.0, init_lora_weights=False))
    written += save_peft(peft_model, outs[0], x, merged=True)
    model, x, _ = gpt2()
    torch.manual_seed(14)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], lora_dropout=0.0,
                                                  init_lora_weights=False, use_dora=True))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(1 + 0.1 * torch.randn_like(parameter))
    written += save_peft(peft_model, outs[1], x, merged=True)
    return written


def main():
    written = []
    for folder, class_name, build, own_files in PORTS:
        out = os.path.join(HERE, folder)
        if folder in NEEDS_TRANSFORMERS:
            try:
                import transformers  # noqa: F401
            except ImportError:
                print(f"transformers is not importable (source /work/realpeft-site/env.sh): kept the committed {folder}/")
                written += [os.path.join(out, f) for f in sorted(os.listdir(out)) if os.path.isfile(os.path.join(out, f))]
                continue
        model, x, x2 = build()
        paths = export_port(model, (x,), out, class_name, namespace=f"TorchLinear.Tests.Ports.{folder}",
                            weights=own_files, recording=own_files)
        written += list(paths.values())
        if own_files:
            second = os.path.join(out, f"{class_name}.second.parity.pt")
            record(model, x2, second)
        else:
            second = os.path.join(out, f"{class_name}.second.pt")
            with torch.no_grad():
                y = model(x2)
                y64 = copy.deepcopy(model).double()(x2.double())
            # noise: PyTorch's own rounding error on this output, max |float32 - float64 run| (as record()'s noise)
            noise = (y.double() - y64).abs().max()
            torch.save({"input": x2.contiguous(), "output": y.contiguous(), "noise": noise}, second)
        written.append(second)
        print(f"{class_name}: " + ", ".join(f"{os.path.basename(p)} ({os.path.getsize(p)} bytes)" for p in paths.values())
              + f", {os.path.basename(second)}")
    written += peft_adapter("TinyTransformer")
    written += peft_llama_adapter()
    written += peft_gpt2_adapters()
    lines = []
    for path in sorted(written):
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        lines.append(f"{digest}  {os.path.relpath(path, HERE)}")
    with open(os.path.join(HERE, "ports.sha256"), "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
