"""HF checkpoint IO that streams: read tensors one at a time from ``.safetensors`` or ``.bin`` (single
or sharded with an index), write safetensors shards with an index as tensors arrive.

Reading never loads a whole shard: safetensors files are opened lazily (``safe_open``), ``.bin``
shards are memory-mapped (``torch.load(mmap=True, weights_only=True)``). Errors name the file: a
shard listed in the index but missing, a truncated or corrupt file, a directory with no weights.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Iterable, List, Optional

import torch

from megatron_patch.convert.rules import ConversionError, compact

ST_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# files copied alongside weights (tokenizer, generation config); config.json is written separately
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "vocab.txt",
                   "generation_config.json", "qwen.tiktoken", "tokenizer.tiktoken", "chat_template.jinja",
                   "chat_template.json")


def read_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{hf_dir} has no config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"corrupt {path}: {e}") from e


def copy_side_files(src: str, dst: str, names: Iterable[str] = TOKENIZER_FILES) -> List[str]:
    copied = []
    for n in names:
        p = os.path.join(src, n)
        if os.path.isfile(p):
            shutil.copy2(p, os.path.join(dst, n))
            copied.append(n)
    return copied


class HFReader:
    """Tensors of an HF checkpoint directory by name, read lazily."""

    def __init__(self, hf_dir: str):
        self.dir = hf_dir
        self._where: Dict[str, str] = {}  # tensor name -> file
        self._open: Dict[str, object] = {}
        self.kind = None
        for index, kind in ((ST_INDEX, "safetensors"), (BIN_INDEX, "bin")):
            p = os.path.join(hf_dir, index)
            if os.path.isfile(p):
                try:
                    with open(p) as f:
                        weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise ConversionError(f"corrupt index {p}: {e}") from e
                missing = sorted({fn for fn in weight_map.values()
                                  if not os.path.isfile(os.path.join(hf_dir, fn))})
                if missing:
                    raise ConversionError(f"{hf_dir}: shard(s) listed in {index} are missing: "
                                          + ", ".join(missing))
                self._where = dict(weight_map)
                self.kind = kind
                break
        else:
            for single, kind in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin")):
                if os.path.isfile(os.path.join(hf_dir, single)):
                    self.kind = kind
                    for name in self._file(single).keys():
                        self._where[name] = single
                    break
            else:
                raise ConversionError(f"{hf_dir} holds no model.safetensors, pytorch_model.bin or "
                                      "shard index")
        if self.kind == "safetensors":  # open every shard now: a truncated file fails before writing
            for fn in sorted(set(self._where.values())):
                self._file(fn)

    def _file(self, fn: str):
        if fn not in self._open:
            path = os.path.join(self.dir, fn)
            try:
                if fn.endswith(".safetensors"):
                    from safetensors import safe_open

                    self._open[fn] = safe_open(path, framework="pt", device="cpu")
                else:
                    try:
                        self._open[fn] = torch.load(path, map_location="cpu", weights_only=True,
                                                    mmap=True)
                    except RuntimeError:  # legacy (non-zip) serialisation cannot be mapped
                        self._open[fn] = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ConversionError(f"cannot read {path} (truncated or corrupt?): {e}") from e
        return self._open[fn]

    def names(self) -> List[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str):
        """(shape, is_floating_point, torch dtype or None) without reading the tensor's data."""
        fn = self._where.get(name)
        if fn is not None and fn.endswith(".safetensors"):
            sl = self._file(fn).get_slice(name)
            code = sl.get_dtype()
            dt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                  "F64": torch.float64}.get(code)
            return tuple(sl.get_shape()), dt is not None, dt
        t = self.get(name)
        return tuple(t.shape), t.is_floating_point(), t.dtype

    def get(self, name: str) -> torch.Tensor:
        fn = self._where.get(name)
        if fn is None:
            raise ConversionError(f"{self.dir}: the checkpoint lacks tensor {name}")
        f = self._file(fn)
        try:
            if fn.endswith(".safetensors"):
                return f.get_tensor(name)
            return f[name]
        except Exception as e:
            raise ConversionError(f"cannot read tensor {name} from {os.path.join(self.dir, fn)} "
                                  f"(truncated or corrupt?): {e}") from e


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(path: str, tensors: Dict[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
    """Write the safetensors format straight from the tensors' memory (no serialised copy):
    8-byte header length, JSON header (names, dtypes, shapes, byte offsets), then the raw bytes."""
    header: Dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            if t.numel():
                f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))


class HFWriter:
    """Writes safetensors shards of at most ``max_shard_bytes`` as tensors are added, then the
    index. Shards are named ``model-XXXXX-of-YYYYY.safetensors`` once their count is known."""

    def __init__(self, out_dir: str, max_shard_bytes: int = 2 * 1024 ** 3,
                 dtype: Optional[torch.dtype] = None):
        self.dir = out_dir
        self.max = max_shard_bytes
        self.dtype = dtype
        self._buf: Dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._shards: List[List[str]] = []
        self.total = 0
        self.dtype_written: Optional[torch.dtype] = None  # the first floating tensor's dtype
        os.makedirs(out_dir, exist_ok=True)

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self._buf or any(name in s for s in self._shards):
            raise ConversionError(f"HF tensor {name} produced twice")
        t = compact(t, self.dtype if t.is_floating_point() else None)
        if self.dtype_written is None and t.is_floating_point():
            self.dtype_written = t.dtype
        n = t.numel() * t.element_size()
        if self._buf and self._buf_bytes + n > self.max:
            self._flush()
        self._buf[name] = t
        self._buf_bytes += n
        self.total += n

    def _flush(self) -> None:
        if not self._buf:
            return
        k = len(self._shards)
        write_safetensors(os.path.join(self.dir, f".shard-{k:05d}.safetensors"), self._buf,
                          {"format": "pt"})
        self._shards.append(list(self._buf))
        self._buf, self._buf_bytes = {}, 0

    def close(self) -> Dict[str, str]:
        self._flush()
        n = len(self._shards)
        weight_map = {}
        for k, names in enumerate(self._shards):
            fn = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.dir, f".shard-{k:05d}.safetensors"),
                       os.path.join(self.dir, fn))
            for name in names:
                weight_map[name] = fn
        with open(os.path.join(self.dir, ST_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f,
                      indent=2, sort_keys=True)
        return weight_map
