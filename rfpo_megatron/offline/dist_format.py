"""Offline read of the actor's "dist" checkpoints (megatron dist_checkpointing, the GPU default) into canonical tensors.

megatron's dist checkpoints are layout-independent: any TP/PP loads them. The tool therefore builds the
actor's model once, in this process, at TP = PP = 1 on a one-rank gloo world (CPU, local layer spec,
whose sharded-state-dict keys map onto the TE spec's, so GPU/TE checkpoints load), loads the "model"
part of the checkpoint (optimizer and RNG are ignored) and gathers the canonical full state.
Memory: the whole model in fp32 on the CPU. Needs `psutil` (megatron's checkpoint I/O imports it).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch

from rfpo_megatron.convert.arch import ConversionError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def saved_dtype(ckpt: Path) -> torch.dtype | None:
    """dtype of the stored model tensors (from the torch DCP metadata), or None if it cannot be read."""
    try:
        from torch.distributed.checkpoint import FileSystemReader

        md = FileSystemReader(str(ckpt / "dist")).read_metadata()
    except Exception:  # unreadable metadata: the caller falls back to the config's dtype
        return None
    dtypes = {
        getattr(getattr(v, "properties", None), "dtype", None)
        for k, v in md.state_dict_metadata.items()
        if "word_embeddings" in k or "linear_qkv.weight" in k
    } - {None}
    return dtypes.pop() if len(dtypes) == 1 else None


def load_dist_checkpoint_state(ckpt: Path, hf_config: dict[str, Any], vocab_size: int) -> dict[str, torch.Tensor]:
    """Canonical full tensors (fp32, vocab cut to vocab_size) of the model in `ckpt/dist`.

    Must run in a process without a torch.distributed world (the CLI's own process); the world it
    creates is destroyed before returning.
    """
    import torch.distributed as dist

    dist_dir = ckpt / "dist"
    if not (dist_dir / "metadata.json").is_file():
        raise ConversionError(f"{dist_dir}/metadata.json not found: not a megatron dist checkpoint")
    if dist.is_initialized():
        raise ConversionError("converting a 'dist' checkpoint needs its own process (a torch.distributed world exists)")
    from megatron.core import dist_checkpointing

    from rfpo_megatron.actor.model import build_model
    from rfpo_megatron.actor.parallel import destroy_parallel, init_parallel
    from rfpo_megatron.convert.sharding import gather_full_state

    saved_env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    try:
        init_parallel(tp=1, pp=1, backend="gloo")
        chunks = build_model(hf_config, params_dtype=torch.float32, spec="local")
        model = chunks[0]
        try:
            loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(dist_dir))
        except Exception as err:  # megatron raises many types; report them as one user-facing error
            raise ConversionError(f"{dist_dir}: megatron dist_checkpointing.load failed: {type(err).__name__}: {err}") from err
        result = model.load_state_dict(loaded["model"], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ConversionError(f"{dist_dir}: model tensors missing {missing[:8]}, unexpected {unexpected[:8]}")
        return {k: v.detach().cpu() for k, v in gather_full_state(chunks, vocab_size=vocab_size).items()}
    finally:
        if dist.is_initialized():
            destroy_parallel()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
