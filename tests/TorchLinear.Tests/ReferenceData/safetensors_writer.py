"""The safetensors layout, written by hand for the reference-data scripts beside this file (the safetensors package is
not installable on the machine that made the data): an 8-byte little-endian header length, a JSON header (optionally
with "__metadata__" first) padded with spaces to a multiple of 8, then each tensor's bytes in order. A complex tensor is
stored as its real view, [..., 2]; the test that reads it rebuilds the complex tensor."""
import json

import torch

DTYPES = {
    torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL",
}


def write_safetensors(tensors, path, metadata=None):
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for key, t in tensors.items():
        t = t.detach().contiguous()
        if t.is_complex():
            t = torch.view_as_real(t).contiguous()
        raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        data = raw.numpy().tobytes()
        header[key] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for blob in blobs:
            f.write(blob)
