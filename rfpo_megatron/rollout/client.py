"""EngineClient: the one HTTP client the trainer uses for SGLang servers and the embedded server alike.

Generation goes to one entry URL (a single server or the sglang_router) as SGLang /generate batches
(n expanded by the client: one item per sample, each with its own `sampling_seed` and rid);
control calls (weight updates, flush, release/resume, abort) go to every worker. The payload of
/update_weights_from_tensor is SGLang's pickled MultiprocessingSerializer format for SGLang servers
and base64 safetensors (load_format "rfpo_safetensors_b64") for the embedded engine — picked from
/get_server_info ("engine": "rfpo-embedded").

Robustness: every request has a timeout; connection errors are retried with exponential backoff;
while /generate is in flight a watchdog checks the managed server processes: a dead process, or no
new log output for `watchdog_s` seconds, raises at once with the server address and its log tail.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
import uuid
from typing import Any, Iterable

import requests
import torch

from . import weights as W
from .base import (EngineConnectionError, EngineError, EngineRequestError, EngineTimeoutError, GenerateResult,
                   SamplingParams, derive_seed, parse_finish_reason)
from .procs import ManagedProcess

EMBEDDED_ENGINE = "rfpo-embedded"
MIN_SGLANG = (0, 5)


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
                 watchdog_s: float = 300.0, max_items_per_request: int = 64, max_concurrency: int = 16):
        if not url and not worker_urls:
            raise ValueError("EngineClient needs a url or worker_urls")
        self.worker_urls = [u.rstrip("/") for u in (worker_urls or [url])]
        # url=None: no router; /generate chunks are spread round-robin over the workers
        self.url = url.rstrip("/") if url else None
        self.generate_urls = [self.url] if self.url else list(self.worker_urls)
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
        self._session = requests.Session()

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
            else:
                self.check_sglang_version(info.get("version"))
                self._kind = "sglang"
        return self._kind

    def check_sglang_version(self, version: str | None) -> None:
        v = _version_tuple(version or "")
        if not v or v[:2] < MIN_SGLANG:
            raise EngineError(
                f"rollout server {self.worker_urls[0]} runs SGLang {version or 'of unknown version'}; rfpo_megatron "
                f"speaks SGLang >= {'.'.join(map(str, MIN_SGLANG))} (pip install 'sglang[all]>=0.5')"
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
        """The /generate bodies for prompts x n samples: [(payload, [(prompt i, sample j) per item])]."""
        params.validate()
        if not prompts:
            return []
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty: every prompt needs at least one token id")
        prefix = rid_prefix or uuid.uuid4().hex[:12]
        index = [(i, j) for i in range(len(prompts)) for j in range(int(params.n))]
        out = []
        for s in range(0, len(index), self.max_items_per_request):
            chunk = index[s:s + self.max_items_per_request]
            payload = {
                "input_ids": [[int(t) for t in prompts[i]] for i, _ in chunk],
                "sampling_params": [params.to_sglang(None if params.seed is None else derive_seed(params.seed, i, j))
                                    for i, j in chunk],
                "rid": [f"{prefix}-{i}-{j}" for i, j in chunk],
                "return_logprob": True,
                "logprob_start_len": -1,
            }
            out.append((payload, chunk))
        return out

    def generate(self, prompts: list[list[int]], params: SamplingParams, rid_prefix: str | None = None
                 ) -> list[list[GenerateResult]]:
        """Blocking wrapper of agenerate (usable with or without a running event loop)."""
        coro = self.agenerate(prompts, params, rid_prefix)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            return ex.submit(asyncio.run, coro).result()

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
                results[i][j] = parse_generate_item(item, self.generate_urls[0])
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

    # ------------------------------------------------------------------ weights
    def update_weights_from_tensors(self, named_tensors: Iterable[tuple[str, torch.Tensor]], flush_cache: bool = True,
                                    weight_version: str | None = None) -> None:
        """Push HF-named tensors (a bucket or all of them) to every worker."""
        named = list(named_tensors)
        if self.kind == "embedded":
            payload = {"serialized_named_tensors": [W.encode_safetensors_b64(named)], "load_format": W.SAFETENSORS_B64}
        else:
            payload = {"serialized_named_tensors": W.encode_sglang_named_tensors(named, self.tp_size), "load_format": None}
        payload["flush_cache"] = bool(flush_cache)
        if weight_version is not None:
            payload["weight_version"] = str(weight_version)
        self._all_workers("POST", "/update_weights_from_tensor", payload)

    def update_weights_from_disk(self, path: str, load_format: str | None = None, weight_version: str | None = None) -> None:
        payload: dict[str, Any] = {"model_path": str(path), "load_format": load_format}
        if weight_version is not None:
            payload["weight_version"] = str(weight_version)
        self._all_workers("POST", "/update_weights_from_disk", payload)

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
        err: list[BaseException] = []

        def call():
            try:
                self.init_weights_update_group(master_address, master_port, 1, world, group_name, backend)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                err.append(e)

        th = threading.Thread(target=call, daemon=True)
        th.start()
        group = W.init_weights_update_group(master_address, master_port, 0, world, group_name, backend, timeout_s)
        th.join(timeout_s)
        if err:
            raise err[0]
        return group

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

        th = threading.Thread(target=call, daemon=True)
        th.start()
        W.broadcast_named_tensors(group, named)
        th.join(self.control_timeout_s)
        if err:
            raise err[0]

    def destroy_weights_update_group(self, group=None, group_name: str = "weight_update_group") -> None:
        self._all_workers("POST", "/destroy_weights_update_group", {"group_name": group_name})
        if group is not None:
            W.destroy_group(group)

    # ------------------------------------------------------------------ memory / cache / lifecycle
    def flush_cache(self, attempts: int = 20, wait_s: float = 0.5) -> None:
        """Flush every worker's prefix cache. SGLang answers 400 while requests are still running, so
        that answer is retried (attempts x wait_s) before it is raised."""
        for k in range(attempts):
            try:
                self._all_workers("POST", "/flush_cache", None)
                return
            except EngineRequestError as e:
                if e.status != 400 or k == attempts - 1:
                    raise
                time.sleep(wait_s)

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

    def __enter__(self) -> "EngineClient":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def parse_generate_item(item: dict, url: str = "") -> GenerateResult:
    """One SGLang /generate output dict -> GenerateResult (ids and log-probs from output_token_logprobs)."""
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
    return GenerateResult(output_ids=ids, logprobs=lps, finish_reason=parse_finish_reason(meta.get("finish_reason")), meta=meta)


def _message(text: str) -> str:
    try:
        obj = json.loads(text)
        if isinstance(obj, dict):
            return str(obj.get("message") or obj.get("error") or obj)[:2000]
    except ValueError:
        pass
    return text[:2000]
