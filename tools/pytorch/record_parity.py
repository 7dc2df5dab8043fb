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

record() writes format `torchlinear-parity/2` (docs/parity.md describes it and how the replay reads it). A .safetensors
path is written with the `safetensors` package, any other path with torch.save; both hold a flat dict of tensors, which
TorchLinear reads with its checked readers:
  state/<key>                 the module's state_dict before the run (tied weights under each of their names)
  input/<i>                   the root's inputs
  call/<key>/input/<j>        for every module call: its tensor arguments, copied BEFORE the module ran (an in-place
                              module records what it was given), positional then keyword, containers flattened
                              depth first, non-tensors and None skipped
  call/<key>/output/<k>       ...and the tensors of its output, flattened the same way (a lone tensor is output/0)
                              <key> is the module's path (the root is ""); a module called again is <path>#1, <path>#2
  grad_output                 the upstream gradient of the root's chosen output tensor (ones, that of .sum(), unless given)
  grad/input/<i>              the gradients of the floating-point inputs
  grad/param/<name>           the gradient of every parameter that requires one, under every name it has (tied
                              parameters once per name; absent if unused)
  metadata                    UTF-8 JSON as a uint8 tensor: versions, call order (finished and started), module types,
                              the tensor names of each call, every module's training flag, parameter names and ties,
                              and `noise`: for every recorded floating-point call tensor and gradient, max |x - x64|,
                              its distance from the same run made in float64 (PyTorch's own rounding error)

Calls are watched by wrapping each module instance's `forward` for the run (torch 1.13's forward hooks do not see
keyword arguments); the wrappers are removed afterwards, also when the forward raises. A module in training mode that
changes results or state (a Dropout with p > 0, any BatchNorm, MultiheadAttention with dropout > 0) is refused unless
allow_training=True.
"""
import copy
import importlib.util
import json
import numbers
import sys
import warnings
from collections.abc import Mapping

import torch


def _flatten(value, name, names, tensors):
    """Appends every tensor in `value` (a tensor, or tuple/list/dict nests of them) depth first, with its dotted name."""
    if isinstance(value, torch.Tensor):
        names.append(name)
        tensors.append(value)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(item, f"{name}.{key}" if name else str(key), names, tensors)
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            _flatten(item, f"{name}.{i}" if name else str(i), names, tensors)


def _flatten_arguments(args, kwargs):
    names, tensors = [], []
    for i, a in enumerate(args):
        _flatten(a, str(i), names, tensors)
    for key, a in kwargs.items():
        _flatten(a, key, names, tensors)
    return names, [t.detach().clone() for t in tensors]


def _flatten_output(output):
    names, tensors = [], []
    _flatten(output, "0" if isinstance(output, torch.Tensor) else "", names, tensors)
    return names, tensors


def _refuse_training_modes(module):
    """What makes a recording unreplayable or mutates the module: random numbers (dropout) and BatchNorm's batch
    statistics and running-stat updates, in training mode."""
    active = []
    for name, m in module.named_modules():
        if not m.training:
            continue
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0:
            active.append(f"{name or '(root)'} ({type(m).__name__}, p={m.p})")
        elif isinstance(m, torch.nn.MultiheadAttention) and m.dropout > 0:
            active.append(f"{name or '(root)'} ({type(m).__name__}, dropout={m.dropout})")
        elif isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            active.append(f"{name or '(root)'} ({type(m).__name__})")
    if active:
        raise ValueError("record: modules in training mode would draw random numbers or use and update batch statistics: "
                         f"{', '.join(active)}. Call module.eval() before recording, or pass allow_training=True.")


def _parameter_names(module):
    """[(name, parameter)] for every name of every parameter, as state_dict lists them (a tied parameter once per name)."""
    result = []
    for prefix, m in module.named_modules(remove_duplicate=False):
        for key, p in m._parameters.items():
            if p is not None:
                result.append((f"{prefix}.{key}" if prefix else key, p))
    return result


def _run(module, inputs, grad_output, output_index):
    """One watched forward and backward. Returns (calls, started, output, grad_output, input_grads, param_grads, named):
    calls = [(key, type name, input names, input copies, output names, output copies)] in the order the calls finished,
    started = the call keys in the order they started, output = the root's chosen output tensor, input_grads = {i: grad},
    param_grads = {name: grad} under every name of a parameter, named = [(name, parameter)] that require grad."""
    paths = {m: name for name, m in module.named_modules()}
    calls, started, counts = [], [], {}

    def watch(m, name, forward):
        def watched(*args, **kwargs):
            k = counts.get(name, 0)
            counts[name] = k + 1
            key = name if k == 0 else f"{name}#{k}"
            started.append(key)
            in_names, in_tensors = _flatten_arguments(args, kwargs)  # before the module can change them in place
            output = forward(*args, **kwargs)
            out_names, out_tensors = _flatten_output(output)
            calls.append((key, type(m).__name__, in_names, in_tensors, out_names, [t.detach().clone() for t in out_tensors]))
            return output
        return watched

    saved = []
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point() or x.is_complex()) for x in inputs]
    try:
        for m, name in paths.items():
            saved.append((m, m.__dict__.get("forward", None), "forward" in m.__dict__))
            m.__dict__["forward"] = watch(m, name, m.forward)
        output = module(*leaves)
    finally:
        for m, previous, had in saved:
            if had:
                m.__dict__["forward"] = previous
            else:
                m.__dict__.pop("forward", None)

    out_names, out_tensors = _flatten_output(output)
    if not out_tensors:
        raise TypeError(f"record: {type(module).__name__} returned {type(output).__name__} holding no tensor")
    if not 0 <= output_index < len(out_tensors):
        raise ValueError(f"record: output_index {output_index} is out of range: {type(module).__name__} returned "
                         f"{len(out_tensors)} tensors ({', '.join(out_names)})")
    output = out_tensors[output_index]
    if grad_output is None:
        grad_output = torch.ones_like(output)  # the gradient of output.sum()
    named = [(n, p) for n, p in _parameter_names(module) if p.requires_grad]
    unique = list({id(p): p for _, p in named}.values())
    differentiable = [(i, x) for i, x in enumerate(leaves) if x.requires_grad]
    wrt = [x for _, x in differentiable] + unique
    if wrt and output.requires_grad:
        grads = torch.autograd.grad([output], wrt, [grad_output], allow_unused=True)
    else:
        grads = [None] * len(wrt)
    by_id = {id(p): g for p, g in zip(unique, grads[len(differentiable):])}
    input_grads = {i: g for (i, _), g in zip(differentiable, grads[: len(differentiable)]) if g is not None}
    param_grads = {n: by_id[id(p)] for n, p in named if by_id[id(p)] is not None}
    return calls, started, output, grad_output, input_grads, param_grads, named


def _tensors_of_run(calls, input_grads, param_grads):
    """The run's recorded tensors under their file keys (calls, then gradients)."""
    tensors = {}
    for key, _, in_names, in_tensors, out_names, out_tensors in calls:
        for j, t in enumerate(in_tensors):
            tensors[f"call/{key}/input/{j}"] = t
        for k, t in enumerate(out_tensors):
            tensors[f"call/{key}/output/{k}"] = t
    for i, g in input_grads.items():
        tensors[f"grad/input/{i}"] = g.detach().clone()
    for n, g in param_grads.items():
        tensors[f"grad/param/{n}"] = g.detach().clone()  # one copy per name: safetensors refuses shared storage
    return tensors


def _noise(x, x64):
    """max |x - x64| in float64, or None when the two cannot be compared. Elements where either value is not finite,
    or where the float64 value lies outside x's dtype's finite range (a dtype-dependent constant such as
    torch.finfo(dtype).min in an attention mask, or an overflow), are left out: they carry no rounding error."""
    if x64 is None or x.shape != x64.shape or not x64.is_floating_point():
        return None
    a, b = x.detach().to(torch.float64), x64.detach().to(torch.float64)
    keep = torch.isfinite(a) & torch.isfinite(b) & (b.abs() <= torch.finfo(x.dtype).max)
    if not bool(keep.any()):
        return 0.0
    return float((a - b).abs()[keep].max())


def record(module, inputs, path, grad_output=None, *, reference64=True, allow_training=False, output_index=0):
    """Runs `module` once on `inputs` (a tensor or a tuple of tensors), forward and backward from the root's
    `output_index`-th output tensor (its outputs flattened depth first), and writes the recording to `path` in format
    torchlinear-parity/2. The module's parameters' .grad are left untouched (torch.autograd.grad is used), and so is
    the module itself: the float64 reference run (reference64=True) runs on a deep copy.

    Raises ValueError if a Dropout (p > 0), MultiheadAttention (dropout > 0) or BatchNorm is in training mode, unless
    allow_training=True. If the float64 run cannot be made, the recording says why (noise_unavailable) and a warning
    is issued."""
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"record: input {i} is a {type(x).__name__}, not a tensor")
    if not allow_training:
        _refuse_training_modes(module)
    grad_output_given = grad_output is not None
    state = {"state/" + key: value.detach().clone() for key, value in module.state_dict().items()}
    training = {name: m.training for name, m in module.named_modules(remove_duplicate=False)}

    reference, unavailable = None, None
    if reference64:
        try:
            reference = copy.deepcopy(module)  # before the run, which may update buffers (BatchNorm, allow_training)
        except Exception as e:  # noqa: BLE001 - any failure only means: no float64 reference
            unavailable = f"deepcopy of the module failed: {type(e).__name__}: {e}"
    rng = torch.get_rng_state()

    calls, started, output, grad_output, input_grads, param_grads, named = _run(module, inputs, grad_output, output_index)
    recorded = _tensors_of_run(calls, input_grads, param_grads)

    noise = {}
    if reference is not None:
        try:
            reference.to(torch.float64)
            inputs64 = tuple(x.to(torch.float64) if x.is_floating_point() else x for x in inputs)
            grad64 = grad_output.to(torch.float64) if grad_output.is_floating_point() else grad_output
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(rng)  # the same random numbers, if the run draws any
                calls64, _, _, _, input_grads64, param_grads64, _ = _run(reference, inputs64, grad64, output_index)
            recorded64 = _tensors_of_run(calls64, input_grads64, param_grads64)
            for key, x in recorded.items():
                if x.is_floating_point():
                    value = _noise(x, recorded64.get(key))
                    if value is not None:
                        noise[key] = value
        except Exception as e:  # noqa: BLE001
            unavailable = f"{type(e).__name__}: {e}"
            noise = {}
        del reference
    if unavailable is not None:
        warnings.warn(f"record: no float64 reference run for {type(module).__name__} ({unavailable}); "
                      "the recording has no noise, and the replay will judge by tolerances alone")

    tensors = dict(state)
    for i, x in enumerate(inputs):
        tensors[f"input/{i}"] = x.detach().clone()
    tensors["grad_output"] = grad_output.detach().clone()
    tensors.update(recorded)

    first = {}
    tied = {}
    for n, p in _parameter_names(module):
        if id(p) in first:
            tied[n] = first[id(p)]
        else:
            first[id(p)] = n
    metadata = {
        "format": "torchlinear-parity/2",
        "torch_version": torch.__version__,
        "module_type": type(module).__name__,
        "call_order": [c[0] for c in calls],
        "call_start_order": started,
        "module_types": {c[0]: c[1] for c in calls},
        "calls": {c[0]: {"inputs": c[2], "outputs": c[4]} for c in calls},
        "training": training,
        "inputs": [{"dtype": str(x.dtype), "shape": list(x.shape)} for x in inputs],
        "output": {"dtype": str(output.dtype), "shape": list(output.shape)},
        "output_index": output_index,
        "grad_output_given": grad_output_given,
        "parameters": [n for n, _ in named],
        "tied": tied,
        "noise_reference": "float64" if reference64 and unavailable is None else None,
        "noise_unavailable": unavailable,
        "noise": noise,
    }
    _save(tensors, metadata, path, "torchlinear-parity/2")
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


def build_from_spec(spec):
    """Calls `function` of the Python file in a command line's `file.py:function` and returns what it built: `(module,
    inputs)` or `(module, inputs, grad_output)`. Shared with export_port.py's command line."""
    file, function = spec.rsplit(":", 1)
    loader = importlib.util.spec_from_file_location("parity_subject", file)
    subject = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(subject)
    return getattr(subject, function)()


def _main(argv):
    if len(argv) != 3 or ":" not in argv[1]:
        print(__doc__)
        return 2
    built = build_from_spec(argv[1])
    module, inputs = built[0], built[1]
    grad_output = built[2] if len(built) > 2 else None
    metadata = record(module, inputs, argv[2], grad_output)
    print(f"recorded {len(metadata['call_order'])} module calls of {metadata['module_type']} to {argv[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
