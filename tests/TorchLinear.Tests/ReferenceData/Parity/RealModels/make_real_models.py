"""Parity recordings (format torchlinear-parity/2) of real models, made with tools/pytorch/record_parity.py::record from
the models' own source: torchvision 0.14 (Debian's python3-torchvision) and transformers (4.48.0.dev0, run on Debian's
PyTorch 1.13 through /work/shared/realpeft). All in eval mode, with random weights; BatchNorm's running statistics,
weight and bias and Llama's RMSNorm weights are randomised too, so that no normalisation is an identity.

    source /work/realpeft-site/env.sh     # transformers on the PYTHONPATH (only tiny_llama needs it)
    LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu/blas:/usr/lib/x86_64-linux-gnu/lapack \\
        /usr/bin/python3 tests/TorchLinear.Tests/ReferenceData/Parity/RealModels/make_real_models.py [name...]

With no name it writes all three; reference BLAS (the LD_LIBRARY_PATH) makes the files byte for byte reproducible.

resnet_basic_1111.parity.pt  torchvision ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10), input (2, 3, 32, 32)
mobilenet_v2_025.parity.pt   torchvision mobilenet_v2(width_mult=0.25, num_classes=10), input (2, 3, 32, 32); its
                             ReLU6(inplace=True) calls record their inputs before the in-place clamp
tiny_llama.parity.pt         transformers LlamaForCausalLM (vocab 64, hidden 16, intermediate 32, 2 layers, 4 heads,
                             2 key/value heads, eager attention, no cache, tuple output), input_ids (2, 7) int64;
                             the recorded output is the logits (the first tensor of the returned tuple)
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "..", "..", "tools", "pytorch"))

from record_parity import record  # noqa: E402


def randomise_norms(model):
    """BatchNorm: running_mean ~ N(0, 0.1), running_var ~ U(0.1, 0.5) (variances below 1, as in
    trained networks, so that gradients grow through the blocks to a few hundred: the size at which float32 rounding of
    backward exceeds assert_close's default tolerances), weight ~ U(0.5, 1.5), bias ~ N(0, 0.1);
    an RMSNorm-like module's weight (a `weight` and `variance_epsilon`) ~ U(0.5, 1.5). In named_modules order."""
    with torch.no_grad():
        for _, m in model.named_modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.1, 0.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
            elif hasattr(m, "variance_epsilon") and isinstance(getattr(m, "weight", None), torch.nn.Parameter):
                m.weight.uniform_(0.5, 1.5)
    return model


def resnet_basic_1111():
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(1111)
    model = randomise_norms(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)).eval()
    return model, torch.randn(2, 3, 32, 32)


def mobilenet_v2_025():
    from torchvision.models import mobilenet_v2

    torch.manual_seed(25)
    model = randomise_norms(mobilenet_v2(width_mult=0.25, num_classes=10)).eval()
    return model, torch.randn(2, 3, 32, 32)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         attn_implementation="eager", use_cache=False, return_dict=False)
    model = randomise_norms(LlamaForCausalLM(config)).eval()
    return model, torch.randint(0, config.vocab_size, (2, 7), dtype=torch.int64)


MODELS = {"resnet_basic_1111": resnet_basic_1111, "mobilenet_v2_025": mobilenet_v2_025, "tiny_llama": tiny_llama}


def main(names):
    for name in names or MODELS:
        if name not in MODELS:
            raise SystemExit(f"unknown recording {name!r}; known: {', '.join(MODELS)}")
        model, x = MODELS[name]()
        path = os.path.join(HERE, f"{name}.parity.pt")
        metadata = record(model, x, path)
        print(f"{name}: {len(metadata['call_order'])} calls, {os.path.getsize(path)} bytes, "
              f"noise_reference={metadata['noise_reference']}")


if __name__ == "__main__":
    main(sys.argv[1:])
