"""Weight payloads for rollout servers: tensor serialisation over HTTP and the broadcast update group.

Two payload formats travel in `serialized_named_tensors` of /update_weights_from_tensor:

* SGLang's own (`load_format=None`): one base64 string per TP rank, each the ForkingPickler dump of a
  list of (hf_name, tensor) — what sglang.srt.utils.MultiprocessingSerializer.serialize(..., output_str=True)
  produces. For CUDA tensors the pickle carries CUDA IPC handles, so it only works colocated
  (same node, the tensors stay alive on the trainer until the call returns).
* The embedded engine's (`load_format="rfpo_safetensors_b64"`): one base64 string holding the bytes of
  a safetensors file of the named tensors (safe to decode: no pickle), copied by value.

The broadcast group (`init_weights_update_group` / `update_weights_from_distributed`) is a process
group built outside the default one: a TCP store at master_address:master_port, prefixed by the group
name, rank 0 = the trainer, the servers' ranks from rank_offset on — the same rendezvous SGLang uses.
"""
from __future__ import annotations

import base64
import io
from datetime import timedelta
from typing import Iterable

import torch

SAFETENSORS_B64 = "rfpo_safetensors_b64"


def encode_safetensors_b64(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """HF-named tensors -> base64 text of a safetensors file (tensors copied to CPU, contiguous)."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    for name, t in named_tensors:
        if name in tensors:
            raise ValueError(f"weight '{name}' appears twice in one update")
        tensors[name] = t.detach().to("cpu").contiguous()
    return base64.b64encode(save(tensors)).decode("ascii")


def decode_safetensors_b64(payload: str) -> list[tuple[str, torch.Tensor]]:
    """Inverse of encode_safetensors_b64; raises ValueError on anything that is not such a payload."""
    from safetensors.torch import load

    if not isinstance(payload, str):
        raise ValueError("each serialized_named_tensors entry must be a base64 string")
    try:
        raw = base64.b64decode(payload, validate=True)
        tensors = load(raw)
    except Exception as e:  # binascii.Error, safetensors errors
        raise ValueError(f"serialized_named_tensors entry is not base64 safetensors bytes ({type(e).__name__}: {e})") from None
    return list(tensors.items())


def encode_sglang_named_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]], tp_size: int = 1) -> list[str]:
    """SGLang's payload: [base64(ForkingPickler(list[(name, tensor)]))] * tp_size.

    Same bytes as MultiprocessingSerializer.serialize(named_tensors, output_str=True) (without
    SGLang's torch-reduction patch, which only changes how CUDA device ids are recorded).
    """
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers the tensor reducers with ForkingPickler)

    items = [(name, t.detach()) for name, t in named_tensors]
    buf = io.BytesIO()
    ForkingPickler(buf).dump(items)
    text = base64.b64encode(buf.getvalue()).decode("ascii")
    return [text] * int(tp_size)


def decode_sglang_named_tensors(payload: str) -> list[tuple[str, torch.Tensor]]:
    """Decode one SGLang entry (trusted, same-host use only: this is a pickle). For tests and debugging."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401

    return list(ForkingPickler.loads(base64.b64decode(payload)))


def torch_dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the string SGLang's update_weights_from_distributed takes)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype '{name}' (use torch names such as 'bfloat16', 'float32')")
    return dt


def init_weights_update_group(master_address: str, master_port: int, rank: int, world_size: int,
                              group_name: str = "weight_update_group", backend: str = "nccl",
                              timeout_s: float = 600.0):
    """Create (or join) the weight-update process group without touching the default group.

    The trainer calls this with rank=0 (its TCP store listens on master_address:master_port); each
    server joins with rank = rank_offset + its tp rank. Returns the ProcessGroup to pass to
    broadcast_named_tensors / receive_named_tensors.
    """
    from torch.distributed import distributed_c10d as c10d

    timeout = timedelta(seconds=timeout_s)
    init_method = f"tcp://{master_address}:{int(master_port)}"
    store, rank, world_size = next(c10d.rendezvous(init_method, int(rank), int(world_size), timeout=timeout))
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)
    pg, _ = c10d._new_process_group_helper(
        world_size, rank, [], c10d.Backend(backend), store, group_name=group_name, timeout=timeout
    )
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def broadcast_named_tensors(group, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Trainer side (rank 0): broadcast each tensor, in order, to every server in `group`.

    The matching HTTP call /update_weights_from_distributed (names, dtypes, shapes in the same order)
    must be in flight at the same time: issue it from another thread first.
    """
    import torch.distributed as dist

    for _, t in named_tensors:
        dist.broadcast(t.detach().contiguous(), src=0, group=group)


def receive_named_tensors(group, names: list[str], dtypes: list[str], shapes: list[list[int]],
                          device: str | torch.device = "cpu") -> list[tuple[str, torch.Tensor]]:
    """Server side: receive the broadcast tensors [shape_i] of dtype_i from rank 0."""
    import torch.distributed as dist

    if not (len(names) == len(dtypes) == len(shapes)):
        raise ValueError(f"names/dtypes/shapes lengths differ: {len(names)}/{len(dtypes)}/{len(shapes)}")
    out = []
    for name, dt, shape in zip(names, dtypes, shapes):
        t = torch.empty([int(s) for s in shape], dtype=dtype_from_name(dt), device=device)
        dist.broadcast(t, src=0, group=group)
        out.append((name, t))
    return out


def destroy_group(group) -> None:
    import torch.distributed as dist

    try:
        dist.destroy_process_group(group)
    except Exception:
        pass
