"""Weight payloads for rollout servers: tensor serialisation over HTTP and the broadcast update group.

Two payload formats travel in `serialized_named_tensors` of /update_weights_from_tensor:

* SGLang's own (`load_format=None`): one base64 string per TP rank of the server, each its own
  ForkingPickler dump of a list of (hf_name, tensor) — what sglang.srt.utils.MultiprocessingSerializer
  .serialize(..., output_str=True) produces, CUDA devices recorded by GPU UUID. For CUDA tensors the pickle
  carries CUDA IPC handles, so it only works on the same node (the tensors stay alive on the trainer
  until the call returns).
* The embedded engine's (`load_format="rfpo_safetensors_b64"`): one base64 string holding the bytes of
  a safetensors file of the named tensors (safe to decode: no pickle), copied by value.
* The embedded engine's same-host form (`load_format="rfpo_safetensors_shm"`): the path of a safetensors
  file in shared memory (/dev/shm) that the trainer rewrites for every bucket; the server memory-maps and
  copies it. No base64, no JSON of the tensor bytes: the CPU twin of SGLang's same-node CUDA IPC handles.
  The client picks it for an embedded server it launched itself (same host); the server reads only files
  named `SHM_PREFIX*` in the shared-memory directory.

The broadcast group (`init_weights_update_group` / `update_weights_from_distributed`) is a process
group built outside the default one: a TCP store at master_address:master_port, prefixed by the group
name, rank 0 = the trainer, the servers' ranks from rank_offset on — the same rendezvous SGLang uses.
"""
from __future__ import annotations

import base64
import io
import os
from datetime import timedelta
from typing import Iterable

import torch

SAFETENSORS_B64 = "rfpo_safetensors_b64"
SAFETENSORS_SHM = "rfpo_safetensors_shm"
SHM_PREFIX = "rfpo_weights_"


def shm_dir() -> str:
    """Where same-host weight payloads live: /dev/shm (RAM-backed) when present, else the temp dir."""
    import tempfile

    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _named_dict(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, t in named_tensors:
        if name in tensors:
            raise ValueError(f"weight '{name}' appears twice in one update")
        tensors[name] = t.detach().to("cpu").contiguous()
    return tensors


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def write_safetensors_shm(named_tensors: Iterable[tuple[str, torch.Tensor]], path: str) -> str:
    """Write HF-named tensors as a safetensors file at `path` (in shm_dir(), named SHM_PREFIX*); returns path.

    The safetensors layout written directly (8-byte little-endian header size, JSON header of dtype / shape /
    data_offsets, then the raw bytes in header order), one copy per tensor into the file; the reader is
    safetensors' own loader, which validates it."""
    import json
    import struct

    tensors = _named_dict(named_tensors)
    header: dict[str, dict] = {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"weight '{name}': dtype {t.dtype} has no safetensors code")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to 8 bytes with spaces
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(head)))
        fh.write(head)
        for t in tensors.values():
            if t.numel():
                fh.write(t.reshape(-1).view(torch.uint8).numpy().data)
    os.replace(tmp, path)  # a reader never sees a half-written file
    return path


def read_safetensors_shm(path: str) -> list[tuple[str, torch.Tensor]]:
    """Inverse of write_safetensors_shm; raises ValueError for a path outside shm_dir() / not SHM_PREFIX*, a
    missing file or one that is not safetensors."""
    from safetensors.torch import load_file

    if not isinstance(path, str):
        raise ValueError("load_format=rfpo_safetensors_shm: each serialized_named_tensors entry must be a file path")
    real = os.path.realpath(path)
    if os.path.dirname(real) != os.path.realpath(shm_dir()) or not os.path.basename(real).startswith(SHM_PREFIX):
        raise ValueError(f"load_format=rfpo_safetensors_shm: {path!r} is not a {SHM_PREFIX}* file in {shm_dir()} "
                         "(the server reads only the trainer's shared-memory payloads)")
    try:
        return list(load_file(real).items())
    except FileNotFoundError:
        raise ValueError(f"load_format=rfpo_safetensors_shm: {path} does not exist (is the server on the "
                         "trainer's host? use load_format=rfpo_safetensors_b64 across hosts)") from None
    except Exception as e:  # safetensors errors
        raise ValueError(f"{path} is not a safetensors file ({type(e).__name__}: {e})") from None


def encode_safetensors_b64(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """HF-named tensors -> base64 text of a safetensors file (tensors copied to CPU, contiguous)."""
    from safetensors.torch import save

    return base64.b64encode(save(_named_dict(named_tensors))).decode("ascii")


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


# Index of the device in torch's rebuild_cuda_tensor arguments (torch.multiprocessing.reductions.reduce_tensor);
# SGLang's patched rebuild reads a GPU UUID there (sglang/srt/utils/patch_torch.py, _REDUCE_TENSOR_ARG_DEVICE_INDEX).
CUDA_DEVICE_ARG = 6


def _device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def with_device_uuid(rebuild, args: tuple, uuid_of=_device_uuid) -> tuple:
    """(rebuild_fn, args) of a reduced tensor with a CUDA device *index* replaced by that GPU's UUID.

    An index names another GPU in a server started with a different CUDA_VISIBLE_DEVICES; SGLang maps the
    UUID back to its own index. CPU tensors (any other rebuild function) are returned unchanged."""
    from torch.multiprocessing import reductions

    if rebuild is reductions.rebuild_cuda_tensor and isinstance(args[CUDA_DEVICE_ARG], int):
        args = (*args[:CUDA_DEVICE_ARG], uuid_of(args[CUDA_DEVICE_ARG]), *args[CUDA_DEVICE_ARG + 1:])
    return rebuild, args


def _dump_for_sglang(items: list[tuple[str, torch.Tensor]]) -> str:
    """One base64 ForkingPickler dump of items, CUDA devices recorded by UUID (as SGLang's patched reducer)."""
    from multiprocessing.reduction import ForkingPickler

    from torch.multiprocessing import reductions

    def reduce(t):
        return with_device_uuid(*reductions.reduce_tensor(t))

    buf = io.BytesIO()
    pickler = ForkingPickler(buf)
    pickler.dispatch_table = dict(pickler.dispatch_table)
    for cls, fn in list(pickler.dispatch_table.items()):
        if fn is reductions.reduce_tensor:
            pickler.dispatch_table[cls] = reduce
    pickler.dump(items)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def encode_sglang_named_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]], tp_size: int = 1) -> list[str]:
    """SGLang's payload for one server: tp_size *separate* base64 ForkingPickler dumps of list[(name, tensor)].

    TP rank r of the server decodes entry [r] only (sglang tp_worker.deserialize_own_rank): each dump shares
    the tensors once (a CPU tensor's shared-memory handle, a CUDA tensor's IPC handle and ref-counter), so
    a copy decoded by two ranks or two servers fails (EOFError on CPU) or breaks CUDA-IPC refcounting.
    Encode once per server. Same format as sglang MultiprocessingSerializer.serialize(..., output_str=True)
    under SGLang's monkey_patch_torch_reductions (CUDA devices by UUID).
    """
    import torch.multiprocessing  # noqa: F401  (registers the tensor reducers with ForkingPickler)

    items = [(name, t.detach()) for name, t in named_tensors]
    return [_dump_for_sglang(items) for _ in range(int(tp_size))]


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
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    timeout = timedelta(seconds=timeout_s)
    rank, world_size = int(rank), int(world_size)
    # The store is built directly, not through c10d.rendezvous("tcp://..."): under torchrun
    # (TORCHELASTIC_USE_AGENT_STORE=True) rendezvous makes every rank a client of the agent's store, so the
    # trainer (rank 0) would never host this group's store and both sides wait until the timeout.
    store = dist.TCPStore(master_address, int(master_port), world_size, is_master=(rank == 0), timeout=timeout,
                          wait_for_workers=False)
    store = c10d.PrefixStore(group_name, store)
    pg, _ = c10d._new_process_group_helper(
        world_size, rank, [], c10d.Backend(backend), store, group_name=group_name, timeout=timeout
    )
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def broadcast_named_tensors(group, named_tensors: Iterable[tuple[str, torch.Tensor]], async_op: bool = False) -> list:
    """Trainer side (rank 0): broadcast each tensor, in order, to every server in `group`.

    The matching HTTP call /update_weights_from_distributed (names, dtypes, shapes in the same order)
    must be in flight at the same time: issue it from another thread first. async_op: return the
    pending works (poll `is_completed()`; the tensors must stay alive until they complete)."""
    import torch.distributed as dist

    works = []
    for _, t in named_tensors:
        w = dist.broadcast(t.detach().contiguous(), src=0, group=group, async_op=async_op)
        if async_op:
            works.append(w)
    return works


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
