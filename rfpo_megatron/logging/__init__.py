"""Metrics logging for a run: W&B (offline unless an API key is set), a JSONL file and a console progress line.

    logger = MetricsLogger(cfg.logging, total_steps=cfg.trainer.steps, config=to_dict(cfg))
    logger.log(step, {"rollout/reward_mean": 0.4, "rfpo/zero_group_frac": 0.25, ...})
    logger.finish()

Only rank 0 constructs one; other ranks log nothing.
"""
from __future__ import annotations

import os
import time
from typing import Any, Optional

from rfpo_megatron.logging.jsonl import JsonlWriter, read_metrics
from rfpo_megatron.logging.progress import ProgressBar, format_duration
from rfpo_megatron.logging.wandb_logger import (WandbRun, find_offline_runs, read_offline_history,
                                                resolve_wandb_mode)

__all__ = ["MetricsLogger", "JsonlWriter", "read_metrics", "ProgressBar", "format_duration", "WandbRun",
           "find_offline_runs", "read_offline_history", "resolve_wandb_mode"]


class MetricsLogger:
    """Fans each step's metrics out to W&B, `<log_dir>/metrics.jsonl` and the console.

    Args:
      log_cfg: a `LoggingConfig` (project, run_name, wandb_mode, log_dir, console).
      total_steps: for the progress bar's ETA.
      config: plain dict of the whole run config (W&B run config).
      start_step: the step resumed from (0 for a fresh run); later JSONL records are dropped.
      wandb_run_id: the id stored in the checkpoint, so W&B appends to the same run on resume.
    """

    def __init__(self, log_cfg, total_steps: int, config: Optional[dict] = None, start_step: int = 0,
                 wandb_run_id: Optional[str] = None):
        self.log_dir = log_cfg.log_dir
        os.makedirs(self.log_dir, exist_ok=True)
        self.jsonl_path = os.path.join(self.log_dir, "metrics.jsonl")
        self.jsonl = JsonlWriter(self.jsonl_path)
        if start_step > 0 or wandb_run_id:
            self.jsonl.truncate_after(start_step)
        elif os.path.getsize(self.jsonl_path) > 0:
            self.jsonl.truncate_after(0)  # a fresh run in a used directory starts a fresh file
        self.progress = ProgressBar(total_steps, start_step=start_step, enabled=log_cfg.console)
        self.wandb: Optional[WandbRun] = None
        mode = resolve_wandb_mode(log_cfg.wandb_mode)
        if mode != "disabled":
            try:
                self.wandb = WandbRun(log_cfg.project, log_cfg.run_name, mode, self.log_dir, config or {},
                                      run_id=wandb_run_id)
            except Exception as exc:  # noqa: BLE001 - e.g. online without network: keep training, offline
                if mode != "online":
                    raise
                print(f"[rfpo-megatron] W&B online init failed ({type(exc).__name__}: {exc}); "
                      f"logging offline instead (upload later with `wandb sync`)", flush=True)
                self.wandb = WandbRun(log_cfg.project, log_cfg.run_name, "offline", self.log_dir, config or {},
                                      run_id=wandb_run_id)

    @property
    def wandb_run_id(self) -> Optional[str]:
        return self.wandb.run_id if self.wandb else None

    @property
    def wandb_dir(self) -> str:
        return self.wandb.run_dir if self.wandb else ""

    def log(self, step: int, metrics: dict[str, Any], progress: bool = True) -> None:
        """Record `metrics` for `step` everywhere; `progress=False` skips the console line (e.g. eval)."""
        self.jsonl.write(step, metrics, wall_time=time.time())
        if self.wandb is not None:
            self.wandb.log(metrics, step)
        if progress:
            self.progress.update(step, metrics)

    def message(self, text: str) -> None:
        self.progress.message(text)

    def finish(self, exit_code: int = 0) -> None:
        self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code)
            self.wandb = None
