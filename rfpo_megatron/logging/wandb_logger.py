"""Weights & Biases run: online when an API key is configured, offline otherwise (no network needed)."""
from __future__ import annotations

import glob
import os
from typing import Any, Optional


def resolve_wandb_mode(mode: str, env: Optional[dict] = None) -> str:
    """`auto` -> `online` if WANDB_API_KEY is set (or WANDB_MODE=online), else `offline`; explicit modes pass.

    WANDB_MODE in the environment, when set to online/offline/disabled, wins over `auto`.
    """
    env = os.environ if env is None else env
    if mode != "auto":
        return mode
    env_mode = env.get("WANDB_MODE", "").strip().lower()
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    if env_mode == "dryrun":
        return "offline"
    return "online" if env.get("WANDB_API_KEY") else "offline"


class WandbRun:
    """A thin wrapper: `log(metrics, step)`, `finish()`, `run_dir` (the local run directory).

    `run_id` is kept in the checkpoint so a resumed run appends to the same W&B run.
    """

    def __init__(self, project: str, run_name: Optional[str], mode: str, log_dir: str, config: dict,
                 run_id: Optional[str] = None):
        import wandb

        self.mode = resolve_wandb_mode(mode)
        if self.mode == "online" and not os.environ.get("WANDB_API_KEY"):
            # `wandb login` stores the key in ~/.netrc; wandb will find it or fail clearly itself.
            pass
        os.makedirs(log_dir, exist_ok=True)
        self._wandb = wandb
        self.run = wandb.init(
            project=project,
            name=run_name,
            mode=self.mode,
            dir=log_dir,
            config=config,
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )
        self.run_id = self.run.id if self.run is not None else None
        # offline/online: <log_dir>/wandb/{offline-,}run-<date>-<id>; `run.dir` is its files/ subdir.
        self.run_dir = os.path.dirname(self.run.dir) if self.mode != "disabled" else ""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        clean = {}
        for k, v in metrics.items():
            if hasattr(v, "item"):
                v = v.item()
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                clean[k] = v
        self.run.log(clean, step=int(step))

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def find_offline_runs(log_dir: str) -> list[str]:
    """Offline W&B run directories under `log_dir`, oldest first."""
    return sorted(glob.glob(os.path.join(log_dir, "wandb", "offline-run-*")))


def _leveldb_records(data: bytes, header_len: int = 7, block: int = 32768):
    """Payloads of a W&B transaction log (LevelDB log format: 32 KiB blocks, 7-byte record headers)."""
    pos, buf = header_len, b""
    while pos + 7 <= len(data):
        left = block - (pos % block)
        if left < 7:  # block trailer padding
            pos += left
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        rtype = data[pos + 6]
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if rtype == 0 and length == 0:
            continue
        if rtype == 1:  # FULL
            yield payload
        elif rtype == 2:  # FIRST
            buf = payload
        elif rtype == 3:  # MIDDLE
            buf += payload
        elif rtype == 4:  # LAST
            yield buf + payload
            buf = b""


def read_offline_history(run_dir: str) -> list[dict[str, Any]]:
    """The history rows (`{"_step": s, key: value}`) recorded in an offline run's `run-*.wandb` file."""
    import json

    from wandb.proto import wandb_internal_pb2

    files = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    with open(files[0], "rb") as fh:
        data = fh.read()
    if not data.startswith(b":W&B"):
        raise ValueError(f"{files[0]} is not a W&B transaction log")
    rows = []
    for payload in _leveldb_records(data):
        rec = wandb_internal_pb2.Record()
        try:
            rec.ParseFromString(payload)
        except Exception:  # a torn record at the end of a killed run
            continue
        if rec.WhichOneof("record_type") == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows
