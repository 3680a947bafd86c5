"""Reading and writing safetensors files with numpy (memory-mapped, bfloat16 through ml_dtypes).

The format: an 8-byte little-endian header length N, N bytes of JSON {name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}, then the raw little-endian data, offsets
relative to the end of the header. Tensors are read as memory maps, so opening a checkpoint reads
only its headers and a tensor's bytes are read when it is used (once, straight into its shard).

A checkpoint is one `model.safetensors` or the shards listed by `model.safetensors.index.json`
("weight_map": tensor name -> file); `TensorIndex` opens either and says which file is missing,
truncated or malformed, before any tensor is read.
"""

import json
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
          "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
          "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class CheckpointFileError(ValueError):
  """A checkpoint file is missing, truncated or malformed (the message names the file)."""


def read_header(path: str) -> tuple[dict, int]:
  """({name: entry}, data start offset) of one safetensors file; metadata under "__metadata__"."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      raw = f.read(8)
      if len(raw) < 8:
        raise CheckpointFileError(f"{path}: truncated ({size} bytes, no header length)")
      (n,) = struct.unpack("<Q", raw)
      if 8 + n > size:
        raise CheckpointFileError(f"{path}: truncated (header of {n} bytes, file of {size})")
      header = json.loads(f.read(n))
  except FileNotFoundError:
    raise CheckpointFileError(f"{path}: no such file") from None
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointFileError(f"{path}: the header is not JSON ({e})") from None
  start = 8 + n
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    if entry.get("dtype") not in DTYPES:
      raise CheckpointFileError(f"{path}: tensor {name!r} has dtype {entry.get('dtype')!r}; "
                                f"supported: {sorted(DTYPES)}")
    begin, end = entry["data_offsets"]
    want = int(np.prod(entry["shape"], dtype=np.int64)) * np.dtype(DTYPES[entry["dtype"]]).itemsize
    if end - begin != want:
      raise CheckpointFileError(f"{path}: tensor {name!r} spans {end - begin} bytes, its shape "
                                f"{entry['shape']} and dtype {entry['dtype']} need {want}")
    if start + end > size:
      raise CheckpointFileError(f"{path}: truncated (tensor {name!r} ends at byte {start + end}, "
                                f"the file has {size})")
  return header, start


class TensorIndex:
  """The tensors of a checkpoint directory: names, shapes and dtypes, and memory-mapped reads."""

  def __init__(self, directory: str):
    self.directory = directory
    index_path = os.path.join(directory, INDEX)
    if os.path.exists(index_path):
      try:
        with open(index_path) as f:
          weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointFileError(f"{index_path}: not a safetensors index with a weight_map "
                                  f"({type(e).__name__}: {e})") from None
      files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(directory, SINGLE)):
      files, weight_map = [SINGLE], None
    else:
      raise CheckpointFileError(f"{directory}: neither {SINGLE} nor {INDEX} is there")
    self._entries: dict[str, tuple[str, dict, int]] = {}
    for name in files:
      path = os.path.join(directory, name)
      header, start = read_header(path)
      for tensor, entry in header.items():
        if tensor != "__metadata__":
          self._entries[tensor] = (path, entry, start)
    if weight_map is not None:
      missing = sorted(t for t, f in weight_map.items() if t not in self._entries)
      if missing:
        raise CheckpointFileError(f"{index_path} lists {missing[:3]} (and {len(missing)} in all) "
                                  "that no shard holds")

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name][1]["shape"])

  def dtype(self, name: str) -> str:
    return self._entries[name][1]["dtype"]

  def read(self, name: str) -> np.ndarray:
    """The tensor as a read-only memory map (no bytes read until used)."""
    if name not in self._entries:
      raise CheckpointFileError(f"{self.directory}: the checkpoint has no tensor {name!r}")
    path, entry, start = self._entries[name]
    begin, _ = entry["data_offsets"]
    shape = tuple(entry["shape"])
    return np.memmap(path, dtype=DTYPES[entry["dtype"]], mode="r", offset=start + begin,
                     shape=shape if shape else (1,)).reshape(shape)


def write_file(path: str, tensors: Iterable[tuple[str, np.ndarray]],
               metadata: Mapping[str, str] | None = None) -> None:
  """Writes one safetensors file (tensors in the order given), atomically via a temporary name."""
  tensors = list(tensors)
  header, offset = {}, 0
  for name, array in tensors:
    dtype = np.dtype(array.dtype)
    if dtype not in NAMES:
      raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}, which safetensors cannot hold")
    header[name] = {"dtype": NAMES[dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
  if metadata is not None:
    header["__metadata__"] = dict(metadata)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for _, array in tensors:
      f.write(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)
              .tobytes())
  os.replace(tmp, path)
