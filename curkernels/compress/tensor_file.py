"""Write one tensor as a safetensors file a block of rows at a time, so a tensor larger than
the memory to spare (a 128k-row embedding or LM head) is copied without being held whole.

safetensors writes only whole tensors from memory; its file format is small and fixed (a
little-endian u64 header length, a JSON header naming each tensor's dtype, shape and byte
range, then the bytes), so the header is written here and the rows appended after it."""

import json
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

# safetensors' names of the dtypes a checkpoint's tensors take
DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
               torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
               torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def write_tensor_file(path: Path, name: str, dtype: torch.dtype, shape: tuple[int, ...],
                      blocks: Iterable[torch.Tensor]) -> None:
    """A safetensors file holding the one tensor `name` (`dtype`, `shape`) whose rows, in
    order, are the concatenation of `blocks` (each cast to `dtype`); metadata format=pt, as
    `save_file` writes it. Raises when the blocks do not make up `shape`."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype {dtype} of {name!r} has no safetensors name: expected one of "
                         f"{sorted(map(str, DTYPE_NAMES))}")
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian: this machine is not")
    size = torch.Size(shape).numel() * dtype.itemsize
    header = json.dumps({"__metadata__": {"format": "pt"},
                         name: {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                                "data_offsets": [0, size]}}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors pads
    written = 0
    with open(path, "wb") as handle:
        handle.write(len(header).to_bytes(8, "little"))
        handle.write(header)
        for block in blocks:
            block = block.to(dtype).contiguous()
            if tuple(block.shape[1:]) != tuple(shape[1:]):
                raise ValueError(f"a block of {name!r} has shape {tuple(block.shape)}, rows of "
                                 f"{tuple(shape)} were expected")
            handle.write(block.reshape(-1).view(torch.uint8).numpy().data)
            written += block.nbytes
    if written != size:
        raise ValueError(f"the blocks of {name!r} held {written} bytes, {tuple(shape)} in "
                         f"{dtype} is {size}")
