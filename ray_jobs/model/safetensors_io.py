"""Read a chosen subset of tensors from (possibly sharded, possibly remote) safetensors files.

The safetensors format is an 8-byte little-endian header length, a JSON header mapping each
tensor name to its dtype, shape and byte range, then the raw data. Reading the header and
then only the byte ranges of the wanted tensors lets a pipeline stage load exactly its own
layers from a local file or an ``s3://`` object without fetching the rest.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from ray_jobs import storage
from ray_jobs.contract.layout import join_uri
from ray_jobs.errors import ModelError
from ray_jobs.model.keys import safe_relpath

_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    stop: int


def header_bytes(fs, path: str, name: str | None = None) -> bytes:
    """The raw JSON header of a safetensors file, by two exact byte-range reads (never weight bytes)."""
    name = name or path
    raw = fs.cat_file(path, start=0, end=8)
    if len(raw) != 8:
        raise ModelError(f"{name}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", raw)
    if n > _MAX_HEADER:
        raise ModelError(f"{name}: not a safetensors file (header length {n})")
    header = fs.cat_file(path, start=8, end=8 + n)
    if len(header) != n:
        raise ModelError(f"{name}: not a safetensors file (header shorter than its length {n})")
    return header


def _read_header(uri: str) -> dict[str, TensorEntry]:
    """The tensor table of one file, read by two exact byte ranges (no read-ahead of weight bytes)."""
    fs, path = storage.filesystem_for(uri)
    try:
        raw_header = header_bytes(fs, path, uri)
        n = len(raw_header)
        header = json.loads(raw_header)
    except FileNotFoundError as exc:
        raise ModelError(f"model weights file {uri} does not exist") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{uri}: unreadable safetensors header: {exc}") from exc
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        b, e = meta["data_offsets"]
        out[name] = TensorEntry(uri, meta["dtype"], tuple(meta["shape"]), base + b, base + e)
    return out


class SafetensorsIndex:
    """All tensor names of a checkpoint directory, single-file or sharded."""

    def __init__(self, model_dir: str, filename: str = "model.safetensors") -> None:
        self.model_dir = model_dir
        self.filename = filename
        single = join_uri(model_dir, filename)
        index = join_uri(model_dir, filename + ".index.json")
        if storage.exists(single):
            self.entries = _read_header(single)
        elif storage.exists(index):
            shards = sorted(set(json.loads(storage.read_text(index))["weight_map"].values()))
            for shard in shards:
                safe_relpath(shard, index, "shard file name")
            self.entries = {}
            for shard in shards:
                self.entries.update(_read_header(join_uri(model_dir, shard)))
        else:
            raise ModelError(f"no {filename} (or {filename}.index.json) under {model_dir}")

    def label(self, name: str) -> str:
        """*name*, prefixed with the file name unless it is the default ``model.safetensors``."""
        return name if self.filename == "model.safetensors" else f"{self.filename}:{name}"

    def names(self) -> list[str]:
        return sorted(self.entries)

    def load(self, names: Iterable[str]) -> dict:
        """Read only the named tensors, grouped per file, as CPU torch tensors."""
        import torch

        wanted = sorted(set(names))
        missing = [n for n in wanted if n not in self.entries]
        if missing:
            raise ModelError(f"{self.model_dir}: checkpoint lacks tensors {missing[:5]}")
        by_file: dict[str, list[TensorEntry]] = {}
        for n in wanted:
            by_file.setdefault(self.entries[n].file, []).append(self.entries[n])
        names_of = {id(self.entries[n]): n for n in wanted}
        out = {}
        for uri, entries in by_file.items():
            fs, path = storage.filesystem_for(uri)
            with fs.open(path, "rb") as fh:
                for entry in sorted(entries, key=lambda e: e.start):
                    fh.seek(entry.start)
                    data = bytearray(fh.read(entry.stop - entry.start))
                    dtype = getattr(torch, _DTYPES[entry.dtype])
                    if data:
                        tensor = torch.frombuffer(data, dtype=dtype).reshape(entry.shape)
                    else:
                        tensor = torch.empty(entry.shape, dtype=dtype)
                    out[names_of[id(entry)]] = tensor
        return out

    def nbytes(self, names: Iterable[str]) -> int:
        return sum(self.entries[n].stop - self.entries[n].start for n in names)
