"""Client of a remote reward service (`data.reward_url`): HTTP POST of batches, JSON in and out.

Request  (POST <reward_url>, Content-Type: application/json):
    {"items": [{"response": "<text>", "answer": "<reference>", "record": {<the dataset record>}}, ...]}
Response (200):
    {"results": [{"reward": 1.0, "message": ""}, {"error": "ZeroDivisionError: ..."}, ...]}
one result per item, in order: `reward` (a finite number) with an optional `message`, or `error` (that item's
reward function failed; not retried, handled by data.reward_error_policy).

A batch is cut into POSTs of `batch_size` items, at most `concurrency` in flight (threads that end with the
call). Each POST gets `attempts` tries: a connection error, a timeout (`timeout_s` per socket operation) or an
HTTP 5xx is retried after `backoff_s * 2**(k-1)` seconds; a 4xx or a malformed reply is not. A POST that runs
out of tries fails its items with an error naming the URL; worst case per POST:
`attempts * timeout_s + backoff_s * (2**(attempts-1) - 1)`. The reference server is `rewards/server.py`.
"""
from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

from rfpo_megatron.rewards.base import OutcomeScorer, RewardResult, ScoreItem
from rfpo_megatron.rewards.custom import Outcome, one_line, to_result


class RemoteRewardError(RuntimeError):
    """A POST to the reward service failed (names the URL, the tries and the last error)."""


class _Retryable(Exception):
    pass


def encode_items(items: Sequence[ScoreItem]) -> bytes:
    """The request body for `items` = [(response_text, answer, record)]."""
    return json.dumps({"items": [{"response": r, "answer": a, "record": rec} for r, a, rec in items]},
                      default=str).encode()


def decode_results(body: bytes, n: int) -> list[Outcome]:
    """Per-item outcomes from a reply body; ValueError when it is not `{"results": [n results]}`."""
    data = json.loads(body.decode())
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, list) or len(results) != n:
        got = len(results) if isinstance(results, list) else type(results).__name__
        raise ValueError(f"reply must be {{'results': [{n} results]}}, got {got}")
    outs: list[Outcome] = []
    for r in results:
        if isinstance(r, dict) and r.get("error"):
            outs.append(RemoteRewardError(f"the server's reward function failed: {r['error']}"))
            continue
        try:
            outs.append(to_result(r))
        except Exception as exc:
            outs.append(exc)
    return outs


@dataclass
class RemoteReward(OutcomeScorer):
    """`score_outcomes(items)` / `score_batch(items)` against the service at `url`."""

    url: str
    batch_size: int = 32
    concurrency: int = 4
    timeout_s: float = 30.0
    attempts: int = 3
    backoff_s: float = 0.5

    def _post(self, body: bytes) -> bytes:
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:200].decode(errors="replace").strip()
            err = f"HTTP {exc.code}" + (f" ({detail})" if detail else "")
            if exc.code >= 500:
                raise _Retryable(err) from None
            raise RemoteRewardError(f"POST {self.url}: {err}") from None
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise _Retryable(f"timed out after {self.timeout_s:g}s" if isinstance(reason, (socket.timeout, TimeoutError))
                             else one_line(reason if isinstance(reason, BaseException) else exc)) from None

    def _chunk(self, items: list[ScoreItem]) -> list[Outcome]:
        body, last = encode_items(items), ""
        for k in range(1, self.attempts + 1):
            try:
                reply = self._post(body)
            except _Retryable as exc:
                last = str(exc)
                if k < self.attempts:
                    time.sleep(self.backoff_s * 2 ** (k - 1))
                continue
            except RemoteRewardError as exc:
                return [exc] * len(items)
            try:
                return decode_results(reply, len(items))
            except (ValueError, UnicodeDecodeError) as exc:
                return [RemoteRewardError(f"POST {self.url}: malformed reply: {one_line(exc)}")] * len(items)
        err = RemoteRewardError(f"POST {self.url} failed after {self.attempts} attempt(s): {last}")
        return [err] * len(items)

    def score_outcomes(self, items: Sequence[ScoreItem]) -> list[Outcome]:
        """One RewardResult or exception per item, in order."""
        items = list(items)
        chunks = [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        if len(chunks) <= 1 or self.concurrency == 1:
            return [o for c in chunks for o in self._chunk(c)]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(chunks)),
                                thread_name_prefix="rfpo-reward-url") as ex:
            parts = list(ex.map(self._chunk, chunks))
        return [o for p in parts for o in p]

