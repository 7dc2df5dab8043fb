"""Record one run of a PyTorch module, for TorchLinear's Parity.Replay to replay against a TorchSharp port.

Needs only torch >= 1.13. From your own script:

    from record_parity import record            # tools/pytorch/record_parity.py on your PYTHONPATH
    model.eval()
    record(model, example_input, "model.parity.pt")

or from the command line, for a module that a Python file builds:

    python record_parity.py my_model.py:build_model_and_input model.parity.pt

(`build_model_and_input()` returns `(module, inputs)`, or `(module, inputs, grad_output)`).

What the file holds (a .safetensors path is written with the `safetensors` package, any other path with torch.save;
both hold a flat dict of tensors, which TorchLinear reads with its checked readers):
  state/<key>                 the module's state_dict
  input/<i>                   the inputs
  call/<path>/input/<j>       for every submodule call, in call order: its tensor inputs...
  call/<path>/output          ...and its output (forward hooks; the root module's path is ""; a module called again
                              is recorded as <path>#1, <path>#2, ...)
  grad_output                 the upstream gradient (ones, that of output.sum(), unless given)
  grad/input/<i>              the gradients of the floating-point inputs
  grad/param/<name>           the gradients of every parameter that requires one (absent if unused)
  metadata                    UTF-8 JSON as a uint8 tensor: torch version, call order, module types, dtypes
"""
import importlib.util
import json
import sys

import torch


def record(module, inputs, path, grad_output=None):
    """Runs `module` once on `inputs` (a tensor or a tuple of tensors), forward and backward, and writes the
    recording to `path`. The module's parameters' .grad are left untouched (torch.autograd.grad is used)."""
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    paths = {m: name for name, m in module.named_modules()}
    calls, counts = [], {}

    def hook(m, args, output):
        name = paths[m]
        k = counts.get(name, 0)
        counts[name] = k + 1
        key = name if k == 0 else f"{name}#{k}"
        tensors_in = [a.detach().clone() for a in args if isinstance(a, torch.Tensor)]
        tensor_out = output.detach().clone() if isinstance(output, torch.Tensor) else None
        calls.append((key, type(m).__name__, tensors_in, tensor_out))

    handles = [m.register_forward_hook(hook) for m in paths]
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point() or x.is_complex()) for x in inputs]
    try:
        output = module(*leaves)
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(output, torch.Tensor):
        raise TypeError("record() needs a module that returns one tensor")
    if grad_output is None:
        grad_output = torch.ones_like(output)  # the gradient of output.sum()
    parameters = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    differentiable = [(i, x) for i, x in enumerate(leaves) if x.requires_grad]
    wrt = [x for _, x in differentiable] + [p for _, p in parameters]
    grads = torch.autograd.grad([output], wrt, [grad_output], allow_unused=True) if wrt else []

    tensors = {}
    for key, value in module.state_dict().items():
        tensors["state/" + key] = value.detach().clone()
    for i, x in enumerate(inputs):
        tensors[f"input/{i}"] = x.detach().clone()
    tensors["grad_output"] = grad_output.detach().clone()
    for key, _, tensors_in, tensor_out in calls:
        for j, t in enumerate(tensors_in):
            tensors[f"call/{key}/input/{j}"] = t
        if tensor_out is not None:
            tensors[f"call/{key}/output"] = tensor_out
    for (i, _), g in zip(differentiable, grads[: len(differentiable)]):
        if g is not None:
            tensors[f"grad/input/{i}"] = g
    for (name, _), g in zip(parameters, grads[len(differentiable):]):
        if g is not None:
            tensors[f"grad/param/{name}"] = g

    metadata = {
        "format": "torchlinear-parity/1",
        "torch_version": torch.__version__,
        "module_type": type(module).__name__,
        "call_order": [key for key, _, _, _ in calls],
        "module_types": {key: kind for key, kind, _, _ in calls},
        "inputs": [{"dtype": str(x.dtype), "shape": list(x.shape)} for x in inputs],
        "output": {"dtype": str(output.dtype), "shape": list(output.shape)},
        "grad_output_given": grad_output is not None,
        "parameters": [name for name, _ in parameters],
    }
    tensors["metadata"] = torch.tensor(list(json.dumps(metadata).encode()), dtype=torch.uint8)
    tensors = {k: v.contiguous() for k, v in tensors.items()}

    if path.endswith(".safetensors"):
        if importlib.util.find_spec("safetensors") is None:
            raise ValueError(f"{path}: writing .safetensors needs the safetensors package; pip install safetensors, or give a .pt path")
        from safetensors.torch import save_file
        save_file(tensors, path, metadata={"format": "torchlinear-parity/1"})
    else:
        torch.save(tensors, path)
    return metadata


def _main(argv):
    if len(argv) != 3 or ":" not in argv[1]:
        print(__doc__)
        return 2
    file, function = argv[1].rsplit(":", 1)
    spec = importlib.util.spec_from_file_location("parity_subject", file)
    subject = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(subject)
    built = getattr(subject, function)()
    module, inputs = built[0], built[1]
    grad_output = built[2] if len(built) > 2 else None
    metadata = record(module, inputs, argv[2], grad_output)
    print(f"recorded {len(metadata['call_order'])} module calls of {metadata['module_type']} to {argv[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
