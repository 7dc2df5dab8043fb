"""What torch.testing.assert_close says, recorded from real PyTorch for Equivalence.AssertClose to match.

Run with Debian's PyTorch 1.13 (apt-get install python3-torch):
    /usr/bin/python3 tests/TorchLinear.Tests/ReferenceData/AssertClose/make_assert_close.py

Writes cases.safetensors (each case's actual and expected tensors, in the safetensors layout written by hand: the
safetensors package is not installable here) and cases.json (per case: the arguments, and the message PyTorch raised,
or null when it passed). Python only generates these files; the tests read the committed copies.
"""
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from safetensors_writer import write_safetensors  # noqa: E402  (ReferenceData/safetensors_writer.py)

HERE = os.path.dirname(os.path.abspath(__file__))
NAN, INF = float("nan"), float("inf")


def cases():
    t = torch.tensor
    yield "exact", t([1.0, 2.0, 3.0]), t([1.0, 2.0, 3.0]), {}
    yield "within_default_f32", t([1.0, 2.0 + 1e-6, 3.0]), t([1.0, 2.0, 3.0]), {}
    yield "outside_default_f32", t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), t([[1.0, 2.0, 3.5], [4.0, 5.25, 6.0]]), {}
    yield "scalar", t(1.5), t(1.0), {}
    yield "f64", t([1.0, 2.0], dtype=torch.float64), t([1.0, 2.0 + 1e-6], dtype=torch.float64), {}
    yield "f16", t([1.0, 2.0], dtype=torch.float16), t([1.0, 2.01], dtype=torch.float16), {}
    yield "bf16_within", t([1.0, 2.0], dtype=torch.bfloat16), t([1.0, 2.015625], dtype=torch.bfloat16), {}
    yield "bf16", t([1.0, 2.0], dtype=torch.bfloat16), t([1.0, 2.25], dtype=torch.bfloat16), {}
    yield "explicit_tolerances", t([1.0, 2.0, 3.0]), t([1.1, 2.0, 3.3]), {"rtol": 0.05, "atol": 0.0}
    yield "zero_tolerances", t([1.0, 2.0]), t([1.0, 2.0000002]), {"rtol": 0.0, "atol": 0.0}
    yield "int64", t([1, 2, 3]), t([1, 5, 3]), {}
    yield "int32_2d", t([[1, 2], [3, 4]], dtype=torch.int32), t([[1, 2], [3, 7]], dtype=torch.int32), {}
    yield "bool", t([True, False]), t([True, True]), {}
    yield "nan_default", t([1.0, NAN]), t([1.0, NAN]), {}
    yield "nan_equal", t([1.0, NAN]), t([1.0, NAN]), {"equal_nan": True}
    yield "nan_vs_number", t([1.0, NAN]), t([1.0, 2.0]), {"equal_nan": True}
    yield "inf_same", t([INF, -INF]), t([INF, -INF]), {}
    yield "inf_vs_number", t([INF, 1.0]), t([1e38, 1.0]), {}
    yield "zero_expected", t([0.5, 0.0]), t([0.0, 0.0]), {}
    yield "signed_zero", t([0.0]), t([-0.0]), {}
    yield "shape", t([1.0, 2.0]), t([[1.0, 2.0]]), {}
    yield "dtype", t([1.0, 2.0]), t([1.0, 2.0], dtype=torch.float64), {}
    yield "dtype_unchecked", t([1.0, 2.0]), t([1.0, 2.0 + 1e-6], dtype=torch.float64), {"check_dtype": False}
    yield "complex", t([1 + 1j, 2 + 2j], dtype=torch.complex64), t([1 + 1j, 2 + 2.5j], dtype=torch.complex64), {}
    yield "many", torch.arange(1000, dtype=torch.float32).reshape(10, 100), torch.arange(1000, dtype=torch.float32).reshape(10, 100) * 1.001, {}


def main():
    tensors, records = {}, []
    for name, actual, expected, options in cases():
        tensors[name + "/actual"] = actual
        tensors[name + "/expected"] = expected
        try:
            torch.testing.assert_close(actual, expected, **options)
            message = None
        except AssertionError as error:
            message = str(error)
        records.append({"name": name, "options": options, "complex": actual.dtype.is_complex, "message": message})
    write_safetensors(tensors, os.path.join(HERE, "cases.safetensors"))
    with open(os.path.join(HERE, "cases.json"), "w") as f:
        json.dump({"torch": torch.__version__, "cases": records}, f, indent=1)
    print(f"{len(records)} cases, {sum(r['message'] is not None for r in records)} failing")


if __name__ == "__main__":
    main()
