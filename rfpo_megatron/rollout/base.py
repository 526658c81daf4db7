"""Rollout engine protocol: sampling params, generate results, errors and the engine interface.

Every rollout backend (SGLang servers, the embedded CPU engine) is driven through the same
`RolloutEngine` surface; the trainer only ever holds an `EngineClient` (rfpo_megatron.rollout.client)
that speaks SGLang's HTTP protocol to either kind of server.
"""
from __future__ import annotations

import base64
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, runtime_checkable

import torch

# SGLang finish_reason["type"] values (FINISH_MATCHED_TOKEN / FINISH_LENGTH / FINISH_ABORT .to_json()).
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"


@dataclass
class SamplingParams:
    """Sampling parameters of one generate call (SGLang names; `seed` maps to `sampling_seed`).

    temperature == 0 means greedy (SGLang turns it into temperature=1, top_k=1). top_k = -1 means the
    whole vocabulary. `seed` makes the call reproducible: sample j of prompt i uses the seed
    `derive_seed(seed, i, j)`, so results do not depend on how a batch is split into requests.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_new_tokens: int = 128
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None

    def validate(self) -> None:
        """Raise ValueError with the offending field named (same ranges as SGLang's verify())."""
        if int(self.n) < 1:
            raise ValueError(f"sampling n must be >= 1, got {self.n}")
        if not (self.temperature >= 0.0) or self.temperature == float("inf"):
            raise ValueError(f"sampling temperature must be a finite number >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"sampling top_p must be in (0, 1], got {self.top_p}")
        if not (self.top_k == -1 or self.top_k >= 1):
            raise ValueError(f"sampling top_k must be -1 (whole vocabulary) or >= 1, got {self.top_k}")
        if not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"sampling min_p must be in [0, 1], got {self.min_p}")
        if int(self.max_new_tokens) < 0:
            raise ValueError(f"sampling max_new_tokens must be >= 0, got {self.max_new_tokens}")

    def to_sglang(self, seed: int | None = None) -> dict[str, Any]:
        """The `sampling_params` dict of one /generate item, n=1 (the client expands n itself)."""
        out: dict[str, Any] = {
            "n": 1,
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
            "top_k": int(self.top_k),
            "min_p": float(self.min_p),
            "max_new_tokens": int(self.max_new_tokens),
            "ignore_eos": bool(self.ignore_eos),
            "skip_special_tokens": False,
            "no_stop_trim": True,
        }
        if self.stop_token_ids:
            out["stop_token_ids"] = [int(t) for t in self.stop_token_ids]
        if seed is not None:
            out["sampling_seed"] = int(seed)
        return out


def derive_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """Seed of sample `sample_index` of prompt `prompt_index` (a plain 63-bit mix, stable across runs)."""
    x = (int(seed) * 1_000_003 + int(prompt_index) * 10_007 + int(sample_index) * 101 + 0x9E3779B9) & (2**64 - 1)
    # splitmix64 finaliser: neighbouring inputs give unrelated outputs
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & (2**64 - 1)
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & (2**64 - 1)
    x ^= x >> 31
    return x & (2**63 - 1)


@dataclass
class GenerateResult:
    """One sampled response: token ids [L], per-token log-probs [L] and why it ended.

    finish_reason is "stop" (a stop/EOS token was produced; it is the last of output_ids),
    "length" (max_new_tokens or the context limit) or "abort". `meta` keeps SGLang's meta_info
    (rid, prompt_tokens, weight_version, the raw finish_reason dict, ...). routed_experts: the MoE routing
    SGLang returned (``return_routed_experts``), int32 [prompt + output - 1, num_layers, num_experts_per_tok],
    row p = the experts of the token at position p; None when not requested.
    """

    output_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    meta: dict[str, Any] = field(default_factory=dict)
    routed_experts: torch.Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class EngineError(RuntimeError):
    """A rollout server failed; the message names the server address and what to check."""


class EngineRequestError(EngineError):
    """The server rejected a request (HTTP 4xx/5xx); `status` and the server's message are kept."""

    def __init__(self, message: str, status: int | None = None, body: str = ""):
        super().__init__(message)
        self.status = status
        self.body = body


class EngineConnectionError(EngineError):
    """The server could not be reached, or dropped the connection mid-request."""


class EngineTimeoutError(EngineError):
    """A request exceeded its timeout, or the watchdog saw no progress for too long."""


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a rollout backend (implemented by EngineClient, for every backend).

    Tensor shapes: generate prompts are token-id lists (ragged, [B][T_i]); weights are HF-named
    tensors in the model's HF shapes.
    """

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[GenerateResult]]:
        """n results per prompt, in prompt order: out[i][j] is sample j of prompt i."""
        ...

    def update_weights_from_tensors(self, named_tensors: Iterable[tuple[str, torch.Tensor]], flush_cache: bool = True) -> None:
        """Load HF-named tensors (a subset is fine: buckets) into the serving model."""
        ...

    def update_weights_from_disk(self, path: str, load_format: str | None = None) -> None:
        """Reload weights from an HF directory."""
        ...

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group", backend: str = "nccl") -> None:
        """Join a process group whose rank 0 is the trainer (the servers take ranks rank_offset..)."""
        ...

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        group_name: str = "weight_update_group", flush_cache: bool = True) -> None:
        """Receive the listed tensors by broadcast from rank 0 of the update group."""
        ...

    def flush_cache(self) -> None: ...

    def release_memory(self, tags: list[str] | None = None) -> None: ...

    def resume_memory(self, tags: list[str] | None = None) -> None: ...

    def health(self) -> bool: ...

    def abort(self, rid: str | None = None) -> None: ...

    def shutdown(self) -> None: ...


def encode_routed_experts(ids: torch.Tensor) -> str:
    """[rows, layers, k] expert ids -> SGLang's meta_info["routed_experts"]: base64 of the int32 C-order bytes
    (sglang/srt/managers/detokenizer_manager.py ``_b64_encode_per_request``)."""
    return base64.b64encode(ids.to(torch.int32).contiguous().numpy().tobytes()).decode("ascii")


def decode_routed_experts(payload: str, num_layers: int, topk: int, rows: int | None = None) -> torch.Tensor:
    """SGLang's base64 routed_experts -> int32 [rows, num_layers, topk] (a ValueError names a size mismatch)."""
    import numpy as np

    flat = np.frombuffer(base64.b64decode(payload.encode("ascii")), dtype=np.int32)
    per = int(num_layers) * int(topk)
    if per <= 0 or flat.size % per or (rows is not None and flat.size != rows * per):
        raise ValueError(f"routed_experts holds {flat.size} int32 values: not {rows if rows is not None else 'N'} rows x "
                         f"{num_layers} layers x {topk} experts; the rollout model differs from the configured one "
                         "(num_hidden_layers, num_experts_per_tok)")
    return torch.from_numpy(flat.copy()).reshape(-1, int(num_layers), int(topk))


def parse_finish_reason(fr: Any) -> str:
    """SGLang meta_info.finish_reason (dict, string or None) -> "stop" | "length" | "abort"."""
    if fr is None:
        return FINISH_ABORT
    kind = fr.get("type") if isinstance(fr, dict) else str(fr)
    if kind in (FINISH_STOP, FINISH_LENGTH, FINISH_ABORT):
        return kind
    return FINISH_ABORT
