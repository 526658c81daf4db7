"""SGLang launcher: one `python -m sglang.launch_server` per group of tp_size GPUs, plus sglang_router.

Every SGLang server argument is passable from the config (`server_args`: {name: value}, rendered as
`--name-with-dashes value`; True -> bare flag; False/None -> omitted; lists -> repeated values).
Servers get CUDA_VISIBLE_DEVICES for their GPU group; when there are several, `sglang_router`
(`python -m sglang_router.launch_router --worker-urls ...`) fronts /generate, and control calls go
to every server directly. The installed SGLang version is checked before anything starts, and each
server's /get_server_info version once it is up.

Router defaults (`ROUTER_DEFAULTS`, each overridable in router_args): Prometheus on the router's own host
at a free port (0.3.x binds 0.0.0.0:29000 otherwise, so a second router on a host fails to start), the
worker health check on /get_model_info (SGLang's /health runs a one-token generation on an idle server:
in colocated training that would run on released memory), no router retries (a 5xx is resent with the
same rid; the client reports the server's error instead) and the request timeout of the client.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .base import EngineError
from .client import MIN_SGLANG, EngineClient, _version_tuple
from .procs import ManagedProcess, free_port, spawn, wait_healthy

_RESERVED = {"model_path", "host", "port", "tp_size", "tp"}


def check_sglang_installed(min_version: tuple[int, int] = MIN_SGLANG) -> str:
    """Installed SGLang version, or a one-line error saying what to install (or to use the embedded engine)."""
    want = ".".join(map(str, min_version))
    try:
        v = importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        raise EngineError(
            f"rollout.backend=sglang needs SGLang >= {want}, which is not installed (pip install 'sglang[all]>={want}' "
            f"on a GPU node); without a GPU use rollout.backend=embedded"
        ) from None
    if _version_tuple(v)[:3] < tuple(min_version):
        raise EngineError(f"SGLang {v} is installed; rfpo_megatron needs SGLang >= {want} (pip install -U 'sglang[all]>={want}')")
    return v


def args_to_cli(args: dict[str, Any] | None) -> list[str]:
    """{"mem_fraction_static": 0.7, "enable_memory_saver": True} -> ["--mem-fraction-static", "0.7", "--enable-memory-saver"]."""
    out: list[str] = []
    for key, value in (args or {}).items():
        flag = "--" + str(key).replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        elif isinstance(value, dict):
            out += [flag, json.dumps(value)]
        else:
            out += [flag, str(value)]
    return out


def build_server_cmd(model_path: str, host: str, port: int, tp_size: int, server_args: dict[str, Any] | None = None,
                     python: str = sys.executable, launch_module: str = "sglang.launch_server") -> list[str]:
    """Command line of one SGLang server."""
    clash = sorted(_RESERVED & set(server_args or {}))
    if clash:
        raise ValueError(f"rollout.server_args must not set {clash}: use rollout.model_path / host / port / tp_size")
    return [python, "-m", launch_module, "--model-path", str(model_path), "--host", host, "--port", str(port),
            "--tp-size", str(tp_size), *args_to_cli(server_args)]


ROUTER_DEFAULTS: dict[str, Any] = {"health_check_endpoint": "/get_model_info", "disable_retries": True}


def build_router_cmd(worker_urls: list[str], host: str, port: int, router_args: dict[str, Any] | None = None,
                     python: str = sys.executable, prometheus_port: int | None = None,
                     request_timeout_s: float | None = None) -> list[str]:
    """Command line of sglang_router in front of worker_urls (ROUTER_DEFAULTS under router_args)."""
    args: dict[str, Any] = dict(ROUTER_DEFAULTS)
    args["prometheus_host"] = host
    args["prometheus_port"] = prometheus_port or free_port(host)
    if request_timeout_s:
        args["request_timeout_secs"] = int(request_timeout_s)
    args.update(router_args or {})
    return [python, "-m", "sglang_router.launch_router", "--worker-urls", *worker_urls, "--host", host,
            "--port", str(port), *args_to_cli(args)]


def gpu_groups(num_gpus: int, tp_size: int, visible: str | None = None) -> list[str]:
    """CUDA_VISIBLE_DEVICES of each server: consecutive groups of tp_size of the visible GPUs."""
    if tp_size < 1 or num_gpus < tp_size or num_gpus % tp_size:
        raise ValueError(f"rollout.num_gpus={num_gpus} must be a positive multiple of rollout.tp_size={tp_size}")
    ids = [s.strip() for s in visible.split(",") if s.strip()] if visible else [str(i) for i in range(num_gpus)]
    if len(ids) < num_gpus:
        raise ValueError(f"rollout.num_gpus={num_gpus} but only {len(ids)} GPUs are visible (CUDA_VISIBLE_DEVICES={visible})")
    return [",".join(ids[k * tp_size:(k + 1) * tp_size]) for k in range(num_gpus // tp_size)]


def launch_sglang(model_path: str, *, num_gpus: int = 1, tp_size: int = 1, server_args: dict[str, Any] | None = None,
                  router: bool = True, router_args: dict[str, Any] | None = None, host: str = "127.0.0.1",
                  port: int | None = None, log_dir: str | os.PathLike = "rollout_logs", startup_timeout_s: float = 900.0,
                  env: dict[str, str] | None = None, launch_module: str = "sglang.launch_server",
                  check_version: bool = True, **client_kwargs: Any) -> EngineClient:
    """Start num_gpus/tp_size SGLang servers (+ router when several), wait healthy, return the client.

    On any failure every process started so far is stopped before the error propagates.
    """
    if check_version and launch_module == "sglang.launch_server":
        check_sglang_installed()
    base_env = dict(os.environ if env is None else env)
    groups = gpu_groups(num_gpus, tp_size, base_env.get("CUDA_VISIBLE_DEVICES"))
    log_dir = Path(log_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    procs: list[ManagedProcess] = []
    try:
        for k, gpus in enumerate(groups):
            p = port + k if port else free_port(host)
            url = f"http://{host}:{p}"
            senv = dict(base_env, CUDA_VISIBLE_DEVICES=gpus)
            cmd = build_server_cmd(model_path, host, p, tp_size, server_args, launch_module=launch_module)
            procs.append(spawn(f"sglang-server-{k}", cmd, log_dir / f"sglang_server{k}_{stamp}.log", env=senv, url=url))
        for proc in procs:
            wait_healthy(proc.url, proc, startup_timeout_s)
        worker_urls = [p.url for p in procs]
        entry: str | None = worker_urls[0]
        if len(procs) > 1:
            if router:
                rport = (port + len(groups)) if port else free_port(host)
                rurl = f"http://{host}:{rport}"
                rcmd = build_router_cmd(worker_urls, host, rport, router_args,
                                        request_timeout_s=client_kwargs.get("request_timeout_s"))
                procs.append(spawn("sglang-router", rcmd,
                                   log_dir / f"sglang_router_{stamp}.log", env=base_env, url=rurl))
                wait_healthy(rurl, procs[-1], startup_timeout_s, path="/health")
                entry = rurl
            else:
                entry = None  # the client spreads /generate over the workers itself
        client = EngineClient(entry, worker_urls, procs, tp_size=tp_size, **client_kwargs)
        _ = client.kind  # version check of what actually runs
        return client
    except BaseException:
        for proc in reversed(procs):
            proc.stop()
        raise
