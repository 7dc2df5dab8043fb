"""Tests of export_port.py's refusals and of what it writes (plain unittest, Debian's PyTorch 1.13):

    /usr/bin/python3 tools/pytorch/test_export_port.py

The generated ports of real models are compiled and replayed by the .NET tests (tests/TorchLinear.Tests/Ports)."""
import math
import operator
import os
import re
import sys
import tempfile
import unittest

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from export_port import ExportRefused, export_port, generate  # noqa: E402

THIS = os.path.basename(__file__)


def line_of(text):
    """The line number of `text` in this file (the refusals name source lines)."""
    with open(__file__, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if text in line and "line_of(" not in line:
                return number
    raise AssertionError(text)


class Fft(nn.Module):
    def forward(self, x):
        return torch.fft.fft(x).real  # the unsupported operation


class Svd(nn.Module):
    def forward(self, x):
        return torch.linalg.svd(x)[1]  # svd here


class WithInner(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.inner = inner

    def forward(self, x):
        return self.inner(self.proj(x))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # the data-dependent branch
            return self.proj(x)
        return -self.proj(x)


class BakedLength(nn.Module):
    def forward(self, x):
        return x[: len(x) - 1] * 2.0  # len() is a Python int in the trace


class BakedValue(nn.Module):
    def forward(self, x):
        return x * float(x.abs().max())  # a tensor's value frozen as a constant


class SizeBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        if x.shape[1] > 4:  # the size branch
            return self.lin(x) * 2
        return self.lin(x) + 1


class SizeMin(nn.Module):
    def forward(self, x):
        keep = min(x.shape[1], 4)  # the min of a size
        return x[:, :keep] * 2.0


class SizeScaled(nn.Module):
    def forward(self, x):
        if x.shape[1] * 0.5 > 2:  # a size condition the port cannot write
            return x * 2.0
        return x


class SizeVector(nn.Module):
    def forward(self, x):
        if torch.tensor([x.shape[1]]) > 4:  # a one-element vector of a size
            return x * 2.0
        return x


class LenBranch(nn.Module):
    def forward(self, x):
        if len(x) > 1:  # len of the input
            return x * 2.0
        return x


class IntBranch(nn.Module):
    def forward(self, x):
        if int(x.shape[1]) > 4:  # int of a size
            return x * 2.0
        return x


class HeadScale(nn.Module):
    """Its last size is the Linear's in_features: the same at every input the model accepts."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x) / float(x.shape[-1])  # float of the last size


class RankBranch(nn.Module):
    def forward(self, x):
        if x.dim() == 3:  # the rank
            return x * 2.0
        return x


class FloatData(nn.Module):
    def forward(self, x):
        if float(x.abs().max()) > 0.5:  # float of a value
            return x * 2.0
        return x


class ItemData(nn.Module):
    def forward(self, x):
        if x.abs().max().item() > 0.5:  # item of a value
            return x * 2.0
        return x


class TolistData(nn.Module):
    def forward(self, x):
        return x * x.abs().max().tolist()  # tolist of a value


class FixedMiddle(nn.Module):
    """A Linear over dimension 1 makes it 3 at every input the model accepts: the second trace cannot change it, so only
    the first trace's watch of __index__ sees a Python number taken from it. `how` picks the conversion."""

    def __init__(self, how):
        super().__init__()
        self.mix = nn.Linear(3, 3)
        self.how = how

    def forward(self, x):
        y = self.mix(x.transpose(1, 2)).transpose(1, 2)
        if self.how == "range":
            out = y[:, 0]
            for i in range(1, x.shape[1]):  # a loop over a size
                out = out + y[:, i]
            return out
        if self.how == "index":
            return y * [0.5, 1.0, 1.5, 2.0][x.shape[1]]  # a list indexed by a size
        if self.how == "slice":
            return y * sum([0.5, 1.0, 1.5, 2.0][:x.shape[1]])  # a list sliced by a size
        if self.how == "repeat":
            return y * len([0.0] * x.shape[1])  # a list repeated a size's times
        if self.how == "after a view":
            n = x.shape[1]
            return y.reshape(-1, n, 4) * [0.5, 1.0, 1.5, 2.0][n]  # a list indexed by a size a view took before
        if self.how == "a view after":
            n = x.shape[1]
            s = [0.5, 1.0, 1.5, 2.0][n]  # a list indexed by a size a view takes after
            return y.reshape(-1, n, 4) * s
        if self.how == "str.count":
            return y * float("aaaaabbbaaa".count("a", 0, x.shape[1]))  # a str method returning a number
        if self.how == "operator.index":
            return y * operator.index(x.shape[1])  # operator.index of a size
        raise ValueError(self.how)


class Plain(nn.Module):
    def forward(self, x):
        return x * 2.0


class HoldsUncalled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.spare = nn.Linear(3, 3), Plain()

    def forward(self, x):
        return self.lin(x)


class SizeTable(nn.Module):
    """A list indexed by a size, where the two traces' sizes (5, then 6) find the same number (the table changes at 7):
    the generated code is the same, so the second trace alone cannot tell."""

    def forward(self, x):
        return x * [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0][x.shape[1]]  # a table indexed by a size


class ValueIndex(nn.Module):
    def forward(self, x):
        return x * [0.5, 1.0, 2.0][x.argmax() % 3]  # a list indexed by a value


class TorchTakesSizes(nn.Module):
    """Sizes passed where torch takes an int (its argument parser calls __index__): the trace records them. And sizes
    written into messages (a torch.Size's repr calls __index__ on each): text, not a number the forward computes with."""

    def forward(self, x):
        torch._assert(x.dim() == 3, f"expected 3 dimensions, got {x.shape}")  # a torch.Size in a message, as ViT's
        batch, time, width = x.shape
        template = "shape %s"   # not a literal: `%` formatting at run time, as logging's `msg % args`
        assert template % (x.shape,) + "{}".format(x.shape) + repr(x.shape)  # more sizes written into text

        def split(t):
            return t.view(batch, time, 2, width // 2)  # a closure's sizes, as tiny_transformer.py's split

        y = split(x).reshape(batch, time, width)
        y = y[:, : time - 1, : y.shape[2] - 1]
        return y.select(1, y.shape[1] - 1).expand(y.shape[1], batch, -1)


class Gated(nn.Module):
    def __init__(self, flag, verbose):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.flag = flag
        self.verbose = verbose

    def forward(self, x):
        y = self.lin(x)
        if self.flag:
            y = y * 2  # the statement flag turns on
        return y


class GatedPair(nn.Module):
    """flag decides; verbose is only correlated with it (equal to it here), and is listed first in vars()."""

    def __init__(self, settings):
        super().__init__()
        self.a = Gated(*settings[0])
        self.b = Gated(*settings[1])
        for gated in (self.a, self.b):   # verbose first in vars(): the attribute the old rule took first
            flag = gated.__dict__.pop("flag")
            gated.__dict__["flag"] = flag
        self.a.__dict__ = {k: self.a.__dict__[k] for k in sorted(self.a.__dict__, key=lambda k: k != "verbose")}
        self.b.__dict__ = {k: self.b.__dict__[k] for k in sorted(self.b.__dict__, key=lambda k: k != "verbose")}

    def forward(self, x):
        return self.b(self.a(x))


class KeywordCaller(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Plus()

    def forward(self, x):
        return self.inner(x, other=x)


class Plus(nn.Module):
    def forward(self, x, other):
        return x + other


class Pair(nn.Module):
    def forward(self, x):
        return x, x * 2


class UsesPair(nn.Module):
    def __init__(self):
        super().__init__()
        self.pair = Pair()

    def forward(self, x):
        a, b = self.pair(x)
        return a + b


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.scale = 0.5

    def forward(self, x, y):
        return self.proj(x) * self.scale + y, x  # several outputs: the port returns the first


class Layer(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.fc = nn.Linear(4, n)
        self.back = nn.Linear(n, 4)
        self.eps = 1e-3

    def forward(self, x):
        return x + self.back(torch.relu(self.fc(x))) * self.eps


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Layer(8), Layer(8), Layer(16)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


# Settings named after the Python source (NamingTests)

def repeat_kv(hidden_states, n_rep):
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class GroupedQuery(nn.Module):
    """Llama's attention in small: repeat_kv's n_rep (a function argument) in an expand and in the reshape's size
    arithmetic, rotate_half's `// 2`, `/ math.sqrt(self.head_dim)`, and a local named head_dim beside the attribute."""

    def __init__(self):
        super().__init__()
        self.head_dim = 4
        self.num_key_value_groups = 2
        self.q = nn.Linear(16, 16)
        self.k = nn.Linear(16, 8)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = repeat_kv(rotate_half(k), self.num_key_value_groups)
        head_dim = q.shape[-1]
        w = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)
        return (w.softmax(-1) @ q).transpose(1, 2).reshape(b, t, head_dim * 4)


class TwoRepeats(nn.Module):
    """repeat_kv called with two different n_rep: two settings, never one name for two values."""

    def forward(self, x):
        return torch.cat((repeat_kv(x, 2), repeat_kv(x, 3)), 1)


class PastOffset(nn.Module):
    """A number the code holds in a plain name, used in two operations of one line (GPT-2's past_length)."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(16, 4)

    def forward(self, x):
        past_length = 0
        position_ids = torch.arange(past_length, x.shape[-1] + past_length, dtype=torch.long)
        return self.table(position_ids) + x[..., None]


class CheckedHeads(nn.Module):
    """transformers' `if attn_output.size() != (bsz, self.num_heads, q_len, self.head_dim)` in small."""

    def __init__(self):
        super().__init__()
        self.num_heads = 2
        self.head_dim = 4
        self.q = nn.Linear(8, 8)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        if q.size() != (b, self.num_heads, t, self.head_dim):
            raise ValueError("not reached")
        return q.transpose(1, 2).reshape(b, t, -1)

class MaskValues(nn.Module):
    """Llama's `torch.full(..., fill_value=min_dtype)` and GPT-2's `mask_value` (a name given to a number, then to the
    tensor made of it, which the next line reads)."""

    def forward(self, x):
        t = x.shape[-1]
        min_dtype = torch.finfo(x.dtype).min
        causal = torch.full((t, t), fill_value=min_dtype, dtype=x.dtype).triu(1)
        mask_value = torch.finfo(x.dtype).min
        mask_value = torch.full([], mask_value, dtype=x.dtype)
        return torch.where(x > 0, x, mask_value) + causal

class Gains(nn.Module):
    """Two different numbers that happen to be equal, each multiplied into the tensor `x` (names of the tensor)."""

    def __init__(self):
        super().__init__()
        self.gains, self.biases = [0.5, 2.0], [0.5, 1.0]

    def forward(self, x):
        x = x * self.gains[-2]
        return x + self.biases[-2]


class GainsOfInput(Gains):
    """The same with the tensor named `input`, which the port calls t (the traced operand's C# name says nothing)."""

    def forward(self, input):
        input = input * self.gains[-2]
        return input + self.biases[-2]


class Rows(nn.Module):
    """Two size products on one line: m (a local) and self.k (an attribute) are equal but unrelated."""

    def __init__(self):
        super().__init__()
        self.k = 2

    def forward(self, x):
        m = 2
        return x.reshape(x.shape[0] * m, -1).mean(1).view(-1, 1) + x.reshape(x.shape[1] * self.k, -1).mean(1).view(1, -1)


class TwoScales(nn.Module):
    """y * beta on the line of x * self.alpha, beta equal to alpha."""

    def __init__(self):
        super().__init__()
        self.alpha, self.gamma = 0.5, 0.25

    def forward(self, x, y):
        beta = self.gamma * 2
        return x * self.alpha + y * beta


def reshape_rows(x, k):
    return x.reshape(x.shape[0], k, -1)


class ReadElsewhere(nn.Module):
    """A plain name the forward also reads where the port does not: a condition, a loop, a helper's argument."""

    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, x):
        n = 2
        if self.how == "condition":
            if n > 1:
                x = x * 3.0
            return x.expand(n, *x.shape)
        if self.how == "loop":
            for _ in range(n):
                x = x + 1.0
            return x.reshape(x.shape[0], n, -1)
        if self.how == "helper":
            return x.view(x.shape[0], n, -1) + reshape_rows(x, n)
        raise ValueError(self.how)


class ReadOnce(nn.Module):
    """n read only where the port reads the setting (the same line's view and product): a setting named n."""

    def forward(self, x):
        n = 2
        return x.view(x.shape[0], n, -1) * n


class TanhGelu(nn.Module):
    """transformers' NewGELUActivation in small: `math.sqrt(2.0 / math.pi)` is made of literals only."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))

class NamingTests(unittest.TestCase):
    """A setting is named after the Python expression its value came from, one setting per (name, value) read
    everywhere the value was used, and a number the Python line writes stays a literal (docs/porting.md)."""

    def forward_of(self, code, class_name):
        start = code.index(f"public sealed class {class_name} ")
        body = code[start:]
        return body[body.index("public override"):body.index("\n    }\n")]

    def test_repeat_kvs_n_rep_is_one_setting_in_the_expand_and_in_the_reshapes_size_arithmetic(self):
        torch.manual_seed(0)
        code = generate(GroupedQuery().eval(), (torch.randn(2, 3, 16),), "GroupedQuery")
        # The constructor a user reads: the names of the source, no mechanical suffix for the local named head_dim.
        self.assertIn("public GroupedQuery(long head_dim, long n_rep, double sqrt_head_dim) : base(\"GroupedQuery\")", code)
        self.assertIn("public GroupedQuery() : this(head_dim: 4, n_rep: 2, sqrt_head_dim: 2.0)", code)
        forward = self.forward_of(code, "GroupedQuery")
        self.assertRegex(forward, r"\.expand\(new long\[\] \{ batch, num_key_value_heads, n_rep, slen, head_dim \}\);  // ")
        # The reshape's num_key_value_heads * n_rep reads the same setting: no literal 2 left for a changed n_rep to miss.
        self.assertRegex(forward, r"long (\w+) = num_key_value_heads \* n_rep;  // .*reshape\(batch, num_key_value_heads \* n_rep")
        self.assertNotIn("num_key_value_heads * 2", forward)
        self.assertEqual(code.count("private readonly long n_rep;"), 1)
        # The attribute head_dim beside the local head_dim (q.shape[-1]): the field, read as this.head_dim.
        self.assertEqual(forward.count(", -1, this.head_dim });"), 2)
        self.assertIn("long head_dim = hidden_states.size(3);", forward)
        self.assertNotRegex(code.split("public override")[0], r"\bhead_dim\d")
        # `// 2` and `head_dim * 4` are literals in the source: literals in the port, not settings.
        self.assertEqual(len(re.findall(r"long \w+ = size\d* / 2;  // .*x\.shape\[-1\] // 2", forward)), 2)
        self.assertRegex(forward, r"long \w+ = head_dim2 \* 4;")
        self.assertNotIn("floor_divide_by", code)
        self.assertNotIn("shape_", code)
        self.assertIn(".div(sqrt_head_dim);  // ", forward)

    def test_two_values_named_alike_are_two_settings(self):
        code = generate(TwoRepeats().eval(), (torch.randn(2, 2, 3, 4),), "TwoRepeats")
        self.assertIn("public TwoRepeats(long n_rep, long n_rep2)", code)
        self.assertIn("public TwoRepeats() : this(n_rep: 2, n_rep2: 3)", code)
        forward = self.forward_of(code, "TwoRepeats")
        self.assertRegex(forward, r"= num_key_value_heads \* n_rep;")
        self.assertRegex(forward, r"= num_key_value_heads2 \* n_rep2;")

    def test_a_plain_name_used_in_two_operations_is_one_setting_read_by_both(self):
        code = generate(PastOffset().eval(), (torch.randn(2, 5),), "PastOffset")
        self.assertIn("public PastOffset(long past_length)", code)
        forward = self.forward_of(code, "PastOffset")
        self.assertRegex(forward, r"long (\w+) = size \+ past_length;.*\n.*torch\.arange\(past_length, \1, dtype: ScalarType\.Int64\);")
        self.assertNotIn("arange(0,", forward)

    def test_a_size_check_against_named_numbers_reads_the_settings(self):
        code = generate(CheckedHeads().eval(), (torch.randn(2, 3, 8),), "CheckedHeads")
        self.assertIn("public CheckedHeads(long num_heads, long head_dim)", code)
        forward = self.forward_of(code, "CheckedHeads")
        self.assertIn("if (!(size2 == num_heads)) throw new InvalidOperationException(\"CheckedHeads: traced with "
                      "test_export_port.py:", forward)
        self.assertIn("if (!(size4 == head_dim)) throw", forward)
        # The message and the header say what the trace saw: the numbers.
        self.assertIn("where (size2 == 2) was True;", forward)
        self.assertIn("((size == b) was True: checked; (size2 == 2) was True: checked; (size3 == t) was True: checked; "
                      "(size4 == 4) was True: checked)", code)

    def test_a_fill_value_is_named_after_its_argument_unless_the_name_is_given_to_another_value(self):
        code = generate(MaskValues().eval(), (torch.randn(3, 3),), "MaskValues")
        # min_dtype names the full's fill value; mask_value also names the tensor the next line reads, so the port could
        # not follow a setting of that name there: the traced number, written where it is used.
        self.assertIn("public MaskValues(double min_dtype)", code)
        forward = self.forward_of(code, "MaskValues")
        self.assertRegex(forward, r"torch\.full\(new long\[\] \{ t, t \}, min_dtype, dtype: ScalarType\.Float32\);")
        self.assertRegex(forward, r"Tensor mask_value = torch\.full\(System\.Array\.Empty<long>\(\), -3\.4028234663852886e\+38, dtype: ScalarType\.Float32\);")

    def test_an_expression_of_literals_is_a_const_not_a_setting(self):
        code = generate(TanhGelu().eval(), (torch.randn(2, 3),), "TanhGelu")
        self.assertIn("public TanhGelu() : base(\"TanhGelu\")", code)
        self.assertIn(f"private const double mul_other3 = {math.sqrt(2.0 / math.pi)!r};", code)
        self.assertNotIn("private readonly double", code)

    def test_a_setting_is_never_named_after_the_traced_tensor(self):
        code = generate(Gains().eval(), (torch.randn(2, 3),), "Gains")
        # Two Python numbers (gains[-2], biases[-2]), equal: two settings, neither named x (the tensor they multiply).
        self.assertIn("public Gains(double mul_other, double add_other)", code)
        forward = self.forward_of(code, "Gains")
        self.assertRegex(forward, r"Tensor x2 = x\.mul\(mul_other\);")
        self.assertRegex(forward, r"= x2\.add\(add_other\);")
        self.assertNotIn("this.x", code)
        code = generate(GainsOfInput().eval(), (torch.randn(2, 3),), "Gains")
        self.assertIn("public Gains(double mul_other, double add_other)", code)
        self.assertNotIn("double input", code)

    def test_a_constant_takes_no_name_from_another_operation_of_its_line(self):
        code = generate(Rows().eval(), (torch.randn(4, 6),), "Rows")
        forward = self.forward_of(code, "Rows")
        # m's product and self.k's on one line, neither told from the other by the traced operand: the older rule.
        self.assertEqual(len(re.findall(r"long \w+ = size\d* \* 2;", forward)), 2)
        self.assertNotRegex(code[:code.index("public override")], r"\bk\b")
        code = generate(TwoScales().eval(), (torch.randn(3, 4), torch.randn(3, 4)), "TwoScales")
        forward = self.forward_of(code, "TwoScales")
        # y * beta: the operation whose other operand is y (the traced one), not x * self.alpha's alpha.
        self.assertIn("public TwoScales(double alpha, double beta)", code)
        self.assertRegex(forward, r"= x\.mul\(alpha\);")
        self.assertRegex(forward, r"= y\.mul\(beta\);")

    def test_a_plain_name_the_forward_reads_where_the_port_does_not_names_no_setting(self):
        # Python reads n where a setting would not reach: the traced number, a literal at every use (no setting named
        # otherwise for some uses only; the helper's parameter k is n under another name, so no setting either).
        for how, ins, uses in (("condition", (3, 4), [r"\.expand\(new long\[\] \{ 2, "]),
                               ("loop", (2, 6), [r"\.reshape\(new long\[\] \{ size, 2, -1 \}\)"]),
                               ("helper", (2, 6), [r"\.view\(new long\[\] \{ size, 2, -1 \}\)", r"\.reshape\(new long\[\] \{ \w+, 2, -1 \}\)"])):
            with self.subTest(how):
                code = generate(ReadElsewhere(how).eval(), (torch.randn(*ins),), "Port")
                declarations = code[code.index("public sealed class Port"):code.index("public override")]
                self.assertNotRegex(declarations, r"private readonly long")
                for use in uses:
                    self.assertRegex(code, use)
        code = generate(ReadOnce().eval(), (torch.randn(2, 6),), "Port")
        self.assertIn("public Port(long n)", code)
        self.assertRegex(code, r"\.view\(new long\[\] \{ size, n, -1 \}\);.*\n.*\.mul\(n\);")

    def test_a_size_derived_name_is_not_a_setting(self):
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "TorchLinear.Tests", "Ports"))
        from shape_guard import Wide   # keep = min(x.shape[1], 4): a number from a size, guarded, not configuration

        code = generate(Wide().eval(), (torch.randn(2, 6, 4),), "Wide")
        declarations = code[code.index("public sealed class Wide"):code.index("public override")]
        self.assertNotIn("keep", declarations)
        self.assertIn("Tensor t3 = t2.slice(1, 0, 4, 1);  // shape_guard.py:23: return y[:, :keep]", code)


class RefusalTests(unittest.TestCase):
    def assert_refused(self, model, inputs, *fragments):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out")
            with self.assertRaises(ExportRefused) as caught:
                export_port(model.eval(), inputs, out, "Port")
            self.assertFalse(os.path.exists(out), "nothing may be written on a refusal")
        message = str(caught.exception)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def test_an_unsupported_operation_is_refused_naming_it_its_module_path_and_source_line(self):
        self.assert_refused(WithInner(Fft()), (torch.randn(2, 4),), "aten::fft_fft", "at inner (Fft)",
                            f"{THIS}:{line_of('the unsupported operation')}: return torch.fft.fft(x).real")

    def test_svd_is_refused_naming_it(self):
        self.assert_refused(WithInner(Svd()), (torch.randn(3, 4),), "aten::linalg_svd", "at inner (Svd)",
                            f"{THIS}:{line_of('svd here')}")

    def test_a_branch_on_a_tensors_value_is_refused_with_its_line(self):
        self.assert_refused(Branchy(), (torch.randn(2, 4),), "a branch on a tensor's value", "(root) (Branchy)",
                            f"{THIS}:{line_of('the data-dependent branch')}: if x.sum() > 0:")

    def test_a_shape_baked_into_the_trace_is_refused(self):
        # len(x) is a Python int the trace freezes: the port checks it (size == 2), which differs at the second shape.
        self.assert_refused(BakedLength(), (torch.randn(2, 4),), "the trace froze a value that depends on the input",
                            "[(2, 4)] vs [(3, 5)]",
                            f"{THIS}:{line_of('len() is a Python int')}: return x[: len(x) - 1] * 2.0",
                            "((size == 2) was True: checked)", "((size == 3) was True: checked)")
        # Assumed by the caller, the second trace still finds the frozen length (a value that changes with the shape).
        with self.assertRaises(ExportRefused) as caught:
            generate(BakedLength().eval(), (torch.randn(2, 4),), "Port",
                     assume_shape_conditions=[f"{THIS}:{line_of('len() is a Python int')}"])
        message = str(caught.exception)
        self.assertIn("the trace froze a value that depends on the input", message)
        self.assertIn("slice(0, 0, 1, 1)", message)   # len(x) - 1 = 1 frozen ...
        self.assertIn("slice(0, 0, 2, 1)", message)   # ... and 2 at the second shape

    def test_a_value_baked_into_the_trace_is_refused(self):
        self.assert_refused(BakedValue(), (torch.randn(2, 4),), "float() of a tensor's value",
                            f"{THIS}:{line_of('frozen as a constant')}")


    def test_one_tensor_passed_as_two_arguments_is_refused(self):
        # The trace sees one value where Python has x and other: which of them the module uses where is lost.
        self.assert_refused(KeywordCaller(), (torch.randn(2, 4),), "called with one tensor as several arguments (other repeat",
                            "at inner (Plus)")
        # Also without a recording (export_port's recording=False): generate() itself watches the calls.
        model = KeywordCaller().eval()
        with self.assertRaises(ExportRefused):
            generate(model, (torch.randn(2, 4),), "Port")
        self.assertNotIn("forward", vars(model.inner))   # the watching wrapper is gone

    def test_more_than_six_tensor_arguments_are_refused(self):
        class Seven(nn.Module):
            def forward(self, *xs):
                return sum(xs)

        class CallsSeven(nn.Module):
            def __init__(self):
                super().__init__()
                self.seven = Seven()

            def forward(self, x):
                return self.seven(*[x + i for i in range(7)])

        self.assert_refused(CallsSeven(), (torch.randn(2, 4),), "called with 7 tensors (0, 1, 2, 3, 4, 5, 6) at seven (Seven)",
                            "at most 6")

    def test_a_model_in_training_mode_is_refused(self):
        with self.assertRaises(ExportRefused) as caught:
            generate(Stack().train(), (torch.randn(2, 4),), "Port")
        self.assertIn("training mode", str(caught.exception))

    def test_a_submodule_never_called_as_a_module_is_refused_naming_it(self):
        # Qwen2's rotary_emb held by each attention, torchvision ViT's out_proj read through its weights.
        with self.assertRaises(ExportRefused) as caught:
            generate(HoldsUncalled().eval(), (torch.randn(2, 3),), "Port")
        self.assertIn("submodule spare (Plain) is never called as a module in the traced forward", str(caught.exception))

    def test_every_problem_is_listed_not_only_the_first(self):
        class Both(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = Fft(), Svd()

            def forward(self, x):
                return self.a(x) + self.b(x)

        self.assert_refused(Both(), (torch.randn(4, 4),), "aten::fft_fft", "aten::linalg_svd", "at a (Fft)", "at b (Svd)")


class ShapeConditionTests(unittest.TestCase):
    """A branch on sizes only is evaluated once by the trace; the port has the side taken only, so it checks the
    condition where Python evaluated it and throws on an input that gives the other side (the .NET side runs such a
    guard: Ports/ShapeGuard). What it cannot check is refused unless the caller assumes it."""

    def test_a_size_branch_taken_is_a_guard_that_throws_on_the_other_side(self):
        code = generate(SizeBranch().eval(), (torch.randn(2, 5, 3),), "Port")
        where = f"{THIS}:{line_of('the size branch')}: if x.shape[1] > 4:"
        self.assertRegex(code, r"long (\w+) = x\.size\(1\);.*\n.*if \(!\(\1 > 4\)\) throw new InvalidOperationException\(")
        self.assertIn(f'"SizeBranch: traced with {where}  # the size branch where (size > 4) was True; this input makes it False, '
                      f'which the port does not compute (the other branch, another number): re-export at that shape");', code)
        # The header says what was compared and how it came out.
        self.assertIn(f"//   {where}  # the size branch  ((size > 4) was True: checked)", code)
        self.assertIn("t.mul(2)", code)
        self.assertNotIn("add(1)", code)

    def test_a_size_branch_not_taken_throws_where_the_condition_holds(self):
        code = generate(SizeBranch().eval(), (torch.randn(2, 3, 3),), "Port")
        self.assertRegex(code, r"if \(\(\w+ > 4\)\) throw new InvalidOperationException\(")
        self.assertIn("was False; this input makes it True", code)
        self.assertIn("((size > 4) was False: checked)", code)

    def test_a_min_of_a_size_baked_as_a_number_is_guarded(self):
        code = generate(SizeMin().eval(), (torch.randn(2, 6, 3),), "Port")
        self.assertIn("slice(1, 0, 4, 1)", code)   # min(6, 4) = 4, a number in the port ...
        self.assertRegex(code, r"if \(!\(\w+ > 4\)\) throw new InvalidOperationException\(")   # ... checked
        self.assertIn(f"{THIS}:{line_of('the min of a size')}", code)

    def test_a_size_condition_the_port_cannot_write_is_refused_unless_assumed(self):
        line = line_of("a size condition the port cannot write")
        with self.assertRaises(ExportRefused) as caught:
            generate(SizeScaled().eval(), (torch.randn(2, 6, 3),), "Port")
        self.assertIn(f"a branch on sizes that the port cannot check", str(caught.exception))
        self.assertIn(f"(root) (SizeScaled), {THIS}:{line}: if x.shape[1] * 0.5 > 2:", str(caught.exception))
        self.assertIn(f"list {THIS}:{line} in assume_shape_conditions", str(caught.exception))
        code = generate(SizeScaled().eval(), (torch.randn(2, 6, 3),), "Port", assume_shape_conditions=[f"{THIS}:{line}"])
        self.assertIn(f"{THIS}:{line}: if x.shape[1] * 0.5 > 2:  # a size condition the port cannot write  "
                      f"(assumed by the caller (assume_shape_conditions), not checked)", code)
        self.assertNotIn("0.5) throw", code)

    def test_a_size_condition_on_a_vector_is_refused_unless_assumed(self):
        line = line_of("a one-element vector of a size")
        with self.assertRaises(ExportRefused) as caught:
            generate(SizeVector().eval(), (torch.randn(2, 6, 3),), "Port")
        self.assertIn(f"a branch on sizes that the port cannot check (not a single number) at", str(caught.exception))
        self.assertIn(f"{THIS}:{line}: if torch.tensor([x.shape[1]]) > 4:", str(caught.exception))
        generate(SizeVector().eval(), (torch.randn(2, 6, 3),), "Port", assume_shape_conditions=[f"{THIS}:{line}"])

    def test_len_and_int_of_sizes_are_checked_so_refused_where_they_change_with_the_shape_unless_assumed(self):
        for model, what, mark, size in ((LenBranch(), "len()", "len of the input", 2), (IntBranch(), "int()", "int of a size", 6)):
            with self.subTest(what):
                # The port would check `size == number`: a number that changes with the input's shape, so refused.
                with self.assertRaises(ExportRefused) as caught:
                    generate(model.eval(), (torch.randn(2, 6, 3),), "Port")
                self.assertIn("the trace froze a value that depends on the input", str(caught.exception))
                self.assertIn(f"{THIS}:{line_of(mark)}", str(caught.exception))
                self.assertIn(f"((size == {size}) was True: checked)", str(caught.exception))
                # The caller's word: not checked, listed.
                code = generate(model.eval(), (torch.randn(2, 6, 3),), "Port", assume_shape_conditions=[f"{THIS}:{line_of(mark)}"])
                self.assertIn("// The caller's assumptions (assume_shape_conditions): Python numbers taken from sizes, frozen by the trace:", code)
                self.assertIn(f"{THIS}:{line_of(mark)}", code)
                self.assertIn(f"({what}, assumed the same at every input)", code)

    def test_a_python_number_of_a_size_that_the_shape_does_not_change_is_checked(self):
        code = generate(HeadScale().eval(), (torch.randn(2, 6, 3),), "Port")
        self.assertRegex(code, r"if \(!\(\w+ == 3\.0\)\) throw new InvalidOperationException\(\"HeadScale: traced with "
                               + re.escape(f"{THIS}:{line_of('float of the last size')}"))

    def test_python_numbers_of_tensor_values_are_refused_naming_the_line(self):
        for model, what, mark in ((FloatData(), "float()", "float of a value"), (ItemData(), ".item()", "item of a value"),
                                  (TolistData(), ".tolist()", "tolist of a value")):
            with self.subTest(what):
                with self.assertRaises(ExportRefused) as caught:
                    generate(model.eval(), (torch.randn(2, 6, 3),), "Port")
                self.assertIn(f"{what} of a tensor's value", str(caught.exception))
                self.assertIn(f"{THIS}:{line_of(mark)}", str(caught.exception))
                # Not assumable: a value is no size.
                with self.assertRaises(ExportRefused):
                    generate(model.eval(), (torch.randn(2, 6, 3),), "Port", assume_shape_conditions=[f"{THIS}:{line_of(mark)}"])

    def test_the_port_checks_each_inputs_rank(self):
        # x.dim() is a Python int the trace never sees: the port checks the rank of every input instead.
        code = generate(RankBranch().eval(), (torch.randn(2, 6, 3),), "Port")
        self.assertIn('if (x.dim() != 3) throw new InvalidOperationException($"RankBranch: input x has {x.dim()} dimensions; '
                      'the port was traced with 3 and computes only that rank: re-export at it");', code)


class IndexTests(unittest.TestCase):
    """Tensor.__index__ converts a traced size to a Python int without the tracer's warning: range(t), a list's index or
    slice, [0] * t, operator.index(t) freeze it; torch's own argument parser calls it too, and records the size (no
    conversion). A frozen one from sizes is checked as int() of it is (a guard), one from values is refused."""

    def test_a_loop_over_a_size_the_second_trace_cannot_change_is_checked_where_range_took_it(self):
        line = line_of("a loop over a size")
        code = generate(FixedMiddle("range").eval(), (torch.randn(2, 3, 4),), "Port")
        self.assertEqual(code.count(".add("), 2)   # the loop, unrolled for x.shape[1] == 3 ...
        self.assertRegex(code, r'if \(!\(\w+ == 3\)\) throw new InvalidOperationException\("FixedMiddle: traced with '
                         + re.escape(f"{THIS}:{line}: for i in range(1, x.shape[1]):  # a loop over a size where (size == 3) was True"))
        self.assertIn(f"//   {THIS}:{line}: for i in range(1, x.shape[1]):  # a loop over a size  ((size == 3) was True: checked)", code)

    def test_each_python_conversion_of_a_size_is_checked_naming_its_line(self):
        for how, mark in (("index", "a list indexed by a size"), ("slice", "a list sliced by a size"),
                          ("repeat", "a list repeated a size's times"), ("operator.index", "operator.index of a size"),
                          ("after a view", "a list indexed by a size a view took before"),
                          # settled when its frame moves on to the next instruction (no C call returns in between)
                          ("a view after", "a list indexed by a size a view takes after"),
                          # a str method that returns a number, not text (_into_text)
                          ("str.count", "a str method returning a number")):
            with self.subTest(how):
                code = generate(FixedMiddle(how).eval(), (torch.randn(2, 3, 4),), "Port")
                self.assertRegex(code, r"if \(!\(\w+ == 3\)\) throw new InvalidOperationException\(\"FixedMiddle: traced with "
                                 + re.escape(f"{THIS}:{line_of(mark)}:"))

    def test_a_size_frozen_where_the_second_trace_gives_the_same_code_is_refused_unless_assumed(self):
        line = line_of("a table indexed by a size")
        with self.assertRaises(ExportRefused) as caught:
            generate(SizeTable().eval(), (torch.randn(2, 5, 3),), "Port")
        message = str(caught.exception)
        self.assertIn("the trace froze a value that depends on the input (shape [(2, 5, 3)] vs [(3, 6, 4)]", message)
        self.assertIn(f"{THIS}:{line}: return x * [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0][x.shape[1]]  # a table indexed "
                      f"by a size  ((size == 5) was True: checked)", message)
        code = generate(SizeTable().eval(), (torch.randn(2, 5, 3),), "Port", assume_shape_conditions=[f"{THIS}:{line}"])
        self.assertIn(f"{THIS}:{line}: return x * [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0][x.shape[1]]  # a table indexed "
                      f"by a size  (a Python sequence's index or slice (__index__), assumed the same at every input)", code)

    def test_a_python_index_of_a_tensor_value_is_refused_naming_the_line(self):
        line = line_of("a list indexed by a value")
        for assume in ((), (f"{THIS}:{line}",)):
            with self.subTest(assume=assume), self.assertRaises(ExportRefused) as caught:
                generate(ValueIndex().eval(), (torch.randn(2, 6, 3),), "Port", assume_shape_conditions=assume)
            self.assertIn(f"a Python sequence's index or slice (__index__) of a tensor's value (a Python number the trace "
                          f"freezes: data-dependent) at (root) (ValueIndex), {THIS}:{line}: return x * [0.5, 1.0, 2.0]"
                          f"[x.argmax() % 3]", str(caught.exception))

    def test_export_under_cprofile_is_refused_and_under_a_python_profile_function_keeps_it(self):
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            with self.assertRaises(ExportRefused) as caught:
                generate(Plain().eval(), (torch.randn(2, 3),), "Port")
            active = sys.getprofile()
        finally:
            profiler.disable()
        self.assertIs(active, profiler)
        self.assertIn("a profile function is active (sys.getprofile() is a cProfile.Profile", str(caught.exception))
        self.assertIn("export outside the profiler", str(caught.exception))
        # A Python profile function keeps seeing the events during the export, and is set again after it.
        seen = []

        def hook(frame, event, arg):
            if torch._C._get_tracing_state() is not None:   # an event during the trace, where the watch's is set
                seen.append(event)

        sys.setprofile(hook)
        try:
            code = generate(FixedMiddle("index").eval(), (torch.randn(2, 3, 4),), "Port")
            after = sys.getprofile()
        finally:
            sys.setprofile(None)
        self.assertIs(after, hook)
        self.assertGreater(seen.count("c_call"), 100)
        self.assertRegex(code, r"if \(!\(\w+ == 3\)\) throw")   # and the watch of __index__ still works under it

    def test_sizes_torch_takes_as_ints_are_traced_not_checked(self):
        code = generate(TorchTakesSizes().eval(), (torch.randn(2, 6, 4),), "Port")
        self.assertNotIn("was True: checked", code)
        self.assertNotIn("Conditions on sizes", code)
        # The sizes keep their Python names (the watch holds the tensor in no local the tracer would name it after).
        self.assertIn("long batch = x.size(0);", code)
        self.assertIn("x.view(new long[] { batch, time, ", code)
        # No size of the (2, 6, 4) input written as a number (time - 1 = 5, then 4 after the slice).
        self.assertNotRegex(code, r"slice\(1, 0, 5, 1\)|select\(1, 4\)|expand\(new long\[\] \{ 5,")


class TransformersTests(unittest.TestCase):
    """transformers' models from their real source (through /work/shared/realpeft: source its env.sh first; skipped
    without it). The ports make_ports.py writes are compiled and replayed by GeneratedTransformerPortTests."""

    def setUp(self):
        try:
            import transformers  # noqa: F401
        except ImportError:
            self.skipTest("transformers is not importable: source /work/realpeft-site/env.sh")
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "TorchLinear.Tests",
                                        "ReferenceData", "Parity", "RealModels"))

    def test_tiny_llama_is_written_with_keyword_inputs_tuple_outputs_and_its_shape_conditions_listed(self):
        import make_real_models

        model, ids = make_real_models.tiny_llama()
        code = generate(model, (ids,), "TinyLlama")
        # One decoder-layer class for both layers; attention and layers take every tensor transformers passes them,
        # keyword arguments under their names, in the recorder's order.
        self.assertEqual(code.count("public sealed class LlamaDecoderLayer"), 1)
        self.assertIn("new TorchSharp.Modules.ModuleList<LlamaDecoderLayer>(new LlamaDecoderLayer(), new LlamaDecoderLayer())", code)
        self.assertIn("public override Tensor forward(Tensor hidden_states, Tensor attention_mask, Tensor position_ids, "
                      "Tensor cache_position, Tensor position_embeddings_0, Tensor position_embeddings_1)", code)
        # The rotary embedding returns its (cos, sin) tuple, deconstructed by its caller and passed to each layer.
        self.assertIn("public sealed class LlamaRotaryEmbedding : nn.Module<Tensor, Tensor, (Tensor, Tensor)>", code)
        self.assertRegex(code, r"var \((\w+), (\w+)\) = rotary_emb\.call\(\w+, position_ids\);")
        # RMSNorm's `hidden_states.to(torch.float32)` hands its input back to the caller's residual: the residual is the
        # layer's own input, not a second output of the norm.
        self.assertRegex(code, r"Tensor hidden_states = x\.add\(t2\);  // modeling_llama.py:\d+: hidden_states = residual \+ hidden_states")
        # The size checks and the causal mask's `if sequence_length != 1` depend on shapes only: checked by the port
        # where Python evaluated them (it throws on a one-token input), and listed with the comparison.
        self.assertIn("modeling_llama.py:1003: if sequence_length != 1:  ((sequence_length != 1) was True: checked)", code)
        self.assertIn('if (!(sequence_length != 1)) throw new InvalidOperationException("LlamaModel: traced with '
                      'modeling_llama.py:1003: if sequence_length != 1: where (sequence_length != 1) was True;', code)
        self.assertIn("modeling_llama.py:306: if attn_output.size() != (bsz, self.num_heads, q_len, self.head_dim):", code)
        self.assertRegex(code, r"if \(!\(\w+ == q_len\)\) throw new InvalidOperationException\(\"LlamaAttention: traced with "
                               r"modeling_llama\.py:306: ")
        # Nothing of the batch or sequence length is written as a number.
        self.assertIn("long batch_size = t.size(0);", code)
        self.assertIn("long sequence_length = t.size(1);", code)

    def test_gpt2_conv1d_keeps_its_layout_the_causal_mask_is_a_triangle_and_the_head_is_tied(self):
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        config = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, attn_implementation="eager",
                            use_cache=False, return_dict=False)
        code = generate(GPT2LMHeadModel(config).eval(), (torch.randint(0, 50, (2, 5)),), "Gpt2")
        # Conv1D constructed as TorchLinear's Conv1D(nf, nx) (its (in, out) weight, addmm, and LoRA's slot), not translated.
        self.assertRegex(code, r"private readonly Conv1D c_attn;")
        self.assertRegex(code, r"c_attn = new Conv1D\((nf: )?48, (nx: )?16\);")
        self.assertNotIn("class Conv1D", code)
        self.assertNotIn("pytorch_utils.py", code)
        # The non-persistent causal mask (16 x 16 booleans) as the lower triangle it is.
        self.assertIn("bias = torch.ones(16, 16, dtype: ScalarType.Bool).tril().expand(new long[] { 1, 1, 16, 16 }).contiguous();", code)
        self.assertIn('register_buffer("bias", bias, persistent: false);', code)
        # The LM head shares the token embedding's weight, as in transformers.
        self.assertIn('((CustomLinear)Submodule("lm_head")).weight = ((TorchSharp.Modules.Embedding)Submodule("transformer.wte")).weight!;', code)

    def test_only_transformers_own_conv1d_is_the_library_layer_a_subclass_is_translated(self):
        from transformers.pytorch_utils import Conv1D

        class ScaledConv1D(Conv1D):
            def forward(self, x):
                return super().forward(x) * 2

        class TwoConv(nn.Module):
            def __init__(self):
                super().__init__()
                self.a = Conv1D(6, 4)
                self.b = ScaledConv1D(4, 6)

            def forward(self, x):
                return self.b(self.a(x))

        torch.manual_seed(0)
        code = generate(TwoConv().eval(), (torch.randn(2, 3, 4),), "TwoConv")
        self.assertRegex(code, r"a = new Conv1D\((nf: )?6, (nx: )?4\);")
        # The subclass overrides forward: written from its own graph, as any module.
        self.assertIn("class ScaledConv1D", code)
        self.assertNotRegex(code, r"b = new Conv1D\(")

    def test_a_conv1d_weight_tied_to_another_is_set_by_a_tie_line(self):
        from transformers.pytorch_utils import Conv1D

        class TiedConv(nn.Module):
            def __init__(self):
                super().__init__()
                self.a = Conv1D(4, 4)
                self.b = Conv1D(4, 4)
                self.b.weight = self.a.weight

            def forward(self, x):
                return self.b(self.a(x))

        torch.manual_seed(0)
        code = generate(TiedConv().eval(), (torch.randn(2, 3, 4),), "TiedConv")
        self.assertIn('((Conv1D)Submodule("b")).weight = ((Conv1D)Submodule("a")).weight;  // tied: b.weight is a.weight', code)

    def test_bert_buffers_ties_and_a_keyword_named_module(self):
        from transformers import BertConfig, BertForMaskedLM

        torch.manual_seed(0)
        config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                            max_position_embeddings=16, attn_implementation="eager", return_dict=False)
        code = generate(BertForMaskedLM(config).eval(), (torch.randint(0, 50, (2, 5)),), "Bert")
        # int64 non-persistent buffers as literals; the one BertModel reads from its embeddings is internal there.
        self.assertIn("position_ids = torch.tensor(new long[] { 0L, 1L, 2L,", code)
        self.assertIn("internal readonly Tensor token_type_ids;", code)
        # Both ties, the second to the prediction head's own parameter under a handle of its own.
        self.assertIn('((CustomLinear)Submodule("cls.predictions.decoder")).weight = '
                      '((TorchSharp.Modules.Embedding)Submodule("bert.embeddings.word_embeddings")).weight!;', code)
        self.assertIn('((CustomLinear)Submodule("cls.predictions.decoder")).bias = '
                      'new TorchSharp.Modules.Parameter(Parameter("cls.predictions.bias").contiguous());', code)
        # `value` is a C# contextual keyword: the field is value_, registered as "value", and nothing registers it again.
        self.assertIn('register_module("value", value_);', code)
        self.assertIn("protected override void RegisterComponents() { }", code)
        # 1.0 - mask, which TorchSharp has no rsub for, as the same IEEE operation.
        self.assertRegex(code, r"Tensor \w+ = \w+\.neg\(\)\.add\(rsub_other\);  // modeling_utils.py:\d+: extended_attention_mask = \(1.0 - ")

    def test_a_branch_on_values_is_still_refused_when_shape_branches_are_not(self):
        class Mixed(nn.Module):
            def forward(self, x):
                if x.shape[0] != 1 and x.size(1) > 0:   # shapes only
                    x = x * 2.0
                if x.max() > 100:   # values: refused
                    x = x - 1.0
                return x

        with self.assertRaises(ExportRefused) as caught:
            generate(Mixed().eval(), (torch.randn(2, 4),), "Port")
        message = str(caught.exception)
        self.assertIn(f"{THIS}:{line_of('if x.max() > 100:')}", message)
        self.assertNotIn("shapes only", message)


class WrittenTests(unittest.TestCase):
    def test_writes_the_three_files_with_the_fixed_interface(self):
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            paths = export_port(Stack().eval(), (torch.randn(2, 3, 4),), tmp, "StackPort")
            self.assertEqual(sorted(os.listdir(tmp)), ["StackPort.cs", "StackPort.parity.pt", "StackPort.safetensors"])
            self.assertEqual(paths["cs"], os.path.join(tmp, "StackPort.cs"))
            with open(paths["cs"], encoding="utf-8") as f:
                code = f.read()
            with open(paths["safetensors"], "rb") as f:
                header_length = int.from_bytes(f.read(8), "little")
                header = f.read(header_length).decode("utf-8")
        self.assertIn("public sealed class StackPort : nn.Module<Tensor, Tensor>", code)
        self.assertIn("public StackPort() : base(\"Stack\")", code)
        # The three Layers: two with 8, one with 16 hidden: one class, the width a constructor parameter.
        self.assertEqual(code.count("public sealed class Layer"), 1)
        self.assertIn("public Layer(long out_features, double eps)", code)
        self.assertIn("new Layer(out_features: 8, eps: 0.001),", code)
        self.assertIn("new Layer(out_features: 16, eps: 0.001));", code)
        # eps is a setting: a constructor parameter kept in a readonly field named as the module's attribute; the source
        # line a comment, Linear a CustomLinear.
        self.assertIn("private readonly double eps;", code)
        self.assertIn("this.eps = eps;", code)
        self.assertIn(f"// {THIS}:{line_of('* self.eps')}: return x + self.back(torch.relu(self.fc(x))) * self.eps", code)
        self.assertIn("new CustomLinear(4, out_features, bias: true) { Dispatch = LinearDispatch.PyTorch }", code)
        self.assertIn('register_module("layers", layers);', code)
        for key in Stack().state_dict():
            self.assertIn(f'"{key}"', header)

    def test_two_inputs_and_several_outputs_give_a_two_input_module_returning_the_first(self):
        code = generate(TwoInputs().eval(), (torch.randn(2, 4), torch.randn(2, 4)), "Two")
        self.assertIn("public sealed class Two : nn.Module<Tensor, Tensor, Tensor>", code)
        self.assertIn("public override Tensor forward(Tensor x, Tensor y)", code)
        # The root's setting: a field set by its constructor, and the parameterless constructor builds the exported model.
        self.assertIn("private readonly double scale;", code)
        self.assertIn("public Two() : this(scale: 0.5)", code)
        self.assertIn("public Two(double scale) : base(\"TwoInputs\")", code)
        body = code[code.index("public override Tensor forward"):]
        returned = re.search(r"return (\w+)\.MoveToOuterDisposeScope", body).group(1)
        self.assertRegex(body, rf"Tensor {returned} = \w+\.add\(y\);")   # the first output: proj(x) * scale + y

    def test_keyword_arguments_become_parameters_in_the_recorders_order(self):
        class KeywordPlus(nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = Plus()

            def forward(self, x):
                return self.inner(other=x * 3.0, x=x)   # keyword order: other first, as the recorder flattens it

        code = generate(KeywordPlus().eval(), (torch.randn(2, 4),), "Port")
        self.assertIn("public sealed class Plus : nn.Module<Tensor, Tensor, Tensor>", code)
        self.assertIn("public override Tensor forward(Tensor other, Tensor x)", code)
        self.assertRegex(code, r"Tensor \w+ = x\.add\(other\);")
        self.assertRegex(code, r"Tensor (\w+) = x\.mul\(mul_other\);[^\n]*\n\s*Tensor \w+ = inner\.call\(\1, x\);")

    def test_a_submodule_returning_a_tuple_returns_a_value_tuple_and_an_argument_as_is(self):
        code = generate(UsesPair().eval(), (torch.randn(2, 4),), "Port")
        self.assertIn("public sealed class Pair : nn.Module<Tensor, (Tensor, Tensor)>", code)
        self.assertIn("public override (Tensor, Tensor) forward(Tensor x)", code)
        self.assertRegex(code, r"return \(x, \w+\.MoveToOuterDisposeScope\(\)\);")
        self.assertIn("var (pair_0, pair_1) = pair.call(x);", code)
        self.assertRegex(code, r"Tensor \w+ = x\.add\(pair_1\);")

    def test_the_same_model_gives_the_same_code(self):
        torch.manual_seed(0)
        a = generate(Stack().eval(), (torch.randn(2, 3, 4),), "StackPort")
        b = generate(Stack().eval(), (torch.randn(5, 1, 4),), "StackPort")
        self.assertEqual(a, b)


class CustomLinear(nn.Module):
    """A user's class that happens to share a name with the library layer the port constructs for nn.Linear."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        return self.inner(x) * 2.0


class Conv1D(nn.Module):
    """A user's class named as transformers' Conv1D (not transformers' type: translated, not constructed)."""

    def forward(self, x):
        return x + 1.0


class NamesLikeTheLibrarys(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = CustomLinear()
        self.b = Conv1D()

    def forward(self, x):
        return self.b(self.a(x))


class LibraryNameTests(unittest.TestCase):
    """A generated class never takes the name of a library type the port uses unqualified (CustomLinear, Conv1D):
    in the port's namespace it would hide that type."""

    def test_pytorch_classes_named_as_the_library_types_get_other_names(self):
        code = generate(NamesLikeTheLibrarys().eval(), (torch.randn(2, 4),), "NamesLikeTheLibrarys")
        self.assertIn("public sealed class CustomLinear_2 : nn.Module<Tensor, Tensor>", code)
        self.assertIn("public sealed class Conv1D_2 : nn.Module<Tensor, Tensor>", code)
        self.assertNotRegex(code, r"class (CustomLinear|Conv1D) ")
        self.assertIn("inner = new CustomLinear(4, 4, bias: true)", code)


class OneClassPerPyTorchClassTests(unittest.TestCase):
    """Instances of one PyTorch class are one C# class: what differs is a constructor parameter, a submodule some lack
    is passed in (null where absent), a statement only some run is written under the condition that tells them apart;
    where nothing tells them apart, a second class says why."""

    @classmethod
    def setUpClass(cls):
        model, x, _ = make_ports().merged_classes()   # compiled and replayed by the .NET tests (Ports/MergedClasses)
        cls.code = generate(model, (x,), "MergedClasses")

    def test_a_submodule_some_instances_lack_is_a_nullable_parameter_and_its_call_a_condition(self):
        self.assertEqual(self.code.count("public sealed class MaybeNorm"), 1)
        self.assertIn("public MaybeNorm(long out_features, TorchSharp.Modules.LayerNorm? norm = null)", self.code)
        self.assertRegex(self.code, r"Tensor \w+ = norm is not null \? norm\.call\((\w+)\) : \1;")
        self.assertIn("a = new MaybeNorm(out_features: 8, norm: nn.LayerNorm(4, eps: 1e-05, elementwise_affine: true));", self.code)
        self.assertIn("b = new MaybeNorm(out_features: 16);", self.code)
        self.assertIn("if (norm is not null)", self.code)

    def test_a_statement_only_some_instances_run_is_conditioned_on_the_bool_attribute_that_tells_them_apart(self):
        self.assertEqual(self.code.count("public sealed class MaybeResidual"), 1)
        self.assertIn("public MaybeResidual(bool residual)", self.code)
        self.assertIn("private readonly bool residual;", self.code)
        self.assertRegex(self.code, r"Tensor \w+ = residual \? x\.add\((\w+)\) : \1;")
        self.assertIn("c = new MaybeResidual(residual: true);", self.code)
        self.assertIn("d = new MaybeResidual(residual: false);", self.code)

    def test_instances_that_nothing_tells_apart_are_two_classes_and_the_second_says_why(self):
        self.assertIn("public sealed class Activation : ", self.code)
        self.assertIn("public sealed class Activation_2 : ", self.code)
        self.assertIn("// A class of its own: these instances of Activation are not written as Activation because some of "
                      "their forwards have a statement", self.code)
        self.assertIn("neither a submodule nor a bool attribute tells which.", self.code)
        self.assertIn("public sealed class Unary_2 : ", self.code)
        self.assertIn("// A class of its own: these instances of Unary are not written as Unary because their forwards differ "
                      "in more than statements some of them leave out.", self.code)

    def test_a_bool_attribute_only_correlated_with_the_split_is_not_the_condition(self):
        # flag and verbose both split the instances as the statement does: flag, read by the `if` around it, decides.
        code = generate(GatedPair([(True, True), (False, False)]).eval(), (torch.randn(2, 3),), "Port")
        self.assertEqual(code.count("public sealed class Gated"), 1)
        self.assertRegex(code, r"Tensor \w+ = flag \? \w+\.mul\(2\) : \w+;")
        self.assertNotIn("verbose", code)

    def test_a_float_literal_of_the_python_line_is_a_constant_and_other_values_are_settings(self):
        self.assertIn("private const double mul_other = 2.0;", self.code)   # return y * 2.0
        self.assertNotIn("mul_other: 2.0", self.code)


def make_ports():
    ports = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "TorchLinear.Tests", "Ports")
    if ports not in sys.path:
        sys.path.insert(0, ports)
    import make_ports as module
    return module


def _transformers():
    try:
        import transformers  # noqa: F401
        return True
    except ImportError:
        return False


def _torchvision():
    try:
        import torchvision  # noqa: F401
        return True
    except ImportError:
        return False


@unittest.skipUnless(_torchvision(), "torchvision is not importable (Debian: apt-get install python3-torchvision)")
class TorchvisionClassTests(unittest.TestCase):
    def test_resnets_blocks_are_one_class_with_downsample_optional(self):
        from torchvision.models.resnet import BasicBlock, ResNet

        torch.manual_seed(0)
        code = generate(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10).eval(), (torch.randn(1, 3, 32, 32),), "ResNet")
        self.assertEqual(code.count("public sealed class BasicBlock"), 1)
        self.assertIn("public BasicBlock(long in_channels, long out_channels, (long, long) stride, Sequential? downsample = null)", code)
        self.assertIn("Tensor t6 = downsample is not null ? downsample.call(x) : x;", code)
        self.assertIn("Tensor t7 = t5.add_(t6);", code)
        self.assertIn("new BasicBlock(in_channels: 64, out_channels: 64, stride: (1, 1))", code)

    def test_mobilenets_inverted_residuals_are_one_class_with_use_res_connect(self):
        from torchvision.models import mobilenet_v2

        code = generate(mobilenet_v2(width_mult=0.25, num_classes=10).eval(), (torch.randn(1, 3, 32, 32),), "MobileNetV2")
        self.assertEqual(code.count("public sealed class InvertedResidual"), 1)
        self.assertIn("public InvertedResidual(Sequential conv, bool use_res_connect)", code)
        self.assertIn("Tensor t2 = use_res_connect ? x.add(t) : t;", code)
        self.assertEqual(code.count("use_res_connect: true"), 11)
        self.assertEqual(code.count("use_res_connect: false"), 6)


@unittest.skipUnless(_torchvision(), "torchvision is not importable (make_ports.py's ResNet and MobileNetV2 need it)")
class CommittedPortsTests(unittest.TestCase):
    """The committed generated ports are what the generator writes now (make_ports.py's models): a generator change
    that is not regenerated and reviewed fails here (and the .NET snapshot tests show the diff)."""

    def test_regenerating_the_committed_ports_gives_the_committed_files(self):
        ports = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "TorchLinear.Tests", "Ports")
        module = make_ports()
        for folder, class_name, build, _ in module.PORTS:
            with self.subTest(folder):
                if folder in module.NEEDS_TRANSFORMERS and not _transformers():
                    self.skipTest(f"transformers is not importable (source /work/realpeft-site/env.sh): {folder} not regenerated")
                model, x, _ = build()
                code = generate(model, (x,), class_name, namespace=f"TorchLinear.Tests.Ports.{folder}")
                with open(os.path.join(ports, folder, f"{class_name}.cs"), encoding="utf-8", newline="") as f:
                    self.assertEqual(code, f.read(), f"{folder}/{class_name}.cs is not what export_port.py writes now: "
                                                     f"run make_ports.py and review the diff")


if __name__ == "__main__":
    unittest.main()
