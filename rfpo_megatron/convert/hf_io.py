"""Reading and writing HF checkpoint directories: safetensors shards + index, config, generation config, tokenizer.

Reading is lazy: `HFReader` maps tensor names to shard files from the index (or the single
`model.safetensors`) and loads one tensor at a time. Writing (`HFWriter`) streams tensors into
shards of at most `max_shard_bytes`, then writes `model.safetensors.index.json`.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rfpo_megatron.convert.arch import ConversionError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files copied next to the weights (tokenizer and friends); config.json is written from the config dict.
AUX_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of an HF directory as a dict; ConversionError naming the file if absent/invalid."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"{cfg_path} not found: point --hf-dir at an HF model directory with config.json")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{cfg_path} is not valid JSON: {err}") from err


class HFReader:
    """Lazy tensor access to an HF safetensors checkpoint (sharded with an index, or single file)."""

    def __init__(self, path: str | os.PathLike):
        self.dir = Path(path)
        index = self.dir / INDEX_NAME
        single = self.dir / SINGLE_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index}: no 'weight_map' object")
            self.file_of = {k: self.dir / v for k, v in weight_map.items()}
        elif single.is_file():
            with safe_open(single, framework="pt") as f:
                self.file_of = {k: single for k in f.keys()}
        else:
            bins = sorted(p.name for p in self.dir.glob("*.bin"))
            hint = f" (found {bins[0]}: re-save it with safetensors)" if bins else ""
            raise ConversionError(f"{self.dir}: no {SINGLE_NAME} or {INDEX_NAME}{hint}")
        for f in set(self.file_of.values()):
            if not f.is_file():
                raise ConversionError(f"{index}: shard {f.name} listed in the index does not exist")
        self._handles: dict[Path, Any] = {}

    def _handle(self, f: Path):
        if f not in self._handles:
            self._handles[f] = safe_open(f, framework="pt")
        return self._handles[f]

    def names(self) -> list[str]:
        return list(self.file_of)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape, from the safetensors headers (no data read)."""
        return {n: tuple(self._handle(f).get_slice(n).get_shape()) for n, f in self.file_of.items()}

    def get(self, name: str) -> torch.Tensor:
        if name not in self.file_of:
            raise ConversionError(f"{self.dir}: tensor '{name}' not found")
        return self._handle(self.file_of[name]).get_tensor(name)

    def get_part(self, name: str, *, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> torch.Tensor:
        """Rows [a, b) or columns [a, b) of a tensor, reading only that part from disk."""
        if name not in self.file_of:
            raise ConversionError(f"{self.dir}: tensor '{name}' not found")
        sl = self._handle(self.file_of[name]).get_slice(name)
        if rows is not None:
            return sl[rows[0]:rows[1]]
        if cols is not None:
            return sl[:, cols[0]:cols[1]]
        return sl[:]


class HFWriter:
    """Stream HF-named tensors into safetensors shards of at most `max_shard_bytes`; `close` names them
    `model-0000i-of-0000N.safetensors` and writes the index. Several writers (one per PP stage) can share
    a directory with distinct `prefix`es: each calls `finish()` and one process calls `finalize_shards`."""

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = 5 * 1024**3, prefix: str = ""):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.prefix = prefix
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[str, list[str], int]] = []  # (temp file name, tensor names, bytes)
        self._names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ConversionError(f"tensor '{name}' written twice")
        self._names.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += nbytes

    def add_many(self, items: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in items:
            self.add(name, tensor)

    def _flush(self) -> None:
        if not self._pending:
            return
        tmp = f"{self.prefix}shard-{len(self._written):05d}.tmp.safetensors"
        save_file(self._pending, str(self.dir / tmp), metadata={"format": "pt"})
        self._written.append((tmp, list(self._pending), self._pending_bytes))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[tuple[str, list[str], int]]:
        """Write the last shard; returns [(temp file, tensor names, bytes)] for `finalize_shards`."""
        self._flush()
        return list(self._written)

    def close(self) -> list[str]:
        """finish + finalize_shards for a single writer; returns the shard file names."""
        return finalize_shards(self.dir, self.finish())


def finalize_shards(out_dir: str | os.PathLike, pieces: list[tuple[str, list[str], int]]) -> list[str]:
    """Rename temp shards to model-i-of-N.safetensors (in the given order) and write the index."""
    out = Path(out_dir)
    n = len(pieces)
    if n == 0:
        raise ConversionError("no tensors to write")
    weight_map: dict[str, str] = {}
    files = []
    for i, (tmp, names, _) in enumerate(pieces):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(out / tmp, out / final)
        files.append(final)
        for k in names:
            if k in weight_map:
                raise ConversionError(f"tensor '{k}' written by two shards")
            weight_map[k] = final
    index = {"metadata": {"total_size": sum(p[2] for p in pieces)}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return files


def write_hf_config(out_dir: str | os.PathLike, config: dict[str, Any]) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_aux_files(src_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Copy generation config and tokenizer files present in src_dir; returns the names copied."""
    copied = []
    for name in AUX_FILES:
        src = Path(src_dir) / name
        if src.is_file():
            shutil.copy2(src, Path(out_dir) / name)
            copied.append(name)
    return copied
