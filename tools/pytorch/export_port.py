"""Write a TorchSharp port of a PyTorch module, its weights and its parity recording, for TorchLinear's Parity.Replay to
prove the port right.

Needs only torch >= 1.13. From your own script (this folder on sys.path):

    from export_port import export_port
    model.eval()
    export_port(model, (example_input,), "out_dir", "MyModel")

or from the command line, for a module that a Python file builds (as record_parity.py):

    python export_port.py my_model.py:build_model_and_input out_dir MyModel [--namespace My.Ports]

(`build_model_and_input()` returns `(module, inputs)`; inputs a tensor or a tuple of one or two tensors).

It writes into out_dir:
  <MyModel>.cs            the port: public class MyModel : nn.Module<Tensor, Tensor> (two inputs: <Tensor, Tensor, Tensor>)
                          with a public parameterless constructor, and one class per PyTorch module class it uses
  <MyModel>.safetensors   the model's state_dict
  <MyModel>.parity.pt     record_parity.record(model, example_inputs, ...)

How it sees the model: torch.jit.trace(model, example_inputs, strict=False), which keeps the module hierarchy (every
submodule has its own graph of aten operations, each with its Python source line). Each module is written from its own
graph; the modules TorchSharp has (Linear as TorchLinear's CustomLinear, transformers' Conv1D as TorchLinear's Conv1D,
Conv2d, BatchNorm2d, LayerNorm, Embedding, ReLU, ...) are constructed, not translated. A submodule's C# forward takes every tensor argument of its Python call
(keyword arguments too, in the recorder's order) and returns what Python returns (several tensors as a ValueTuple);
the trace is watched to recover both (TraceCalls). Nothing silent: every operation or module it cannot write, every
branch on a tensor's value or Python number taken from one (a branch on sizes only, or a number taken from sizes, is
written as the path taken with a guard that throws where an input would take the other; one the port cannot write is
refused unless the caller assumes it, assume_shape_conditions), every
value the trace froze that changes with the input's shape or values (found by tracing again at a second shape with other
values and comparing the generated C#) and every call the port cannot make (one tensor as two arguments, more than six)
is refused with ExportRefused, before anything is written. docs/porting.md has the rules.
"""
import ast
import dis
import hashlib
import inspect
import keyword
import linecache
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import warnings
import json

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from record_parity import _flatten, _parameter_names, build_from_spec, record  # noqa: E402


class ExportRefused(Exception):
    """The generator cannot write a faithful port: the message names every operation or module, its path and its
    Python source line. Nothing has been written."""


# ----------------------------------------------------------------------------------------------------------------------
# C# literals and names

CS_KEYWORDS = {
    "abstract", "as", "base", "bool", "break", "byte", "case", "catch", "char", "checked", "class", "const", "continue",
    "decimal", "default", "delegate", "do", "double", "else", "enum", "event", "explicit", "extern", "false", "finally",
    "fixed", "float", "for", "foreach", "goto", "if", "implicit", "in", "int", "interface", "internal", "is", "lock",
    "long", "namespace", "new", "null", "object", "operator", "out", "override", "params", "private", "protected",
    "public", "readonly", "ref", "return", "sbyte", "sealed", "short", "sizeof", "stackalloc", "static", "string",
    "struct", "switch", "this", "throw", "true", "try", "typeof", "uint", "ulong", "unchecked", "unsafe", "ushort",
    "using", "virtual", "void", "volatile", "while", "var", "value", "torch", "nn", "scope",
}
# Members of TorchSharp's nn.Module that a field must not hide.
MODULE_MEMBERS = {
    "train", "eval", "to", "apply", "call", "forward", "name", "parameters", "buffers", "modules", "children",
    "state_dict", "load_state_dict", "cuda", "cpu", "half", "@float", "@double", "zero_grad", "training", "register_module",
    "register_buffer", "register_parameter", "named_modules", "named_children", "named_parameters", "named_buffers",
    "Dispose", "GetType", "ToString", "Equals", "GetHashCode", "bfloat16", "requires_grad", "get_submodule",
}

SCALAR_TYPES = {0: "Byte", 1: "Int8", 2: "Int16", 3: "Int32", 4: "Int64", 5: "Float16", 6: "Float32", 7: "Float64",
                11: "Bool", 15: "BFloat16"}
TORCH_DTYPES = {torch.float32: "Float32", torch.float64: "Float64", torch.float16: "Float16", torch.bfloat16: "BFloat16",
                torch.int64: "Int64", torch.int32: "Int32", torch.bool: "Bool", torch.uint8: "Byte", torch.int8: "Int8"}


def cs_ident(name):
    """A C# identifier for a PyTorch name: '0' -> '_0', a keyword or a Module member -> name + '_'."""
    ident = re.sub(r"[^A-Za-z0-9_]", "_", name)
    if not ident or ident[0].isdigit():
        ident = "_" + ident
    if ident in CS_KEYWORDS or ident in MODULE_MEMBERS:
        ident += "_"
    return ident


def cs_literal(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if -2**31 <= value < 2**31 else (f"{value}L" if value != 2**63 - 1 else "long.MaxValue")
    if isinstance(value, float):
        if math.isinf(value):
            return "double.PositiveInfinity" if value > 0 else "double.NegativeInfinity"
        if math.isnan(value):
            return "double.NaN"
        text = repr(value)
        return text if any(c in text for c in ".eE") else text + ".0"
    if isinstance(value, tuple):
        return "(" + ", ".join(cs_literal(v) for v in value) + ")"
    raise TypeError(f"no C# literal for {value!r}")


def cs_type_of(value):
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "long"
    if isinstance(value, float):
        return "double"
    if isinstance(value, tuple):
        return "(" + ", ".join(cs_type_of(v) for v in value) + ")"
    raise TypeError(value)


def _frame_of(node):
    """(file, line) of a graph node: the innermost frame of the tracer's Python stack that is not in torch itself
    (F.softmax's caller rather than torch/nn/functional.py), or None."""
    text = str(node.sourceRange()) if hasattr(node, "sourceRange") else ""
    frames = [(m.group(1), int(m.group(2))) for m in re.finditer(r"(\S+\.py)\((\d+)\)", text)]
    if not frames:
        return None
    own = [f for f in frames if "/torch/" not in f[0]]
    return own[0] if own else frames[0]


def _source_of(node):
    """'file.py:line: source text' for a graph node (_frame_of), or ''."""
    frame = _frame_of(node)
    return _describe_line(*frame) if frame else ""


def _describe_line(path, line):
    short = path
    for marker in ("dist-packages/", "site-packages/"):
        if marker in path:
            short = path.rsplit(marker, 1)[1]
            break
    else:
        short = os.path.basename(path)
    code = linecache.getline(path, line).strip()
    return f"{short}:{line}: {code}" if code else f"{short}:{line}"


# ----------------------------------------------------------------------------------------------------------------------
# Settings named after the Python source: the expression of the line that a traced constant came from.

LITERAL = "<literal>"   # _source_operand's answer for a number the Python line writes as a literal


def _parse_statement(path, line):
    """The statement starting at path:line as (ast tree, its text) (the line alone, or with the lines that continue
    it), or None."""
    text = linecache.getline(path, line)
    if not text.strip():
        return None
    code = text.strip()
    if code.startswith("elif "):
        code = code[2:]
    for extra in range(0, 8):
        if extra:
            more = linecache.getline(path, line + extra)
            if not more:
                return None
            code += "\n" + more.strip()
        for attempt in (code, code + " pass" if code.rstrip().endswith(":") else None):
            if attempt is None:
                continue
            try:
                return ast.parse(attempt), attempt
            except SyntaxError:
                pass
    return None


def _setting_name(expr):
    """The name a setting takes after the Python expression it came from: a name its name (`n_rep`), `self.attr` (or
    any `a.attr`) `attr`, `f(a.b)` `f_b` (`math.sqrt(self.head_dim)`: `sqrt_head_dim`), `torch.finfo(dtype).min`
    `finfo_min`, `shape[2]` `shape_2`; anything else None."""
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.Attribute):
        if isinstance(expr.value, ast.Call):
            inner = _setting_name(expr.value.func)
            return f"{inner}_{expr.attr}" if inner else None
        return expr.attr
    if isinstance(expr, ast.Call) and not expr.keywords:
        func = _setting_name(expr.func)
        args = [_setting_name(a) for a in expr.args]
        if func is None or any(a is None for a in args):
            return None
        return "_".join([func] + args)
    if isinstance(expr, ast.Subscript):
        index = expr.slice.value if isinstance(expr.slice, ast.Index) else expr.slice   # ast.Index: Python < 3.9
        if isinstance(expr.value, ast.Name) and isinstance(index, ast.Constant) and type(index.value) is int \
                and index.value >= 0:
            return f"{expr.value.id}_{index.value}"
    return None


_FILE_TREES = {}


def _function_at(path, line):
    """The innermost function (def, async def, lambda) of the Python file at `path` whose source holds `line`, as its
    ast node, or None (no such function, the file unreadable or not Python)."""
    if path not in _FILE_TREES:
        try:
            _FILE_TREES[path] = ast.parse("".join(linecache.getlines(path)))
        except (SyntaxError, ValueError):
            _FILE_TREES[path] = None
    tree, found = _FILE_TREES[path], None
    for n in ast.walk(tree) if tree is not None else ():
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and n.lineno <= line <= n.end_lineno:
            if found is None or n.lineno >= found.lineno and n.end_lineno <= found.end_lineno:
                found = n
    return found


def _is_number_literal(expr, value):
    """Whether expr is the literal `value` (`2`, `-1`, `0.5`)."""
    if isinstance(expr, ast.UnaryOp) and isinstance(expr.op, ast.USub):
        return _is_number_literal(expr.operand, -value)
    return isinstance(expr, ast.Constant) and type(expr.value) in (int, float) and expr.value == value


def _evaluates_to(expr, value, module, path):
    """Whether expr, made only of names, attributes, numbers, arithmetic and calls of math's functions, evaluates to
    `value` with `self` the module and the globals of the file the line is in (no other call is made)."""
    for n in ast.walk(expr):
        if isinstance(n, ast.Call) and not (isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)
                                            and n.func.value.id == "math"):
            return False
        if not isinstance(n, (ast.Name, ast.Attribute, ast.Constant, ast.BinOp, ast.UnaryOp, ast.Call, ast.Load,
                              ast.operator, ast.unaryop)):
            return False
    scope = {}
    for m in list(sys.modules.values()) if path else ():
        if getattr(m, "__file__", None) and os.path.abspath(m.__file__) == os.path.abspath(path):
            scope.update(vars(m))
            break
    scope.update({"self": module, "math": math})
    try:
        got = eval(compile(ast.Expression(expr), "<setting>", "eval"), {"__builtins__": {}}, scope)  # noqa: S307
    except Exception:   # a local of the function, an attribute the module lacks: not this operand
        return False
    return type(got) in (int, float) and not isinstance(got, bool) and got == value


_CALL_ARGUMENTS = {"full": (1, "fill_value"), "masked_fill": (1, "value")}   # the number's position (method: after self)
_BINOPS = {"mul": ast.Mult, "div": ast.Div, "add": ast.Add, "sub": ast.Sub, "rsub": ast.Sub, "floor_divide": ast.FloorDiv,
           "remainder": ast.Mod}


def _size_dim(value):
    """The dimension d when graph value `value` is `x.size(d)` (through the tracer's int conversions), else None."""
    node = value.node()
    while node.kind() in ("prim::NumToTensor", "aten::Int", "aten::ScalarImplicit") and list(node.inputs()):
        node = node.inputsAt(0).node()
    if node.kind() != "aten::size" or len(list(node.inputs())) != 2 or node.inputsAt(1).node().kind() != "prim::Constant":
        return None
    dim = node.inputsAt(1).toIValue()
    rank = node.inputsAt(0).type().dim() if node.inputsAt(0).type().kind() == "TensorType" else None
    if dim < 0:
        dim = dim + rank if rank is not None else None
    return dim


def _named(expr):
    """_source_operand's answer for an expression: ("bare", name) for a plain name (a local, an argument, a global),
    ("tuple", name) for an element of a tuple built elsewhere, ("name", name) for another expression with a name
    (_setting_name), ("none", None) for one without."""
    name = _setting_name(expr)
    if name is None:
        return "none", None
    if isinstance(expr, ast.Name):
        return "bare", name
    return ("tuple" if isinstance(expr, ast.Subscript) else "name"), name


def _source_operand(frame, op, value, module, position=None, traced=None, second=True, traced_names=frozenset()):
    """What a constant of a traced operation is in its Python line (frame): ("literal", LITERAL) when the line writes
    it as a number, else the expression it came from as _named says, or None when the line does not say (unparsable,
    several candidates that disagree, an expression without a name).

    op 'view'/'reshape'/'expand': the positional argument of the line's `.op(...)` call at `position` (the element
    of a tuple or of a starred name passed whole: `view(new_shape)` gives `new_shape_2`); 'full'/'masked_fill'
    (_CALL_ARGUMENTS): the fill value, positional or by keyword; 'arange': the positional argument at `position`;
    'slice': the bound `position` = (dim, 'lower' | 'upper') of the subscript's slice at that dimension; 'compare':
    the element at the size's dimension `position` of a tuple a `.size()` or `.shape` is compared with. Otherwise a binary
    operation (`_BINOPS`): the operand that is not the traced one, `traced` the C# name of the traced operand (its
    Python name is that name without a numeric suffix), `second` whether the value is the traced operation's second
    operand. Of the line's operations of that kind, the one with an operand named as the traced one, else the only
    one; where several remain, only an answer every one of them gives (a literal, an operand that evaluates to the
    value) counts, never one operation's operand for another's value. In that operation: a literal equal to the value,
    else the one operand that evaluates to it (_evaluates_to) and is not named as the traced one, else the operand not
    named as the traced one, else for `/ // % -` the operand at the traced operation's position (`x / s`: the right;
    a reflected `s - x`: the left), for `*` `+` the one operand with a name; never a plain name in `traced_names`
    (the Python names the trace gave values), so that a setting is never named after the traced tensor itself."""
    if frame is None:
        return None
    parsed = _parse_statement(*frame)
    if parsed is None:
        return None
    tree = parsed[0]
    answers = []

    def element(arg):   # an argument the value is: a literal, or the expression's name
        if _is_number_literal(arg, value):
            return "literal", LITERAL
        return _named(arg)

    if op in _CALL_ARGUMENTS:
        # torch.full(size, fill_value), x.masked_fill(mask, value): that argument, positional or by keyword
        index, keyword = _CALL_ARGUMENTS[op]
        for n in ast.walk(tree):
            if isinstance(n, ast.Call) and isinstance(n.func, (ast.Attribute, ast.Name)) and \
                    (n.func.attr if isinstance(n.func, ast.Attribute) else n.func.id) == op:
                args = list(n.args)
                if op == "masked_fill" and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name) \
                        and n.func.value.id == "torch":
                    args = args[1:]   # torch.masked_fill(x, mask, value)
                if any(isinstance(a, ast.Starred) for a in args):
                    answers.append(("none", None))
                elif index < len(args):
                    answers.append(element(args[index]))
                else:
                    given = [k.value for k in n.keywords if k.arg == keyword]
                    answers.append(element(given[0]) if given else ("none", None))
    elif op == "arange":
        # torch.arange(start, end, step): the positional argument at `position`
        for n in ast.walk(tree):
            if isinstance(n, ast.Call) and isinstance(n.func, (ast.Attribute, ast.Name)) and \
                    (n.func.attr if isinstance(n.func, ast.Attribute) else n.func.id) == "arange":
                if any(isinstance(a, ast.Starred) for a in n.args) or position >= len(n.args):
                    answers.append(("none", None))
                else:
                    answers.append(element(n.args[position]))
    elif op == "slice":
        # x[a:b, c:d]: the bound (`position` (dim, 'lower' | 'upper' | 'step')) of the slice at that dimension, where
        # the subscript has no `...` (a slice or None before it takes one dimension each, an index none)
        dim, bound = position
        for n in ast.walk(tree):
            if not isinstance(n, ast.Subscript):
                continue
            index = n.slice.value if isinstance(n.slice, ast.Index) else n.slice   # ast.Index: Python < 3.9
            items = list(index.elts) if isinstance(index, ast.Tuple) else [index]
            if not any(isinstance(i, ast.Slice) for i in items):
                continue
            if any(isinstance(i, ast.Constant) and i.value is Ellipsis for i in items):
                answers.append(("none", None))
                continue
            at, found = 0, None
            for i in items:
                if at == dim and isinstance(i, ast.Slice):
                    found = i
                    break
                if isinstance(i, ast.Slice) or isinstance(i, ast.Constant) and i.value is None:
                    at += 1
            if found is None:
                answers.append(("none", None))
                continue
            expr = getattr(found, bound)
            answers.append(("literal", LITERAL) if expr is None else element(expr))
    elif op == "compare":
        # `x.size() != (a, b, c)` (or `x.shape == [...]`): the element at the size's dimension `position`
        for n in ast.walk(tree):
            if not (isinstance(n, ast.Compare) and len(n.ops) == 1):
                continue
            sides = [n.left, n.comparators[0]]
            tuples = [e for e in sides if isinstance(e, (ast.Tuple, ast.List))]
            sizes = [e for e in sides if isinstance(e, ast.Call) and isinstance(e.func, ast.Attribute) and e.func.attr == "size"
                     and not e.args or isinstance(e, ast.Attribute) and e.attr == "shape"]
            if len(tuples) == 1 and len(sizes) == 1:
                elts = tuples[0].elts
                if any(isinstance(e, ast.Starred) for e in elts) or position >= len(elts):
                    answers.append(("none", None))
                else:
                    answers.append(element(elts[position]))
    elif op in ("view", "reshape", "expand"):
        for n in ast.walk(tree):
            if not (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == op):
                continue
            args = list(n.args)
            if isinstance(n.func.value, ast.Name) and n.func.value.id == "torch":
                args = args[1:]   # torch.reshape(x, shape)
            if len(args) == 1 and not isinstance(args[0], ast.Starred) and position is not None and not (
                    isinstance(args[0], ast.Constant) or isinstance(args[0], ast.UnaryOp)):
                whole = args[0]
                if isinstance(whole, (ast.Tuple, ast.List)):
                    args = list(whole.elts)
                elif isinstance(whole, ast.Name):
                    answers.append(("tuple", f"{whole.id}_{position}"))
                    continue
                else:
                    answers.append(("none", None))
                    continue
            elif len(args) == 1 and isinstance(args[0], ast.Starred) and isinstance(args[0].value, ast.Name):
                answers.append(("tuple", f"{args[0].value.id}_{position}"))
                continue
            starred = [i for i, a in enumerate(args) if isinstance(a, ast.Starred)]
            if starred and position >= starred[0] or position >= len(args):
                answers.append(("none", None))
                continue
            answers.append(element(args[position]))
    elif op in _BINOPS:
        binops = [(n.left, n.right) for n in ast.walk(tree) if isinstance(n, ast.BinOp) and isinstance(n.op, _BINOPS[op])]
        binops += [(n.target, n.value) for n in ast.walk(tree) if isinstance(n, ast.AugAssign) and isinstance(n.op, _BINOPS[op])]
        base = re.sub(r"\d+$", "", traced or "")

        def is_traced(e):   # the operand the traced value is, by its name (`x` for the C# x2)
            return bool(base) and isinstance(e, ast.Name) and e.id == base

        def strong(left, right):   # a literal equal to the value, or the one operand that evaluates to it
            if any(_is_number_literal(e, value) for e in (left, right)):
                return "literal", LITERAL
            evaluated = [e for e in (left, right) if not is_traced(e) and _evaluates_to(e, value, module, frame[0])]
            return _named(evaluated[0]) if len(evaluated) == 1 else None

        def judge(left, right):   # the answer of the one operation the value is an operand of
            answer = strong(left, right)
            if answer is not None:
                return answer
            others = [e for e in (left, right) if not is_traced(e)]
            if len(others) == 1:   # the other operand is the traced one, by name
                return _named(others[0])
            if len(others) == 2 and op in ("div", "sub", "floor_divide", "remainder", "rsub"):
                # Not symmetric: the operand of the traced operation's position (`x / s`: aten::div(x, s); `s - x`:
                # aten::rsub(x, s)).
                chosen = left if (op == "rsub") == second else right
            elif len(others) == 2:
                # Symmetric (`*`, `+`): the one operand with a name (`x.view(...) * k`) unless that name is one the
                # trace gave a value (`h * cfg.gains[0]` where h holds the tensor): then the line does not say.
                with_name = [e for e in (left, right) if _setting_name(e)]
                chosen = with_name[0] if len(with_name) == 1 else None
            else:
                return "none", None
            if chosen is None or isinstance(chosen, ast.Name) and chosen.id in traced_names:
                return "none", None
            return _named(chosen)

        if len(binops) == 1:
            answers.append(judge(*binops[0]))
        elif binops:
            # Several operations of this kind on the line: only the one whose other operand is the traced one, else
            # an answer every one of them gives (`a * 2 + b * 2`); never one operation's operand for another.
            mine = [b for b in binops if any(is_traced(e) for e in b)]
            if len(mine) == 1:
                answers.append(judge(*mine[0]))
            else:
                answers.extend(strong(*b) or ("none", None) for b in binops)
    if not answers or len(set(answers)) != 1 or answers[0][0] == "none":
        return None
    return answers[0]


# ----------------------------------------------------------------------------------------------------------------------
# Slots: the numbers a class body holds. Instances of one PyTorch class with the same code share one C# class; a slot
# whose value differs between them becomes a constructor parameter, one that does not stays a literal (or a named field).

class Body:
    """A class body under construction: text with @@i@@ markers for slots."""

    def __init__(self):
        self.slots = []   # [name, value, kind] kind: "inline" (a literal where used) or "field" (a named field)
        self.own = []     # indices of the slots made here (shapes, configuration values), not adopted from children

    def slot(self, name, value, kind="inline"):
        self.slots.append([name, value, kind])
        self.own.append(len(self.slots) - 1)
        return f"@@{len(self.slots) - 1}@@"

    def adopt(self, child_slots):
        """Take a child's slots as this body's; returns the marker offset."""
        offset = len(self.slots)
        self.slots.extend([list(s) for s in child_slots])
        return offset


# ----------------------------------------------------------------------------------------------------------------------
# Modules TorchSharp has: constructed, not translated (exact types only: a subclass may override forward).

def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _leaf(module, body, path):
    """(C# field type, constructor expression with slot markers) for a module TorchSharp has, or None."""
    t = type(module)
    s = body.slot
    if t is nn.Linear:
        return ("CustomLinear", f"new CustomLinear({s('in_features', module.in_features)}, {s('out_features', module.out_features)}, "
                f"bias: {s('bias', module.bias is not None)}) {{ Dispatch = LinearDispatch.PyTorch }}")
    if _is_transformers_conv1d(module):
        # transformers' Conv1D (weight (nx, nf), addmm): TorchLinear's Conv1D computes it with the same operations, for
        # any input rank, and runs LoRA adapters in its own slot (TorchLinear.Lora adapts it as PEFT does,
        # fan_in_fan_out); a translated copy of its graph would be a class LoRA does not know.
        return ("Conv1D", f"new Conv1D(nf: {s('nf', module.nf)}, nx: {s('nx', module.nx)})")
    if t is nn.Conv2d:
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ExportRefused(f"{path} (Conv2d): padding {module.padding!r}, padding_mode {module.padding_mode!r}: only numeric zero padding is written")
        return ("TorchSharp.Modules.Conv2d",
                f"nn.Conv2d({s('in_channels', module.in_channels)}, {s('out_channels', module.out_channels)}, {s('kernel_size', _pair(module.kernel_size))}, "
                f"stride: {s('stride', _pair(module.stride))}, padding: {s('padding', _pair(module.padding))}, dilation: {s('dilation', _pair(module.dilation))}, "
                f"groups: {s('groups', module.groups)}, bias: {s('bias', module.bias is not None)})")
    if t is nn.BatchNorm2d:
        if module.momentum is None:
            raise ExportRefused(f"{path} (BatchNorm2d): momentum None (cumulative average) is not written")
        return ("TorchSharp.Modules.BatchNorm2d",
                f"nn.BatchNorm2d({s('num_features', module.num_features)}, eps: {s('eps', float(module.eps))}, momentum: {s('momentum', float(module.momentum))}, "
                f"affine: {s('affine', module.affine)}, track_running_stats: {s('track_running_stats', module.track_running_stats)})")
    if t is nn.LayerNorm:
        shape = tuple(module.normalized_shape)
        shape_text = s("normalized_shape", shape[0]) if len(shape) == 1 else "new long[] { " + ", ".join(s("normalized_shape", d) for d in shape) + " }"
        return ("TorchSharp.Modules.LayerNorm",
                f"nn.LayerNorm({shape_text}, eps: {s('eps', float(module.eps))}, elementwise_affine: {s('elementwise_affine', module.elementwise_affine)})")
    if t is nn.Embedding:
        if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            raise ExportRefused(f"{path} (Embedding): max_norm, scale_grad_by_freq and sparse are not written")
        pad = "" if module.padding_idx is None else f", padding_idx: {s('padding_idx', module.padding_idx)}"
        return ("TorchSharp.Modules.Embedding",
                f"nn.Embedding({s('num_embeddings', module.num_embeddings)}, {s('embedding_dim', module.embedding_dim)}{pad})")
    if t is nn.ReLU:
        return ("TorchSharp.Modules.ReLU", f"nn.ReLU(inplace: {s('inplace', module.inplace)})")
    if t is nn.ReLU6:
        return ("TorchSharp.Modules.ReLU6", f"nn.ReLU6(inplace: {s('inplace', module.inplace)})")
    if t is nn.GELU:
        approximate = getattr(module, "approximate", "none")
        return ("TorchSharp.Modules.GELU", "nn.GELU()" if approximate == "none" else "nn.GELU(TorchSharp.Modules.GELU.Approximate.tanh)")
    if t is nn.SiLU:
        return ("TorchSharp.Modules.SiLU", "nn.SiLU()")
    if t is nn.Tanh:
        return ("TorchSharp.Modules.Tanh", "nn.Tanh()")
    if t is nn.Sigmoid:
        return ("TorchSharp.Modules.Sigmoid", "nn.Sigmoid()")
    if t is nn.Identity:
        return ("TorchSharp.Modules.Identity", "nn.Identity()")
    if t is nn.Dropout:
        return ("TorchSharp.Modules.Dropout", f"nn.Dropout({s('p', float(module.p))}, inplace: {s('inplace', module.inplace)})")
    if t is nn.Flatten:
        return ("TorchSharp.Modules.Flatten", f"nn.Flatten({s('start_dim', module.start_dim)}, {s('end_dim', module.end_dim)})")
    if t is nn.MaxPool2d:
        if module.return_indices:
            raise ExportRefused(f"{path} (MaxPool2d): return_indices=True is not written")
        return ("TorchSharp.Modules.MaxPool2d",
                f"nn.MaxPool2d({s('kernel_size', _pair(module.kernel_size))}, stride: {s('stride', _pair(module.stride))}, "
                f"padding: {s('padding', _pair(module.padding))}, dilation: {s('dilation', _pair(module.dilation))}, ceil_mode: {s('ceil_mode', module.ceil_mode)})")
    if t is nn.AdaptiveAvgPool2d:
        size = _pair(module.output_size)
        if None in size:
            raise ExportRefused(f"{path} (AdaptiveAvgPool2d): output_size {module.output_size!r} with None is not written")
        return ("TorchSharp.Modules.AdaptiveAvgPool2d", f"nn.AdaptiveAvgPool2d({s('output_size', size)})")
    return None


LEAF_TYPES = (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.LayerNorm, nn.Embedding, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh,
              nn.Sigmoid, nn.Identity, nn.Dropout, nn.Flatten, nn.MaxPool2d, nn.AdaptiveAvgPool2d)


def _is_transformers_conv1d(module):
    """transformers' Conv1D, exact type only (a subclass may override forward), without importing transformers."""
    t = type(module)
    return t.__module__ == "transformers.pytorch_utils" and t.__name__ == "Conv1D"


def _is_leaf(module):
    return type(module) in LEAF_TYPES or _is_transformers_conv1d(module)


def _is_sequential(module):
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


# ----------------------------------------------------------------------------------------------------------------------
# Translation of one module's traced graph into a C# forward.

class Value:
    """What a graph value is in C#: kind 'tensor', 'long', 'double', 'bool', 'none', 'longs' (long[]), 'tensors'
    (Tensor[]), 'dtype', 'device', 'module' (expr is the C# expression of the child), 'tuple' (items)."""

    def __init__(self, kind, expr, nonneg=False, items=None, module=None, const=None):
        self.kind, self.expr, self.nonneg, self.items, self.module, self.const = kind, expr, nonneg, items, module, const


class Refusals:
    def __init__(self):
        self.items = []

    def add(self, text):
        if text not in self.items:
            self.items.append(text)


class Translator:
    """Turns module `module` (at `path`) with its traced graph into C# forward lines (with slot markers)."""

    def __init__(self, exporter, module, traced, path, body, field_of, refusals, is_root, unnamed=frozenset()):
        self.x, self.module, self.traced, self.path, self.body = exporter, module, traced, path, body
        self.field_of = field_of            # PyTorch child/param/buffer name -> C# field name
        self.refusals, self.is_root = refusals, is_root
        self.lines = []
        self.names = set(field_of.values()) | {"scope"}
        self.values = {}
        self.config = {}                    # (name, value) -> marker, to reuse a named field
        self.bare = {}                      # marker -> (name, value) of a setting named after a plain Python name
        self.unnamed = unnamed              # plain Python names not to name settings after (partial_settings)
        self.line_frames = {}               # index in lines -> (file, line) of the Python statement it came from
        self.called = []                    # (child name, argument count, output count)
        self.input_names = []
        self.locals = []

    # -- naming
    def canonical(self):
        """The forward with its inputs and locals renamed in order of definition: instances of one class whose
        tracer-given names differ (a value named after the module it flows into, an input named after the caller's
        variable) still group together; the first instance's names are written."""
        mapping = {name: f"v{i}" for i, name in enumerate(self.locals)}
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, self.locals)) + r")\b") if self.locals else None

        def rename(line):
            # The code only: a line's comment quotes the Python source, whose names are not the C# locals.
            code, sep, comment = line.partition("  // ")
            return pattern.sub(lambda m: mapping[m.group(1)], code) + sep + comment

        lines = tuple(rename(line) if pattern else line for line in self.lines)
        return lines, rename(self.result or "") if pattern else self.result

    def fresh(self, debug):
        if debug.startswith("tlout"):   # a marker of a submodule's output (TraceCalls): the name it replaced
            debug = self.x.calls.original.get(debug.split(".")[0], "t")
        base = debug.split(".")[0] if not debug.split(".")[0].isdigit() else "t"
        base = cs_ident(base) if base != "t" else "t"
        if base in ("self", "this"):
            base = "self_"
        if base == "input":
            base = "t"   # the tracer names a value after the parameter of the module it flows into: misleading here
        name, i = base, 1
        while name in self.names or name in CS_KEYWORDS:
            i += 1
            name = f"{base}{i}"
        self.names.add(name)
        self.locals.append(name)
        return name

    def where(self, node):
        src = _source_of(node)
        return f"{self.path or '(root)'} ({type(self.module).__name__})" + (f", {src}" if src else "")

    def refuse(self, node, why):
        if getattr(self, "soft", None) is not None:   # a node that only computes a guard's condition (run)
            self.soft.append(why)
            return
        self.refusals.add(f"{why} at {self.where(node)}")

    def emit(self, node, text):
        frame = _frame_of(node)
        if frame is not None:
            self.line_frames[len(self.lines)] = frame
        src = _source_of(node)
        self.lines.append(f"{text}" + (f"  // {src}" if src else ""))

    # -- config values (named fields)
    def attribute_equal_to(self, value):
        """The module attribute equal to `value` when exactly one is, else None."""
        names = [k for k, v in vars(self.module).items()
                 if not k.startswith("_") and type(v) is type(value) and not isinstance(v, bool) and v == value]
        return names[0] if len(names) == 1 else None

    def config_value(self, value, hint, source=None):
        """A number the code holds, a named setting: named after the Python expression it came from (`source`, from
        _source_operand: `n_rep`, `head_dim`, `sqrt_head_dim`), else (an element of a tuple built elsewhere, or no
        source) after the module attribute equal to it when exactly one is, else `new_shape_2` or `hint`. One setting
        per (name, value): every use of a value named alike is the same setting."""
        if source is not None and source[0] in ("name", "bare"):
            name = source[1]
        else:
            name = self.attribute_equal_to(value) or (source[1] if source is not None else hint)
        key = (name, value)
        if key not in self.config:
            self.config[key] = self.body.slot(name, value, "field")
        if source is not None and source[0] == "bare":
            self.bare[self.config[key]] = (name, value)
        return self.config[key]

    def partial_settings(self):
        """The plain Python names (`n_rep`, `past_length`) of settings that the port does not read everywhere Python
        reads them: a settings name is kept only where every read of that name (ast.Name load) in the functions whose
        statements gave this forward's lines (the whole function: conditions, loops, call arguments, nested
        functions) lies in a statement whose port lines read the setting, and no such statement names it without the
        port reading it there (`past_seen_tokens + n` on a line the generator did not name, a size-derived `keep =
        min(n, 4)`, a name given to another value later, `if n_rep > 1:`, `for _ in range(n)`, `helper(x, n)`,
        `self.embeddings(..., past_key_values_length=past_key_values_length)`). Such a setting is not one the port
        follows, and the module is translated again without those names (the older rule names their values), so that
        changing a setting never changes some of the uses the traced functions make of that Python name and not
        others."""
        by_frame = {}
        for index, frame in self.line_frames.items():
            by_frame.setdefault(frame, []).append(self.lines[index])
        spans = {}   # frame -> (file, first line, last line) of its statement
        for frame in by_frame:
            parsed = _parse_statement(*frame)
            spans[frame] = (frame[0], frame[1], frame[1] + (parsed[1].count("\n") if parsed else 0))
        functions = {}
        for frame in by_frame:
            function = _function_at(*frame)
            if function is not None:
                functions[(frame[0], function.lineno, function.col_offset)] = (frame[0], function)
        partial = set()
        for marker, (name, value) in self.bare.items():
            pattern = re.compile(rf"(?<![\w.]){re.escape(name)}\b")
            reading = [spans[frame] for frame, lines in by_frame.items()
                       if any(marker in line.partition("  // ")[0] for line in lines)]
            for frame, lines in by_frame.items():
                parsed = _parse_statement(*frame)
                text = parsed[1] if parsed else linecache.getline(*frame)
                if pattern.search(text) and not any(marker in line.partition("  // ")[0] for line in lines):
                    partial.add(name)
                    break
            for path, function in functions.values():
                for n in ast.walk(function):
                    if isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load) and not any(
                            path == file and first <= n.lineno <= last for file, first, last in reading):
                        partial.add(name)
        # A helper's parameter that a traced function passes a name Python reads elsewhere (`helper(x, n)` with n
        # partial) is that name under another one: a setting of the parameter would be followed by the helper only.
        bare_names = {name for name, _ in self.bare.values()}
        changed = True
        while changed:
            changed = False
            for path, function in functions.values():
                if isinstance(function, ast.Lambda):
                    continue
                params = [a.arg for a in function.args.posonlyargs + function.args.args]
                for name in bare_names - partial:
                    if name not in params:
                        continue
                    index = params.index(name)
                    for _, caller in functions.values():
                        for call in ast.walk(caller):
                            if not isinstance(call, ast.Call):
                                continue
                            callee = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", None)
                            if callee != function.name:
                                continue
                            shift = 1 if params and params[0] == "self" and isinstance(call.func, ast.Attribute) else 0
                            args = [k.value for k in call.keywords if k.arg == name]
                            if index - shift < len(call.args) and index - shift >= 0:
                                args.append(call.args[index - shift])
                            if any(isinstance(arg, ast.Name) and arg.id in partial for arg in args):
                                partial.add(name)
                                changed = True
        return partial

    # -- values
    def const_of(self, node):
        out = node.output()
        t = out.type()
        kind = t.kind()
        if kind == "NoneType":
            return Value("none", "null", const=None)
        if "value" not in node.attributeNames():
            return Value("none", "null", const=None)
        akind = node.kindOf("value")
        if akind == "i" and kind == "BoolType":
            v = bool(node.i("value"))
            return Value("bool", cs_literal(v), const=v)
        if akind == "i":
            v = node.i("value")
            return Value("long", cs_literal(v), nonneg=v >= 0, const=v)
        if akind == "f":
            v = node.f("value")
            return Value("double", cs_literal(v), const=v)
        if akind == "s":
            v = node.s("value")
            if kind == "DeviceObjType":
                return Value("device", f'"{v}"', const=v)
            return Value("string", f'"{v}"', const=v)
        if akind == "t":
            tensor = node.t("value")
            if tensor.dim() == 0:
                v = tensor.item()
                if tensor.dtype.is_floating_point:
                    return Value("double", cs_literal(float(v)), const=float(v))
                if tensor.dtype == torch.bool:
                    return Value("bool", cs_literal(bool(v)), const=bool(v))
                return Value("long", cs_literal(int(v)), nonneg=v >= 0, const=int(v))
            return Value("tensorconst", None, const=tensor)
        return Value("unknown", None)   # lists, strings lists, IValues: an argument the walk refuses where used

    def v(self, value):
        # A value missing here comes from an operation already refused (listed): unknown, refused where used.
        return self.values.get(value.unique()) or Value("unknown", None)

    def as_tensor(self, val, node, what):
        if val.kind == "tensor":
            return val.expr
        if val.kind == "long":
            return f"torch.tensor({val.expr})"
        self.refuse(node, f"{node.kind()}: {what} is a {val.kind}, not a tensor")
        return "null!"

    def source_operand(self, node, op, value, **kwargs):
        """_source_operand for this node's Python line and this module (None for a plain name partial_settings
        found partial)."""
        if "traced" in kwargs:
            kwargs["traced_names"] = self.traced_names()
        source = _source_operand(_frame_of(node), op, value, self.module, **kwargs)
        if source is not None and source[0] == "bare" and source[1] in self.unnamed:
            # Python reads the name where the port would not follow a setting: the traced number, written as a literal
            # at every use the line names so (no setting the port half-follows, no older-rule name for some uses only).
            return ("literal", source[1], "partial")
        return source

    def traced_names(self):
        """The Python names the trace gave this forward's values (debug names without the tracer's `.n` suffix): a
        plain name among them may hold a traced tensor or size, so no setting is named after it by position alone."""
        if not hasattr(self, "_traced_names"):
            self._traced_names = frozenset(v.debugName().split(".")[0] for n in self.traced.graph.nodes() for v in n.outputs()) \
                | frozenset(v.debugName().split(".")[0] for v in self.traced.graph.inputs())
        return self._traced_names

    def named_int(self, node, op, val, position):
        """An int argument (a slice's bound, arange's start, end, step): a setting where it is a constant that the Python
        line names (`past_length` in `torch.arange(past_length, n + past_length)`, the setting its `+ past_length` is),
        else its expression (a literal where the line writes one or does not say)."""
        if val.kind == "long" and val.const is not None and val.const != 2**63 - 1 and position is not None \
                and (not isinstance(position, tuple) or position[0] is not None):
            source = self.source_operand(node, op, val.const, position=position)
            if source is not None and source[0] != "literal":
                return self.config_value(val.const, f"{op}_{position if isinstance(position, int) else position[1]}", source)
        return val.expr

    def scalar(self, val, node, hint, config=True, op=None, traced=None):
        """A number argument: a config field for a constant float, the expression otherwise. With `op` (a binary
        operation on a tensor, masked_fill), a constant the Python line names is a setting named so (an int too), one
        it writes as a literal or does not name keeps the hint (a float the line writes as a literal becomes a const,
        plan)."""
        if op is not None and val.kind in ("double", "long") and val.const is not None and config:
            # The traced operand: a[0] of the tensor operation (its number is the second operand), so that the
            # tensor itself is never the operand a setting is named after.
            source = self.source_operand(node, op, val.const, traced=traced)
            if source is not None and source[0] in ("name", "bare"):
                return self.config_value(val.const, hint, source)
            if source is not None and source[2:] == ("partial",):
                return val.expr
        if val.kind == "double" and val.const is not None and config:
            return self.config_value(val.const, hint)
        if val.kind in ("long", "double", "bool"):
            return val.expr
        if val.kind == "tensor":
            return val.expr
        self.refuse(node, f"{node.kind()}: argument {hint} is a {val.kind}")
        return "0"

    def longs(self, val, node, hint, config=False, op=None):
        """A list of ints. With config (the shape of view, reshape, expand: `op`), a constant element is a setting
        named after the call's argument in the Python line (config_value), or stays a literal where the line writes
        one (-1, an inferred size, always does)."""
        if val.kind == "longs":
            items = []
            for i, item in enumerate(val.items):
                if config and item.const is not None and item.const >= 0:
                    source = self.source_operand(node, op, item.const, position=i) if op else None
                    if source is not None and source[0] == "literal":
                        items.append(item.expr)
                    else:
                        items.append(self.config_value(item.const, f"{hint}_{i}", source))
                else:
                    items.append(item.expr)
            return "new long[] { " + ", ".join(items) + " }"
        if val.kind == "long":
            return "new long[] { " + val.expr + " }"
        self.refuse(node, f"{node.kind()}: {hint} is a {val.kind}, not a list of ints")
        return "null!"

    def dtype(self, val, node):
        if val.kind == "none":
            return None
        if val.kind == "long" and val.const in SCALAR_TYPES:
            return "ScalarType." + SCALAR_TYPES[val.const]
        self.refuse(node, f"{node.kind()}: dtype {val.expr}")
        return None

    # -- the walk
    def run(self):
        graph = self.traced.graph
        inputs = list(graph.inputs())
        self.values[inputs[0].unique()] = Value("module", "this", module=self.module)
        info = None if self.is_root else self.x.calls.calls.get(self.path)
        self.info = info
        if info is None:
            for inp in inputs[1:]:
                debug = inp.debugName()
                name = self.fresh("x" if debug.split(".")[0].isdigit() else debug)
                self.input_names.append(name)
                self.values[inp.unique()] = Value("tensor", name)
        else:
            # Every tensor argument of the Python call, in the recorder's order (keyword arguments by their names); the
            # graph lifted the distinct ones in that order (TraceCalls).
            lifted = inputs[1:]
            if len(lifted) != info["n_unique"]:
                self.refusals.add(f"the trace gave {self.path} ({type(self.module).__name__}) {len(lifted)} inputs for its "
                                  f"{info['n_unique']} distinct tensor arguments ({', '.join(info['in_names'])}): it uses a value of "
                                  f"its caller that is not an argument")
                return None
            for p, (arg, u) in enumerate(zip(info["in_names"], info["unique"])):
                if arg.split(".")[0].isdigit():
                    debug = lifted[u].debugName()
                    hint = "x" if debug.split(".")[0].isdigit() or debug.startswith("tlout") else debug
                else:
                    hint = arg.replace(".", "_")
                name = self.fresh(hint)
                self.input_names.append(name)
                if lifted[u].unique() not in self.values:
                    self.values[lifted[u].unique()] = Value("tensor", name)
        if info is None:
            # A rank the Python code reads (x.dim(), len(x.shape)) is a Python number the trace never sees: the port
            # checks every input's rank against the traced one.
            for inp, name in zip(inputs[1:], self.input_names):
                rank = inp.type().dim() if inp.type().kind() == "TensorType" else None
                if rank is not None:
                    self.lines.append(f"if ({name}.dim() != {rank}) throw new InvalidOperationException($\"{type(self.module).__name__}: "
                                      f"input {name} has {{{name}.dim()}} dimensions; the port was traced with {rank} and "
                                      f"computes only that rank: re-export at it\");")
        uses = {}
        for node in graph.nodes():
            for inp in node.inputs():
                uses[inp.unique()] = uses.get(inp.unique(), 0) + 1
        for out in graph.outputs():
            uses[out.unique()] = uses.get(out.unique(), 0) + 1
        self.uses = uses
        guard_only = self.guard_only(graph)
        self.guard_index = 0
        for node in graph.nodes():
            if node in guard_only:
                # Only a guard's condition uses it: what cannot be written makes the condition unknown (refused at the
                # guard unless the caller assumes it), not a refusal of its own.
                self.soft = []
                self.node(node)
                failed, self.soft = self.soft, None
                if failed:
                    for out in node.outputs():
                        self.values[out.unique()] = Value("unknown", None, const="; ".join(failed))
            else:
                self.node(node)
        recorded = len(self.x.calls.guards.get(self.path, []))
        if self.guard_index != recorded:
            # A condition the trace evaluated here whose check is not in the graph: the port would not check it.
            self.refusals.add(f"{self.path or '(root)'} ({type(self.module).__name__}): the trace evaluated {recorded} conditions "
                              f"on sizes here and its graph holds {self.guard_index} of their checks")
        ret = list(graph.outputs())[0]
        val = self.values.get(ret.unique())
        if val is None:
            return None
        if info is not None:
            return self.python_outputs(ret, val, info)
        if val.kind == "tuple":
            tensors = [it for it in val.items if it.kind == "tensor"]
            if not self.is_root:
                self.refusals.add(f"returns {len(val.items)} values (a tuple) at {self.path} ({type(self.module).__name__}): only the root's "
                                  f"several outputs are reduced (to the first tensor)")
                return None
            if not tensors:
                self.refusals.add(f"returns no tensor at {self.path or '(root)'}")
                return None
            return tensors[0].expr + ".MoveToOuterDisposeScope()"
        if val.kind != "tensor":
            self.refusals.add(f"returns a {val.kind} at {self.path or '(root)'} ({type(self.module).__name__})")
            return None
        return val.expr + ".MoveToOuterDisposeScope()"

    @staticmethod
    def is_guard_write(node):
        """aten::copy_ into the guard buffer (TraceCalls.boolean), directly or through an earlier such write."""
        if node.kind() != "aten::copy_":
            return False
        target = node.inputsAt(0).node()
        return target.kind() == "prim::GetAttr" and target.s("name") == GUARD or Translator.is_guard_write(target)

    def guard_only(self, graph):
        """The nodes whose values only guards' conditions use."""
        only, nodes = set(), list(graph.nodes())
        for node in reversed(nodes):
            if self.is_guard_write(node) or node.kind() in ("prim::Constant", "prim::GetAttr"):
                continue
            users = [u.user for out in node.outputs() for u in out.uses()]
            if users and all(u in only or self.is_guard_write(u) and u.inputsAt(1) in list(node.outputs()) for u in users) \
                    and not any(o in list(graph.outputs()) for o in node.outputs()):
                only.add(node)
        return only

    def guard(self, node, cond):
        """The check of a shape condition the trace evaluated here: the port throws where the input would take the
        other branch. A condition that cannot be written is refused unless the caller assumes its line."""
        entries = self.x.calls.guards.get(self.path, [])
        if self.guard_index >= len(entries):
            self.refusals.add(f"a guard of {self.where(node)} that the trace did not record")
            return
        file, line, outcome = entries[self.guard_index]
        self.guard_index += 1
        described = _describe_line(file, line)
        text = None
        if cond.kind == "bool":
            text = cond.expr
        elif cond.kind == "long":
            text = f"({cond.expr} != 0)"
        key = (file, line, outcome)
        if text is None:
            if any(_matches(a, file, line) for a in self.x.assume):
                status = "assumed by the caller (assume_shape_conditions), not checked"
                if status not in self.x.guard_status.setdefault(key, []):
                    self.x.guard_status[key].append(status)
                return
            why = f" ({cond.const})" if cond.kind == "unknown" and cond.const else ""
            self.refusals.add(f"a branch on sizes that the port cannot check{why} (the port would compute the branch taken, "
                              f"{outcome}, at any input) at {self.where_line(file, line)}; if every input the port will see "
                              f"gives it {outcome}, list {os.path.basename(file)}:{line} in assume_shape_conditions")
            return
        pyname = type(self.module).__name__
        check_text, text = text, re.sub(r"@@(\d+)@@", lambda m: cs_literal(self.body.slots[int(m.group(1))][1]), text)
        message = (f"{pyname}: traced with {described} where {text} was {outcome}; this input makes it {not outcome}, "
                   f"which the port does not compute (the other branch, another number): re-export at that shape")
        message = message.replace("\\", "\\\\").replace('"', '\\"')
        check = f"!{check_text}" if outcome else check_text
        status = f"{text} was {outcome}: checked"
        if status not in self.x.guard_status.setdefault(key, []):
            self.x.guard_status[key].append(status)
        self.lines.append(f'if ({check}) throw new InvalidOperationException("{message}");  // {described}')

    def where_line(self, file, line):
        return f"{self.path or '(root)'} ({type(self.module).__name__}), {_describe_line(file, line)}"

    # -- a submodule's outputs: the graph's against the Python call's
    def resolve(self, traced, value):
        """The final marker (TraceCalls) of a graph value of `traced`, following submodule calls into their graphs."""
        name = value.debugName()
        if name.startswith("tlout"):
            return self.x.calls.final(name.split(".")[0])
        node = value.node()
        index = None
        if node.kind() == "prim::TupleUnpack":
            index = [o.unique() for o in node.outputs()].index(value.unique())
            node = node.input().node()
        if node.kind() != "prim::CallMethod":
            return None
        owner, chain = node.inputsAt(0), []
        while owner.node().kind() == "prim::GetAttr":
            chain.append(owner.node().s("name"))
            owner = owner.node().input()
        target = traced
        for attr in reversed(chain):
            target = getattr(target, attr)
        try:
            ret = list(getattr(target, node.s("name")).graph.outputs())[0]
        except (AttributeError, RuntimeError):
            return None
        if index is not None:
            if ret.node().kind() != "prim::TupleConstruct":
                return None
            ret = list(ret.node().inputs())[index]
        return self.resolve(target, ret)

    def alias_of_input(self, value):
        """The flat argument index a graph output is (through conversions to its own dtype, which return the tensor
        itself: the tracer then hands the converted value back to the caller, for its later uses), or None."""
        inputs = [v.unique() for v in list(self.traced.graph.inputs())[1:]]
        while value.unique() not in inputs:
            node = value.node()
            if node.kind() != "aten::to" or len(list(node.inputs())) != 5:
                return None
            source = node.inputsAt(0)
            dtype = node.inputsAt(1).toIValue() if node.inputsAt(1).node().kind() == "prim::Constant" else None
            if source.type().kind() != "TensorType" or SCALAR_TYPES.get(dtype) != TORCH_DTYPES.get(getattr(torch, str(source.type().scalarType()).lower(), None)):
                return None
            value = source
        return self.info["unique"].index(inputs.index(value.unique()))

    def python_outputs(self, ret, val, info):
        """The return statement with the Python call's outputs, in its order, and self.graph_out_map: for each of the
        graph's outputs, ("out", k) (the Python output k) or ("in", p) (an alias of the argument p, see
        alias_of_input); refused when the graph returns something else."""
        items = list(ret.node().inputs()) if ret.node().kind() == "prim::TupleConstruct" else [ret]
        item_values = val.items if val.kind == "tuple" else [val]
        marks = info["outputs"]
        exprs, self.graph_out_map = [None] * len(marks), []
        where = f"{self.path} ({type(self.module).__name__})"
        for item, value in zip(items, item_values):
            marker = self.resolve(self.traced, item)
            k = next((k for k, m in enumerate(marks) if isinstance(m, str) and self.x.calls.final(m) == marker), None) if marker else None
            if k is None:
                p = self.alias_of_input(item)
                if p is not None:
                    self.graph_out_map.append(("in", p))
                    continue
                k = next((k for k, m in enumerate(marks) if m is None and exprs[k] is None), None)
            if k is None or value.kind != "tensor":
                self.refusals.add(f"the trace of {where} returns a value that is none of its Python outputs "
                                  f"({', '.join(info['out_names'])}) and no argument")
                return None
            exprs[k] = value.expr
            self.graph_out_map.append(("out", k))
        for k, m in enumerate(marks):
            if exprs[k] is not None:
                continue
            if isinstance(m, tuple):
                exprs[k] = self.input_names[m[1]]
                continue
            # An output the caller does not use is no output of the graph: found among the graph's values.
            for node in self.traced.graph.nodes():
                for out in node.outputs():
                    if exprs[k] is None and out.unique() in self.values and self.values[out.unique()].kind == "tensor" \
                            and isinstance(m, str) and self.resolve(self.traced, out) == self.x.calls.final(m):
                        exprs[k] = self.values[out.unique()].expr
            if exprs[k] is None:
                self.refusals.add(f"output {info['out_names'][k]} of {where} is not found in its trace")
                return None
        self.n_outputs = len(exprs)
        # An argument returned as it came is the caller's: not moved out of this scope (it never was in it).
        moved = [e if isinstance(m, tuple) else f"{e}.MoveToOuterDisposeScope()" for e, m in zip(exprs, marks)]
        return moved[0] if len(moved) == 1 else "(" + ", ".join(moved) + ")"

    def set(self, node, kind, expr, nonneg=False, statement_type=None, name_hint=None):
        out = node.output()
        if statement_type is None:
            self.values[out.unique()] = Value(kind, expr, nonneg=nonneg)
            return
        if self.uses.get(out.unique(), 0) == 0 and not node.kind().endswith("_"):
            return
        name = self.fresh(name_hint or out.debugName())
        self.emit(node, f"{statement_type} {name} = {expr};")
        self.values[out.unique()] = Value(kind, name, nonneg=nonneg)

    def node(self, node):
        k = node.kind()
        ins = list(node.inputs())
        if k == "prim::Constant":
            self.values[node.output().unique()] = self.const_of(node)
            return
        if k == "prim::GetAttr" and node.s("name") == GUARD:
            self.values[node.output().unique()] = Value("guard", None)
            return
        if k == "aten::copy_" and self.is_guard_write(node):
            self.values[node.output().unique()] = Value("guard", None)
            self.guard(node, self.v(ins[1]))
            return
        if k == "prim::GetAttr":
            owner = self.v(ins[0])
            name = node.s("name")
            if owner.kind != "module":
                self.refuse(node, f"prim::GetAttr {name} of a {owner.kind}")
                return
            target = getattr(owner.module, name)
            if owner.expr == "this":
                field = self.field_of.get(name)
                if field is None:
                    self.refuse(node, f"attribute {name!r} that is not a submodule, parameter or buffer")
                    return
                expr = field
            else:
                expr = f"{owner.expr}[{int(name)}]" if name.isdigit() else f"{owner.expr}.{cs_ident(name)}"
                if not name.isdigit():
                    if isinstance(target, nn.Module):   # refused when called
                        self.values[node.output().unique()] = Value("module", expr, module=target, const="nested")
                        return
                    cd = self.x.draft_of.get(id(owner.module))
                    buffer = cd is not None and cd.kind == "gen" and owner.const != "nested" and \
                        any(n == name for _, n, *_ in getattr(cd, "buffers", []))
                    if not buffer:
                        self.refuse(node, f"attribute {name!r} of a child module")
                        return
                    # A child's buffer the parent reads (BERT's embeddings.token_type_ids): an internal field there.
                    cd.exposed.add(name)
                    expr = f"{owner.expr}.{next(f for f, n, *_ in cd.buffers if n == name)}"
            if isinstance(target, nn.Module):
                self.values[node.output().unique()] = Value("module", expr, module=target)
            else:
                self.values[node.output().unique()] = Value("tensor", expr)
            return
        if k == "prim::CallMethod":
            child = self.v(ins[0])
            method = node.s("name")
            if child.const == "nested":
                self.refuse(node, f"a call of {child.expr}, a submodule of a child module")
                return
            if method != "forward" and not (re.fullmatch(r"forward\d+", method) and _is_leaf(child.module)):
                # The tracer names a module's second traced call forward1, ...: a module TorchSharp has is one
                # operation whatever the call; a translated module is written from its first call's graph only.
                self.refuse(node, f"a second call of {child.expr} ({type(child.module).__name__}, traced as {method})")
                return
            args = [self.v(a) for a in ins[1:]]
            bad = [a.kind for a in args if a.kind != "tensor"]
            if bad:
                self.refuse(node, f"{child.expr} called with a non-tensor argument ({', '.join(bad)})")
                return
            cd = self.x.draft_of.get(id(child.module))
            info = self.x.calls.calls.get(cd.path) if cd is not None and cd.kind == "gen" else None
            if info is not None:
                self.call_generated(node, child, cd, info, args)
                return
            if len(args) > 2:
                self.refuse(node, f"{child.expr} called with {len(args)} tensors (at most 2 are written)")
                return
            out_type = node.output().type()
            if out_type.kind() != "TensorType":
                self.refuse(node, f"{child.expr} returns {out_type} (a port's submodule returns one tensor)")
                return
            self.set(node, "tensor", f"{child.expr}.call({', '.join(a.expr for a in args)})", statement_type="Tensor")
            return
        if k in ("prim::NumToTensor", "aten::Int", "aten::ScalarImplicit", "aten::Float"):
            val = self.v(ins[0])
            if val.kind == "tensor":
                if k == "aten::Int":
                    self.refuse(node, "aten::Int of a tensor's value (a value the trace froze)")
                    return
                self.values[node.output().unique()] = val
                return
            self.values[node.output().unique()] = val
            return
        if k == "prim::ListConstruct":
            items = [self.v(a) for a in ins]
            if all(i.kind == "long" for i in items):
                self.values[node.output().unique()] = Value("longs", None, items=items)
            elif all(i.kind == "tensor" for i in items):
                self.values[node.output().unique()] = Value("tensors", "new[] { " + ", ".join(i.expr for i in items) + " }", items=items)
            else:
                self.refuse(node, "a list of " + ", ".join(i.kind for i in items))
            return
        if k == "prim::TupleConstruct":
            self.values[node.output().unique()] = Value("tuple", None, items=[self.v(a) for a in ins])
            return
        if k in ("prim::ListUnpack", "prim::TupleUnpack"):
            src = self.v(ins[0])
            if src.kind == "tuple":
                for out, item in zip(node.outputs(), src.items):
                    self.values[out.unique()] = item
                return
            if src.kind != "tensors":
                self.refuse(node, f"{k} of a {src.kind}")
                return
            for i, out in enumerate(node.outputs()):
                if self.uses.get(out.unique(), 0) == 0:
                    continue
                name = self.fresh(out.debugName())
                self.emit(node, f"Tensor {name} = {src.expr}[{i}];")
                self.values[out.unique()] = Value("tensor", name)
            return
        if k.startswith("aten::"):
            self.aten(node, k[6:], [self.v(a) if a.unique() in self.values else Value("unknown", None) for a in ins])
            return
        self.refuse(node, f"operation {k}")

    def call_generated(self, node, child, cd, info, args):
        """A call of a translated submodule: every tensor argument of the Python call in the recorder's order (the
        graph passes the distinct ones), its outputs deconstructed from the tuple it returns, and the graph's outputs
        mapped onto them (an output that is an argument's alias is that argument)."""
        if getattr(cd, "graph_out_map", None) is None:
            return   # the submodule was refused (listed with its reasons)
        if len(args) != info["n_unique"]:
            self.refuse(node, f"{child.expr} ({type(child.module).__name__}) called with {len(args)} values for its "
                              f"{info['n_unique']} distinct tensor arguments")
            return
        flat = [args[u].expr for u in info["unique"]]
        call = f"{child.expr}.call({', '.join(flat)})"
        if cd.n_outputs == 1:
            names = [self.fresh(node.output().debugName() if node.output().type().kind() == "TensorType" else "t")]
            self.emit(node, f"Tensor {names[0]} = {call};")
        else:
            names = [self.fresh(f"{child.expr.split('[')[0]}_{n.replace('.', '_')}") for n in info["out_names"]]
            self.emit(node, f"var ({', '.join(names)}) = {call};")
        items = [Value("tensor", names[k]) if kind == "out" else Value("tensor", flat[k]) for kind, k in cd.graph_out_map]
        if node.output().type().kind() == "TupleType":
            self.values[node.output().unique()] = Value("tuple", None, items=items)
        elif len(items) == 1:
            self.values[node.output().unique()] = items[0]
        else:
            self.refuse(node, f"{child.expr} returns {len(items)} values where its call has one")

    # -- aten operations
    def aten(self, node, op, a):
        T = lambda i: self.as_tensor(a[i], node, f"argument {i}")  # noqa: E731
        ints = all(x.kind in ("long",) for x in a) and op in ("floor_divide", "mul", "add", "sub", "remainder")
        if ints and a:
            x, y = a[0], a[1]
            # A constant operand of size arithmetic: a literal where the Python line writes one (`// 2`), a setting
            # named after the operand it came from where the line names one (`* n_rep`: the setting the expand's n_rep
            # is), else as before (floor_divide's divisor a setting, another operand a literal).
            texts = []
            for operand, other in ((x, y), (y, x)):
                text = operand.expr
                if operand.const is not None and other.const is None:
                    source = self.source_operand(node, op, operand.const, traced=other.expr, second=operand is y)
                    if source is not None and source[0] != "literal":
                        text = self.config_value(operand.const, f"{op}_by", source)
                    elif source is None and op == "floor_divide" and operand is y:
                        text = self.config_value(operand.const, "floor_divide_by")
                texts.append(text)
            xexpr, yexpr = texts
            if op == "floor_divide":
                if not (x.nonneg and y.nonneg):
                    self.refuse(node, "aten::floor_divide of numbers that may be negative")
                    return
                self.set(node, "long", f"{xexpr} / {yexpr}", nonneg=True, statement_type="long")
                return
            if op == "remainder" and not (x.nonneg and y.nonneg):
                # Python's % floors, C#'s truncates: they agree only on numbers that are not negative.
                self.refuse(node, "aten::remainder of numbers that may be negative")
                return
            if op in ("add", "sub") and len(a) > 2 and a[2].const not in (1, None):
                self.refuse(node, f"aten::{op} of numbers with alpha")
                return
            sym = {"mul": "*", "add": "+", "sub": "-", "remainder": "%"}[op]
            self.set(node, "long", f"{xexpr} {sym} {yexpr}", nonneg=x.nonneg and y.nonneg and op != "sub", statement_type="long")
            return
        if op in ("eq", "ne", "lt", "gt", "le", "ge") and len(a) == 2 and all(x.kind in ("long", "double") for x in a):
            sym = {"eq": "==", "ne": "!=", "lt": "<", "gt": ">", "le": "<=", "ge": ">="}[op]
            # A size compared with a number the Python line names (`x.size() != (bsz, self.num_heads, ...)`): the
            # setting of that name, so that a port built with another num_heads checks its own (a literal stays one).
            texts = [a[0].expr, a[1].expr]
            for k in (0, 1):
                operand, other = a[k], a[1 - k]
                if operand.kind == "long" and operand.const is not None and other.const is None:
                    dim = _size_dim(node.inputsAt(1 - k))
                    source = self.source_operand(node, "compare", operand.const, position=dim) if dim is not None else None
                    if source is not None and source[0] != "literal":
                        texts[k] = self.config_value(operand.const, "compare", source)
            self.values[node.output().unique()] = Value("bool", f"({texts[0]} {sym} {texts[1]})")
            return
        if op in ("__and__", "__or__", "logical_and", "logical_or", "bitwise_and", "bitwise_or") and len(a) == 2 \
                and all(x.kind == "bool" for x in a):
            sym = "&&" if "and" in op else "||"
            self.values[node.output().unique()] = Value("bool", f"({a[0].expr} {sym} {a[1].expr})")
            return
        if op in ("__not__", "logical_not", "bitwise_not") and len(a) == 1 and a[0].kind == "bool":
            self.values[node.output().unique()] = Value("bool", f"(!{a[0].expr})")
            return
        if any(x.kind == "unknown" for x in a):
            self.refuse(node, f"aten::{op} with an argument the generator cannot read")
            return
        if op == "pow" and len(a) == 2 and a[0].kind == "long" and a[1].kind == "double":
            # `size ** 0.5` in the trace: the size is a 0-dim int64 tensor there, raised in PyTorch's default dtype
            self.set(node, "tensor", f"torch.tensor({a[0].expr}).pow({self.scalar(a[1], node, 'pow_exponent')})", statement_type="Tensor")
            return
        if op == "size":
            if a[0].kind != "tensor" or a[1].kind != "long":
                self.refuse(node, "aten::size without a constant dimension")
                return
            users = [u.user for u in node.output().uses()]
            named = [u.output().debugName() for u in users if u.kind() == "prim::NumToTensor" and not u.output().debugName().split(".")[0].isdigit()]
            hint = named[0] if named else "size"
            self.set(node, "long", f"{a[0].expr}.size({a[1].expr})", nonneg=True, statement_type="long", name_hint=hint)
            return
        simple = {
            "view": lambda: f"{T(0)}.view({self.longs(a[1], node, 'shape', config=True, op='view')})",
            "reshape": lambda: f"{T(0)}.reshape({self.longs(a[1], node, 'shape', config=True, op='reshape')})",
            "expand": lambda: f"{T(0)}.expand({self.longs(a[1], node, 'shape', config=True, op='expand')})",
            "permute": lambda: f"{T(0)}.permute({self.longs(a[1], node, 'dims')})",
            "transpose": lambda: f"{T(0)}.transpose({a[1].expr}, {a[2].expr})",
            "matmul": lambda: f"{T(0)}.matmul({T(1)})",
            "mm": lambda: f"{T(0)}.mm({T(1)})",
            "bmm": lambda: f"{T(0)}.bmm({T(1)})",
            "contiguous": lambda: f"{T(0)}.contiguous()",
            "unsqueeze": lambda: f"{T(0)}.unsqueeze({a[1].expr})",
            "squeeze": lambda: f"{T(0)}.squeeze({a[1].expr})" if len(a) > 1 else f"{T(0)}.squeeze()",
            "flatten": lambda: f"{T(0)}.flatten({a[1].expr}, {a[2].expr})",
            "relu": lambda: f"{T(0)}.relu()",
            "relu_": lambda: f"{T(0)}.relu_()",
            "sigmoid": lambda: f"{T(0)}.sigmoid()",
            "tanh": lambda: f"{T(0)}.tanh()",
            "neg": lambda: f"{T(0)}.neg()",
            "rsqrt": lambda: f"{T(0)}.rsqrt()",
            "sqrt": lambda: f"{T(0)}.sqrt()",
            "exp": lambda: f"{T(0)}.exp()",
            "cos": lambda: f"{T(0)}.cos()",
            "sin": lambda: f"{T(0)}.sin()",
            "silu": lambda: f"torch.nn.functional.silu({T(0)})",
            "select": lambda: f"{T(0)}.select({a[1].expr}, {a[2].expr})",
            "masked_fill": lambda: f"{T(0)}.masked_fill({T(1)}, {self.scalar(a[2], node, 'fill_value', op='masked_fill')})",
            "adaptive_avg_pool2d": lambda: f"torch.nn.functional.adaptive_avg_pool2d({T(0)}, {self.longs(a[1], node, 'output_size')})",
            "cat": lambda: f"torch.cat({a[0].expr}, {a[1].expr})" if a[0].kind == "tensors" else self.refuse(node, "aten::cat of a non-list"),
            "embedding": lambda: f"torch.nn.functional.embedding({T(1)}, {T(0)})" if a[2].const == -1 else self.refuse(node, "aten::embedding with padding_idx"),
        }
        if op in simple:
            expr = simple[op]()
            if expr is not None:
                self.set(node, "tensor", expr, statement_type="Tensor")
            return
        if op in ("add", "sub", "add_", "sub_", "mul", "div", "mul_", "div_", "eq", "ne", "lt", "gt", "le", "ge", "pow"):
            base = op.rstrip("_")
            if a[0].kind != "tensor":
                self.refuse(node, f"aten::{op} with a {a[0].kind} first")
                return
            other = a[1].expr if a[1].kind == "tensor" else self.scalar(a[1], node, f"{base}_other", op=base, traced=a[0].expr)
            extra = ""
            if base in ("add", "sub") and len(a) > 2 and a[2].const != 1:
                extra = f", {self.scalar(a[2], node, 'alpha', config=False)}"
            if base == "div" and len(a) > 2:
                if a[2].kind != "none":
                    self.refuse(node, "aten::div with a rounding mode")
                    return
            self.set(node, "tensor", f"{a[0].expr}.{op}({other}{extra})", statement_type="Tensor")
            return
        if op == "rsub":
            other = a[1].expr if a[1].kind == "tensor" else self.scalar(a[1], node, "rsub_other", op="rsub", traced=a[0].expr)
            if len(a) > 2 and a[2].const != 1:
                self.refuse(node, "aten::rsub with alpha")
                return
            # TorchSharp has no rsub: other - x is (-x) + other exactly (IEEE subtraction is the addition of the negation)
            self.set(node, "tensor", f"{other}.sub({a[0].expr})" if a[1].kind == "tensor" else f"{a[0].expr}.neg().add({other})",
                     statement_type="Tensor")
            return
        if op == "softmax":
            dtype = self.dtype(a[2], node)
            self.set(node, "tensor", f"{T(0)}.softmax({a[1].expr}" + (f", {dtype})" if dtype else ")"), statement_type="Tensor")
            return
        if op == "split":
            size = a[1].expr if a[1].kind == "long" else self.longs(a[1], node, "split_size")
            self.set(node, "tensors", f"{T(0)}.split({size}, {a[2].expr})", statement_type="Tensor[]")
            return
        if op == "chunk":
            self.set(node, "tensors", f"{T(0)}.chunk({a[1].expr}, {a[2].expr})", statement_type="Tensor[]")
            return
        if op == "slice":
            dim = a[1].const if a[1].kind == "long" else None
            start = "0" if a[2].kind == "none" else self.named_int(node, "slice", a[2], (dim, "lower"))
            end = "long.MaxValue" if a[3].kind == "none" else self.named_int(node, "slice", a[3], (dim, "upper"))
            self.set(node, "tensor", f"{T(0)}.slice({a[1].expr}, {start}, {end}, {a[4].expr})", statement_type="Tensor")
            return
        if op == "arange":
            # arange(end, dtype, layout, device, pin) | arange(start, end, ...) | arange(start, end, step, ...)
            n = len(a) - 4
            nums = [self.named_int(node, "arange", x, i) for i, x in enumerate(a[:n])]
            dtype = self.dtype(a[n], node)
            if dtype is None and all(x.kind == "long" for x in a[:n]):
                dtype = "ScalarType.Int64"   # PyTorch's arange of integers is int64 (TorchSharp's default is not said)
            dt = f", dtype: {dtype}" if dtype else ""
            self.set(node, "tensor", f"torch.arange({', '.join(nums)}{dt})", statement_type="Tensor")
            return
        if op == "full":
            # full(size, fill_value, dtype, layout, device, pin_memory)
            dtype = self.dtype(a[2], node)
            if a[1].kind == "double" and a[1].const is not None:
                source = self.source_operand(node, "full", a[1].const)
                fill = a[1].expr if source and source[2:] == ("partial",) else \
                    self.config_value(a[1].const, "fill_value", source if source and source[0] != "literal" else None)
            elif a[1].kind == "tensor":
                fill = f"{a[1].expr}.ToScalar()"   # a number PyTorch computed as a 0-dim tensor (below), as it is
            else:
                self.refuse(node, f"aten::full with a fill value that is a {a[1].kind}")
                return
            dt = f", dtype: {dtype}" if dtype else ""
            size = "System.Array.Empty<long>()" if a[0].kind == "longs" and not a[0].items else self.longs(a[0], node, 'size')
            self.set(node, "tensor", f"torch.full({size}, {fill}{dt})", statement_type="Tensor")
            return
        if op == "addmm":
            if any(x.kind != "long" or x.const != 1 for x in a[3:5]):
                self.refuse(node, "aten::addmm with beta or alpha other than 1")
                return
            self.set(node, "tensor", f"{T(0)}.addmm({T(1)}, {T(2)})", statement_type="Tensor")
            return
        if op == "where" and len(a) == 3:
            other = a[2].expr if a[2].kind == "tensor" else None
            if other is None:
                self.refuse(node, "aten::where with a number")
                return
            self.set(node, "tensor", f"torch.where({T(0)}, {T(1)}, {other})", statement_type="Tensor")
            return
        if op in ("ones", "zeros") and len(a) == 5:
            # ones(size, dtype, layout, device, pin_memory)
            dtype = self.dtype(a[1], node)
            dt = f", dtype: {dtype}" if dtype else ""
            self.set(node, "tensor", f"torch.{op}({self.longs(a[0], node, 'size')}{dt})", statement_type="Tensor")
            return
        if op in ("triu", "tril"):
            self.set(node, "tensor", f"{T(0)}.{op}({a[1].expr})", statement_type="Tensor")
            return
        if op == "layer_norm":
            w = "null" if a[2].kind == "none" else T(2)
            b = "null" if a[3].kind == "none" else T(3)
            self.set(node, "tensor", f"torch.nn.functional.layer_norm({T(0)}, {self.longs(a[1], node, 'normalized_shape')}, {w}, {b}, "
                                     f"{self.scalar(a[4], node, 'eps')})", statement_type="Tensor")
            return
        if op == "linear":
            b = "null" if a[2].kind == "none" else T(2)
            self.set(node, "tensor", f"torch.nn.functional.linear({T(0)}, {T(1)}, {b})", statement_type="Tensor")
            return
        if op == "gelu":
            approx = a[1].const if len(a) > 1 else "none"
            self.set(node, "tensor", f"torch.nn.functional.gelu({T(0)})" if approx == "none" else
                     f"torch.nn.functional.gelu({T(0)}, TorchSharp.Modules.GELU.Approximate.tanh)", statement_type="Tensor")
            return
        if op in ("dropout", "dropout_"):
            if a[2].kind not in ("bool", "long") or a[2].const != 0:   # the tracer writes False as the integer 0
                self.refuse(node, "aten::dropout in training mode")
                return
            self.set(node, "tensor", f"torch.nn.functional.dropout({T(0)}, {self.scalar(a[1], node, 'dropout_p')}, training: false)", statement_type="Tensor")
            return
        if op == "mean":
            dtype = self.dtype(a[3], node) if len(a) > 3 else None
            if dtype:
                self.refuse(node, "aten::mean with a dtype")
                return
            self.set(node, "tensor", f"{T(0)}.mean({self.longs(a[1], node, 'dims')}, keepdim: {a[2].expr})", statement_type="Tensor")
            return
        if op == "to":
            # to(self, dtype, non_blocking, copy, memory_format)
            if len(a) == 5 and a[1].kind == "long":
                dtype = self.dtype(a[1], node)
                self.set(node, "tensor", f"{T(0)}.to({dtype})", statement_type="Tensor")
                return
            # to(self, device, dtype, non_blocking, copy, memory_format) on the CPU (the trace's own device)
            if len(a) == 6 and a[1].kind == "device" and a[1].const == "cpu" and a[2].kind == "long":
                dtype = self.dtype(a[2], node)
                self.set(node, "tensor", f"{T(0)}.to({dtype})", statement_type="Tensor")
                return
            self.refuse(node, "aten::to with a device or another tensor")
            return
        self.refuse(node, f"operation aten::{op}")


# ----------------------------------------------------------------------------------------------------------------------
# One class per PyTorch class: the instances' forwards as programs, and their merge.

class Unmergeable(Exception):
    """Instances of one PyTorch class that one C# class cannot express safely; the message says why (the extra class
    carries it as a comment)."""


_TOKEN = re.compile(r"(@@c\d+@@|(?<![\w.@])[A-Za-z_]\w*)")
_STATEMENT = re.compile(r"^(\w+(?:\[\])?) (\w+) = (.*);$")


def _tokens(code, variables):
    """code as a list of strings and ("v", name) for its locals and inputs (consecutive strings joined)."""
    out = []
    for i, part in enumerate(_TOKEN.split(code)):
        if not part:
            continue
        if i % 2 == 1 and part in variables:
            out.append(("v", part))
        elif out and not isinstance(out[-1], tuple):
            out[-1] += part
        else:
            out.append(part)
    return out


class Program:
    """One instance's forward: inputs, statements [type, var, tokens, comment] (type "" and var None for a statement
    that declares nothing) and the returned expression, with configuration values as @@c<k>@@."""

    def __init__(self, inputs, lines, result):
        self.inputs, self.lines, self.result = inputs, lines, result

    def key(self):
        """The program with its locals renamed in order of first appearance (a statement of another form may declare
        one in its text): equal keys, equal code up to names."""
        names = {n: f"v{i}" for i, n in enumerate(self.inputs)}

        def canon(tokens):
            for t in tokens:
                if isinstance(t, tuple) and t[1] not in names:
                    names[t[1]] = f"v{len(names)}"
            return tuple(names[t[1]] if isinstance(t, tuple) else t for t in tokens)
        lines = []
        for line in self.lines:
            expression = canon(line[2])
            lines.append((line[0], canon([("v", line[1])]) if line[1] else None, expression))
        return len(self.inputs), tuple(lines), canon(self.result)


def _enclosing_conditions(cls, comment):
    """The statement's Python line (a generated line's comment, 'file.py:line: code') and the `if`/`elif` lines that
    enclose it in its function: where the attribute that decides whether it runs is read."""
    m = re.match(r"(.+?):(\d+): ", comment or "")
    if not m:
        return ""
    try:
        path = inspect.getsourcefile(cls)
    except (TypeError, OSError):
        return ""
    if not path or not (path.endswith(os.sep + m.group(1)) or os.path.basename(path) == m.group(1)):
        return ""
    number = int(m.group(2))
    text = linecache.getline(path, number)
    found, indent = [text], len(text) - len(text.lstrip())
    for k in range(number - 1, 0, -1):
        above = linecache.getline(path, k)
        if not above.strip():
            continue
        depth = len(above) - len(above.lstrip())
        if depth < indent:
            if above.lstrip().startswith("def "):
                break
            if re.match(r"(if|elif)\b", above.lstrip()):
                found.append(above)
            indent = depth
    return "".join(found)


def _program(d):
    config = {i: k for k, i in enumerate(d.config_slots)}

    def marker(m):
        i = int(m.group(1))
        if i not in config:
            raise Unmergeable("a forward holds a value that is not a configuration value")
        return f"@@c{config[i]}@@"
    variables = set(d.inputs) | set(getattr(d, "locals", ()))
    lines = []
    for line in d.forward_lines:
        code, _, comment = line.partition("  // ")
        code = re.sub(r"@@(\d+)@@", marker, code)
        m = _STATEMENT.match(code)
        if m:
            variables.add(m.group(2))
            lines.append([m.group(1), m.group(2), _tokens(m.group(3), variables), comment])
        else:
            lines.append(["", None, _tokens(code, variables), comment])
    return Program(list(d.inputs), lines, _tokens(re.sub(r"@@(\d+)@@", marker, d.result or ""), variables))


def _literal_in_source(value, k, lines):
    """Whether float `value` (configuration value k) is written as a literal in every Python line that uses it."""
    if not isinstance(value, float):
        return False
    sources = [line[3].split(": ", 1)[1] for line in lines
               if any(not isinstance(t, tuple) and f"@@c{k}@@" in t for t in line[2]) and ": " in line[3]]
    if not sources:
        return False
    for code in sources:
        if math.isinf(value):
            if not re.search(r"\binf\b", code):
                return False
            continue
        numbers = re.findall(r"(?<![\w.])(\d+\.\d*(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|\.\d+(?:[eE][-+]?\d+)?)", code)
        if not any(float(n) == abs(value) for n in numbers) and not _constant_expression_in(code, value):
            return False
    return True


def _constant_expression_in(code, value):
    """Whether the Python line `code` holds an expression of number literals, arithmetic and math's functions and
    constants only (`math.sqrt(2.0 / math.pi)`) equal to `value`: code, not configuration."""
    try:
        tree = ast.parse(code.strip() + (" pass" if code.rstrip().endswith(":") else ""))
    except SyntaxError:
        return False
    for n in ast.walk(tree):
        if not isinstance(n, (ast.BinOp, ast.Call)):
            continue
        names = [m for m in ast.walk(n) if isinstance(m, ast.Name)]
        if any(m.id != "math" for m in names) or not names and isinstance(n, ast.Call):
            continue
        if _evaluates_to(n, value, None, None):
            return True
    return False


def _fresh_name(base, used):
    name, i = base, 1
    while name in used:
        i += 1
        name = f"{base}{i}"
    used.add(name)
    return name


def _class_name(pyname, used, root_name):
    base = cs_ident(pyname) if pyname != root_name else pyname + "Module"
    name, i = base, 1
    while name in used:
        i += 1
        name = f"{base}_{i}"
    used.add(name)
    return name


def _gen_descendants(d):
    out = []
    for part in getattr(d, "parts", None) or []:
        child = part[-2]
        if child.kind == "gen":
            out.append(child)
        out += _gen_descendants(child)
    return out


def _merge_programs(programs, reserved):
    """One forward for several programs: [type, var, tokens, comment, present, passthrough] where present is the set of
    programs that run the statement; the others take `passthrough` (a tensor the statement would have been computed
    from) as its value. Raises Unmergeable when they do not align that way."""
    first = programs[0]
    lines = [[t, v, list(tokens), c, frozenset([0]), None] for t, v, tokens, c in first.lines]
    result = list(first.result)
    names = set(reserved) | set(first.inputs) | {line[1] for line in lines if line[1]}
    types = {n: "Tensor" for n in first.inputs}
    types.update({line[1]: line[0] for line in lines if line[1]})
    for k, program in enumerate(programs[1:], 1):
        lines, result = _merge_one(first.inputs, lines, result, program, k, types, names)
    # Locals named t, t2, ... (the tracer's unnamed values) renumbered in order, as a person would.
    plain = [line[1] for line in lines if line[1] and re.fullmatch(r"t\d*", line[1]) and line[1] not in first.inputs]
    every = {t[1] for line in lines for t in line[2] if isinstance(t, tuple)} | {t[1] for t in result if isinstance(t, tuple)}
    taken = ((names | every) - set(plain)) | set(first.inputs)   # a local another form of statement declares is taken
    rename, n = {}, 1
    for var in plain:
        while (candidate := "t" if n == 1 else f"t{n}") in taken:
            n += 1
        rename[var] = candidate
        n += 1
    fix = lambda tokens: [("v", rename.get(t[1], t[1])) if isinstance(t, tuple) else t for t in tokens]  # noqa: E731
    lines = [[t, rename.get(v, v), fix(tokens), c, present, rename.get(p, p)] for t, v, tokens, c, present, p in lines]
    return list(first.inputs), lines, fix(result)


def _merge_one(inputs, merged, merged_result, program, k, types, names):
    own_types = {n: "Tensor" for n in program.inputs}
    own_types.update({line[1]: line[0] for line in program.lines if line[1]})
    budget = [20000]

    def copy(st):
        return {"out": list(st["out"]), "bval": dict(st["bval"]), "mvar": dict(st["mvar"]), "newpass": dict(st["newpass"]),
                "names": set(st["names"])}

    def resolve(u, st):
        while u in st["newpass"]:
            u = st["newpass"][u]
        return u

    def match(mt, bt, st):
        """The merged statement's tokens if merged tokens mt compute, in this program, what its tokens bt do; a local
        that first appears here on both sides (declared by a statement of another form) is bound in st."""
        if len(mt) != len(bt):
            return None
        out = []
        for x, y in zip(mt, bt):
            if isinstance(x, tuple) and isinstance(y, tuple):
                if x[1] not in st["bval"] and y[1] not in st["mvar"]:
                    st["bval"][x[1]] = y[1]
                    st["mvar"][y[1]] = x[1]
                    out.append(x)
                elif st["bval"].get(x[1]) == y[1]:
                    out.append(x)
                elif st["mvar"].get(y[1]) in st["newpass"] and resolve(st["mvar"][y[1]], st) == x[1]:
                    out.append(("v", st["mvar"][y[1]]))   # a statement only this program runs, x elsewhere
                else:
                    return None
            elif isinstance(x, tuple) or isinstance(y, tuple) or x != y:
                return None
            else:
                out.append(x)
        return out

    def tensors(tokens, kinds):
        seen = []
        for t in tokens:
            if isinstance(t, tuple) and kinds.get(t[1], "Tensor") == "Tensor" and t[1] not in seen:
                seen.append(t[1])
        return seen

    def dfs(i, j, st):
        budget[0] -= 1
        if budget[0] < 0:
            raise Unmergeable("their forwards are too different to align")
        if i == len(merged) and j == len(program.lines):
            r = match(merged_result, program.result, copy(st))
            return None if r is None else (st["out"], r)
        if i < len(merged) and j < len(program.lines):
            ml, bl = merged[i], program.lines[j]
            if ml[0] == bl[0] and (ml[1] is None) == (bl[1] is None):
                st2 = copy(st)
                tokens = match(ml[2], bl[2], st2)
                if tokens is not None:
                    if ml[1]:
                        st2["bval"][ml[1]] = bl[1]
                        st2["mvar"][bl[1]] = ml[1]
                    st2["out"].append([ml[0], ml[1], tokens, ml[3], ml[4] | {k}, ml[5]])
                    r = dfs(i + 1, j + 1, st2)
                    if r:
                        return r
        if j < len(program.lines) and program.lines[j][0] == "Tensor":
            bl = program.lines[j]
            if all(not isinstance(t, tuple) or t[1] in st["mvar"] for t in bl[2]):
                tokens = [("v", st["mvar"][t[1]]) if isinstance(t, tuple) else t for t in bl[2]]
                for cand in tensors(bl[2], own_types):
                    st2 = copy(st)
                    u = _fresh_name(re.sub(r"\d+$", "", bl[1]) or "t", st2["names"])
                    st2["mvar"][bl[1]] = u
                    st2["bval"][u] = bl[1]
                    st2["newpass"][u] = st["mvar"][cand]
                    st2["out"].append(["Tensor", u, tokens, bl[3], frozenset([k]), st["mvar"][cand]])
                    r = dfs(i, j + 1, st2)
                    if r:
                        return r
        if i < len(merged) and merged[i][0] == "Tensor":
            ml = merged[i]
            candidates = [ml[5]] if ml[5] is not None else tensors(ml[2], types)
            for cand in candidates:
                if cand not in st["bval"]:
                    continue
                st2 = copy(st)
                st2["bval"][ml[1]] = st["bval"][cand]
                st2["out"].append([ml[0], ml[1], ml[2], ml[3], ml[4], cand])
                r = dfs(i + 1, j, st2)
                if r:
                    return r
        return None

    start = {"out": [], "bval": dict(zip(inputs, program.inputs)), "mvar": dict(zip(program.inputs, inputs)), "newpass": {},
             "names": set(names)}
    found = dfs(0, 0, start)
    if found is None:
        raise Unmergeable("their forwards differ in more than statements some of them leave out")
    out, result = found
    for line in out:
        if line[1]:
            names.add(line[1])
            types.setdefault(line[1], line[0])
    return out, result


# ----------------------------------------------------------------------------------------------------------------------
# The exporter: drafts of every module instance, grouped into classes, written as one C# file.

class Draft:
    def __init__(self, module, path):
        self.module, self.path = module, path
        self.kind = None        # "leaf" | "seq" | "list" | "gen"
        self.sig = None         # everything but slot values
        self.slots = []
        self.field_type = None  # C# type of a field holding it
        self.exposed = set()    # buffers its parent reads (internal fields)
        self.ctor = None        # constructor expression (with markers into self.slots)
        self.group = None


class Exporter:
    def __init__(self, model, traced, class_name, namespace, calls=None, assume=()):
        self.model, self.traced, self.class_name, self.namespace = model, traced, class_name, namespace
        self.assume = tuple(assume)
        self.guard_status = {}  # (file, line, outcome) -> what the port does about that shape condition
        self.calls = calls if calls is not None else TraceCalls()
        self.draft_of = {}      # id(module) -> its Draft
        # Parameters listed under several names (a tied LM head): id -> the names, the first the owner's.
        names = {}
        for name, p in _parameter_names(model):
            names.setdefault(id(p), []).append(name)
        self.tied = {k: v for k, v in names.items() if len(v) > 1}
        self.refusals = Refusals()
        self.drafts = []
        self.groups = {}        # sig -> Group

    def traced_child(self, traced, name):
        return getattr(traced, name)

    def draft(self, module, traced, path, is_root=False):
        d = Draft(module, path)
        self.draft_of.setdefault(id(module), d)
        if not is_root and _is_leaf(module):
            body = Body()
            try:
                leaf = _leaf(module, body, path)
            except ExportRefused as e:
                self.refusals.add(str(e))
                leaf = ("object", "null!")
            d.kind, d.slots = "leaf", body.slots
            d.field_type, d.ctor = leaf
            d.sig = ("leaf", d.ctor, tuple(s[0] for s in d.slots))
            return d
        children = list(module.named_children())
        if not is_root and isinstance(module, (nn.ModuleList, nn.ModuleDict)) or (not is_root and _is_sequential(module)
                                                                               and [n for n, _ in children] == [str(i) for i in range(len(children))]):
            if isinstance(module, nn.ModuleDict):
                self.refusals.add(f"{path} (ModuleDict): a ModuleDict is not written")
            body = Body()
            parts, subs = [], []
            for name, child in children:
                cd = self.draft(child, self.traced_child(traced, name), f"{path}.{name}")
                off = body.adopt(cd.slots)
                parts.append((cd, off))
                subs.append(cd.sig)
            d.slots = body.slots
            d.kind = "list" if isinstance(module, nn.ModuleList) else "seq"
            d.parts = parts
            # One Sequential class per PyTorch class: it takes its modules as constructor arguments.
            d.sig = ("seq", type(module).__name__) if d.kind == "seq" else ("list", type(module).__name__, tuple(subs))
            return d
        # A module written from its graph.
        d.kind = "gen"
        body = Body()
        field_of, parts = {}, []
        taken = set()

        def field(name):
            f = cs_ident(name)
            while f in taken:
                f += "_"
            taken.add(f)
            field_of[name] = f
            return f

        params = []
        for name, p in module.named_parameters(recurse=False):
            params.append((field(name), name, tuple(p.shape), TORCH_DTYPES.get(p.dtype), p.requires_grad))
        buffers = []
        persistent_names = set(module.state_dict(keep_vars=True).keys())
        for name, b in module.named_buffers(recurse=False):
            persistent = name in persistent_names
            init = None
            if not persistent and b.dtype == torch.bool and b.dim() >= 2 and \
                    torch.equal(b, torch.ones(b.shape[-2:], dtype=torch.bool).tril().expand(b.shape)):
                # a causal mask (GPT-2's `bias`): written as the lower triangle it is, not element by element
                buffers.append((field(name), name, tuple(b.shape), "Bool", persistent, ("tril", b.shape[-2], b.shape[-1])))
                continue
            if not persistent:
                if b.numel() > 4096 or not (b.dtype.is_floating_point or b.dtype == torch.int64):
                    self.refusals.add(f"{path}.{name}: a non-persistent buffer of {b.numel()} {b.dtype} elements (not in the state_dict; "
                                      f"only floating-point and int64 buffers of at most 4096 elements are written out as literals)")
                init = [float(v) if b.dtype.is_floating_point else int(v) for v in b.detach().reshape(-1).tolist()]
            buffers.append((field(name), name, tuple(b.shape), TORCH_DTYPES.get(b.dtype), persistent, init))
        shapes_text = {}
        for f, name, shape, dt, *_ in params + buffers:
            shapes_text[name] = ", ".join(body.slot(f"{f}_shape", s) for s in shape)
        for name, child in children:
            cd = self.draft(child, self.traced_child(traced, name), f"{path}.{name}" if path else name)
            off = body.adopt(cd.slots)
            parts.append((field(name), name, cd, off))
        mark = (len(body.slots), len(body.own))
        tr = Translator(self, module, traced, path, body, field_of, self.refusals, is_root)
        try:
            if not traced._c._has_method("forward"):
                # Held but never called as a module (Qwen2's rotary_emb in each attention, torchvision ViT's
                # out_proj, whose weights MultiheadAttention reads directly): the trace has no forward of it to write.
                raise ExportRefused(f"submodule {path} ({type(module).__name__}) is never called as a module in the "
                                    f"traced forward, so the trace has no forward of it to translate (its parent may "
                                    f"read its parameters directly): the generator writes only called submodules")
            result = tr.run()
            partial = tr.partial_settings()
            if partial:
                del body.slots[mark[0]:], body.own[mark[1]:]
                tr = Translator(self, module, traced, path, body, field_of, self.refusals, is_root, unnamed=frozenset(partial))
                result = tr.run()
        except ExportRefused as e:
            self.refusals.add(str(e))
            result = None
        tr.result = result
        d.n_outputs = getattr(tr, "n_outputs", 1)
        d.graph_out_map = getattr(tr, "graph_out_map", None)
        d.params, d.buffers, d.parts, d.shapes_text = params, buffers, parts, shapes_text
        d.forward_lines, d.result, d.inputs = tr.lines, result, tr.input_names
        d.config_slots = [i for i in body.own if body.slots[i][2] == "field"]
        d.locals = list(tr.locals)
        d.slots = body.slots
        d.sig = ("gen", type(module).__name__, tuple((f, n, len(s), dt, rg) for f, n, s, dt, rg in params),
                 tuple((f, n, len(s), dt, ps, None if init is None else tuple(init)) for f, n, s, dt, ps, init in buffers),
                 tuple((f, n, cd.sig) for f, n, cd, _ in parts), tr.canonical(), len(tr.input_names),
                 tuple((s[0], s[2]) for s in body.slots))
        return d

    # -- grouping: one C# class per PyTorch class where its instances allow it
    def collect(self, d, out):
        if d.kind in ("gen", "seq", "list"):
            for part in d.parts:
                self.collect(part[-2], out)
        out.append(d)

    def group_all(self, root):
        """Decides the C# classes: one per Sequential class; for every other PyTorch class one class for all its
        instances where _plan can merge them (children's classes first), else as few as it can (each extra class says
        why in a comment)."""
        self.root, self.classes = root, []
        if self.refusals.items:
            return
        every = []
        self.collect(root, every)
        self.order = {id(d): i for i, d in enumerate(every)}
        # The library's types the port names unqualified are never a generated class's name: a PyTorch class called
        # CustomLinear or Conv1D (a user's own, or a subclass of transformers') is written as CustomLinear_2, Conv1D_2.
        names_used = {self.class_name, "CustomLinear", "Conv1D", "LinearDispatch"}
        seq_plans = {}
        for d in every:
            if d.kind == "seq":
                t = type(d.module)
                if t not in seq_plans:
                    seq_plans[t] = {"kind": "seq", "name": _class_name(t.__name__, names_used, self.class_name), "members": [d]}
                    self.classes.append(seq_plans[t])
                else:
                    seq_plans[t]["members"].append(d)
                d.plan = seq_plans[t]
        families, deps = {}, {}
        for d in every:
            if d.kind == "gen":
                key = "root" if d is root else type(d.module)
                families.setdefault(key, []).append(d)
        if type(root.module) in families:
            self.refusals.add("the root module's class is used inside it")
            return
        for key, members in families.items():
            inner = set()
            for d in members:
                for g in _gen_descendants(d):
                    inner.add("root" if g is root else type(g.module))
            inner.discard(key)
            deps[key] = inner
        done = set()
        while len(done) < len(families):
            ready = [k for k in families if k not in done and deps[k] <= done]
            if not ready:
                self.refusals.add("module classes that contain each other: " + ", ".join(
                    sorted(k.__name__ for k in families if k not in done and k != "root")))
                return
            for key in ready:
                self.group_family(families[key], names_used)
                done.add(key)
        # Children first: classes in the order their first instance finishes.
        self.classes.sort(key=lambda p: self.order[id(p["members"][0])])
        self.ties = self.tie_lines() if hasattr(self, "tie_lines") else []

    def group_family(self, members, names_used):
        plans, reason = [], None
        for d in members:
            for i, plan in enumerate(plans):
                try:
                    plans[i] = self.plan(plan["members"] + [d])
                    break
                except Unmergeable as e:
                    if i == 0 and reason is None:
                        reason = str(e)
            else:
                plans.append(self.plan([d]))
        pyname = type(members[0].module).__name__
        for i, plan in enumerate(plans):
            if members[0] is self.root:
                plan["name"] = self.class_name
            else:
                plan["name"] = _class_name(pyname, names_used, self.class_name)
            if i:
                plan["reason"] = (f"A class of its own: these instances of {pyname} are not written as {plans[0]['name']} "
                                  f"because {reason}.")
            for d in plan["members"]:
                d.plan = plan
            self.classes.append(plan)

    def field_type(self, d):
        if d.kind == "leaf":
            return d.field_type
        if d.kind == "list":
            return f"TorchSharp.Modules.ModuleList<{self.list_type(d)}>"
        return d.plan["name"]

    def list_type(self, d):
        types = {self.field_type(cd) for cd, _ in d.parts}
        if len(types) == 1:
            return types.pop()
        return "nn.Module<Tensor, Tensor>"

    def template(self, d, vals):
        """The expression that builds draft d, as a tree whose values are @@j@@ markers into vals (name, value): equal
        trees build equal structures; the values may differ."""
        if d.kind == "leaf":
            def sub(m):
                vals.append(tuple(d.slots[int(m.group(1))][:2]))
                return f"@@{len(vals) - 1}@@"
            return ("text", re.sub(r"@@(\d+)@@", sub, d.ctor))
        if d.kind in ("seq", "list"):
            parts = tuple(self.template(cd, vals) for cd, _ in d.parts)
            head = f"new TorchSharp.Modules.ModuleList<{self.list_type(d)}>(" if d.kind == "list" else f"new {d.plan['name']}("
            return ("seq", head, parts)
        plan = d.plan
        i = plan["index"][id(d)]
        args = []
        for p in plan["params"]:
            if p["kind"] == "child":
                cd = p["drafts"][i]
                args.append((p["name"], None if cd is None else self.template(cd, vals)))
            else:
                vals.append((p["name"], p["values"][i]))
                args.append((p["name"], ("text", f"@@{len(vals) - 1}@@")))
        return ("gen", f"new {plan['name']}(", tuple(args))

    def structure(self, d):
        vals = []
        tree = self.template(d, vals)
        return repr(tree) + repr(tuple(cs_type_of(v) for _, v in vals))

    def plan(self, members):
        """One C# class for `members` (instances of one PyTorch class), or Unmergeable saying why not: the values in
        which they differ become constructor parameters, a submodule whose structure differs (or that some lack) is
        passed in (null where absent), and a statement some instances' forwards have and others lack is written once,
        under the condition that tells them apart (the submodule it calls is not null, or a bool attribute of the
        module), with the value it replaces where the condition is false."""
        d0 = members[0]
        pb = lambda d: (tuple((f, n, len(s), dt, rg) for f, n, s, dt, rg in d.params),  # noqa: E731
                        tuple((f, n, len(s), dt, ps, None if init is None else tuple(init)) for f, n, s, dt, ps, init in d.buffers))
        if any(pb(d) != pb(d0) for d in members):
            raise Unmergeable("their parameters or buffers differ")
        if any(len(d.inputs) != len(d0.inputs) for d in members):
            raise Unmergeable("their forwards take different numbers of inputs")
        if any(getattr(d, "n_outputs", 1) != getattr(d0, "n_outputs", 1) for d in members):
            raise Unmergeable("their forwards return different numbers of tensors")
        if any(len(d.config_slots) != len(d0.config_slots) for d in members):
            raise Unmergeable("their forwards hold different numbers of configuration values")
        # Submodules, in registration order.
        kids = [{n: (f, cd) for f, n, cd, _ in d.parts} for d in members]
        union = []
        for d in members:
            names = [n for _, n, _, _ in d.parts]
            for k, n in enumerate(names):
                if n not in union:
                    union.insert(union.index(names[k - 1]) + 1 if k else 0, n)
        for d in members:
            positions = [union.index(n) for _, n, _, _ in d.parts]
            if positions != sorted(positions):
                raise Unmergeable("their submodules are registered in different orders")
        children = []   # (field, name, mode, nullable, [draft or None per member], field type)
        for n in union:
            drafts = [k[n][1] if n in k else None for k in kids]
            field = next(k[n][0] for k in kids if n in k)
            types = {self.field_type(cd) for cd in drafts if cd is not None}
            if len(types) > 1:
                raise Unmergeable(f"their {n} are of different classes ({', '.join(sorted(types))})")
            nullable = any(cd is None for cd in drafts)
            built = not nullable and len({self.structure(cd) for cd in drafts}) == 1
            children.append((field, n, "built" if built else "passed", nullable, drafts, types.pop()))
        # The values each instance's class text holds, column by column: parameter shapes, built submodules, the
        # forward's configuration values.
        columns, shape_tpl, child_tpl, config_cols = None, {}, {}, []
        for m, d in enumerate(members):
            vals = []

            def own(m_):
                vals.append(tuple(d.slots[int(m_.group(1))][:2]))
                return f"@@{len(vals) - 1}@@"
            shapes = {n: re.sub(r"@@(\d+)@@", own, d.shapes_text[n]) for _, n, *_ in d.params + d.buffers}
            trees = {}
            for field, n, mode, nullable, drafts, _ in children:
                if mode == "built":
                    trees[n] = self.template(drafts[m], vals)
            first_config = len(vals)
            for i in d.config_slots:
                vals.append(tuple(d.slots[i][:2]))
            if columns is None:
                columns = [(name, [value]) for name, value in vals]
                shape_tpl, child_tpl = shapes, trees
                config_cols = list(range(first_config, len(vals)))
            else:
                if len(vals) != len(columns) or shapes != shape_tpl or trees != child_tpl:
                    raise Unmergeable("their submodules differ in structure")   # not expected: structures were compared
                for j, (name, value) in enumerate(vals):
                    if cs_type_of(value) != cs_type_of(columns[j][1][0]):
                        raise Unmergeable(f"their {name} values are of different types")
                    columns[j][1].append(value)
        # The forwards: one per distinct program, merged.
        programs, index, member_program = [], {}, []
        for d in members:
            program = _program(d)
            key = program.key()
            if key not in index:
                index[key] = len(programs)
                programs.append(program)
            member_program.append(index[key])
        reserved = ({f for f, *_ in d0.params + d0.buffers} | {c[0] for c in children} | {"scope", "this"})
        inputs, lines, result = _merge_programs(programs, reserved)
        everyone = frozenset(range(len(programs)))
        # Conditions of the statements only some instances have.
        fields_of = {c[0]: c for c in children}
        flags, conditions = {}, {}
        for k, line in enumerate(lines):
            text = "".join(t for t in line[2] if not isinstance(t, tuple))
            called = [c for c in re.findall(r"(?<![\w.])(\w+)(?:\[\d+\])?\.call\(", text) if c in fields_of]
            runs = {m for m in range(len(members)) if member_program[m] in line[4]}
            for c in called:
                has = {m for m, cd in enumerate(fields_of[c][4]) if cd is not None}
                if not runs <= has:
                    raise Unmergeable(f"a statement calls {c}, which some instances lack")
            if line[4] == everyone:
                continue
            condition = None
            if len(called) == 1 and fields_of[called[0]][3] and runs == {m for m, cd in enumerate(fields_of[called[0]][4]) if cd is not None}:
                condition = f"{called[0]} is not null"
            else:
                # A bool attribute whose true/false split is the split of the instances that run the statement: taken
                # only when it is the one such attribute, or the one of them that the statement's Python line reads (an
                # attribute merely correlated with the split, `verbose` where the code reads `flag`, is not the cause).
                matching = []
                for attr, value in vars(d0.module).items():
                    if attr.startswith("_") or not all(type(vars(d.module).get(attr)) is bool for d in members):
                        continue
                    truth = {m for m, d in enumerate(members) if vars(d.module)[attr]}
                    if truth == runs or truth == set(range(len(members))) - runs:
                        matching.append((attr, truth == runs))
                code = _enclosing_conditions(type(d0.module), line[3])
                read = [(attr, positive) for attr, positive in matching if re.search(rf"\.{re.escape(attr)}\b", code)]
                chosen = matching if len(matching) == 1 else read if len(read) == 1 else []
                if chosen:
                    attr, positive = chosen[0]
                    flags.setdefault(attr, [vars(d.module)[attr] for d in members])
                    condition = ("", attr) if positive else ("!", attr)
                elif len(matching) > 1:
                    src = f" ({line[3]})" if line[3] else ""
                    raise Unmergeable(f"some of their forwards have a statement{src} that the others lack, and several bool "
                                      f"attributes ({', '.join(a for a, _ in matching)}) split them so, none of them read "
                                      f"on that line alone")
            if condition is None:
                src = f" ({line[3]})" if line[3] else ""
                raise Unmergeable(f"some of their forwards have a statement{src} that the others lack, and neither a submodule "
                                  f"nor a bool attribute tells which")
            conditions[k] = condition
        locals_ = set(inputs) | {line[1] for line in lines if line[1]}
        # Constructor parameters: values that differ between instances (equal columns are one parameter, named after
        # the first) and every configuration value of the forward (a named setting, kept in a field).
        # A setting is named as the Python source names it even where a local of the forward has that name (the
        # forward reads the field as this.name): the constructor's parameter names are what a caller reads.
        used = set(reserved) | set(CS_KEYWORDS)
        params, alias, consts = [], {}, []
        by_column = {}
        for j, (name, values) in enumerate(columns):
            varying = len({repr(v) for v in values}) > 1
            if not varying and j not in config_cols:
                continue
            if not varying and all(name not in vars(d.module) for d in members) and \
                    _literal_in_source(values[0], config_cols.index(j), lines):
                # A float the Python line writes as a literal (`y * 2.0`, `float("-inf")`), not a setting.
                const_name = _fresh_name(cs_ident(name), used | locals_)   # a const cannot be read as this.name
                used.add(const_name)
                alias[j] = {"name": const_name, "values": values, "ctype": cs_type_of(values[0]), "const": True}
                consts.append(alias[j])
                continue
            key = tuple(repr(v) for v in values) if varying else None
            if key is not None and key in by_column:
                alias[j] = by_column[key]
                if j in config_cols:
                    by_column[key]["field"] = True
                continue
            p = {"kind": "value", "name": _fresh_name(cs_ident(name), used), "values": values, "field": j in config_cols,
                 "ctype": cs_type_of(values[0])}
            params.append(p)
            alias[j] = p
            if key is not None:
                by_column[key] = p
        for field, n, mode, nullable, drafts, ftype in children:
            if mode == "passed" and not nullable:
                params.append({"kind": "child", "name": field, "drafts": drafts, "ctype": ftype, "nullable": False})
        for attr, values in flags.items():
            flags[attr] = {"kind": "flag", "name": _fresh_name(cs_ident(attr), used), "values": values, "field": True, "ctype": "bool"}
            params.append(flags[attr])
        for field, n, mode, nullable, drafts, ftype in children:
            if mode == "passed" and nullable:
                params.append({"kind": "child", "name": field, "drafts": drafts, "ctype": ftype, "nullable": True})
        return {"kind": "gen", "members": members, "index": {id(d): i for i, d in enumerate(members)}, "params": params,
                "columns": columns, "alias": alias, "shape_tpl": shape_tpl, "child_tpl": child_tpl, "children": children,
                "config_cols": config_cols, "inputs": inputs, "lines": lines, "result": result, "conditions": conditions,
                "flags": flags, "consts": consts, "locals": locals_, "reason": None}

    # -- emission
    def render(self, tree, value_text, indent=12):
        """A template tree as C#: on one line when it fits in 120 columns, else one line per module or argument."""
        if tree[0] == "text":
            return re.sub(r"@@(\d+)@@", lambda m: value_text(int(m.group(1))), tree[1])
        if tree[0] == "seq":
            inner = [self.render(t, value_text, indent + 4) for t in tree[2]]
        else:
            inner = [f"{name}: {self.render(t, value_text, indent + 4)}" for name, t in tree[2] if t is not None]
        head = tree[1]
        one_line = head + ", ".join(inner) + ")"
        if len(one_line) + indent <= 120 and "\n" not in one_line:
            return one_line
        pad = "\n" + " " * (indent + 4)
        return head + pad + ("," + pad).join(inner) + ")"

    def emit_class(self, plan):
        d = plan["members"][0]
        name = plan["name"]
        pyname = type(d.module).__name__
        if plan["kind"] == "seq":
            return [
                f"    /// <summary>PyTorch's <c>{pyname}</c> (a Sequential): its modules, registered as \"0\", \"1\", ..., called in order.</summary>",
                f"    public sealed class {name} : nn.Module<Tensor, Tensor>",
                "    {",
                "        private readonly nn.Module<Tensor, Tensor>[] _modules;",
                "",
                "        /// <summary>Registers <paramref name=\"modules\"/> under their positions, as PyTorch's Sequential does.</summary>",
                f"        public {name}(params nn.Module<Tensor, Tensor>[] modules) : base(\"{pyname}\")",
                "        {",
                "            _modules = modules;",
                "            for (int i = 0; i < modules.Length; i++)",
                "                register_module(i.ToString(System.Globalization.CultureInfo.InvariantCulture), modules[i]);",
                "        }",
                "",
                "        /// <summary>Each module on the previous one's output, as torch.nn.Sequential.forward.</summary>",
                "        public override Tensor forward(Tensor input)",
                "        {",
                "            Tensor x = input;",
                "            foreach (var module in _modules)",
                "                x = module.call(x);",
                "            return x;",
                "        }",
                "    }",
            ]
        is_root = d is self.root
        columns, alias = plan["columns"], plan["alias"]

        def value_text(j):
            return alias[j]["name"] if j in alias else cs_literal(columns[j][1][0])

        def field(name):   # a field read in the forward: this.name where a local has its name
            return f"this.{name}" if name in plan.get("locals", ()) else name

        def forward_text(j):
            return field(alias[j]["name"]) if j in alias and not alias[j].get("const") else value_text(j)

        lines = []
        if plan["reason"]:
            lines.append(f"    // {plan['reason']}")
        arity = max(1, len(plan["inputs"]))
        n_outputs = getattr(d, "n_outputs", 1)
        result_type = "Tensor" if n_outputs == 1 else "(" + ", ".join(["Tensor"] * n_outputs) + ")"
        generic = f"nn.Module<{', '.join(['Tensor'] * arity)}, {result_type}>"
        what = "The exported model" if is_root else f"PyTorch's <c>{pyname}</c>"
        lines.append(f"    /// <summary>{what} ({type(d.module).__module__}.{pyname}), written from its traced forward.</summary>")
        lines.append(f"    public sealed class {name} : {generic}")
        lines.append("    {")
        params = plan["params"]
        for c in plan["consts"]:
            lines.append(f"        private const {c['ctype']} {c['name']} = {cs_literal(c['values'][0])};")
        for p in params:
            if p.get("field"):
                lines.append(f"        private readonly {p['ctype']} {p['name']};")
        for f, n, shape, dt, rg in d.params:
            lines.append(f"        private readonly TorchSharp.Modules.Parameter {f};")
        exposed = set().union(*(getattr(m, "exposed", set()) for m in plan["members"]))
        for f, n, shape, dt, ps, init in d.buffers:
            access = "internal" if n in exposed else "private"   # a buffer its parent reads
            lines.append(f"        {access} readonly Tensor {f};")
        for f, n, mode, nullable, drafts, ftype in plan["children"]:
            lines.append(f"        private readonly {ftype}{'?' if nullable else ''} {f};")
        lines.append("")
        decls = [f"{p['ctype']}{'?' if p.get('nullable') else ''} {p['name']}{' = null' if p.get('nullable') else ''}" for p in params]
        if is_root and params:
            defaults = ", ".join(f"{p['name']}: {cs_literal(p['values'][0])}" for p in params)
            lines.append("        /// <summary>Builds the exported architecture (weights are loaded from the exported state_dict).</summary>")
            lines.append(f"        public {name}() : this({defaults})")
            lines.append("        {")
            lines.append("        }")
            lines.append("")
        if not params:
            summary = "Builds the architecture (weights are loaded from the exported state_dict)."
        else:
            summary = "Builds the architecture from its settings (weights are loaded from the exported state_dict)."
        lines.append(f"        /// <summary>{summary}</summary>")
        lines.append(f"        public {name}({', '.join(decls)}) : base(\"{pyname}\")")
        lines.append("        {")
        for p in params:
            if p.get("field"):
                lines.append(f"            this.{p['name']} = {p['name']};")
        for f, n, shape, dt, rg in d.params:
            dtype = "" if dt in (None, "Float32") else f", dtype: ScalarType.{dt}"
            shape_text = self.render(("text", plan["shape_tpl"][n]), value_text)
            lines.append(f"            {f} = nn.Parameter(torch.zeros(new long[] {{ {shape_text} }}{dtype}), requires_grad: {cs_literal(rg)});")
            lines.append(f"            register_parameter(\"{n}\", {f});")
        for f, n, shape, dt, ps, init in d.buffers:
            shape_text = self.render(("text", plan["shape_tpl"][n]), value_text)
            if init is None:
                dtype = "" if dt in (None, "Float32") else f", dtype: ScalarType.{dt}"
                lines.append(f"            {f} = torch.zeros(new long[] {{ {shape_text} }}{dtype});")
            elif init[0] == "tril":
                lines.append(f"            {f} = torch.ones({init[1]}, {init[2]}, dtype: ScalarType.Bool).tril().expand(new long[] {{ {shape_text} }}).contiguous();")
            else:
                values = ", ".join(repr(struct.unpack("f", struct.pack("f", v))[0]) + "f" if dt == "Float32" else
                                   f"{v}L" if dt == "Int64" else cs_literal(v) for v in init)
                ctype = {"Float32": "float", "Int64": "long"}.get(dt, "double")
                lines.append(f"            {f} = torch.tensor(new {ctype}[] {{ {values} }}).reshape(new long[] {{ {shape_text} }});")
            lines.append(f"            register_buffer(\"{n}\", {f}, persistent: {cs_literal(ps)});")
        for f, n, mode, nullable, drafts, ftype in plan["children"]:
            if mode == "built":
                lines.append(f"            {f} = {self.render(plan['child_tpl'][n], value_text)};")
                lines.append(f"            register_module(\"{n}\", {f});")
            elif nullable:
                lines.append(f"            this.{f} = {f};")
                lines.append(f"            if ({f} is not null)")
                lines.append(f"                register_module(\"{n}\", {f});")
            else:
                lines.append(f"            this.{f} = {f};")
                lines.append(f"            register_module(\"{n}\", {f});")
        ties = getattr(self, "ties", []) if is_root else []
        lines += ties
        lines.append("        }")
        renamed = [n for f, n, *_ in d.params + d.buffers if f != n] + [n for f, n, *_ in plan["children"] if f != n]
        if renamed:
            # register_module(name, this) calls this.RegisterComponents(), which registers every Module, Parameter and
            # Tensor field once more under the field's name: a field not named as PyTorch names it would get a second key.
            lines += [
                "",
                f"        /// <summary>Registers nothing more: everything is registered under PyTorch's names above ({', '.join(renamed)} under another field name).</summary>",
                "        protected override void RegisterComponents() { }",
            ]
        if ties:
            lines += [
                "",
                "        private nn.Module Submodule(string path)",
                "        {",
                "            foreach (var (name, module) in named_modules())",
                "            {",
                "                if (name == path)",
                "                    return module;",
                "            }",
                "            throw new InvalidOperationException($\"{GetType().Name} has no submodule {path}.\");",
                "        }",
            ]
            if any("Parameter(\"" in t for t in ties):
                lines += [
                    "",
                    "        private TorchSharp.Modules.Parameter Parameter(string name)",
                    "        {",
                    "            foreach (var (key, parameter) in named_parameters())",
                    "            {",
                    "                if (key == name)",
                    "                    return parameter;",
                    "            }",
                    "            throw new InvalidOperationException($\"{GetType().Name} has no parameter {name}.\");",
                    "        }",
                ]
        lines.append("")
        config_order = plan["config_cols"]
        nullable_children = {f for f, n, mode, nullable, *_ in plan["children"] if nullable}

        def code(tokens):
            text = "".join(t[1] if isinstance(t, tuple) else t for t in tokens)
            return re.sub(r"@@c(\d+)@@", lambda m: forward_text(config_order[int(m.group(1))]), text)

        ins = plan["inputs"] if plan["inputs"] else ["input"]
        lines.append("        /// <summary>The traced forward, operation for operation; each line names the Python source it came from.</summary>")
        lines.append(f"        public override {result_type} forward({', '.join('Tensor ' + i for i in ins)})")
        lines.append("        {")
        lines.append("            using var scope = NewDisposeScope();")
        for k, line in enumerate(plan["lines"]):
            ltype, var, tokens, comment, present, passthrough = line
            expr = code(tokens)
            if k in plan["conditions"]:
                condition = plan["conditions"][k]
                if isinstance(condition, tuple):
                    neg, attr = condition
                    condition = neg + field(plan["flags"][attr]["name"])
                    for c in nullable_children:   # a flag guards it: the compiler cannot know the submodule is there
                        expr = re.sub(rf"(?<![\w.]){c}\.call\(", f"{c}!.call(", expr)
                statement = f"{ltype} {var} = {condition} ? {expr} : {passthrough};"
            elif var is None:
                statement = expr
            else:
                statement = f"{ltype} {var} = {expr};"
            lines.append("            " + statement + (f"  // {comment}" if comment else ""))
        returned = code(plan["result"])
        if "MoveToOuterDisposeScope" not in returned:   # a translator that moves each returned tensor itself
            returned += ".MoveToOuterDisposeScope()"
        lines.append(f"            return {returned};")
        lines.append("        }")
        lines.append("    }")
        return lines

    def tie_lines(self):
        """The constructor lines that tie parameters PyTorch's model shares (its state_dict lists one under each name,
        as TorchSharp's does once they are one Parameter): a leaf's `weight` is set to the owner's."""
        lines = []
        modules = dict(self.model.named_modules(remove_duplicate=False))
        for names in self.tied.values():
            owner = names[0]
            for name in names[1:]:
                path, _, attr = name.rpartition(".")
                opath, _, oattr = owner.rpartition(".")
                d, od = self.draft_of.get(id(modules.get(path))), self.draft_of.get(id(modules.get(opath)))
                settable = {"CustomLinear": ("weight", "bias"), "Conv1D": ("weight", "bias"), "TorchSharp.Modules.Embedding": ("weight",)}
                if d is None or od is None or d.kind != "leaf" or attr not in settable.get(d.field_type, ()) \
                        or od.kind not in ("leaf", "gen") or od.kind == "leaf" and oattr not in settable.get(od.field_type, ()):
                    self.refusals.add(f"{name} is {owner} (a tied parameter): only a Linear's, a Conv1D's or an Embedding's weight or "
                                      f"bias set to another's, or to a translated module's own parameter, is written")
                    continue
                source = f"(({od.field_type})Submodule(\"{opath}\")).{oattr}" + ("!" if od.field_type.endswith("Embedding") else "") \
                    if od.kind == "leaf" else f"new TorchSharp.Modules.Parameter(Parameter(\"{owner}\").contiguous())"
                lines.append(f"            (({d.field_type})Submodule(\"{path}\")).{attr} = {source};  // tied: {name} is {owner}")
        return lines

    def write_cs(self):
        out = [
            f"// <auto-generated> by tools/pytorch/export_port.py from {type(self.model).__module__}.{type(self.model).__name__}",
            f"// (PyTorch {torch.__version__}); regenerate rather than edit. </auto-generated>",
        ]
        conditions = []
        constructed = {}
        for file, line, outcome, path in self.calls.shape_conditions:
            if (file, line, outcome) not in conditions:
                conditions.append((file, line, outcome))
            d = self.draft_of.get(id(dict(self.model.named_modules()).get(path)))
            if d is not None and d.kind == "leaf":
                constructed.setdefault((file, line, outcome), path)
        if conditions:
            out.append("// Conditions on sizes only that the trace evaluated (the port has the branch taken only; each is checked")
            out.append("// where Python evaluated it, and the port throws InvalidOperationException on an input that gives the other):")
            for file, line, outcome in conditions:
                key = (file, line, outcome)
                status = "; ".join(self.guard_status[key]) if key in self.guard_status else \
                    f"a comparison was {outcome} in {constructed[key]}, a module TorchSharp has, which takes either branch itself" \
                    if key in constructed else f"a comparison was {outcome}"
                out.append(f"//   {_describe_line(file, line)}  ({status})")
        assumed = [(file, line, what) for file, line, what, shape_only in self.calls.numbers
                   if shape_only and any(_matches(a, file, line) for a in self.assume)]
        if assumed:
            out.append("// The caller's assumptions (assume_shape_conditions): Python numbers taken from sizes, frozen by the trace:")
            for file, line, what in assumed:
                out.append(f"//   {_describe_line(file, line)}  ({what}, assumed the same at every input)")
        out += [
            "#nullable enable",
            "using System;",
            "using TorchLinear;",
            "using TorchSharp;",
            "using static TorchSharp.torch;",
            "",
            f"namespace {self.namespace}",
            "{",
        ]
        for i, group in enumerate(self.classes):
            if i:
                out.append("")
            out += self.emit_class(group)
        out.append("}")
        return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------------------------------
# Tracing, the checks, and the files.

def _normalise_inputs(example_inputs):
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    if not 1 <= len(example_inputs) <= 2 or not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise ExportRefused(f"example_inputs must be a tuple of one or two tensors, not {[type(t).__name__ for t in example_inputs]}")
    return example_inputs


def _module_of_line(model, filename, lineno):
    for path, m in model.named_modules():
        fwd = type(m).forward
        try:
            lines, start = inspect.getsourcelines(fwd)
            file = inspect.getsourcefile(fwd)
        except (OSError, TypeError):
            continue
        if file and os.path.abspath(file) == os.path.abspath(filename) and start <= lineno < start + len(lines):
            return f"{path or '(root)'} ({type(m).__name__})"
    return "a module"


# Operations a shape condition may consist of: a branch whose condition is made of these (and of tensors' sizes) depends
# on the input's shape only, never on its values.
SHAPE_OPS = {"aten::size", "prim::NumToTensor", "prim::Constant", "aten::Int", "aten::ScalarImplicit", "aten::Float",
             "aten::eq", "aten::ne", "aten::lt", "aten::gt", "aten::le", "aten::ge", "aten::add", "aten::sub", "aten::mul",
             "aten::floor_divide", "aten::div", "aten::remainder", "aten::neg", "aten::__and__", "aten::__or__",
             "aten::__not__", "aten::logical_and", "aten::logical_or", "aten::logical_not", "prim::ListConstruct",
             "prim::TupleConstruct", "aten::all", "aten::any", "aten::to", "aten::detach", "aten::clone"}


def _shape_only(value, seen=None):
    """Whether a traced value is computed from tensors' sizes and constants only (never from a tensor's values)."""
    seen = set() if seen is None else seen
    if value.unique() in seen:
        return True
    seen.add(value.unique())
    node = value.node()
    if node.kind() not in SHAPE_OPS:
        return False
    if node.kind() == "aten::size":
        return True
    return all(_shape_only(v, seen) for v in node.inputs())


def _caller_line():
    """(file, line) of the innermost frame outside torch and this file."""
    frame = sys._getframe(2)
    while frame is not None:
        file = frame.f_code.co_filename
        if "/torch/" not in file and os.path.abspath(file) != os.path.abspath(__file__):
            return file, frame.f_lineno
        frame = frame.f_back
    return "?", 0


class TraceCalls:
    """What the trace hides and the port needs: how each submodule was called in Python. During the trace every
    submodule's forward is wrapped (as record_parity's recorder watches): its tensor arguments (positional and keyword,
    flattened as the recorder names them) are touched first thing in the module's scope, so that the tracer lifts every
    one into the submodule's graph in that order, used or not; each returned tensor's traced value gets a marker name, so
    that the submodule's Python outputs are found in the graphs afterwards (a tensor returned by several nested modules is
    renamed by each; `renamed` keeps the chain). Branches taken on a tensor's truth value are sorted into shape conditions
    (computed from sizes only) and data-dependent ones."""

    def __init__(self):
        self.calls = {}         # path -> {"in_names", "unique", "n_unique", "out_names", "outputs": [marker | ("in", j)]}
        self.renamed = {}       # marker -> the marker that replaced it
        self.original = {}      # marker -> the value's name before it
        self.counter = 0
        self.shape_conditions = []   # (file, line, outcome, path) of branches on sizes only, in trace order
        self.data_lines = []         # (file, line) of branches on tensor values
        self.guards = {}             # module path -> [(file, line, outcome)]: its guard markers in its graph, in order
        self.numbers = []            # (file, line, what, shape_only): a tensor turned into a Python number or list
        self.stack = [("", None)]    # the module whose forward runs (path, module); the root's is ""
        self.assume = ()             # assume_shape_conditions
        self.unguarded = []          # (file, line) of size conditions that could not be marked for a guard
        self.c_calls = {}            # frame -> (the C function it calls now, _newest() when it was called): profile
        self.pending = []            # conversions through __index__ not yet settled (TraceCalls.index)
        self.indexing = False        # inside the __index__ wrapper: its own calls are no events to settle on
        self.index_code = None       # the __index__ wrapper's code (its own return is no event to settle on)
        self.from_len = []           # what Tensor.__len__ returned (a traced size) that len() has yet to take __index__ of

    def final(self, marker):
        while marker in self.renamed:
            marker = self.renamed[marker]
        return marker

    def wrap(self, model):
        wrapped = []
        for path, m in model.named_modules():
            if not path:
                continue

            def forward(*args, _original=m.forward, _path=path, m_=m, **kwargs):
                # No local variable holds a tensor here: the tracer names a value after a local that holds it.
                names, tensors = [], []
                for i in range(len(args)):
                    _flatten(args[i], str(i), names, tensors)
                for key in kwargs:
                    _flatten(kwargs[key], key, names, tensors)
                unique, firsts = [], []
                for p in range(len(tensors)):
                    j = next((u for u in range(len(firsts)) if firsts[u] is tensors[p]), None)
                    if j is None:
                        firsts.append(tensors[p])
                        j = len(firsts) - 1
                        if torch._C._get_tracing_state() is not None:
                            torch.ops.aten.alias(firsts[j])   # the first use in this scope: lifted in argument order
                    unique.append(j)
                self.stack.append((_path, m_))
                try:
                    results = [_original(*args, **kwargs)]
                finally:
                    self.stack.pop()
                out_names, outs = [], []
                _flatten(results[0], "0" if isinstance(results[0], torch.Tensor) else "", out_names, outs)
                marks = []
                for k in range(len(outs)):
                    j = next((p for p in range(len(tensors)) if tensors[p] is outs[k]), None)
                    if j is not None:
                        marks.append(("in", j))
                    elif len(outs) == 1 or torch._C._get_tracing_state() is None:
                        marks.append(None)   # the one output: found as the graph's output that is not an input's alias
                    else:
                        value = torch._C._get_value_trace(outs[k])
                        self.counter += 1
                        marker = f"tlout{self.counter}"
                        old = value.debugName()
                        if old.startswith("tlout"):
                            self.renamed[old.split(".")[0]] = marker
                            self.original[marker] = self.original.get(old.split(".")[0], "t")
                        else:
                            self.original[marker] = old
                        value.setDebugName(marker)
                        marks.append(marker)
                if _path not in self.calls:
                    self.calls[_path] = {"in_names": names, "unique": unique, "n_unique": len(firsts),
                                         "out_names": out_names, "outputs": marks}
                return results[0]
            m.forward = forward
            wrapped.append(m)
        return wrapped

    def boolean(self, original):
        """Tensor.__bool__ during the trace: a branch on sizes only is recorded (file, line, outcome) and marked in the
        graph of the module that runs it (the condition copied into that module's guard buffer, GUARD, an in-place
        write the tracer keeps with the operations that computed the condition), so that the port checks the condition
        at that place and throws where the input would take the other branch; a branch on values is listed (refused)."""
        def __bool__(tensor):
            if torch._C._get_tracing_state() is not None:
                where = _caller_line()
                try:
                    shape_only = _shape_only(torch._C._get_value_trace(tensor))
                except RuntimeError:
                    shape_only = False
                outcome = original(tensor)
                if shape_only:
                    path, module = self.stack[-1]
                    self.shape_conditions.append((where[0], where[1], bool(outcome), path))
                    guard = getattr(module if module is not None else self.root, GUARD, None)
                    if guard is not None and tensor.dim() == 0:
                        self.guards.setdefault(path, []).append((where[0], where[1], bool(outcome)))
                        guard.copy_(tensor)
                    elif where not in self.unguarded:
                        self.unguarded.append(where)
                elif where not in self.data_lines:
                    self.data_lines.append(where)
                return outcome
            return original(tensor)
        return __bool__

    def number(self, original, what):
        """Tensor.__int__, __float__, __len__, item, tolist during the trace: the trace keeps the Python number it gives
        as a constant. One taken from a tensor's values is recorded (refused); one taken from sizes only is checked by
        the port as a shape condition (`size == number`, a guard, as TraceCalls.boolean) unless the caller assumes its
        line (assume_shape_conditions): a number that changes with the input's shape then differs between the two
        traces and is refused there."""
        def convert(size, *args, **kwargs):
            if torch._C._get_tracing_state() is None:
                return original(size, *args, **kwargs)
            where = _caller_line()
            result = original(size, *args, **kwargs)
            if what == "len()":
                size = size.shape[0]   # len(x) is x.shape[0], traced as a size (the local's name is the C# name)
                if isinstance(result, torch.Tensor):
                    self.from_len.append(result)   # len() takes its __index__ next: recorded here, not there
            try:
                shape_only = isinstance(size, torch.Tensor) and _shape_only(torch._C._get_value_trace(size))
            except RuntimeError:
                shape_only = False
            entry = (where[0], where[1], what, shape_only)
            if entry not in self.numbers:
                self.numbers.append(entry)
            # Tensor.__len__ returns the traced size itself (len() takes its index): its number, unwatched.
            value = torch._C._TensorBase.item(result) if isinstance(result, torch.Tensor) and result.dim() == 0 else result
            if shape_only:
                self.check_number(size, value, where, self.stack[-1])
            return result
        return convert

    def check_number(self, size, value, where, running):
        """A Python number taken from sizes only: the port checks `size == number` where Python took it (a guard in the
        guard buffer of `running`, the (path, module) whose forward ran), unless the caller assumes its line."""
        if any(_matches(a, *where) for a in self.assume) or size.dim() != 0 \
                or not isinstance(value, (int, float)) or isinstance(value, bool):
            return
        path, module = running
        guard = getattr(module if module is not None else self.root, GUARD, None)
        if guard is not None:
            self.shape_conditions.append((where[0], where[1], True, path))
            self.guards.setdefault(path, []).append((where[0], where[1], True))
            guard.copy_(size == value)

    # -- Tensor.__index__: a conversion no warning and no other method shows (the tracer warns on __int__, __float__,
    # __bool__..., never on __index__). Python calls it for range(t), operator.index(t), a list's index or slice, [0] * t;
    # torch's own argument parser calls it too, on a size passed where torch takes an int (x.view(t, -1),
    # torch.zeros(t), x[:, :t]), and the tracer then records the size's traced value as an aten::Int (the graph computes
    # it). Which of the two happened shows only around the call, so while tracing a profile function (sys.setprofile)
    # tells which C function each Python frame is in, and each conversion is settled once its instruction is over (the
    # frame has moved on, or the C function returned; not on the tracer's own Python callbacks in between): kept by the
    # trace if an aten::Int of the size was made during that C call (torch's argument parser records it just before or
    # just after converting: x.view(t, -1), torch.zeros(t)) or, outside any C call, during the instruction (x[:, :t]
    # records its slice before it returns); frozen otherwise (range(t), lst[t], operator.index(t), numpy.zeros(t), and
    # torch.tensor([t]), which makes a constant). An aten::Int made earlier (t used by a view before) does not count.
    # A frozen one is then what int() of it would be (TraceCalls.number): checked by the port where it comes from sizes
    # (a guard `size == number`), refused where it comes from a tensor's values. One that makes text (a torch.Size in a
    # message: _into_text) is neither.
    def index(self, original):
        def __index__(*args):
            # No local variable holds the tensor: the tracer names a value after a local that holds it (the innermost
            # frame's), and this one's name would replace the caller's (`batch` of `batch, time, d = x.shape`).
            if torch._C._get_tracing_state() is None or self.indexing:
                return original(*args)
            if any(args[0] is r for r in self.from_len):
                self.from_len = [r for r in self.from_len if r is not args[0]]
                return original(*args)
            self.indexing = True
            try:
                result = original(*args)
                frame = sys._getframe(1)
                self.settle_done()   # a conversion by an earlier instruction: settled before this one records anything
                function, since = self.c_calls.get(frame, (None, None))
                if _into_text(frame, function):
                    return result
                try:
                    value = torch._C._get_value_trace(args[0])
                except RuntimeError:
                    value = None
                self.pending.append({"tensor": args[0], "value": value, "result": result, "where": _caller_line(),
                                     "frame": frame, "lasti": frame.f_lasti, "in": function,
                                     "since": _newest() if since is None else since, "running": self.stack[-1],
                                     "described": _index_use(frame, function)})
            finally:
                self.indexing = False
            return result
        return __index__

    def profile(self, frame, event, arg):
        """sys.setprofile's function during the trace: the C function each frame is in (and the trace's newest value
        when it was called), and the conversions through __index__ settled at the first event after their instruction
        (settle_done); the __index__ wrapper's own events are none."""
        if self.indexing:
            return
        if self.pending and frame.f_code is not self.index_code:
            self.settle_done(frame if event in ("c_return", "c_exception", "return") else None)
        if event == "c_call":
            self.c_calls[frame] = (arg, _newest())
        elif event in ("c_return", "c_exception"):
            self.c_calls.pop(frame, None)

    def settle_done(self, finished=None):
        """Settles the conversions whose instruction is over: its frame has moved to another instruction, or `finished`
        (the frame whose C call or whole function just returned) is its frame. Python called while the instruction
        runs (the tracer's own name lookup, a __torch_function__) is no reason: torch's C code may record the size after."""
        done = [p for p in self.pending if p["frame"] is finished or p["frame"].f_lasti != p["lasti"]]
        if done:
            self.pending = [p for p in self.pending if not any(p is d for d in done)]
            for p in done:
                self.settle(p)

    def settle(self, p):
        """A conversion through __index__, once torch's C code has returned: kept by the trace (nothing to do) or
        frozen (recorded as TraceCalls.number records one)."""
        if _int_uses(p["value"], p["since"]):
            return
        try:
            shape_only = p["value"] is not None and _shape_only(p["value"])
        except RuntimeError:
            shape_only = False
        entry = (p["where"][0], p["where"][1], p["described"], shape_only)
        if entry not in self.numbers:
            self.numbers.append(entry)
        if shape_only:
            self.check_number(p["tensor"], p["result"], p["where"], p["running"])


GUARD = "_tl_guard"   # the 0-dim bool buffer a shape condition is copied into during the trace (TraceCalls.boolean)
NUMBER_METHODS = {"__int__": "int()", "__float__": "float()", "__len__": "len()",
                  "item": ".item()", "tolist": ".tolist()"}


def _int_uses(value, since):
    """How many aten::Int nodes made after the value numbered `since` (_newest) use a traced value: how the tracer
    records a size that torch's C code took as an int (inserted after the size, so told apart by number, not place)."""
    return 0 if value is None else sum(1 for u in value.uses() if u.user.kind() == "aten::Int" and u.user.output().unique() > since)


def _newest():
    """The number (unique()) of the trace's newest value: the graph's last node is the newest operation recorded,
    values made after it have higher numbers."""
    state = torch._C._get_tracing_state()
    node = state.graph().return_node().prev() if state is not None else None
    while node is not None and node.kind() != "prim::Param":
        outputs = list(node.outputs())
        if outputs:
            return max(o.unique() for o in outputs)
        node = node.prev()
    return -1


def _instruction(frame):
    """(opname, argrepr) of the instruction a frame executes now; ("", "") where none is found."""
    return next(((i.opname, i.argrepr) for i in dis.get_instructions(frame.f_code) if i.offset == frame.f_lasti), ("", ""))


# The methods of str that return text (a size converted into their result is a message): the others (count, find,
# index, startswith, ...) return a number or a bool the forward may compute with, a conversion to check.
_STR_TEXT_METHODS = frozenset(name for name in ("format", "format_map", "join", "center", "ljust", "rjust", "zfill",
                                                "expandtabs", "replace", "split", "rsplit", "partition", "rpartition",
                                                "strip", "lstrip", "rstrip", "__mod__", "__rmod__", "__format__",
                                                "__add__", "__mul__", "__rmul__", "__getitem__")
                              if hasattr(str, name))


def _into_text(frame, function):
    """Whether a conversion through __index__ makes text, not a number the forward computes with: a torch.Size (of
    traced sizes) written into a message converts each size (torchvision's ViT: `torch._assert(input.dim() == 3,
    f"... got {input.shape}")`). Seen from the instruction: an f-string's value, `%` formatting (a tensor's own `%` is
    traced and converts nothing), repr(), format(), print(), a str method that returns text ("{}".format, "-".join:
    _STR_TEXT_METHODS; "abc".count(..., n) returns a number, so it is checked). str(size) is a call like
    range(): a guard, harmless where the size cannot change."""
    if function is not None:
        return function in (repr, format, print, ascii) or isinstance(getattr(function, "__self__", None), str) \
            and getattr(function, "__name__", None) in _STR_TEXT_METHODS
    op, arg = _instruction(frame)
    return op.startswith("FORMAT_") or op == "BINARY_OP" and arg in ("%", "%=")


def _index_use(frame, function):
    """What took a Python int through __index__, for the message: the C function called, else the instruction."""
    if function is not None:
        module = getattr(function, "__module__", None) or getattr(getattr(function, "__self__", None), "__name__", None)
        return f"{module + '.' if module and module != 'builtins' else ''}{getattr(function, '__name__', '?')}() (__index__)"
    op = _instruction(frame)[0]
    if "SUBSCR" in op or "SLICE" in op:
        return "a Python sequence's index or slice (__index__)"
    if op.startswith("CALL") or op.startswith("PRECALL"):
        return "range() or another call (__index__)"
    return "a Python int (__index__)"


def _matches(assumed, file, line):
    """Whether an entry of assume_shape_conditions ('modeling_llama.py:306' or a longer path) names file:line."""
    name, _, number = assumed.rpartition(":")
    return number.isdigit() and int(number) == line and (os.path.abspath(file).endswith(os.sep + name) or os.path.basename(file) == name)


def _trace(model, inputs, assume=()):
    """The trace, its problems, and the TraceCalls seen during it."""
    calls = TraceCalls()
    # A parameter shared by two modules (a tied LM head) is lifted by the tracer into the second module's call as an
    # input; traced with its own copy instead, each module reads its own attribute, and the port ties the two again
    # in its constructor (Exporter.tie_lines). The copies are the same numbers; the model is restored afterwards.
    untied, groups = [], {}
    for name, p in _parameter_names(model):
        groups.setdefault(id(p), []).append(name)
    modules = dict(model.named_modules(remove_duplicate=False))
    for names in groups.values():
        for name in names[1:]:
            path, _, attr = name.rpartition(".")
            owner = modules[path]
            untied.append((owner, attr, owner._parameters[attr]))
            owner._parameters[attr] = nn.Parameter(owner._parameters[attr].detach().clone(), owner._parameters[attr].requires_grad)
    wrapped = calls.wrap(model)
    calls.root, calls.assume = model, tuple(assume)
    guarded = []
    for m in model.modules():
        if GUARD not in m._buffers and not hasattr(m, GUARD):
            m.register_buffer(GUARD, torch.zeros((), dtype=torch.bool), persistent=False)
            guarded.append(m)
    original_bool = torch.Tensor.__bool__
    originals = {name: getattr(torch.Tensor, name) for name in NUMBER_METHODS}
    original_profile = sys.getprofile()
    if original_profile is not None and not callable(original_profile):
        # The watch of __index__ needs sys.setprofile for the trace, and a C profiler's object (cProfile's Profile)
        # cannot be handed back to sys.setprofile afterwards (it is no callable): refused, the profiler left running.
        raise ExportRefused(f"cannot trace {type(model).__name__}: a profile function is active (sys.getprofile() is a "
                            f"{type(original_profile).__module__}.{type(original_profile).__qualname__}), and the export "
                            f"needs sys.setprofile for the trace: export outside the profiler (cProfile)")
    original_index = torch.Tensor.__index__
    if original_profile is None:
        profile = calls.profile
    else:
        def profile(frame, event, arg):   # a Python profile function already set: it keeps seeing every event
            calls.profile(frame, event, arg)
            return original_profile(frame, event, arg)
    torch.Tensor.__bool__ = calls.boolean(original_bool)
    for name, what in NUMBER_METHODS.items():
        setattr(torch.Tensor, name, calls.number(originals[name], what))
    torch.Tensor.__index__ = calls.index(original_index)
    calls.index_code = torch.Tensor.__index__.__code__
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                sys.setprofile(profile)
                try:
                    traced = torch.jit.trace(model, inputs, strict=False, check_trace=False)
                finally:
                    sys.setprofile(original_profile)
        if calls.pending:
            raise RuntimeError(f"export_port: {len(calls.pending)} conversions through __index__ left unsettled by the trace")
    finally:
        torch.Tensor.__index__ = original_index
        torch.Tensor.__bool__ = original_bool
        for name in NUMBER_METHODS:
            setattr(torch.Tensor, name, originals[name])
        for m in guarded:
            del m._buffers[GUARD]
        for m in wrapped:
            del m.forward
        for owner, attr, parameter in untied:
            owner._parameters[attr] = parameter
    # The tracer's warnings "Converting a tensor to a Python boolean / number / integer / index / list" and "Using len"
    # come from the wrapped __bool__ and number methods, which have sorted each: a branch on sizes only is checked by the
    # port (a guard, TraceCalls.boolean); a branch on a tensor's values is refused; a Python number taken from a tensor
    # is refused (from values always; from sizes unless the caller assumes that line, assume_shape_conditions). A
    # warning from elsewhere (a conversion that bypasses them) is refused too.
    lines = list(calls.data_lines)
    known = {(file, line) for file, line, *_ in calls.numbers}
    for w in caught:
        text = str(w.message)
        if ("Converting a tensor to a Python" in text or "Using len to get tensor shape" in text) \
                and os.path.abspath(w.filename) != os.path.abspath(__file__) \
                and (w.filename, w.lineno) not in lines and (w.filename, w.lineno) not in known:
            lines.append((w.filename, w.lineno))
    problems = [f"a branch on a tensor's value or a conversion of a tensor to a Python value (data-dependent control "
                f"flow or a number the trace would freeze) at {_module_of_line(model, file, line)}, {_describe_line(file, line)}"
                for file, line in lines]
    for file, line in calls.unguarded:
        if not any(_matches(a, file, line) for a in assume):
            problems.append(f"a branch on sizes that the port cannot check (not a single number) at "
                            f"{_module_of_line(model, file, line)}, {_describe_line(file, line)}; if every input the port "
                            f"will see gives it the value it had, list {os.path.basename(file)}:{line} in assume_shape_conditions")
    for file, line, what, shape_only in calls.numbers:
        where = f"{_module_of_line(model, file, line)}, {_describe_line(file, line)}"
        if not shape_only:
            problems.append(f"{what} of a tensor's value (a Python number the trace freezes: data-dependent) at {where}")
    return traced, problems, calls


MAX_ARGUMENTS = 6   # TorchSharp's nn.Module<T1, ..., T6, TResult>, and what Parity's CallCapture watches


def _calls_the_port_cannot_make(model, inputs):
    """Submodules whose calls a port cannot make: more than six tensor arguments (positional and keyword, flattened as
    the recorder names them), or a result that is not a tensor or a tuple or list of tensors (None items are dropped,
    as the recorder drops them). Keyword arguments are fine: the port's module takes every tensor argument in the
    recorder's order, which is how the replay matches them. Watched as the recorder watches, by wrapping each
    instance's forward; the wrappers are removed afterwards."""
    problems, wrapped = [], []

    def note(text):
        if text not in problems:
            problems.append(text)

    def plain(output):
        if output is None or isinstance(output, torch.Tensor):
            return True
        return isinstance(output, (tuple, list)) and all(o is None or isinstance(o, torch.Tensor) for o in output)

    for path, m in model.named_modules():
        if not path:
            continue

        def forward(*args, _original=m.forward, _path=path, _module=m, **kwargs):
            names, tensors = [], []
            for i, a in enumerate(args):
                _flatten(a, str(i), names, tensors)
            for key, a in kwargs.items():
                _flatten(a, key, names, tensors)
            twice = [names[p] for p in range(len(tensors)) if any(tensors[q] is tensors[p] for q in range(p))]
            if twice:
                note(f"called with one tensor as several arguments ({', '.join(twice)} repeat an earlier one) at {_path} "
                     f"({type(_module).__name__}): the trace cannot tell which of them the module uses where")
            if len(tensors) > MAX_ARGUMENTS:
                note(f"called with {len(tensors)} tensors ({', '.join(names)}) at {_path} ({type(_module).__name__}): a port's module "
                     f"takes at most {MAX_ARGUMENTS}")
            output = _original(*args, **kwargs)
            if not plain(output):
                note(f"returns a {type(output).__name__} at {_path} ({type(_module).__name__}): a port's module returns a tensor "
                     f"or a tuple of tensors")
            elif output is None or not isinstance(output, torch.Tensor) and not any(isinstance(o, torch.Tensor) for o in output):
                note(f"returns no tensor at {_path} ({type(_module).__name__})")
            return output
        m.forward = forward
        wrapped.append(m)
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for m in wrapped:
            del m.forward
    return problems


def _run_ok(model, inputs):
    try:
        with torch.no_grad():
            model(*inputs)
        return True
    except Exception:  # noqa: BLE001 - any failure means this size is not free
        return False


def second_inputs(model, inputs, seed=1234):
    """Inputs of another shape and other values: each dimension that the model accepts at another size (+1, else -1)
    changes (all such dimensions together); the values are drawn again (integers within the example's range)."""
    g = torch.Generator().manual_seed(seed)

    def draw(t, shape):
        if t.dtype.is_floating_point:
            return torch.randn(shape, generator=g, dtype=t.dtype)
        if t.dtype == torch.bool:
            return torch.randint(0, 2, shape, generator=g).bool()
        high = int(t.max()) + 1 if t.numel() else 2
        return torch.randint(int(t.min()) if t.numel() else 0, max(high, 1), shape, generator=g, dtype=t.dtype)

    shapes = [list(t.shape) for t in inputs]
    for i, t in enumerate(inputs):
        for dim in range(t.dim()):
            for delta in (1, -1):
                if t.shape[dim] + delta < 1:
                    continue
                trial = [list(s) for s in shapes]
                trial[i][dim] = t.shape[dim] + delta
                candidate = tuple(draw(x, s) for x, s in zip(inputs, trial))
                if _run_ok(model, candidate):
                    shapes = trial
                    break
    if shapes == [list(t.shape) for t in inputs]:
        warnings.warn("export_port: the model accepts no input dimension at another size, so the second trace runs at the "
                      "example's shape and cannot find a shape the trace froze (values still differ)")
    return tuple(draw(t, s) for t, s in zip(inputs, shapes))


def generate(model, example_inputs, class_name, namespace="Ports", assume_shape_conditions=()):
    """The C# text of the port, after every check; raises ExportRefused listing every problem.

    assume_shape_conditions: 'file.py:line' entries, the caller's word that every input the port will see gives the
    condition (or the Python number taken from a size) on that line the value it had in the trace; only for those the
    port cannot check (every other shape condition is checked by the port). Listed in the port's header."""
    assume = tuple(assume_shape_conditions)
    if model.training:
        raise ExportRefused(f"{type(model).__name__} is in training mode: call model.eval() first (a port is written from the eval forward)")
    inputs = _normalise_inputs(example_inputs)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", class_name):
        raise ExportRefused(f"class_name {class_name!r} is not a C# identifier")
    texts, problems = [], _calls_the_port_cannot_make(model, inputs)
    for run, ins in enumerate((inputs, second_inputs(model, inputs))):
        traced, trace_problems, calls = _trace(model, ins, assume)
        problems += [p for p in trace_problems if p not in problems]
        if trace_problems:
            continue
        exporter = Exporter(model, traced, class_name, namespace, calls, assume)
        root = exporter.draft(model, traced, "", is_root=True)
        exporter.group_all(root)
        problems += [p for p in exporter.refusals.items if p not in problems]
        if exporter.refusals.items:
            break
        texts.append((ins, exporter.write_cs()))
    if problems:
        raise ExportRefused("cannot write a faithful port of " + type(model).__name__ + ":\n  " + "\n  ".join(problems))
    (ins1, first), (ins2, second) = texts
    if first != second:
        a, b = first.splitlines(), second.splitlines()
        diff = next(i for i in range(min(len(a), len(b)) + 1) if i >= min(len(a), len(b)) or a[i] != b[i])
        where = a[diff].strip() if diff < len(a) else "(end)"
        other = b[diff].strip() if diff < len(b) else "(end)"
        cls = next((l.strip() for l in reversed(a[:diff]) if l.strip().startswith("public sealed class")), "?")
        raise ExportRefused(
            f"cannot write a faithful port of {type(model).__name__}: the trace froze a value that depends on the input "
            f"(shape {[tuple(t.shape) for t in ins1]} vs {[tuple(t.shape) for t in ins2]}, other values): in {cls},\n"
            f"  first trace:  {where}\n  second trace: {other}")
    return first


def _write_safetensors(state, path):
    """The safetensors format: 8-byte little-endian header length, a JSON header, the raw little-endian data."""
    names = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
             torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
    header, blobs, offset = {}, [], 0
    for key in sorted(state):
        t = state[key].detach().contiguous().cpu()
        if t.dtype not in names:
            raise ExportRefused(f"state_dict key {key}: dtype {t.dtype} has no safetensors name")
        data = t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes()
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def export_port(model, example_inputs, out_dir, class_name, *, namespace="Ports", weights=True, recording=True, reference64=True,
                assume_shape_conditions=()):
    """Writes <class_name>.cs (the TorchSharp port), <class_name>.safetensors (the state_dict) and <class_name>.parity.pt
    (record_parity.record of the model on example_inputs) into out_dir. Raises ExportRefused, naming every operation or
    module it cannot write with its module path and Python source line, before anything is written. Returns the paths.

    namespace: the C# namespace of the port. weights=False / recording=False leave out the .safetensors / .parity.pt
    (when the same weights and recording exist elsewhere); reference64 is record()'s; assume_shape_conditions is
    generate()'s."""
    inputs = _normalise_inputs(example_inputs)
    code = generate(model, inputs, class_name, namespace, assume_shape_conditions)
    with tempfile.TemporaryDirectory() as tmp:
        rec = os.path.join(tmp, "recording.parity.pt")
        if recording:
            record(model, inputs, rec, reference64=reference64)
        st = os.path.join(tmp, "weights.safetensors")
        _write_safetensors(model.state_dict(), st)
        os.makedirs(out_dir, exist_ok=True)
        paths = {"cs": os.path.join(out_dir, f"{class_name}.cs"), "safetensors": os.path.join(out_dir, f"{class_name}.safetensors")}
        with open(paths["cs"], "w", encoding="utf-8", newline="\n") as f:
            f.write(code)
        if weights:
            shutil.copyfile(st, paths["safetensors"])
        else:
            del paths["safetensors"]
        if recording:
            paths["parity"] = os.path.join(out_dir, f"{class_name}.parity.pt")
            shutil.copyfile(rec, paths["parity"])
    return paths


def _main(argv):
    args = [a for a in argv[1:] if not a.startswith("--")]
    options = dict(a[2:].split("=", 1) for a in argv[1:] if a.startswith("--") and "=" in a)
    if len(args) != 3 or ":" not in args[0]:
        print(__doc__)
        return 2
    built = build_from_spec(args[0])
    module, inputs = built[0], built[1]
    try:
        paths = export_port(module, inputs, args[1], args[2], namespace=options.get("namespace", "Ports"))
    except ExportRefused as e:
        print(f"refused: {e}", file=sys.stderr)
        return 1
    print("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
