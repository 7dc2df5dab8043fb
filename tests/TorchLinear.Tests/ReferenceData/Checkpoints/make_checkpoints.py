"""Legitimate PyTorch checkpoints that a strict reader must still read, written by real PyTorch.

Run with Debian's PyTorch 1.13 (apt-get install python3-torch), from any folder:
    /usr/bin/python3 tests/TorchLinear.Tests/ReferenceData/Checkpoints/make_checkpoints.py

Writes, beside this script:
  shared.pt       tensors that share one storage: a tied weight (two keys, one tensor), a slice (a view with an
                  offset), a transposed (non-contiguous) tensor, a scalar, an empty tensor, bf16/fp16/int64/bool tensors;
  byteorder.pt    the same, with the 'byteorder' entry PyTorch >= 2.1 writes ("little");
  zip64.bin       the same archive rewritten with ZIP64 records and data descriptors (flag bit 3), as some
                  published adapter_model.bin files are;
  deflated.pt     the same archive with deflate-compressed entries (PyTorch's reader accepts them);
  expected.json   every tensor's dtype, shape, strides, storage offset and values (exact: float.hex), as torch.load
                  returns them from shared.pt; the script checks that torch.load reads every file to the same;
  expected.safetensors  the same tensors, contiguous, in the safetensors format, written here by hand from the
                  format's specification (the safetensors package is not installable on the machine that made them).
Python only generates these files; the tests read the committed copies.
"""
import io
import json
import os
import sys
import zipfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from safetensors_writer import write_safetensors  # noqa: E402  (ReferenceData/safetensors_writer.py)

HERE = os.path.dirname(os.path.abspath(__file__))


def state():
    torch.manual_seed(0)
    base = torch.randn(4, 6)
    tied = torch.randn(3, 2)
    return {
        "encoder.weight": tied,
        "decoder.weight": tied,                  # the same tensor under two keys (tied weights)
        "base": base,
        "slice": base[1:3, 2:5],                 # a view: offset 8, strides (6, 1), not contiguous
        "transposed": base.t(),                  # strides (1, 6)
        "row": base[2],                          # offset 12
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 5),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "fp16": torch.randn(2, 3).to(torch.float16),
        "int64": torch.arange(-3, 4, dtype=torch.int64),
        "bool": torch.tensor([True, False, True]),
        "f64": torch.randn(3, dtype=torch.float64),
    }


def values(t):
    if t.dtype == torch.bool:
        return [bool(v) for v in t.flatten().tolist()]
    if t.dtype == torch.int64:
        return [int(v) for v in t.flatten().tolist()]
    return [float(v).hex() for v in t.to(torch.float64).flatten().tolist()]


def describe(sd):
    return {
        k: {
            "dtype": str(t.dtype).replace("torch.", ""),
            "shape": list(t.shape),
            "stride": list(t.stride()),
            "offset": t.storage_offset(),
            "values": values(t),
        }
        for k, t in sd.items()
    }


def rezip(source, target, compression, zip64_and_descriptors):
    with zipfile.ZipFile(source) as original:
        entries = [(info.filename, original.read(info.filename)) for info in original.infolist()]
    if zip64_and_descriptors:
        # A stream that cannot seek makes zipfile write each entry's CRC and sizes in a data descriptor after the data.
        class Unseekable(io.RawIOBase):
            def __init__(self, sink):
                self.sink = sink
            def writable(self):
                return True
            def write(self, b):
                return self.sink.write(b)
        # zipfile writes a ZIP64 end record only past its entry-count limit: lower it for this file, so that the
        # archive ends with a ZIP64 end record and locator (force_zip64 gives every local header a ZIP64 extra field).
        limit = zipfile.ZIP_FILECOUNT_LIMIT
        zipfile.ZIP_FILECOUNT_LIMIT = 0
        try:
            with open(target, "wb") as sink:
                with zipfile.ZipFile(Unseekable(sink), "w", compression=compression) as z:
                    for name, data in entries:
                        with z.open(zipfile.ZipInfo(name), "w", force_zip64=True) as f:
                            f.write(data)
        finally:
            zipfile.ZIP_FILECOUNT_LIMIT = limit
    else:
        with zipfile.ZipFile(target, "w", compression=compression) as z:
            for name, data in entries:
                z.writestr(name, data)


def main():
    sd = state()
    shared = os.path.join(HERE, "shared.pt")
    torch.save(sd, shared)
    expected = describe(torch.load(shared))

    with zipfile.ZipFile(shared) as original:
        entries = [(info.filename, original.read(info.filename)) for info in original.infolist()]
    prefix = entries[0][0].split("/")[0]
    with zipfile.ZipFile(os.path.join(HERE, "byteorder.pt"), "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in entries:
            z.writestr(name, data)
        z.writestr(prefix + "/byteorder", b"little")
    rezip(shared, os.path.join(HERE, "zip64.bin"), zipfile.ZIP_STORED, zip64_and_descriptors=True)
    rezip(shared, os.path.join(HERE, "deflated.pt"), zipfile.ZIP_DEFLATED, zip64_and_descriptors=False)

    for name in ["shared.pt", "byteorder.pt", "zip64.bin", "deflated.pt"]:
        loaded = describe(torch.load(os.path.join(HERE, name)))
        assert loaded == expected, name
        print(f"{name}: torch.load reads the same {len(loaded)} tensors")
    data = open(os.path.join(HERE, "zip64.bin"), "rb").read()
    assert b"PK\x06\x06" in data and b"PK\x06\x07" in data and b"PK\x07\x08" in data, "zip64.bin lacks ZIP64 records or data descriptors"
    loaded = torch.load(shared)
    assert loaded["encoder.weight"].data_ptr() == loaded["decoder.weight"].data_ptr()
    write_safetensors(torch.load(shared), os.path.join(HERE, "expected.safetensors"))
    with open(os.path.join(HERE, "expected.json"), "w") as f:
        json.dump({"torch": torch.__version__, "tensors": expected}, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
