"""Embedded CPU rollout engine on HF transformers: batched KV-cache sampling with SGLang's semantics.

Sampling follows SGLang 0.5.x (python/sglang/srt/layers/sampler.py, torch fallback):
* temperature < 1e-6 is greedy: temperature := 1, top_k := 1;
* probs = softmax(logits / T); keep tokens whose sorted cumulative mass *before* them is <= top_p,
  the top_k most likely, and those with p >= min_p * p_max; sample from what is left;
* reported log-prob of the sampled token = log softmax(logits / T)[token] — temperature-scaled,
  NOT renormalised after top-p/top-k (SGLang's default). With `return_original_logprob=True`
  (SGLang: env SGLANG_RETURN_ORIGINAL_LOGPROB=1) it is log softmax(logits)[token].
* a stop token (stop_token_ids, or the model's EOS unless ignore_eos) ends the sample and is kept as
  its last output token: finish_reason {"type": "stop", "matched": id}; otherwise
  {"type": "length", "length": n_generated}; aborted samples {"type": "abort", ...}.
* `sampling_seed` seeds a per-sample torch.Generator (one uniform per decode step, drawn up front; the token
  is the inverse CDF of the kept mass at it), so a seeded sample does not depend on the other samples in the
  batch. (SGLang honours sampling_seed only with --enable-deterministic-inference; see docs/rollout.md for
  what is reproducible on GPU.)

Server behaviour follows SGLang `SGLANG_COMPAT` (0.5.23), so the CPU suite drives the client paths a
cluster takes: weight updates from tensors / the update group only inside /begin_weight_update ...
/end_weight_update; a tag-less release frees weights, KV cache and CUDA graphs (`MEMORY_TAGS`) and
generation is refused until all are resumed; prompt + max_new_tokens over the context length fails
the request unless `allow_auto_truncate`; flushing the cache (also after a disk update) fails while
requests run. /pause_generation (mode "abort", SGLang's default) aborts the running requests -- they return
the tokens and log-probs made so far with finish_reason abort -- and holds new ones until
/continue_generation; weight updates in between never wait for a batch (the partial-rollout protocol,
rfpo_megatron.rollout.partial). Env RFPO_EMBEDDED_DECODE_SLEEP_S (test instrumentation) sleeps that long per
decode step: a deterministic slow engine.

Routed experts (R3; SGLang `--enable-return-routed-experts` + request `return_routed_experts`, see
docs/rollout.md for the wheel's code): for MoE models (HF `Qwen3MoeForCausalLM`: a forward hook on each
layer's `Qwen3MoeTopKRouter`, whose third output is HF's top-k of the router softmax)
`meta_info["routed_experts"]` is base64 of int32 C-order bytes shaped [prompt + output - 1 -
routed_experts_start_len, num_hidden_layers, num_experts_per_tok]: row p is the routing of the token at
position p (prompt tokens, then every output token but the last, which is never fed to the model); dense
layers' columns are 0 (SGLang's zero-initialised buffer).
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from . import weights as W
from .base import encode_routed_experts
from .hf_experts import fused_expert_slots, slot_view
from .lean_decode import LeanDecoder, unsupported_reason

GREEDY_EPS = 1e-6  # SGLang's _SAMPLING_EPS
SGLANG_COMPAT = "0.5.23"  # the SGLang release whose HTTP behaviour this engine imitates
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")  # released by a tag-less /release_memory_occupation
SUPPORTED_SAMPLING_KEYS = {
    "max_new_tokens", "stop_token_ids", "temperature", "top_p", "top_k", "min_p", "n", "ignore_eos",
    "sampling_seed", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
    # accepted only at their neutral value:
    "stop", "stop_regex", "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens",
    "json_schema", "regex", "ebnf", "structural_tag", "custom_params", "logit_bias", "stream_interval",
}
_NEUTRAL = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0, "min_new_tokens": 0}


class RequestError(ValueError):
    """A malformed or unsupported request (the HTTP server answers 400 with this message)."""


@dataclass
class GenItem:
    """One sample to generate: prompt token ids [T] and its normalised sampling params."""

    rid: str
    input_ids: list[int]
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    return_logprob: bool = False
    return_routed_experts: bool = False
    routed_experts_start_len: int = 0


def _num(sp: dict, key: str, default, kind):
    v = sp.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) and kind is not bool:
        raise RequestError(f"sampling_params.{key} must be a number, got {v!r}")
    try:
        return kind(v)
    except (TypeError, ValueError):
        raise RequestError(f"sampling_params.{key} must be {kind.__name__}, got {v!r}") from None


def parse_sampling_params(sp: Any, vocab_size: int) -> dict:
    """Validate one SGLang sampling_params dict; returns normalised fields (raises RequestError)."""
    if sp is None:
        sp = {}
    if not isinstance(sp, dict):
        raise RequestError(f"sampling_params must be an object, got {type(sp).__name__}")
    unknown = sorted(set(sp) - SUPPORTED_SAMPLING_KEYS)
    if unknown:
        raise RequestError(f"unknown sampling_params {unknown}; supported: {sorted(SUPPORTED_SAMPLING_KEYS)}")
    for key in ("stop", "stop_regex", "json_schema", "regex", "ebnf", "structural_tag", "custom_params", "logit_bias"):
        if sp.get(key):
            raise RequestError(f"sampling_params.{key} is not supported by the embedded engine (token ids only)")
    for key, neutral in _NEUTRAL.items():
        if key in sp and sp[key] is not None and float(sp[key]) != neutral:
            raise RequestError(f"sampling_params.{key}={sp[key]} is not supported by the embedded engine (use {neutral})")
    out = {
        "max_new_tokens": _num(sp, "max_new_tokens", 128, int),
        "temperature": _num(sp, "temperature", 1.0, float),
        "top_p": _num(sp, "top_p", 1.0, float),
        "top_k": _num(sp, "top_k", -1, int),
        "min_p": _num(sp, "min_p", 0.0, float),
        "n": _num(sp, "n", 1, int),
        "ignore_eos": bool(sp.get("ignore_eos") or False),
        "seed": None if sp.get("sampling_seed") is None else _num(sp, "sampling_seed", 0, int),
    }
    stops = sp.get("stop_token_ids") or []
    if not isinstance(stops, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in stops):
        raise RequestError(f"sampling_params.stop_token_ids must be a list of ints, got {stops!r}")
    out["stop_token_ids"] = list(stops)
    t = out["temperature"]
    if not (t >= 0.0) or t == float("inf"):
        raise RequestError(f"temperature must be a non-negative finite number, got {t}")
    if not 0.0 < out["top_p"] <= 1.0:
        raise RequestError(f"top_p must be in (0, 1], got {out['top_p']}")
    if not (out["top_k"] == -1 or out["top_k"] >= 1):
        raise RequestError(f"top_k must be -1 (disable) or at least 1, got {out['top_k']}")
    if not 0.0 <= out["min_p"] <= 1.0:
        raise RequestError(f"min_p must be in [0, 1], got {out['min_p']}")
    if out["max_new_tokens"] < 0:
        raise RequestError(f"max_new_tokens must be at least 0, got {out['max_new_tokens']}")
    if out["n"] < 1:
        raise RequestError(f"n must be at least 1, got {out['n']}")
    bad = [s for s in out["stop_token_ids"] if not 0 <= s < vocab_size]
    if bad:
        raise RequestError(f"stop_token_ids {bad} outside the vocabulary [0, {vocab_size})")
    return out


class EmbeddedEngine:
    """An HF causal LM in one process, serving SGLang-style generate and weight-update calls.

    Thread-safe: generation and weight updates take one lock, so updates wait for running batches.
    """

    def __init__(self, model_path: str, dtype: str = "float32", attn_implementation: str = "eager",
                 max_batch_size: int = 64, return_original_logprob: bool = False,
                 weights_cpu_backup: bool = False, log_every_s: float = 2.0, device: str = "cpu",
                 allow_auto_truncate: bool = False, enable_return_routed_experts: bool = False,
                 lean_decode: bool = True):
        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model_path '{model_path}' has no config.json: pass an HF model directory")
        try:  # fail fast, before the slow transformers import
            json.loads((path / "config.json").read_text())
        except ValueError as e:
            raise ValueError(f"{path / 'config.json'} is not valid JSON ({e}); re-export the HF model directory") from None
        from transformers import AutoModelForCausalLM

        self.model_path = str(path)
        self.dtype = W.dtype_from_name(dtype)
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_path, dtype=self.dtype, attn_implementation=attn_implementation
        ).to(self.device).eval()
        cfg = self.model.config
        self.vocab_size = int(cfg.vocab_size)
        self.max_context = int(getattr(cfg, "max_position_embeddings", 0) or 1 << 30)
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = getattr(cfg, "eos_token_id", None)
        self.eos_ids: list[int] = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
        pad = getattr(cfg, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self.max_batch_size = int(max_batch_size)
        self.return_original_logprob = bool(return_original_logprob)
        self.weights_cpu_backup = bool(weights_cpu_backup)
        self.log_every_s = float(log_every_s)
        self.weight_version = "default"
        self.lock = threading.Lock()
        # the one thread that runs model work after loading (_on_torch_thread)
        self._torch_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rfpo-embedded-torch")
        self._torch_thread = self._torch_pool.submit(threading.current_thread).result()
        self.progress = 0  # decode steps done since start
        self.last_progress = time.time()
        self.busy = False
        self.released: set[str] = set()
        self._shapes: dict[str, tuple[torch.Size, torch.dtype]] = {}
        self._backup: dict[str, torch.Tensor] = {}
        self._abort_rids: set[str] = set()
        self._abort_epoch = 0
        self._abort_lock = threading.Lock()
        self.groups: dict[str, Any] = {}
        self._expert_slots = fused_expert_slots(self._state())  # per-expert checkpoint name -> fused slice
        self.allow_auto_truncate = bool(allow_auto_truncate)
        self.weight_session = False  # inside /begin_weight_update ... /end_weight_update
        self.health_generations = 0  # one-token health-check generations run (SGLang's /health does one)
        self.health_while_released = 0  # health checks that would have generated on released memory
        self.paused = False  # /pause_generation ... /continue_generation: new requests wait, running ones aborted
        self._pause_cond = threading.Condition()
        self.decode_sleep_s = float(os.environ.get("RFPO_EMBEDDED_DECODE_SLEEP_S", "0") or 0)
        self.enable_return_routed_experts = bool(enable_return_routed_experts)
        # decode steps through lean_decode.LeanDecoder (same arithmetic as HF's eager forward, without its
        # per-module overhead) where it covers the model; HF's forward otherwise and for routing capture
        why = unsupported_reason(self.model) if lean_decode else "disabled"
        self.lean_decode = why is None
        self.decode_path = "lean" if self.lean_decode else f"hf ({why})"
        self._route_sink: list | None = None  # per forward: {layer: [rows, k] int32} while routing is captured
        if self.enable_return_routed_experts:
            self._install_routing_hooks()

    def _install_routing_hooks(self) -> None:
        """Hook every MoE layer's top-k router (HF Qwen3MoeTopKRouter: outputs logits, scores, indices)."""
        layers = getattr(getattr(self.model, "model", None), "layers", None) or []
        cfg = self.model.config
        self.num_layers = int(getattr(cfg, "num_hidden_layers", len(layers)))
        self.topk = int(getattr(cfg, "num_experts_per_tok", 0) or 0)
        hooked = 0
        for i, layer in enumerate(layers):
            gate = getattr(getattr(layer, "mlp", None), "gate", None)
            if gate is None or not type(gate).__name__.endswith("TopKRouter"):
                continue  # a dense layer (mlp_only_layers / decoder_sparse_step)
            gate.register_forward_hook(lambda mod, args, out, i=i: self._capture(i, out))
            hooked += 1
        if not hooked or not self.topk:
            raise ValueError(
                f"--enable-return-routed-experts needs a mixture-of-experts model (e.g. Qwen3MoeForCausalLM); "
                f"{self.model_path} is {type(self.model).__name__} without top-k routers: drop the flag"
            )

    def _capture(self, layer: int, out) -> None:
        if self._route_sink is not None:
            self._route_sink[-1][layer] = out[2].detach().to(device="cpu", dtype=torch.int32)

    def _routing_step(self) -> None:
        if self._route_sink is not None:
            self._route_sink.append({})

    def _routing_rows(self, batch: int, seq: int) -> torch.Tensor:
        """The last forward's routing as [batch, seq, num_layers, k] int32 (dense layers 0)."""
        step = self._route_sink[-1]
        out = torch.zeros(batch, seq, self.num_layers, self.topk, dtype=torch.int32)
        for layer, idx in step.items():
            out[:, :, layer] = idx.reshape(batch, seq, self.topk)
        return out

    # ------------------------------------------------------------------ generation
    def _log(self, msg: str) -> None:
        print(f"[rfpo-embedded {time.strftime('%H:%M:%S')}] {msg}", file=sys.stdout, flush=True)

    def abort(self, rid: str | None = None, abort_all: bool = False) -> None:
        with self._abort_lock:
            if abort_all:
                self._abort_epoch += 1
            elif rid:
                self._abort_rids.add(rid)

    def pause_generation(self, mode: str = "abort") -> None:
        """SGLang's /pause_generation, mode "abort": running requests end now with finish_reason abort (their
        tokens so far are returned), new ones wait for continue_generation. Returns once no batch runs."""
        if mode != "abort":
            raise RequestError(f"pause_generation mode={mode!r} is not supported by the embedded engine (use 'abort')")
        with self._pause_cond:
            self.paused = True
            self.abort(abort_all=True)
        with self.lock:  # the running batch has seen the abort and returned
            pass

    def continue_generation(self) -> None:
        with self._pause_cond:
            self.paused = False
            self._pause_cond.notify_all()

    def generate(self, items: list[GenItem]) -> list[dict]:
        """Run all items (micro-batches of max_batch_size); one SGLang-style output dict per item."""
        for it in items:
            if not it.input_ids:
                raise RequestError(f"request {it.rid}: input_ids is empty")
            bad = [t for t in it.input_ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
            if bad:
                raise RequestError(f"request {it.rid}: token ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
            if len(it.input_ids) >= self.max_context:
                raise RequestError(f"The input ({len(it.input_ids)} tokens) is longer than the model's context "
                                   f"length ({self.max_context} tokens).")
            if it.return_routed_experts and not self.enable_return_routed_experts:
                raise RequestError(f"request {it.rid}: return_routed_experts needs the server started with "
                                   "--enable-return-routed-experts (and a mixture-of-experts model)")
            if it.return_routed_experts and not 0 <= it.routed_experts_start_len <= len(it.input_ids):
                raise RequestError(f"request {it.rid}: routed_experts_start_len={it.routed_experts_start_len} must "
                                   f"be in [0, {len(it.input_ids)}] (the number of input tokens)")
            total = len(it.input_ids) + it.max_new_tokens
            if total > self.max_context and not self.allow_auto_truncate:
                raise RequestError(f"Requested token count exceeds the model's maximum context length of "
                                   f"{self.max_context} tokens. You requested a total of {total} tokens: "
                                   f"{len(it.input_ids)} tokens from the input messages and {it.max_new_tokens} "
                                   f"tokens for the completion (request {it.rid}; start the server with "
                                   f"--allow-auto-truncate to clip max_new_tokens instead)")
        with self._pause_cond:  # paused: wait for /continue_generation (SGLang holds new requests the same way)
            while self.paused:
                self._pause_cond.wait(timeout=1.0)
            with self._abort_lock:  # abort_all also cancels requests still waiting for the lock
                epoch = self._abort_epoch
        return self._on_torch_thread(self._generate_locked, items, epoch)

    def _generate_locked(self, items: list[GenItem], epoch: int) -> list[dict]:
        with self.lock:
            if self.released:
                raise RequestError(f"memory {sorted(self.released)} is released (/release_memory_occupation); call "
                                   f"/resume_memory_occupation for every released tag (and push weights) first")
            self.busy = True
            try:
                out: list[dict] = []
                for s in range(0, len(items), self.max_batch_size):
                    out.extend(self._generate_batch(items[s:s + self.max_batch_size], epoch))
                return out
            finally:
                self.busy = False
                with self._abort_lock:
                    for it in items:
                        self._abort_rids.discard(it.rid)

    def _on_torch_thread(self, fn, *args):
        """Run fn(*args) on the engine's one torch thread and return its result (or raise its error).

        All model work (generation, weight copies, release / resume) runs on one long-lived thread, so the
        process has one OpenMP team: torch work spread over short-lived HTTP handler threads, each with its own
        team, ran 2x slower on a 2-core box once a second thread had done torch work. Waiting for a pause and
        validation stay on the caller's thread, so a paused generate never blocks a weight update."""
        if threading.current_thread() is self._torch_thread:
            return fn(*args)
        return self._torch_pool.submit(fn, *args).result()

    def _aborted(self, rid: str, epoch: int) -> bool:
        with self._abort_lock:
            return self._abort_epoch != epoch or rid in self._abort_rids

    @torch.no_grad()
    def _generate_batch(self, items: list[GenItem], epoch: int) -> list[dict]:
        from transformers import DynamicCache

        t0 = time.time()
        B = len(items)
        lens = [len(it.input_ids) for it in items]
        T = max(lens)
        # prefill each distinct prompt once (the n samples of a prompt share it), then fan out the rows
        uniq: dict[tuple[int, ...], int] = {}
        fan = torch.tensor([uniq.setdefault(tuple(it.input_ids), len(uniq)) for it in items])
        ids = torch.full((len(uniq), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(uniq), T), dtype=torch.long)
        for prompt, u in uniq.items():  # left padding: the last column is every prompt's last token
            ids[u, T - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[u, T - len(prompt):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        temps = torch.tensor([1.0 if it.temperature < GREEDY_EPS else it.temperature for it in items], dtype=torch.float32)
        top_ks = torch.tensor([1 if it.temperature < GREEDY_EPS else (it.top_k if it.top_k > 0 else self.vocab_size) for it in items])
        top_ps = torch.tensor([it.top_p for it in items], dtype=torch.float32)
        min_ps = torch.tensor([it.min_p for it in items], dtype=torch.float32)
        stops = [set(it.stop_token_ids) | (set() if it.ignore_eos else set(self.eos_ids)) for it in items]
        limits = [min(it.max_new_tokens, self.max_context - lens[b]) for b, it in enumerate(items)]
        # one uniform per (sample, decode step), drawn up front from the sample's own generator: a seeded
        # sample does not depend on the batch it runs in, and sampling is one vectorised inverse-CDF per step
        uniforms = torch.zeros(B, max([1, *limits]), dtype=torch.float64)
        for b, it in enumerate(items):
            g = torch.Generator()
            g.manual_seed(it.seed if it.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
            if limits[b] > 0:
                uniforms[b, :limits[b]] = torch.rand(limits[b], generator=g, dtype=torch.float64)
        plain = all(float(top_ps[b]) >= 1.0 and int(top_ks[b]) >= self.vocab_size and float(min_ps[b]) <= 0.0
                    for b in range(B))  # no filtering anywhere in the batch: no sort needed
        out_ids: list[list[int]] = [[] for _ in items]
        out_lp: list[list[float]] = [[] for _ in items]
        finish: list[dict | None] = [None] * B
        for b in range(B):
            if limits[b] <= 0:
                finish[b] = {"type": "length", "length": 0}

        want_routes = self.enable_return_routed_experts and any(it.return_routed_experts for it in items)
        routes: list[list[torch.Tensor]] = [[] for _ in items]  # per item: [n, layers, k] pieces by position
        self._route_sink = [] if want_routes else None
        cache = DynamicCache()
        steps, last_log = 0, time.time()
        rows = torch.arange(B)  # row k of the model inputs and of the KV cache is items[rows[k]]
        logits = None
        if any(f is None for f in finish) or want_routes:
            self._routing_step()
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                position_ids=pos.to(self.device), past_key_values=cache, use_cache=True,
                                logits_to_keep=1).logits[:, -1, :]
            if want_routes:
                pre = self._routing_rows(len(uniq), T)
                for b, it in enumerate(items):
                    routes[b].append(pre[int(fan[b]), T - lens[b]:])
            if len(uniq) < B or not torch.equal(fan, torch.arange(B)):
                cache.batch_select_indices(fan.to(self.device))
                logits, mask, pos = logits[fan.to(logits.device)], mask[fan], pos[fan]
        lean = None
        if self.lean_decode and not want_routes and logits is not None:
            lean = LeanDecoder(self.model, cache, mask.to(self.device), capacity=T + max([1, *limits]))
            cache = None
        while logits is not None:
            row_list = rows.tolist()
            for b in row_list:
                if finish[b] is None and self._aborted(items[b].rid, epoch):
                    finish[b] = {"type": "abort", "message": "Abort in waiting queue" if not out_ids[b] else "Abort request",
                                 "status_code": 400}
            keep = [k for k, b in enumerate(row_list) if finish[b] is None]
            if not keep:
                break
            # drop finished samples from the batch and the KV cache once they are a quarter of it (compacting
            # copies the whole cache; until then their rows decode along and are ignored)
            if len(rows) - len(keep) >= max(1, len(rows) // 4):
                kt = torch.tensor(keep)
                if lean is not None:
                    lean.select(kt.to(self.device))
                else:
                    cache.batch_select_indices(kt.to(self.device))
                logits, mask, pos, rows = logits[kt.to(logits.device)], mask[kt], pos[kt], rows[kt]
                row_list = rows.tolist()
            tok, lp = self._sample(logits.float().cpu(), temps[rows], top_ks[rows], top_ps[rows], min_ps[rows],
                                   uniforms[rows, steps], plain=plain)
            for b, t, v in zip(row_list, tok.tolist(), lp.tolist()):
                if finish[b] is not None:
                    continue  # finished, still in the batch until the next compaction
                out_ids[b].append(t)
                out_lp[b].append(v)
                if t in stops[b]:
                    finish[b] = {"type": "stop", "matched": t}
                elif len(out_ids[b]) >= limits[b]:
                    finish[b] = {"type": "length", "length": len(out_ids[b])}
            steps += 1
            self.progress += 1
            if self.decode_sleep_s:
                time.sleep(self.decode_sleep_s)
            self.last_progress = time.time()
            if self.last_progress - last_log >= self.log_every_s:
                last_log = self.last_progress
                self._log(f"decode batch={B} step={steps} running={sum(f is None for f in finish)}")
            if all(finish[b] is not None for b in row_list):
                break
            pos = pos[:, -1:] + 1
            if lean is not None:  # the lean cache keeps its own validity mask
                logits = lean.step(tok.to(self.device), pos[:, 0].to(self.device))
                continue
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=torch.long)], dim=1)
            self._routing_step()
            logits = self.model(input_ids=tok[:, None].to(self.device), attention_mask=mask.to(self.device),
                                position_ids=pos.to(self.device), past_key_values=cache, use_cache=True).logits[:, -1, :]
            if want_routes:
                dec = self._routing_rows(len(rows), 1)
                for k, b in enumerate(row_list):
                    if finish[b] is None:  # a finished sample's last token is not part of its sequence
                        routes[b].append(dec[k])
                self._route_sink = [self._route_sink[-1]]
        self._route_sink = None
        dt = time.time() - t0
        results = []
        for b, it in enumerate(items):
            meta = {
                "id": it.rid,
                "finish_reason": finish[b],
                "prompt_tokens": lens[b],
                "completion_tokens": len(out_ids[b]),
                "cached_tokens": 0,
                "weight_version": self.weight_version,
                "e2e_latency": dt,
            }
            if it.return_logprob:
                meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(out_lp[b], out_ids[b])]
            if it.return_routed_experts:
                seq = torch.cat(routes[b]) if routes[b] else torch.zeros(0, self.num_layers, self.topk, dtype=torch.int32)
                seq = seq[: max(0, lens[b] + len(out_ids[b]) - 1)][it.routed_experts_start_len:]
                meta["routed_experts"] = encode_routed_experts(seq)
            results.append({"output_ids": out_ids[b], "meta_info": meta})
        self._log(f"generated batch={B} new_tokens={sum(map(len, out_ids))} in {dt:.2f}s")
        return results

    def _sample(self, logits: torch.Tensor, temps, top_ks, top_ps, min_ps, u: torch.Tensor, plain: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [b, V] fp32, per-row params [b] and uniforms u [b] in [0, 1) -> (sampled token [b], reported
        log-prob [b]). Inverse-CDF sampling from the kept mass (exactly the renormalised filtered distribution):
        the first token whose cumulative kept probability exceeds u * (kept mass). `plain` (no top-p / top-k /
        min-p in any row) skips the sort; greedy rows (top_k = 1) keep only the most likely token."""
        scaled = logits / temps[:, None]
        logp = torch.log_softmax(scaled, dim=-1)
        report = torch.log_softmax(logits, dim=-1) if self.return_original_logprob else logp
        probs = logp.exp().double()
        greedy = top_ks == 1
        if plain and not bool(greedy.any()):
            cum = probs.cumsum(dim=-1)
            tok = torch.searchsorted(cum, (u * cum[:, -1])[:, None], right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)
        else:
            p_sort, idx = probs.sort(dim=-1, descending=True)
            cum = p_sort.cumsum(dim=-1)
            ranks = torch.arange(p_sort.shape[-1])[None, :]
            keep = (((cum - p_sort) <= top_ps[:, None].double()) & (ranks < top_ks[:, None])
                    & (p_sort >= p_sort[:, :1] * min_ps[:, None].double()))
            keep[:, 0] = True
            kept = torch.where(keep, p_sort, torch.zeros_like(p_sort)).cumsum(dim=-1)
            j = torch.searchsorted(kept, (u * kept[:, -1])[:, None], right=True)[:, 0].clamp_(max=p_sort.shape[-1] - 1)
            j = torch.where(greedy, torch.zeros_like(j), j)
            tok = idx.gather(1, j[:, None])[:, 0]
        lp = report.gather(1, tok[:, None])[:, 0]
        return tok, lp

    # ------------------------------------------------------------------ weights
    def _state(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict(keep_vars=True)

    def load_named_tensors(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy HF-named tensors into the model (all validated before any is copied). Returns the count.

        Names are the model's own state names or, for fused MoE experts, the checkpoint's per-expert names
        (``...mlp.experts.e.gate_proj.weight`` [I, H] etc., see hf_experts.py), written into their slice."""
        named = list(named)
        if not named:
            raise RequestError("no tensors in the weight update")
        if "weights" in self.released:
            raise RequestError("weights are released; call /resume_memory_occupation before updating them")
        state = self._state()
        unknown = [n for n, _ in named if n not in state and n not in self._expert_slots]
        if unknown:
            raise RequestError(f"unknown weight names {unknown[:5]}{'...' if len(unknown) > 5 else ''} "
                               f"(expected HF names such as {next(iter(state))!r})")

        def target(n: str) -> torch.Tensor:
            return state[n] if n in state else slot_view(state, self._expert_slots[n])

        bad = [(n, tuple(t.shape), tuple(target(n).shape)) for n, t in named if tuple(t.shape) != tuple(target(n).shape)]
        if bad:
            raise RequestError(f"shape mismatch (name, got, expected): {bad[:5]}")
        def copy() -> int:
            with self.lock:
                if "weights" in self.released:
                    raise RequestError("weights are released; call /resume_memory_occupation before updating them")
                threads = torch.get_num_threads()
                torch.set_num_threads(1)  # memcpy-bound; a 2-thread team stalls while the trainer still holds a core
                try:
                    with torch.no_grad():
                        for n, t in named:
                            dst = target(n)
                            dst.copy_(t.to(device=dst.device, dtype=dst.dtype))
                finally:
                    torch.set_num_threads(threads)
            return len(named)
        return self._on_torch_thread(copy)

    def update_weights_from_disk(self, model_path: str) -> int:
        from safetensors.torch import load_file

        p = Path(model_path)
        files = [p] if p.is_file() else sorted(p.glob("*.safetensors")) if p.is_dir() else []
        if not files:
            raise RequestError(f"model_path '{model_path}' has no *.safetensors files")
        named: list[tuple[str, torch.Tensor]] = []
        for f in files:
            named.extend(load_file(str(f)).items())
        return self.load_named_tensors([(n, t) for n, t in named if not n.endswith("rotary_emb.inv_freq")])

    def _require_session(self, what: str) -> None:
        if not self.weight_session:
            raise RequestError(f"{what} must run between begin_weight_update() and end_weight_update()")

    def begin_weight_update(self) -> None:
        if self.weight_session:
            raise RequestError("a weight-update session is already open; call end_weight_update() first")
        self.weight_session = True

    def end_weight_update(self) -> None:
        if not self.weight_session:
            raise RequestError("no weight-update session is open; call begin_weight_update() first")
        self.weight_session = False

    def flush_cache(self) -> None:
        """SGLang flushes only a fully idle server; otherwise the call fails (HTTP 400)."""
        if self.busy:
            raise RequestError("Flush cache failed: requests are running (retry when the server is idle)")

    def update_weights_from_tensor(self, serialized: list[str], load_format: str | None) -> int:
        self._require_session("update_weights_from_tensor")
        if load_format not in (W.SAFETENSORS_B64, W.SAFETENSORS_SHM):
            raise RequestError(
                f"load_format={load_format!r}: the embedded engine takes load_format='{W.SAFETENSORS_B64}' "
                f"(base64 safetensors bytes) or '{W.SAFETENSORS_SHM}' (a shared-memory file on this host); pickled "
                "SGLang payloads are refused. EngineClient picks one automatically"
            )
        if not isinstance(serialized, list) or not serialized:
            raise RequestError("serialized_named_tensors must be a non-empty list of strings")
        try:  # one entry per TP rank; tp=1 here
            named = (W.decode_safetensors_b64(serialized[0]) if load_format == W.SAFETENSORS_B64
                     else W.read_safetensors_shm(serialized[0]))
        except ValueError as e:
            raise RequestError(str(e)) from None
        return self.load_named_tensors(named)

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, group_name: str, backend: str) -> None:
        if backend == "nccl" and not torch.cuda.is_available():
            raise RequestError("backend='nccl' needs CUDA; the embedded CPU engine joins with backend='gloo'")
        if group_name in self.groups:
            raise RequestError(f"weight update group '{group_name}' already exists")
        self.groups[group_name] = W.init_weights_update_group(master_address, master_port, rank_offset,
                                                              world_size, group_name, backend)

    def update_weights_from_distributed(self, names, dtypes, shapes, group_name: str) -> int:
        self._require_session("update_weights_from_distributed")
        if group_name not in self.groups:
            raise RequestError(f"no weight update group '{group_name}': call /init_weights_update_group first")
        try:
            named = W.receive_named_tensors(self.groups[group_name], names, dtypes, shapes)
        except ValueError as e:
            raise RequestError(str(e)) from None
        return self.load_named_tensors(named)

    def destroy_weights_update_group(self, group_name: str) -> None:
        if group_name not in self.groups:
            raise RequestError(f"no weight update group '{group_name}'")
        W.destroy_group(self.groups.pop(group_name))

    # ------------------------------------------------------------------ memory
    def release_memory(self, tags: list[str] | None) -> None:
        """Free the weights ("weights" tag; content lost unless weights_cpu_backup). KV cache is per call;
        no tags = all of MEMORY_TAGS. Like SGLang, only an idle server releases (else HTTP 400)."""
        tags = list(MEMORY_TAGS) if not tags else list(tags)
        if self.busy:
            raise RequestError("release_memory_occupation needs an idle server: requests are still running")
        self._on_torch_thread(self._release_locked, tags)
        self._log(f"released memory {tags}")

    def _release_locked(self, tags: list[str]) -> None:
        with self.lock:
            if "weights" in tags and "weights" not in self.released:
                for n, p in self.model.named_parameters():
                    self._shapes[n] = (p.shape, p.dtype)
                    if self.weights_cpu_backup:
                        self._backup[n] = p.detach().clone()
                    p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            self.released.update(tags)

    def resume_memory(self, tags: list[str] | None) -> None:
        tags = list(MEMORY_TAGS) if not tags else list(tags)
        self._on_torch_thread(self._resume_locked, tags)
        self._log(f"resumed memory {tags}")

    def _resume_locked(self, tags: list[str]) -> None:
        with self.lock:
            if "weights" in tags and "weights" in self.released:
                for n, p in self.model.named_parameters():
                    shape, dt = self._shapes[n]
                    p.data = self._backup.pop(n) if n in self._backup else torch.zeros(shape, dtype=dt, device=p.device)
            self.released.difference_update(tags)


def new_rid() -> str:
    return uuid.uuid4().hex
