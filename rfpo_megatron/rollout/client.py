"""EngineClient: the one HTTP client the trainer uses for SGLang servers and the embedded server alike.

Generation goes to one entry URL (a single server or the sglang_router). n is expanded by the client:
one item per sample, each with its own `sampling_seed` and rid. To a server the items travel as
/generate batches (lists of input_ids / sampling_params / rid); through sglang_router, which takes one
sampling_params dict and one string rid per request (router 0.3.x answers 422 to lists), as one request
per item. Control calls (weight updates, flush, release/resume, abort) go to every worker. The payload
of /update_weights_from_tensor is SGLang's pickled MultiprocessingSerializer format for SGLang servers
(encoded separately for every server and TP rank) and base64 safetensors (load_format
"rfpo_safetensors_b64") for the embedded engine — picked from /get_server_info ("engine": "rfpo-embedded").

SGLang versions (`protocol_version`: the server's version, or the SGLang version the embedded server
imitates): >= 0.5.21 accepts weight updates only inside /begin_weight_update ... /end_weight_update
(`weight_update_session`); >= 0.5.5 releases the CUDA-graph memory too on a tag-less
/release_memory_occupation (`memory_tags`).

Robustness: every request has a timeout; connection errors are retried with exponential backoff;
while /generate is in flight a watchdog checks the managed server processes: a dead process, or no
new log output for `watchdog_s` seconds, raises at once with the server address and its log tail.
"""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import json
import os
import threading
import time
import uuid
from typing import Any, Iterable

import requests
import torch

from rfpo_megatron.aio import run_blocking

from . import weights as W
from .base import (EngineConnectionError, EngineError, EngineRequestError, EngineTimeoutError, GenerateResult,
                   SamplingParams, decode_routed_experts, derive_seed, parse_finish_reason)
from .procs import ManagedProcess

EMBEDDED_ENGINE = "rfpo-embedded"
MIN_SGLANG = (0, 5, 4)
WEIGHT_SESSION_SINCE = (0, 5, 21)  # /begin_weight_update ... /end_weight_update required around updates
CUDA_GRAPH_TAG_SINCE = (0, 5, 5)   # release_memory_occupation without tags also releases "cuda_graph"


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in str(v).split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


class EngineClient:
    """Client of one rollout deployment: `url` serves /generate, `worker_urls` take control calls.

    processes: the ManagedProcess objects behind these URLs (servers and router) when this process
    launched them; they are watched during /generate and stopped by shutdown(). tp_size: tensor
    parallel size of each worker (ranks in the weight-update group, copies of the tensor payload).
    """

    def __init__(self, url: str | None, worker_urls: list[str] | None = None, processes: Iterable[ManagedProcess] = (),
                 *, tp_size: int = 1, request_timeout_s: float = 3600.0, control_timeout_s: float = 600.0,
                 connect_timeout_s: float = 10.0, retries: int = 4, backoff_s: float = 0.5,
                 watchdog_s: float = 300.0, max_items_per_request: int = 64, max_concurrency: int = 16,
                 router: bool | None = None, routed_experts_shape: tuple[int, int] | None = None,
                 same_host: bool | None = None):
        if not url and not worker_urls:
            raise ValueError("EngineClient needs a url or worker_urls")
        self.worker_urls = [u.rstrip("/") for u in (worker_urls or [url])]
        # url=None: no router; /generate chunks are spread round-robin over the workers
        self.url = url.rstrip("/") if url else None
        self.generate_urls = [self.url] if self.url else list(self.worker_urls)
        # router: /generate goes through sglang_router (one item per request); default: url is not a worker
        self.via_router = bool(self.url and self.url not in self.worker_urls) if router is None else bool(router)
        self.processes = list(processes)
        self.tp_size = int(tp_size)
        self.request_timeout_s = float(request_timeout_s)
        self.control_timeout_s = float(control_timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.watchdog_s = float(watchdog_s)
        self.max_items_per_request = int(max_items_per_request)
        self.max_concurrency = int(max_concurrency)
        self._kind: str | None = None
        self._version: tuple[int, ...] | None = None
        self._session = requests.Session()
        # like the aiohttp session of /generate (trust_env=False): no proxy / netrc lookups from the environment
        # for the servers' control calls (an HTTP proxy in front of in-cluster servers is a misconfiguration)
        self._session.trust_env = False
        # (num_hidden_layers, num_experts_per_tok): request MoE routing (SGLang return_routed_experts) and decode
        # it into GenerateResult.routed_experts; the servers need --enable-return-routed-experts
        self.routed_experts_shape = tuple(int(x) for x in routed_experts_shape) if routed_experts_shape else None
        # same_host: the servers share this machine's memory (default: this client launched them), so an
        # embedded server takes weight buckets as a shared-memory file (weights.SAFETENSORS_SHM) instead of base64
        self.same_host = bool(self.processes) if same_host is None else bool(same_host)
        self._shm_path: str | None = None

    def spec(self) -> dict[str, Any]:
        """What another process needs to talk to the same deployment (`from_spec`): URLs, TP size, router."""
        return {"url": self.url, "worker_urls": list(self.worker_urls), "tp_size": self.tp_size,
                "router": self.via_router, "request_timeout_s": self.request_timeout_s,
                "control_timeout_s": self.control_timeout_s, "routed_experts_shape": self.routed_experts_shape}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "EngineClient":
        """A client of the servers described by `spec()` that does not own them (never shuts them down)."""
        spec = dict(spec)
        return cls(spec.pop("url"), spec.pop("worker_urls"), **spec)

    # ------------------------------------------------------------------ plumbing
    def _proc_for(self, url: str) -> ManagedProcess | None:
        for p in self.processes:
            if p.url and p.url.rstrip("/") == url:
                return p
        return None

    def _dead_error(self, url: str, path: str) -> EngineConnectionError | None:
        """If a managed process behind `url` (or any managed process) died, an error describing it."""
        procs = [p for p in self.processes if not p.alive()]
        if not procs:
            return None
        p = self._proc_for(url) if self._proc_for(url) in procs else procs[0]
        return EngineConnectionError(
            f"rollout server {p.url or url} died during {path} ({p.describe()}). Check its log for a crash, "
            f"an out-of-memory kill or a bad model path; last log lines:\n{p.log_tail()}"
        )

    def _unreachable(self, url: str, path: str, err: BaseException, attempts: int) -> EngineConnectionError:
        p = self._proc_for(url)
        hint = f"; server log {p.log_path}:\n{p.log_tail()}" if p is not None else ""
        return EngineConnectionError(
            f"rollout server {url} unreachable for {path} after {attempts} attempt(s) ({type(err).__name__}: {err}). "
            f"Check that the server is running and listening there (curl {url}/health_generate), the host/port in "
            f"the rollout config, and the server log{hint}"
        )

    def _http(self, method: str, url: str, path: str, payload: Any = None, timeout: float | None = None,
              ok_codes=(200,)) -> requests.Response:
        """Blocking request with retries on connection errors; raises EngineRequestError on HTTP errors."""
        timeout = self.control_timeout_s if timeout is None else timeout
        last: BaseException | None = None
        for attempt in range(self.retries + 1):
            dead = self._dead_error(url, path)
            if dead is not None:
                raise dead
            try:
                r = self._session.request(method, url + path, json=payload, timeout=(self.connect_timeout_s, timeout))
            except requests.ConnectionError as e:  # refused, reset, or connect timeout: retry with backoff
                last = e
                time.sleep(self.backoff_s * (2 ** attempt))
                continue
            except requests.Timeout as e:  # read timeout: the server took the request but did not answer
                p = self._proc_for(url)
                tail = f"; last log lines of {p.log_path}:\n{p.log_tail()}" if p is not None else ""
                raise EngineTimeoutError(
                    f"rollout server {url}{path} gave no answer within {timeout:.0f}s; check the server log "
                    f"for a hang, or raise rollout.control_timeout_s{tail}"
                ) from e
            if r.status_code not in ok_codes:
                raise EngineRequestError(f"rollout server {url}{path} answered HTTP {r.status_code}: {_message(r.text)}",
                                         status=r.status_code, body=r.text)
            return r
        raise self._dead_error(url, path) or self._unreachable(url, path, last, self.retries + 1)

    def _all_workers(self, method: str, path: str, payloads: list[Any] | Any, timeout: float | None = None) -> list[Any]:
        """Send to every worker concurrently (weight sync must reach all of them together)."""
        if not isinstance(payloads, list):
            payloads = [payloads] * len(self.worker_urls)
        if len(self.worker_urls) == 1:
            return [self._json(self._http(method, self.worker_urls[0], path, payloads[0], timeout))]
        with concurrent.futures.ThreadPoolExecutor(len(self.worker_urls)) as ex:
            futs = [ex.submit(self._http, method, u, path, p, timeout) for u, p in zip(self.worker_urls, payloads)]
            return [self._json(f.result()) for f in futs]

    @staticmethod
    def _json(r: requests.Response) -> Any:
        try:
            return r.json()
        except ValueError:
            return r.text

    # ------------------------------------------------------------------ info
    def server_info(self, url: str | None = None) -> dict:
        return self._http("GET", (url or self.worker_urls[0]).rstrip("/"), "/get_server_info").json()

    @property
    def kind(self) -> str:
        """"embedded" or "sglang" (from /get_server_info of the first worker, checked once)."""
        if self._kind is None:
            info = self.server_info()
            if info.get("engine") == EMBEDDED_ENGINE:
                self._kind = "embedded"
                self._version = _version_tuple(info.get("sglang_compat") or "0.5.23")
            else:
                self.check_sglang_version(info.get("version"))
                self._kind = "sglang"
                self._version = _version_tuple(info.get("version"))
        return self._kind

    @property
    def protocol_version(self) -> tuple[int, ...]:
        """SGLang version whose HTTP behaviour the servers have (the embedded server reports the one it imitates)."""
        _ = self.kind
        return self._version or ()

    def check_sglang_version(self, version: str | None) -> None:
        v = _version_tuple(version or "")
        if not v or v[:3] < MIN_SGLANG:
            want = ".".join(map(str, MIN_SGLANG))
            raise EngineError(
                f"rollout server {self.worker_urls[0]} runs SGLang {version or 'of unknown version'}; rfpo_megatron "
                f"speaks SGLang >= {want} (pip install 'sglang[all]>={want}')"
            )

    def health(self) -> bool:
        """True when every worker answers /health_generate with 200."""
        for u in self.worker_urls:
            try:
                r = self._session.get(u + "/health_generate", timeout=(self.connect_timeout_s, 60))
            except requests.RequestException:
                return False
            if r.status_code != 200:
                return False
        return True

    # ------------------------------------------------------------------ generate
    def build_generate_payloads(self, prompts: list[list[int]], params: SamplingParams,
                                rid_prefix: str | None = None) -> list[tuple[dict, list[tuple[int, int]]]]:
        """The /generate bodies for prompts x n samples: [(payload, [(prompt i, sample j) per item])].

        To a server: batches of up to max_items_per_request items (lists). Through the router: one body
        per item with a single input_ids list, one sampling_params dict and a string rid."""
        params.validate()
        if not prompts:
            return []
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty: every prompt needs at least one token id")
        prefix = rid_prefix or uuid.uuid4().hex[:12]
        index = [(i, j) for i in range(len(prompts)) for j in range(int(params.n))]

        def seed(i: int, j: int) -> int | None:
            return None if params.seed is None else derive_seed(params.seed, i, j)

        extra = {"return_routed_experts": True} if self.routed_experts_shape else {}
        if self.via_router:
            return [({"input_ids": [int(t) for t in prompts[i]], "sampling_params": params.to_sglang(seed(i, j)),
                      "rid": f"{prefix}-{i}-{j}", "return_logprob": True, "logprob_start_len": -1, **extra}, [(i, j)])
                    for i, j in index]
        out = []
        for s in range(0, len(index), self.max_items_per_request):
            chunk = index[s:s + self.max_items_per_request]
            payload = {
                "input_ids": [[int(t) for t in prompts[i]] for i, _ in chunk],
                "sampling_params": [params.to_sglang(seed(i, j)) for i, j in chunk],
                "rid": [f"{prefix}-{i}-{j}" for i, j in chunk],
                "return_logprob": True,
                "logprob_start_len": -1,
                **extra,
            }
            out.append((payload, chunk))
        return out

    def generate(self, prompts: list[list[int]], params: SamplingParams, rid_prefix: str | None = None
                 ) -> list[list[GenerateResult]]:
        """Blocking wrapper of agenerate (usable with or without a running event loop; the loop runs on a worker
        thread, so a SIGTERM handler's exception reaches the caller, rfpo_megatron/aio.py)."""
        return run_blocking(self.agenerate(prompts, params, rid_prefix), name="engine-generate")

    async def agenerate(self, prompts: list[list[int]], params: SamplingParams, rid_prefix: str | None = None
                        ) -> list[list[GenerateResult]]:
        """n samples for each prompt: out[i][j] = sample j of prompt i (ids, log-probs, finish reason)."""
        import aiohttp

        bodies = self.build_generate_payloads(prompts, params, rid_prefix)
        results: list[list[GenerateResult | None]] = [[None] * int(params.n) for _ in prompts]
        if not bodies:
            return results  # type: ignore[return-value]
        gen_urls = self.generate_urls
        timeout = aiohttp.ClientTimeout(total=self.request_timeout_s, sock_connect=self.connect_timeout_s)
        sem = asyncio.Semaphore(self.max_concurrency)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            tasks = [asyncio.ensure_future(self._post_generate(session, sem, gen_urls[k % len(gen_urls)], body))
                     for k, (body, _) in enumerate(bodies)]
            gathered = asyncio.ensure_future(asyncio.gather(*tasks))
            watchdog = asyncio.ensure_future(self._watchdog("/generate"))
            try:
                await asyncio.wait({gathered, watchdog}, return_when=asyncio.FIRST_COMPLETED)
                if watchdog.done():
                    watchdog.result()  # raises the watchdog's error
                outs = gathered.result()
            finally:
                watchdog.cancel()
                for t in tasks:
                    t.cancel()
                gathered.cancel()
                await asyncio.gather(gathered, watchdog, return_exceptions=True)
        for (body, chunk), out in zip(bodies, outs):
            if isinstance(out, dict):
                out = [out]
            if not isinstance(out, list) or len(out) != len(chunk):
                raise EngineError(f"rollout server {self.generate_urls[0]}/generate returned {type(out).__name__} of "
                                  f"{len(out) if isinstance(out, list) else '?'} items for {len(chunk)} requested")
            for (i, j), item in zip(chunk, out):
                results[i][j] = parse_generate_item(item, self.generate_urls[0], self.routed_experts_shape)
        return results  # type: ignore[return-value]

    async def _post_generate(self, session, sem: asyncio.Semaphore, url: str, body: dict) -> Any:
        import aiohttp

        last: BaseException | None = None
        async with sem:
            for attempt in range(self.retries + 1):
                dead = self._dead_error(url, "/generate")
                if dead is not None:
                    raise dead
                try:
                    async with session.post(url + "/generate", json=body) as r:
                        text = await r.text()
                        if r.status != 200:
                            raise EngineRequestError(f"rollout server {url}/generate answered HTTP {r.status}: {_message(text)}",
                                                     status=r.status, body=text)
                        return json.loads(text)
                except asyncio.TimeoutError as e:
                    raise EngineTimeoutError(
                        f"rollout server {url}/generate gave no answer within {self.request_timeout_s:.0f}s; "
                        f"check the server log for a hang, or raise the rollout request timeout"
                    ) from e
                except aiohttp.ClientConnectionError as e:
                    last = e
                    await asyncio.sleep(self.backoff_s * (2 ** attempt))
                    dead = self._dead_error(url, "/generate")
                    if dead is not None:
                        raise dead from e
        raise self._unreachable(url, "/generate", last, self.retries + 1)

    def _progress_marker(self) -> Any:
        """What changes while servers make progress: their log sizes (launched here) or, for external
        embedded servers, their decode-step counters; None when nothing can be observed."""
        if self.processes:
            return sum(p.log_size() for p in self.processes)
        if self._kind == "embedded":
            try:
                return tuple(requests.get(u + "/get_server_info", timeout=min(10.0, self.watchdog_s)).json().get("progress")
                             for u in self.worker_urls)
            except (requests.RequestException, ValueError):
                return "unresponsive"  # stays equal while the server does not answer: no progress
        return None

    async def _watchdog(self, what: str) -> None:
        """Raise when a managed server dies, or the servers make no progress for watchdog_s."""
        loop = asyncio.get_running_loop()
        last_marker, last_change = None, time.time()
        while True:
            await asyncio.sleep(0.25 if self.processes else 1.0)
            dead = self._dead_error(self.generate_urls[0], what)
            if dead is not None:
                raise dead
            marker = await loop.run_in_executor(None, self._progress_marker)
            now = time.time()
            if marker is None or marker != last_marker:
                last_marker, last_change = marker, now
            elif now - last_change > self.watchdog_s:
                if self.processes:
                    tails = "\n".join(f"--- {p.describe()}\n{p.log_tail(20)}" for p in self.processes)
                    detail = f"(no new log output). Check for a hang or a too-large batch; last log lines:\n{tails}"
                else:
                    detail = "(decode-step counter unchanged). Check the server's log for a hang or a too-large batch"
                raise EngineTimeoutError(
                    f"rollout server {self.generate_urls[0]} made no progress for {self.watchdog_s:.0f}s during {what} {detail}"
                )

    def abort(self, rid: str | None = None) -> None:
        """Abort one request by rid, or every running request (rid=None)."""
        body = {"rid": rid or "", "abort_all": rid is None}
        self._all_workers("POST", "/abort_request", body)

    def pause_generation(self, mode: str = "abort") -> None:
        """SGLang /pause_generation on every worker: mode "abort" ends the running requests now (each returns its
        tokens so far, finish_reason abort) and holds new ones; returns once nothing runs (partial rollout)."""
        self._all_workers("POST", "/pause_generation", {"mode": mode})

    def continue_generation(self) -> None:
        """SGLang /continue_generation on every worker: held requests start."""
        self._all_workers("POST", "/continue_generation", {})

    # ------------------------------------------------------------------ weights
    def update_weights_from_tensors(self, named_tensors: Iterable[tuple[str, torch.Tensor]], flush_cache: bool = True,
                                    weight_version: str | None = None) -> None:
        """Push HF-named tensors (a bucket or all of them) to every worker."""
        self._all_workers("POST", "/update_weights_from_tensor",
                          self.tensor_payloads(named_tensors, flush_cache, weight_version))

    def tensor_payloads(self, named_tensors: Iterable[tuple[str, torch.Tensor]], flush_cache: bool = True,
                        weight_version: str | None = None, kind: str | None = None) -> list[dict]:
        """The /update_weights_from_tensor body for each worker. SGLang: a separate ForkingPickler dump for
        every server and every TP rank of it (shared handles are opened once); embedded: one base64
        safetensors copy (by value) that serves every worker."""
        named = list(named_tensors)
        extra: dict[str, Any] = {"flush_cache": bool(flush_cache)}
        if weight_version is not None:
            extra["weight_version"] = str(weight_version)
        if (kind or self.kind) == "embedded":
            if self.same_host:
                if self._shm_path is None:
                    self._shm_path = os.path.join(W.shm_dir(), f"{W.SHM_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:8]}")
                    atexit.register(_remove_quietly, self._shm_path)
                ser, fmt = W.write_safetensors_shm(named, self._shm_path), W.SAFETENSORS_SHM
            else:
                ser, fmt = W.encode_safetensors_b64(named), W.SAFETENSORS_B64
            body = {"serialized_named_tensors": [ser], "load_format": fmt, **extra}
            return [body] * len(self.worker_urls)
        return [{"serialized_named_tensors": W.encode_sglang_named_tensors(named, self.tp_size), "load_format": None,
                 **extra} for _ in self.worker_urls]

    @property
    def needs_weight_session(self) -> bool:
        """True when the servers accept weight updates only inside begin/end_weight_update (SGLang >= 0.5.21)."""
        return self.protocol_version >= WEIGHT_SESSION_SINCE

    def begin_weight_update(self) -> None:
        self._all_workers("POST", "/begin_weight_update", {"selector": "all"})

    def end_weight_update(self) -> None:
        self._all_workers("POST", "/end_weight_update", {})

    @contextlib.contextmanager
    def weight_update_session(self):
        """Open SGLang's weight-update session on every worker around a group of updates (a no-op before
        0.5.21). The session is closed even when an update fails, so the servers can serve again."""
        if not self.needs_weight_session:
            yield
            return
        self.begin_weight_update()
        try:
            yield
        except BaseException:
            try:
                self.end_weight_update()
            except EngineError:
                pass  # the update's own error is the one to report
            raise
        self.end_weight_update()

    def update_weights_from_disk(self, path: str, load_format: str | None = None, weight_version: str | None = None) -> None:
        payload: dict[str, Any] = {"model_path": str(path), "load_format": load_format}
        if weight_version is not None:
            payload["weight_version"] = str(weight_version)
        self._retry_busy(lambda: self._all_workers("POST", "/update_weights_from_disk", payload))

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group", backend: str = "nccl") -> None:
        """Raw protocol call: worker k joins as ranks rank_offset + k*tp_size ... (blocks until all joined)."""
        payloads = [{"master_address": master_address, "master_port": int(master_port),
                     "rank_offset": int(rank_offset) + k * self.tp_size, "world_size": int(world_size),
                     "group_name": group_name, "backend": backend} for k in range(len(self.worker_urls))]
        self._all_workers("POST", "/init_weights_update_group", payloads)

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        group_name: str = "weight_update_group", flush_cache: bool = True,
                                        weight_version: str | None = None) -> None:
        """Raw protocol call: blocks until rank 0 has broadcast every listed tensor."""
        payload: dict[str, Any] = {"names": list(names), "dtypes": list(dtypes), "shapes": [list(map(int, s)) for s in shapes],
                                   "group_name": group_name, "flush_cache": bool(flush_cache)}
        if weight_version is not None:
            payload["weight_version"] = str(weight_version)
        self._all_workers("POST", "/update_weights_from_distributed", payload)

    def connect_weights_update_group(self, master_address: str, master_port: int, group_name: str = "weight_update_group",
                                     backend: str = "nccl", timeout_s: float = 600.0):
        """Trainer side: build the update group (trainer = rank 0, servers after it) and return it."""
        world = 1 + self.tp_size * len(self.worker_urls)
        done: list[Any] = []

        def join():
            try:
                done.append(W.init_weights_update_group(master_address, master_port, 0, world, group_name, backend,
                                                        timeout_s))
            except BaseException as e:  # noqa: BLE001 - re-raised below
                done.append(e)

        th = threading.Thread(target=join, daemon=True, name="weight-group-rendezvous")
        th.start()
        # the servers' answer comes once every rank has joined; a refusal (bad backend, group exists, ...) comes
        # at once and is raised here instead of leaving the trainer in the rendezvous until timeout_s
        self.init_weights_update_group(master_address, master_port, 1, world, group_name, backend)
        th.join(timeout_s)
        if not done:
            raise EngineTimeoutError(f"weight-update group {group_name} at {master_address}:{master_port}: the servers "
                                     f"answered but the trainer's rendezvous did not finish within {timeout_s:.0f}s")
        if isinstance(done[0], BaseException):
            raise done[0]
        return done[0]

    def push_weights_distributed(self, group, named_tensors: Iterable[tuple[str, torch.Tensor]],
                                 group_name: str = "weight_update_group", flush_cache: bool = True,
                                 weight_version: str | None = None) -> None:
        """Trainer side: announce one bucket over HTTP and broadcast its tensors over `group`."""
        named = [(n, t.detach().contiguous()) for n, t in named_tensors]
        err: list[BaseException] = []

        def call():
            try:
                self.update_weights_from_distributed([n for n, _ in named], [W.torch_dtype_name(t.dtype) for _, t in named],
                                                     [list(t.shape) for _, t in named], group_name, flush_cache, weight_version)
            except BaseException as e:  # noqa: BLE001
                err.append(e)

        th = threading.Thread(target=call, daemon=True, name="update-weights-from-distributed")
        th.start()
        # asynchronous broadcasts, polled: a server that refuses the call (HTTP 400 before it receives anything)
        # fails the sync at once with its message instead of leaving the broadcast waiting until the group timeout
        works = W.broadcast_named_tensors(group, named, async_op=True)
        deadline = time.time() + self.control_timeout_s
        while not all(w.is_completed() for w in works):
            if err or not th.is_alive():
                break
            if time.time() > deadline:
                raise EngineTimeoutError(f"weight broadcast to {self.worker_urls} did not finish within "
                                         f"{self.control_timeout_s:.0f}s (rollout.control_timeout_s)")
            time.sleep(0.002)
        th.join(max(0.0, deadline - time.time()))
        if err:
            raise EngineError(f"weight sync over the update group failed; the group '{group_name}' cannot be used "
                              f"again (restart the run): {err[0]}") from err[0]
        for w in works:
            w.wait()

    def destroy_weights_update_group(self, group=None, group_name: str = "weight_update_group") -> None:
        self._all_workers("POST", "/destroy_weights_update_group", {"group_name": group_name})
        if group is not None:
            W.destroy_group(group)

    # ------------------------------------------------------------------ memory / cache / lifecycle
    @staticmethod
    def _retry_busy(call, attempts: int = 20, wait_s: float = 0.5) -> Any:
        """Run call(); SGLang answers 400 to a cache flush (also the one after a disk update) while requests
        are still running, so that answer is retried (attempts x wait_s) before it is raised."""
        for k in range(attempts):
            try:
                return call()
            except EngineRequestError as e:
                if e.status != 400 or k == attempts - 1:
                    raise
                time.sleep(wait_s)

    def flush_cache(self, attempts: int = 20, wait_s: float = 0.5) -> None:
        """Flush every worker's prefix cache (retried while the servers are busy, see _retry_busy)."""
        self._retry_busy(lambda: self._all_workers("POST", "/flush_cache", None), attempts, wait_s)

    @property
    def memory_tags(self) -> list[str]:
        """What a tag-less /release_memory_occupation releases on these servers (resume them all afterwards)."""
        tags = ["weights", "kv_cache"]
        return tags + ["cuda_graph"] if self.protocol_version >= CUDA_GRAPH_TAG_SINCE else tags

    def release_memory(self, tags: list[str] | None = None) -> None:
        self._all_workers("POST", "/release_memory_occupation", {"tags": tags})

    def resume_memory(self, tags: list[str] | None = None) -> None:
        self._all_workers("POST", "/resume_memory_occupation", {"tags": tags})

    def shutdown(self) -> None:
        """Stop the servers this client launched (their process groups). Servers started elsewhere
        (external backend) are left running: they belong to whoever started them."""
        for p in reversed(self.processes):
            p.stop()
        self._session.close()
        if self._shm_path is not None:
            _remove_quietly(self._shm_path)

    def __enter__(self) -> "EngineClient":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def parse_generate_item(item: dict, url: str = "", routed_experts_shape: tuple[int, int] | None = None) -> GenerateResult:
    """One SGLang /generate output dict -> GenerateResult (ids and log-probs from output_token_logprobs).

    routed_experts_shape: (layers, top-k); decodes meta_info.routed_experts into GenerateResult.routed_experts
    ([prompt_tokens + completion_tokens - 1, layers, k] int32; missing or mis-sized is an EngineError)."""
    if not isinstance(item, dict) or "meta_info" not in item:
        raise EngineError(f"rollout server {url} returned an item without meta_info: {str(item)[:200]}")
    meta = dict(item["meta_info"])
    olp = meta.pop("output_token_logprobs", None)
    if olp is not None:
        ids = [int(x[1]) for x in olp]
        lps = [float(x[0]) for x in olp]
    else:
        ids = [int(t) for t in item.get("output_ids", [])]
        lps = []
    routed = None
    if routed_experts_shape:
        payload = meta.pop("routed_experts", None)
        if payload is None:
            raise EngineError(f"rollout server {url} returned no meta_info.routed_experts although the request set "
                              "return_routed_experts: start the SGLang servers with --enable-return-routed-experts "
                              "(rollout.return_routed_experts does it for launched servers) and serve a MoE model")
        rows = int(meta.get("prompt_tokens", 0)) + int(meta.get("completion_tokens", len(ids))) - 1
        try:
            routed = decode_routed_experts(payload, *routed_experts_shape, rows=max(rows, 0))
        except ValueError as e:
            raise EngineError(f"rollout server {url}: {e}") from None
    return GenerateResult(output_ids=ids, logprobs=lps, finish_reason=parse_finish_reason(meta.get("finish_reason")),
                          meta=meta, routed_experts=routed)


def _message(text: str) -> str:
    try:
        obj = json.loads(text)
        if isinstance(obj, dict):
            return str(obj.get("message") or obj.get("error") or obj)[:2000]
    except ValueError:
        pass
    return text[:2000]
