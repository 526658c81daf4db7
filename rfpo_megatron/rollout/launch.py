"""Rollout launch: `launch_engine(cfg) -> EngineClient` for the embedded, SGLang or external backend.

cfg is an `EngineConfig` or any object/dict with the same field names (an OmegaConf node works).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .client import EngineClient
from .procs import free_port, spawn, wait_healthy


@dataclass
class EngineConfig:
    """Rollout engine settings (the `rollout` section of the training config)."""

    backend: str = "embedded"          # embedded | sglang | external
    model_path: str = ""               # HF model directory served at start
    host: str = "127.0.0.1"
    port: int = 0                      # 0: a free port is picked (servers take port, port+1, ... otherwise)
    log_dir: str = "rollout_logs"      # server logs (their tails are quoted in errors)
    startup_timeout_s: float = 900.0
    request_timeout_s: float = 3600.0  # one /generate request
    control_timeout_s: float = 600.0   # weight updates and other control calls
    watchdog_s: float = 300.0          # no server log output for this long during /generate -> error
    retries: int = 4                   # connection retries (exponential backoff from retry_backoff_s)
    retry_backoff_s: float = 0.5
    max_items_per_request: int = 64    # samples per /generate request (small: the router spreads them)
    max_concurrency: int = 16          # /generate requests in flight
    return_routed_experts: bool = False  # MoE: servers get --enable-return-routed-experts, requests ask for the routing (R3)
    # embedded
    dtype: str = "float32"
    max_batch_size: int = 64
    attn_implementation: str = "eager"
    return_original_logprob: bool = False
    allow_auto_truncate: bool = False  # clip max_new_tokens to the context instead of a 400 (SGLang flag of the same name)
    threads: int = 1
    # sglang
    num_gpus: int = 1
    tp_size: int = 1
    server_args: dict[str, Any] = field(default_factory=dict)
    router: bool = True
    router_args: dict[str, Any] = field(default_factory=dict)
    # external: already running servers
    urls: list[str] = field(default_factory=list)
    router_url: str | None = None


def _as_config(cfg: Any) -> EngineConfig:
    if isinstance(cfg, EngineConfig):
        return cfg
    get = (lambda k, d: cfg.get(k, d)) if isinstance(cfg, dict) else (lambda k, d: getattr(cfg, k, d))
    base = EngineConfig()
    vals = {}
    for f in fields(EngineConfig):
        v = get(f.name, getattr(base, f.name))
        if f.name in ("server_args", "router_args"):
            v = dict(v or {})
        elif f.name == "urls":
            v = list(v or [])
        vals[f.name] = v
    return EngineConfig(**vals)


def routed_experts_shape(model_path: str) -> tuple[int, int]:
    """(num_hidden_layers, num_experts_per_tok) of an HF MoE model dir: the shape of SGLang's routed_experts rows."""
    f = Path(model_path) / "config.json"
    if not f.is_file():
        raise ValueError(f"rollout.return_routed_experts needs rollout.model_path (an HF dir with config.json) to know the "
                         f"routing shape; '{model_path}' has none")
    cfg = json.loads(f.read_text())
    cfg = cfg.get("text_config", cfg)
    if not cfg.get("num_experts_per_tok"):
        raise ValueError(f"rollout.return_routed_experts: {f} has no num_experts_per_tok (not a mixture-of-experts "
                         "model); set rollout.return_routed_experts=false (and actor.router_replay=off)")
    return int(cfg["num_hidden_layers"]), int(cfg["num_experts_per_tok"])


def _client_kwargs(c: EngineConfig) -> dict[str, Any]:
    return dict(request_timeout_s=c.request_timeout_s, control_timeout_s=c.control_timeout_s, watchdog_s=c.watchdog_s,
                retries=c.retries, backoff_s=c.retry_backoff_s, max_items_per_request=c.max_items_per_request,
                max_concurrency=c.max_concurrency,
                routed_experts_shape=routed_experts_shape(c.model_path) if c.return_routed_experts else None)


def launch_embedded_server(model_path: str, *, host: str = "127.0.0.1", port: int = 0, log_dir: str | os.PathLike = "rollout_logs",
                           startup_timeout_s: float = 300.0, extra_args: list[str] | tuple[str, ...] = (),
                           env: dict[str, str] | None = None, threads: int = 1, **client_kwargs: Any) -> EngineClient:
    """Start `rfpo-megatron serve` for an HF model dir as a subprocess on host:port (0 = free), wait healthy.

    The server exits with this process (process group kill at exit/SIGTERM, and --parent-pid).
    """
    if not (Path(model_path) / "config.json").is_file():
        raise FileNotFoundError(f"rollout.model_path '{model_path}' is not an HF model directory (no config.json)")
    port = port or free_port(host)
    url = f"http://{host}:{port}"
    senv = dict(os.environ if env is None else env)
    senv.setdefault("OMP_NUM_THREADS", str(threads))
    cmd = [sys.executable, "-m", "rfpo_megatron.rollout.server", "--model-path", str(model_path), "--host", host,
           "--port", str(port), "--threads", str(threads), "--parent-pid", str(os.getpid()), *map(str, extra_args)]
    log = Path(log_dir) / f"embedded_{port}_{time.strftime('%Y%m%d-%H%M%S')}.log"
    proc = spawn(f"embedded-server:{port}", cmd, log, env=senv, url=url)
    try:
        wait_healthy(url, proc, startup_timeout_s)
    except BaseException:
        proc.stop()
        raise
    return EngineClient(url, [url], [proc], **client_kwargs)


def launch_engine(cfg: Any) -> EngineClient:
    """Start (or connect to) the configured rollout engine and return its client."""
    c = _as_config(cfg)
    if c.backend == "embedded":
        extra = ["--dtype", c.dtype, "--max-batch-size", str(c.max_batch_size), "--attn-implementation", c.attn_implementation]
        if c.return_original_logprob:
            extra.append("--return-original-logprob")
        if c.allow_auto_truncate:
            extra.append("--allow-auto-truncate")
        if c.return_routed_experts:
            extra.append("--enable-return-routed-experts")
        return launch_embedded_server(c.model_path, host=c.host, port=c.port, log_dir=c.log_dir,
                                      startup_timeout_s=c.startup_timeout_s, extra_args=extra, threads=c.threads,
                                      **_client_kwargs(c))
    if c.backend == "sglang":
        from .sglang import launch_sglang

        server_args = dict(c.server_args, **({"enable_return_routed_experts": True} if c.return_routed_experts else {}))
        return launch_sglang(c.model_path, num_gpus=c.num_gpus, tp_size=c.tp_size, server_args=server_args,
                             router=c.router, router_args=c.router_args, host=c.host, port=c.port or None,
                             log_dir=c.log_dir, startup_timeout_s=c.startup_timeout_s, **_client_kwargs(c))
    if c.backend == "external":
        if not c.urls:
            raise ValueError("rollout.backend=external needs rollout.urls (the running servers' http://host:port)")
        client = EngineClient(c.router_url, list(c.urls), tp_size=c.tp_size, **_client_kwargs(c))
        for u in client.worker_urls:
            wait_healthy(u, None, c.startup_timeout_s)
        _ = client.kind
        return client
    raise ValueError(f"rollout.backend='{c.backend}' is not one of embedded | sglang | external")
