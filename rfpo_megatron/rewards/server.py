"""Reference reward server: `rfpo-megatron reward-server --reward-fn NAME|module:fn|file.py:fn [--reward-kwargs JSON]`.

Serves any reward the registry can build (rewards/registry.py) over the JSON protocol of rewards/remote.py:
POST / (or /score) scores a batch, GET /health answers `{"ok": true, "reward_fn": ...}`. A failing item is
reported as `{"error": ...}` in its slot (the client applies data.reward_error_policy). Batches are scored one
at a time (the verifier need not be thread-safe; `code` and `math` parallelise inside a batch). It prints
`reward server: http://HOST:PORT/score (reward_fn ...)` once listening (`--port 0` picks a free port) and
stops on SIGTERM/SIGINT.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from rfpo_megatron.rewards.custom import one_line


def make_handler(verifier: Any, name: str) -> type:
    """The request handler class scoring with `verifier` (one batch at a time)."""
    from rfpo_megatron.rewards.guard import outcomes_of

    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:  # quiet: one line per error only
            pass

        def _reply(self, code: int, obj: dict) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            if self.path.rstrip("/") in ("/health", ""):
                self._reply(200, {"ok": True, "reward_fn": name})
            else:
                self._reply(404, {"error": f"no route {self.path}; POST / or /score"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") not in ("", "/score"):
                self._reply(404, {"error": f"no route {self.path}; POST / or /score"})
                return
            try:
                n = int(self.headers.get("Content-Length", "0"))
                data = json.loads(self.rfile.read(n).decode())
                items = [(str(it["response"]), str(it.get("answer", "")), dict(it.get("record") or {}))
                         for it in data["items"]]
            except Exception as exc:
                self._reply(400, {"error": f"bad request: {one_line(exc)}; expected "
                                           "{'items': [{'response', 'answer', 'record'}]}"})
                return
            with lock:
                outs = outcomes_of(verifier, items)
            results = [{"error": one_line(o)} if isinstance(o, BaseException)
                       else {"reward": o.reward, "message": o.message} for o in outs]
            self._reply(200, {"results": results})

    return Handler


def serve(reward_fn: str, reward_kwargs: dict, host: str = "127.0.0.1", port: int = 0,
          ready: Optional[threading.Event] = None) -> None:
    """Build the verifier and serve until SIGTERM/SIGINT (or KeyboardInterrupt)."""
    from rfpo_megatron.rewards.registry import get_reward_fn

    verifier = get_reward_fn(reward_fn, **reward_kwargs)
    httpd = ThreadingHTTPServer((host, port), make_handler(verifier, reward_fn))
    httpd.daemon_threads = True
    h, p = httpd.server_address[:2]
    print(f"reward server: http://{h}:{p}/score (reward_fn {reward_fn})", flush=True)

    def stop(signum: int, frame: Any) -> None:
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
    if ready is not None:
        ready.set()
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        httpd.server_close()
        if hasattr(verifier, "close"):
            verifier.close()


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="rfpo-megatron reward-server", description=__doc__.splitlines()[0])
    p.add_argument("--reward-fn", required=True, help="registered name (math, code, ...) or module:fn / file.py:fn")
    p.add_argument("--reward-kwargs", default="{}", help="JSON object of keyword arguments for the reward")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    a = p.parse_args(argv)
    try:
        kwargs = json.loads(a.reward_kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        print(f"rfpo-megatron reward-server: --reward-kwargs: {exc}", file=sys.stderr)
        return 2
    try:
        serve(a.reward_fn, kwargs, a.host, a.port)
    except ValueError as exc:  # ConfigError included: a bad name, path or signature
        print(f"rfpo-megatron reward-server: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
