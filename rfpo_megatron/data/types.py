"""Shared rollout dataclasses: one `Sample` per (prompt, response), one `RolloutGroup` per prompt.

These are the currency between rollout, reward, fix stage, and trainer. Token ids are plain Python
lists (lengths vary per sample); the trainer packs them into tensors itself.

Fixed samples (`is_fixed=True`) keep `prompt_ids` = the PLAIN prompt q (never the fix prompt), so the
actor's log-prob pass scores (q, o_f). Their `rollout_logprobs` were produced under the fix prompt, so
`use_tis` is False for them (TIS must be off). `fixed_from` holds the original wrong response's token
ids, needed for R_off = exp(gamma * (S(o) - S(o_f))) from the old log-probs of (q, o) and (q, o_f).

Multi-turn samples (rollout.generate_fn, e.g. the built-in `multi_turn`) keep the whole dialogue after the prompt
in `response_ids` -- model turns and environment replies interleaved -- with `loss_mask` 1 on the model's tokens
and 0 on the environment's. The final model turn starts at `final_turn_start`; a fix of such a sample replaces
that final turn only and takes `prompt_ids` = the plain dialogue prefix q + response_ids[:final_turn_start]
(rfpo_megatron.fix.stage), so R_off compares o and o_f on the same feedback-free context.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

# Generate callable output: per prompt, n tuples (response_ids, logprobs per token, finish_reason).
GenOutput = tuple[list[int], list[float], str]


@dataclass
class Sample:
    """One response to one prompt.

    prompt_ids:       [P] plain prompt token ids (chat template applied), q.
    response_ids:     [T] response token ids, o (or o_f when fixed).
    rollout_logprobs: [T] log-probs the rollout engine reported for `response_ids` (may be empty).
    reward:           scalar reward from the verifier.
    reward_message:   verifier's short error info ("" when correct).
    is_fixed:         True when this sample is a successful fix o_f.
    fixed_from:       [T0] token ids of the original wrong response o (only when is_fixed).
    fixed_from_logprobs: [T0] rollout log-probs of o (informational; R_off uses the actor's old logp).
    fix_variant:      template variant that produced the fix ("" when not fixed).
    finish_reason:    "stop" | "length" | "abort" | engine-specific string.
    use_tis:          whether truncated importance sampling may use `rollout_logprobs`
                      (False for fixed samples: their log-probs are under the fix prompt).
    record:           the dataset record (dict with prompt, answer, optional solution/hints/id).
    response_text:    decoded response (optional; filled by whoever decoded it); for a multi-turn sample the
                      final model turn, which is what the verifier scores.
    loss_mask:        [T] 0/1 per response token: 1 = the policy's own token (trained), 0 = an environment
                      token (never in the loss); None = every response token is the policy's.
    weight_version:   the oldest weight version (trainer step whose update the engine served; 0 = the start
                      weights) that produced any of the response's tokens; staleness at train step k is
                      (k - 1) - weight_version (trainer.async_mode).
    token_versions:   [T] weight version of each response token (a generation interrupted by a weight sync and
                      resumed has two or more segments); None = all tokens are weight_version's.
    routed_experts:   MoE routing the rollout engine used (rollout.return_routed_experts): int32 tensor
                      [P + T - 1, num_layers, num_experts_per_tok], row p = the experts of token p of
                      prompt_ids + response_ids (SGLang's layout); None when not returned, and for fixed samples
                      (their routing ran under the fix prompt) and custom/multi-turn rollouts.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float] = field(default_factory=list)
    reward: float = 0.0
    reward_message: str = ""
    is_fixed: bool = False
    fixed_from: Optional[list[int]] = None
    fixed_from_logprobs: Optional[list[float]] = None
    fix_variant: str = ""
    finish_reason: str = "stop"
    use_tis: bool = True
    record: dict[str, Any] = field(default_factory=dict)
    response_text: str = ""
    loss_mask: Optional[list[int]] = None
    weight_version: int = 0
    token_versions: Optional[list[int]] = None
    routed_experts: Any = None

    @property
    def final_turn_start(self) -> int:
        """Index in response_ids where the final model turn begins: one past the last environment token
        (0 for a single-turn sample or a loss_mask without environment tokens)."""
        if not self.loss_mask:
            return 0
        for i in range(len(self.loss_mask) - 1, -1, -1):
            if not self.loss_mask[i]:
                return i + 1
        return 0

    @property
    def truncated(self) -> bool:
        """True when generation stopped at the length limit."""
        return self.finish_reason == "length"


@dataclass
class RolloutGroup:
    """All responses to one prompt (G samples, plus appended fixes under placement=append).

    prompt_ids: [P] plain prompt token ids (same for every sample in the group).
    samples:    the G (or more) samples.
    record:     the dataset record this prompt came from.
    prompt_text: the chat-formatted prompt string (optional, for logging/fix prompts).
    baseline_reward: reward of one greedy (temperature 0) response to the prompt, the ReMax baseline
                (algo.adv_estimator=remax; None otherwise). Every sample of the group, fixes included,
                uses it.
    """

    prompt_ids: list[int]
    samples: list[Sample] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)
    prompt_text: str = ""
    baseline_reward: Optional[float] = None

    @property
    def rewards(self) -> list[float]:
        """[G] rewards in sample order."""
        return [s.reward for s in self.samples]

    @property
    def num_fixed(self) -> int:
        """Number of samples that are successful fixes."""
        return sum(1 for s in self.samples if s.is_fixed)
