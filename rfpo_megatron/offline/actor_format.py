"""The actor's own checkpoint format ("full", `rfpo_megatron.actor.checkpoint`) read and written offline by the tools.

An actor checkpoint directory holds ``meta.json`` (format "full" or "dist", step, tp/pp/dp, vocab_size, scheduler,
extra) and ``model_pp{r}.pt`` per PP stage: canonical names (local-spec, GLOBAL layer numbers), full
TP = 1 tensors with the vocab cut to vocab_size; ``optim_pp{r}.pt`` holds Adam state (the tool writes an
empty dict: no optimizer state, the actor then starts its optimizer from the weights). The tool adds
``extra.hf_config`` and an ``hf/`` directory (config, generation config, tokenizer) so that the
checkpoint converts back without a reference directory. "dist" checkpoints (megatron
dist_checkpointing under ``dist/``) are read through `dist_format`.

Paths accepted for reading: the checkpoint itself, an actor checkpoint root with a ``latest`` file, or a
trainer step directory (``step_N/actor/…``; its ``config.yaml`` names ``actor.hf_model_path``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from rfpo_megatron.convert.arch import ConversionError

META = "meta.json"


def _format_version() -> int:
    from rfpo_megatron.actor.checkpoint import FORMAT_VERSION

    return int(FORMAT_VERSION)


def resolve(path: str | os.PathLike) -> Path | None:
    """The actor checkpoint directory (holding meta.json) that `path` designates, or None if it is not one."""
    from rfpo_megatron.actor.checkpoint import LATEST, latest_step_dir

    p = Path(path)
    for cand in (p, p / "actor"):
        if (cand / META).is_file():
            return cand
        step = latest_step_dir(str(cand), META) or latest_step_dir(str(cand), os.path.join("actor", LATEST))
        if step is not None:
            return Path(step) if (Path(step) / META).is_file() else resolve(Path(step) / "actor")
    return None


def write_stage(out_dir: str | os.PathLike, r: int, state: dict[str, torch.Tensor]) -> None:
    """Write PP stage r: model_pp{r}.pt (canonical full tensors, vocab unpadded) and an empty optim_pp{r}.pt."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in state.items()}, out / f"model_pp{r}.pt")
    torch.save({}, out / f"optim_pp{r}.pt")


def write_meta(out_dir: str | os.PathLike, *, tp: int, pp: int, vocab_size: int, hf_config: dict[str, Any], source: str) -> None:
    """meta.json of a freshly converted checkpoint (step 0, no scheduler state, hf_config in extra)."""
    meta = {
        "format_version": _format_version(),
        "format": "full",
        "step": 0,
        "tp": tp,
        "pp": pp,
        "dp": 1,
        "world_size": tp * pp,
        "vocab_size": vocab_size,
        "scheduler": None,
        "extra": {"hf_config": hf_config, "converted_from": source},
    }
    (Path(out_dir) / META).write_text(json.dumps(meta, indent=1) + "\n")


def read_meta(ckpt: Path) -> dict[str, Any]:
    meta = json.loads((ckpt / META).read_text())
    if meta.get("format") not in ("full", "dist"):
        raise ConversionError(f"{ckpt / META}: unknown checkpoint format {meta.get('format')!r} (expected 'full' or 'dist')")
    if meta.get("format_version") != _format_version():
        raise ConversionError(f"{ckpt / META}: format_version {meta.get('format_version')} is not {_format_version()}")
    return meta


def hf_config_of(ckpt: Path, meta: dict[str, Any], hf_ref: str | os.PathLike | None) -> tuple[dict[str, Any], Path | None]:
    """(HF config dict, directory to copy tokenizer files from) for an actor checkpoint.

    Order: --hf-ref; extra.hf_config (tool-written, with hf/ next to it); the trainer's config.yaml
    (actor.hf_model_path) two levels up. ConversionError naming --hf-ref when none is found.
    """
    from rfpo_megatron.convert.hf_io import read_hf_config

    if hf_ref is not None:
        return read_hf_config(hf_ref), Path(hf_ref)
    extra = meta.get("extra") or {}
    if isinstance(extra.get("hf_config"), dict):
        hf_dir = ckpt / "hf"
        return extra["hf_config"], hf_dir if hf_dir.is_dir() else None
    for cfg_yaml in (ckpt.parent / "config.yaml", ckpt.parent.parent / "config.yaml"):
        if cfg_yaml.is_file():
            import yaml

            path = ((yaml.safe_load(cfg_yaml.read_text()) or {}).get("actor") or {}).get("hf_model_path")
            if path and (Path(path) / "config.json").is_file():
                return read_hf_config(path), Path(path)
    raise ConversionError(f"{ckpt}: no HF config recorded; pass --hf-ref <HF directory of the base model>")


def read_state(ckpt: Path, meta: dict[str, Any], hf_config: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """All stages' canonical full tensors: memory-mapped ("full"), or loaded through megatron ("dist")."""
    if meta.get("format") == "dist":
        from rfpo_megatron.offline.dist_format import load_dist_checkpoint_state

        return load_dist_checkpoint_state(ckpt, hf_config, int(meta["vocab_size"]))
    state: dict[str, torch.Tensor] = {}
    for r in range(int(meta["pp"])):
        f = ckpt / f"model_pp{r}.pt"
        if not f.is_file():
            raise ConversionError(f"{f} is missing (meta.json says pp={meta['pp']})")
        part = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        dup = set(part) & set(state)
        if dup - {"output_layer.weight"}:
            raise ConversionError(f"{f}: tensors also stored by another stage: {sorted(dup)[:5]}")
        state.update(part)
    return state
