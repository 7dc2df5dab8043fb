"""Record one run of a PyTorch module, or a training run, for TorchLinear's Parity.Replay / Parity.ReplayTraining to
replay against a TorchSharp port.

Needs only torch >= 1.13. From your own script:

    from record_parity import record            # tools/pytorch/record_parity.py on your PYTHONPATH
    model.eval()
    record(model, example_input, "model.parity.pt")

or from the command line, for a module that a Python file builds:

    python record_parity.py my_model.py:build_model_and_input model.parity.pt

(`build_model_and_input()` returns `(module, inputs)`, or `(module, inputs, grad_output)`).

A training run (see record_training below):

    record_training(model, optimizer, batches, loss_fn, "model.training.pt", scheduler=scheduler, max_grad_norm=1.0)

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
import numbers
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
    _save(tensors, metadata, path, "torchlinear-parity/1")
    return metadata


def _refuse_randomness(model):
    """A training run replays deterministically only if its forward draws no random numbers: dropout must be off."""
    active = []
    for name, m in model.named_modules():
        p = getattr(m, "p", None) if isinstance(m, torch.nn.modules.dropout._DropoutNd) else getattr(m, "dropout", None)
        if isinstance(m, (torch.nn.modules.dropout._DropoutNd, torch.nn.MultiheadAttention)) and isinstance(p, numbers.Number) and p > 0:
            active.append(f"{name or '(model)'} ({type(m).__name__}, p={p})")
    if active:
        raise ValueError("record_training: the model draws random numbers in training mode, so its run cannot be replayed "
                         f"step by step: {', '.join(active)}. Set their p to 0 for the recording.")


def _save(tensors, metadata, path, format_name):
    tensors["metadata"] = torch.tensor(list(json.dumps(metadata).encode()), dtype=torch.uint8)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if path.endswith(".safetensors"):
        if importlib.util.find_spec("safetensors") is None:
            raise ValueError(f"{path}: writing .safetensors needs the safetensors package; pip install safetensors, or give a .pt path")
        from safetensors.torch import save_file
        save_file(tensors, path, metadata={"format": format_name})
    else:
        torch.save(tensors, path)


def _hyperparameters(group):
    """A parameter group's settings, as JSON: every number, bool, None and tuple of numbers it holds."""
    result = {}
    for key, value in group.items():
        if key == "params":
            continue
        if isinstance(value, tuple) and all(isinstance(v, numbers.Number) for v in value):
            result[key] = list(value)
        elif value is None or isinstance(value, (bool, numbers.Number, str)):
            result[key] = value
    return result


def record_training(model, optimizer, batches, loss_fn, path, scheduler=None, max_grad_norm=None):
    """Runs a training loop over `batches` (a list of `(input, target)`) and records every step, for Parity.ReplayTraining.

    Each step is the loop a port's training code should reproduce: optimizer.zero_grad(); loss = loss_fn(model(input),
    target); loss.backward(); clip_grad_norm_(model.parameters(), max_grad_norm) when given; optimizer.step();
    scheduler.step() when given. The file holds, under the model's state_dict names:
      state/<key>                          the state_dict before the first step
      step/<s>/input, step/<s>/target      the batch
      step/<s>/loss                        the loss
      step/<s>/call/<path>/input/<j>, .../output   every submodule call of the forward (as record() has them)
      step/<s>/grad/<name>                 each parameter's gradient as the optimizer saw it (after clipping)
      step/<s>/param/<name>                each parameter after the step
      step/<s>/optim/<name>/<field>        the optimizer's state after the step (exp_avg, momentum_buffer, ...)
      metadata                             JSON: the optimizer's class and, for every parameter, its group's settings;
                                           per step the learning rate used and the call order; the scheduler's class
    Refused: a model whose forward draws random numbers (dropout active), and an optimizer that holds parameters that
    are not the model's."""
    _refuse_randomness(model)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for g, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError(f"record_training: parameter group {g} holds a tensor of shape {list(p.shape)} that is not a parameter of the model")
        groups.append({"parameters": [names[id(p)] for p in group["params"]], **_hyperparameters(group)})
    tensors = {"state/" + k: v.detach().clone() for k, v in model.state_dict().items()}
    paths = {m: name for name, m in model.named_modules()}
    model.train()
    steps = []
    for s, (x, target) in enumerate(batches):
        calls, counts = [], {}

        def hook(m, args, output):
            name = paths[m]
            k = counts.get(name, 0)
            counts[name] = k + 1
            key = name if k == 0 else f"{name}#{k}"
            calls.append((key, type(m).__name__, [a.detach().clone() for a in args if isinstance(a, torch.Tensor)],
                          output.detach().clone() if isinstance(output, torch.Tensor) else None))

        handles = [m.register_forward_hook(hook) for m in paths]
        optimizer.zero_grad()
        rng = torch.get_rng_state()
        try:
            output = model(x)
        finally:
            for handle in handles:
                handle.remove()
        if not torch.equal(rng, torch.get_rng_state()):
            # Dropout called as a function (F.dropout), torch.rand in forward...: what the module scan cannot see.
            raise ValueError(f"record_training: the model's forward drew random numbers at step {s} (the RNG state moved), "
                             "so its run cannot be replayed step by step: turn off what draws them (F.dropout's p, noise) for the recording.")
        loss = loss_fn(output, target)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        lrs = [group["lr"] for group in optimizer.param_groups]
        tensors[f"step/{s}/input"] = x.detach().clone()
        tensors[f"step/{s}/target"] = target.detach().clone()
        tensors[f"step/{s}/loss"] = loss.detach().clone()
        for key, _, tensors_in, tensor_out in calls:
            for j, t in enumerate(tensors_in):
                tensors[f"step/{s}/call/{key}/input/{j}"] = t
            if tensor_out is not None:
                tensors[f"step/{s}/call/{key}/output"] = tensor_out
        for n, p in model.named_parameters():
            if p.grad is not None:
                tensors[f"step/{s}/grad/{n}"] = p.grad.detach().clone()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        state_numbers = {}
        for n, p in model.named_parameters():
            tensors[f"step/{s}/param/{n}"] = p.detach().clone()
            for field, value in optimizer.state.get(p, {}).items():
                # The step count is a number (a 0-d tensor in PyTorch 1.13, a long in TorchSharp); every other tensor
                # (exp_avg, momentum_buffer, ... even of a 0-d parameter) is a tensor.
                if isinstance(value, torch.Tensor) and field != "step":
                    tensors[f"step/{s}/optim/{n}/{field}"] = value.detach().clone()
                elif isinstance(value, (torch.Tensor, numbers.Number)):
                    state_numbers.setdefault(n, {})[field] = float(value)
        steps.append({"lr": lrs, "loss": float(loss), "call_order": [key for key, _, _, _ in calls],
                      "module_types": {key: kind for key, kind, _, _ in calls}, "optimizer_numbers": state_numbers})
    metadata = {
        "format": "torchlinear-training/1",
        "torch_version": torch.__version__,
        "module_type": type(model).__name__,
        "optimizer": type(optimizer).__name__,
        "groups": groups,
        "scheduler": type(scheduler).__name__ if scheduler is not None else None,
        "max_grad_norm": max_grad_norm,
        "loss_fn": getattr(loss_fn, "__name__", type(loss_fn).__name__),
        "parameters": [n for n, _ in model.named_parameters()],
        "steps": steps,
    }
    _save(tensors, metadata, path, "torchlinear-training/1")
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
