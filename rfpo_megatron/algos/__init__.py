"""Algorithm core (pure torch, no distributed code): advantage estimators, policy losses, KL, aggregation,
RFPO R_off, DAPO shaping. Importing this package fills the registries ADV_ESTIMATORS, POLICY_LOSSES and ROLLOUT_CORRECTIONS."""

from rfpo_megatron.algos.registry import (  # noqa: F401  (registries first)
    ADV_ESTIMATORS,
    POLICY_LOSSES,
    ROLLOUT_CORRECTIONS,
    get_adv_estimator,
    get_policy_loss,
    get_rollout_correction,
    register_adv_estimator,
    register_policy_loss,
    register_rollout_correction,
)
from rfpo_megatron.algos.advantages import compute_advantages, sample_keep_mask  # noqa: E402
from rfpo_megatron.algos.aggregation import LOSS_AGG_MODES, aggregate, count_tokens_and_seqs  # noqa: E402
from rfpo_megatron.algos.correction import apply_rollout_correction  # noqa: E402
from rfpo_megatron.algos.kl import KL_TYPES, kl_estimate, kl_loss  # noqa: E402
from rfpo_megatron.algos.objective import StepCounts, chord_sft_loss, compute_actor_loss, pos_nll_loss, tis_weight  # noqa: E402
from rfpo_megatron.algos.policy_loss import LOSS_FORMS, bapo_bounds, bapo_candidate_sums, bapo_pick, clipped_surrogate  # noqa: E402
from rfpo_megatron.algos.rfpo import ROFF_MODES, compute_log_roff, sequence_logp  # noqa: E402
from rfpo_megatron.algos.shaping import overlong_penalty  # noqa: E402

__all__ = [
    "ADV_ESTIMATORS", "POLICY_LOSSES", "get_adv_estimator", "get_policy_loss", "register_adv_estimator",
    "register_policy_loss", "ROLLOUT_CORRECTIONS", "get_rollout_correction", "register_rollout_correction",
    "apply_rollout_correction", "compute_advantages", "sample_keep_mask", "LOSS_AGG_MODES", "aggregate",
    "count_tokens_and_seqs", "KL_TYPES", "kl_estimate", "kl_loss", "StepCounts",
    "chord_sft_loss", "compute_actor_loss", "pos_nll_loss", "tis_weight", "LOSS_FORMS", "bapo_bounds",
    "bapo_candidate_sums", "bapo_pick",
    "clipped_surrogate", "ROFF_MODES", "compute_log_roff", "sequence_logp",
    "overlong_penalty",
]  # fmt: skip
