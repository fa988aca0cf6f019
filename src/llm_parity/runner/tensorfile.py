"""Safetensors files written in pieces and read as memory maps.

A golden store's data file is one row per compared position at the whole vocabulary:
gigabytes for a large vocabulary. `safetensors.numpy.save_file` first turns every tensor
into one bytes object (a second copy of everything), and its `load_file` reads every
tensor into memory. Here a tensor is written from an iterable of rows, one at a time, and
read back as a read-only `np.memmap`: the pages are the file's, loaded as rows are read and
dropped by the kernel under pressure. The files are ordinary safetensors (8-byte header
length, JSON header, raw little-endian bytes), readable by the safetensors library itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DTYPES = {"F32": np.dtype("<f4"), "I64": np.dtype("<i8")}


def dtype_name(dtype: np.dtype) -> str:
    """The safetensors name of a dtype a store holds (ValueError for any other)."""
    for name, known in DTYPES.items():
        if known == dtype:
            return name
    raise ValueError(f"float32 and int64 tensors only, not {dtype}")


@dataclass(frozen=True)
class Rows:
    """A tensor written as consecutive rows (or blocks of rows) that are never stacked:
    `dtype` is a safetensors name (F32, I64), `shape` the whole tensor's."""

    dtype: str
    shape: tuple[int, ...]
    rows: Iterable[np.ndarray]

    @classmethod
    def of(cls, array: np.ndarray | Rows) -> Rows:
        if isinstance(array, Rows):
            return array
        return cls(dtype_name(array.dtype), tuple(array.shape), [array])


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray | Rows],
                      metadata: Mapping[str, str]) -> None:
    """A safetensors file written piece by piece: an 8-byte little-endian header length, a
    JSON header naming each tensor's dtype, shape and byte range, then the raw bytes in that
    order. Memory: one row at a time, whatever the file's size."""
    plans = {name: Rows.of(t) for name, t in tensors.items()}
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, plan in plans.items():
        nbytes = DTYPES[plan.dtype].itemsize * int(np.prod(plan.shape, dtype=np.int64))
        header[name] = {"dtype": plan.dtype, "shape": list(plan.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, plan in plans.items():
            dtype, (start, end) = DTYPES[plan.dtype], header[name]["data_offsets"]
            written = 0
            for row in plan.rows:
                if row is None or np.asarray(row).dtype != dtype:
                    raise ValueError(f"{name}: a row of {None if row is None else row.dtype}, "
                                     f"expected {dtype}; nothing is converted on the way in")
                block = memoryview(np.ascontiguousarray(row)).cast("B")
                written += block.nbytes
                if written > end - start:
                    break
                f.write(block)
            if written != end - start:
                raise ValueError(f"{name}: {written} bytes of rows for a tensor of "
                                 f"{end - start} ({plan.shape})")


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, each tensor a read-only memory map in its
    stored dtype: nothing is read until a row is touched. ValueError names what is
    malformed."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or not 2 <= length <= size - 8:
            raise ValueError("not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, ValueError):
            raise ValueError("not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file (bad header)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ValueError("not a safetensors file (bad metadata)")
    base, tensors, end = 8 + length, {}, 0
    try:
        entries = sorted(((int(i["data_offsets"][0]), int(i["data_offsets"][1]), name,
                           DTYPES.get(i.get("dtype")), tuple(int(d) for d in i["shape"]))
                          for name, i in header.items()), key=lambda e: e[0])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        raise ValueError("not a safetensors file (bad tensor entry)") from None
    for start, stop, name, dtype, shape in entries:
        if dtype is None or start != end or stop - start != dtype.itemsize * int(
                np.prod(shape, dtype=np.int64)):
            raise ValueError(f"tensor {name}: dtype {header[name].get('dtype')}, shape "
                             f"{list(shape)}, bytes {start}-{stop} do not fit")
        end = stop
        tensors[name] = (np.memmap(path, dtype=dtype, mode="r", offset=base + start,
                                   shape=shape) if stop > start else np.zeros(shape, dtype))
    if base + end != size:
        raise ValueError(f"{size} bytes, the header accounts for {base + end}")
    return tensors, metadata
