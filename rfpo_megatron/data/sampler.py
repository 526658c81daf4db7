"""Deterministic, resumable prompt sampler: epoch-seeded permutations, (epoch, position) state.

Batches run across epoch boundaries without dropping anything. `state_dict()` goes into the
checkpoint; `load_state_dict()` on a fresh sampler continues with exactly the batch that would have
come next.
"""
from __future__ import annotations

import random
from typing import Any


class PromptSampler:
    """Yields lists of record indices, `batch_size` at a time, reshuffled each epoch by (seed, epoch)."""

    def __init__(self, num_records: int, batch_size: int, seed: int = 0, shuffle: bool = True):
        if num_records < 1:
            raise ValueError("PromptSampler: the prompt set is empty (check data.train_files)")
        if batch_size < 1:
            raise ValueError(f"PromptSampler: batch_size must be >= 1, got {batch_size}")
        self.num_records, self.batch_size = num_records, batch_size
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.epoch, self.position = 0, 0
        self._perm: list[int] | None = None

    def _order(self, epoch: int) -> list[int]:
        idx = list(range(self.num_records))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(idx)
        return idx

    def next_indices(self, batch_size: int | None = None) -> list[int]:
        """The next `batch_size` (default: the configured one) record indices; advances the state."""
        n = batch_size or self.batch_size
        out: list[int] = []
        while len(out) < n:
            if self._perm is None:
                self._perm = self._order(self.epoch)
            take = min(n - len(out), self.num_records - self.position)
            out.extend(self._perm[self.position:self.position + take])
            self.position += take
            if self.position >= self.num_records:
                self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        return out

    def state_dict(self) -> dict[str, Any]:
        """{epoch, position, seed, num_records, batch_size, shuffle} — everything needed to resume."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_records": self.num_records, "batch_size": self.batch_size, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; refuses a state from a prompt set of a different size."""
        if int(state["num_records"]) != self.num_records:
            raise ValueError(f"sampler state is for {state['num_records']} records but the prompt set has "
                             f"{self.num_records}; resume with the same data.train_files")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.seed, self.shuffle = int(state["seed"]), bool(state.get("shuffle", True))
        self._perm = None
