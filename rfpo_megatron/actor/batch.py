"""ActorBatch: the per-sample token data the actor scores and trains on.

Every rank of the job receives the SAME whole batch (the actor splits it over
data-parallel ranks itself, balanced by tokens, and packs micro-batches by the
token budget). Sample i is ``input_ids[i]`` = prompt + response, the response
being ``input_ids[i][prompt_lens[i]:]`` of length ``R_i``. Per-response-token
fields are lists of ``[R_i]`` tensors aligned with those response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch


@dataclass
class ActorBatch:
    """One step's samples.

    input_ids:    B tensors [L_i] int64, prompt + response token ids.
    prompt_lens:  B ints, the prompt length P_i (1 <= P_i <= L_i); R_i = L_i - P_i.
    advantages:   B tensors [R_i] float (train_step).
    old_logp:     B tensors [R_i] float, log-probs of the policy that produced the batch
                  (from compute_logprobs; train_step).
    ref_logp:     B tensors [R_i] float, reference policy log-probs (KL loss only).
    rollout_logp: B tensors [R_i] float, log-probs reported by the rollout engine (informational;
                  TIS weights are passed precomputed in ``tis_weights``).
    tis_weights:  B tensors [R_i] float, truncated importance-sampling weights multiplied into the
                  per-token loss (1 for fixed samples); None = no TIS.
    response_mask: B tensors [R_i] bool, tokens that count in the loss; None = all response tokens.
    log_roff:     [B] float, RFPO log R_off per sequence (0 for unfixed); None = all 0.
    is_fixed:     [B] bool, the sample is an RFPO fix o_f.
    is_positive:  [B] bool, the sample is a correct response (VAPO positive-example NLL).
    routed_experts: B entries, each the rollout engine's MoE routing of sample i, int [L_i - 1, num_layers, k]
                  (row p = the experts of the token at position p; SGLang's routed_experts), or None for a sample
                  without; MoE actors measure (and with ``actor.router_replay=rollout`` force) these choices.
    """

    input_ids: list[torch.Tensor]
    prompt_lens: list[int]
    advantages: Optional[list[torch.Tensor]] = None
    old_logp: Optional[list[torch.Tensor]] = None
    ref_logp: Optional[list[torch.Tensor]] = None
    rollout_logp: Optional[list[torch.Tensor]] = None
    tis_weights: Optional[list[torch.Tensor]] = None
    response_mask: Optional[list[torch.Tensor]] = None
    log_roff: Optional[torch.Tensor] = None
    is_fixed: Optional[torch.Tensor] = None
    is_positive: Optional[torch.Tensor] = None
    routed_experts: Optional[list] = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "ActorBatch":
        """Check shapes and convert fields in place (also after fields were assigned later); returns self."""
        B = len(self.input_ids)
        if len(self.prompt_lens) != B:
            raise ValueError(f"ActorBatch.prompt_lens has {len(self.prompt_lens)} entries, input_ids has {B}")
        self.input_ids = [torch.as_tensor(x, dtype=torch.long).reshape(-1) for x in self.input_ids]
        self.prompt_lens = [int(p) for p in self.prompt_lens]
        for i, (x, p) in enumerate(zip(self.input_ids, self.prompt_lens)):
            if not 1 <= p <= x.numel():
                raise ValueError(
                    f"ActorBatch.prompt_lens[{i}]={p} must be in [1, len(input_ids[{i}])={x.numel()}]"
                )
        R = self.response_lens
        for name in ("advantages", "old_logp", "ref_logp", "rollout_logp", "tis_weights", "response_mask"):
            v = getattr(self, name)
            if v is None:
                continue
            if len(v) != B:
                raise ValueError(f"ActorBatch.{name} has {len(v)} entries, expected {B} (one per sample)")
            conv = []
            for i, t in enumerate(v):
                t = torch.as_tensor(t).reshape(-1)
                if t.numel() != R[i]:
                    raise ValueError(
                        f"ActorBatch.{name}[{i}] has {t.numel()} values, expected the response length {R[i]}"
                    )
                conv.append(t.bool() if name == "response_mask" else t.float())
            setattr(self, name, conv)
        if self.routed_experts is not None:
            if len(self.routed_experts) != B:
                raise ValueError(f"ActorBatch.routed_experts has {len(self.routed_experts)} entries, expected {B}")
            conv = []
            for i, r in enumerate(self.routed_experts):
                if r is not None:
                    r = torch.as_tensor(r)
                    if r.dim() != 3 or r.shape[0] != self.input_ids[i].numel() - 1:
                        raise ValueError(
                            f"ActorBatch.routed_experts[{i}] has shape {tuple(r.shape)}, expected "
                            f"[{self.input_ids[i].numel() - 1} (prompt + response - 1), layers, k]; the routing must "
                            "come from the rollout of exactly these tokens")
                conv.append(r)
            self.routed_experts = conv if any(r is not None for r in conv) else None
        for name in ("log_roff", "is_fixed", "is_positive"):
            v = getattr(self, name)
            if v is None:
                continue
            v = torch.as_tensor(v).reshape(-1)
            if v.numel() != B:
                raise ValueError(f"ActorBatch.{name} has {v.numel()} values, expected {B}")
            setattr(self, name, v.float() if name == "log_roff" else v.bool())
        return self

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        """[B] total lengths L_i."""
        return [int(x.numel()) for x in self.input_ids]

    @property
    def response_lens(self) -> list[int]:
        """[B] response lengths R_i."""
        return [int(x.numel()) - p for x, p in zip(self.input_ids, self.prompt_lens)]

    def mask_of(self, i: int) -> torch.Tensor:
        """[R_i] bool loss mask of sample i."""
        if self.response_mask is not None:
            return self.response_mask[i]
        return torch.ones(self.response_lens[i], dtype=torch.bool)

    @staticmethod
    def from_prompt_response(
        prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], **kw
    ) -> "ActorBatch":
        """Build from separate prompt and response id lists (prompt_lens = len(prompt))."""
        ids = [torch.tensor(list(p) + list(r), dtype=torch.long) for p, r in zip(prompts, responses)]
        return ActorBatch(input_ids=ids, prompt_lens=[len(p) for p in prompts], **kw)


def pad_tokens(values: Sequence, fill: float = 0.0, dtype=None) -> torch.Tensor:
    """B rows [R_i] (tensors or lists) -> [B, R_max] right-padded with ``fill``: the package's one padding helper.

    dtype: default the first row's (a list of ints -> int64, of floats -> float32); device: the first tensor's;
    autograd-safe (rows are copied into a new tensor)."""
    rows = [v if isinstance(v, torch.Tensor) else torch.as_tensor(list(v), dtype=dtype) for v in values]
    R = max((int(v.numel()) for v in rows), default=0)
    dev = rows[0].device if rows else torch.device("cpu")
    out = torch.full((len(rows), R), fill, dtype=dtype or (rows[0].dtype if rows else torch.float32), device=dev)
    for i, v in enumerate(rows):
        out[i, : v.numel()] = v
    return out
