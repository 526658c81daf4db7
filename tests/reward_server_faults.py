"""Test helper: a misbehaving reward server (real process on loopback) for tests/test_rewards_remote.py.

    python tests/reward_server_faults.py MODE [K]
MODE: stall (reads each request, never answers), error500 (always HTTP 500), flaky500 (HTTP 500 for the first K
POSTs, then right answers), die (answers the first K POSTs, then exits while reading the next one).
A right answer is reward = len(response), message = "len". GET /hits returns how many POSTs arrived.
Prints "listening on PORT" once ready; exits on its own after 120 s at the latest.
"""
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODE, K = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0
HITS = [0]


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _send(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200, {"hits": HITS[0]})

    def do_POST(self):
        HITS[0] += 1
        data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if MODE == "stall":
            time.sleep(100)
        if MODE == "error500" or (MODE == "flaky500" and HITS[0] <= K):
            self._send(500, {"error": "injected failure"})
            return
        if MODE == "die" and HITS[0] > K:
            os._exit(1)
        self._send(200, {"results": [{"reward": float(len(it["response"])), "message": "len"}
                                     for it in data["items"]]})


if __name__ == "__main__":
    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    srv.daemon_threads = True
    threading.Timer(120, lambda: os._exit(0)).start()
    print(f"listening on {srv.server_address[1]}", flush=True)
    srv.serve_forever(poll_interval=0.1)
