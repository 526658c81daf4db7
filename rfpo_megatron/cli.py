"""Command-line entry point: `rfpo-megatron <command> ...` dispatches to each command's own `main(argv)`."""
from __future__ import annotations

import importlib
import sys

# command -> (module, one-line help). Each module exposes `main(argv: list[str]) -> int | None` (or names its
# entry point as "module:function").
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("rfpo_megatron.trainer", "run RFPO/GRPO training from a YAML config (+ key=value overrides)"),
    "eval": ("rfpo_megatron.evaluate", "evaluate a checkpoint: avg@k / pass@k on held-out jsonl sets"),
    "convert": ("rfpo_megatron.offline.cli", "convert checkpoints HF <-> Megatron (any TP/PP)"),
    "serve": ("rfpo_megatron.rollout.server", "serve the embedded CPU rollout engine over SGLang's HTTP protocol"),
    "plan": ("rfpo_megatron.plan", "per-GPU memory plan and layout recommendation"),
    "bench": ("rfpo_megatron.cli:bench_main", "benchmark the fused kernels (GPU); --step: the trainer's step"),
    "reward-server": ("rfpo_megatron.rewards.server", "serve a reward function over HTTP (for data.reward_url)"),
    "data": ("rfpo_megatron.cli:data_main", "data check FILES: validate prompt sets against a config"),
}


def data_main(argv: list[str]) -> int:
    """`rfpo-megatron data check FILES... [--config YAML] [key=value ...]`: the first bad record as file:line and
    field (exit 1), else one line per file (exit 0). The config's data.* field mapping and data.reward_fn apply
    (the code verifier also checks each record's `tests`)."""
    import argparse

    from rfpo_megatron.config import ConfigError, load_config
    from rfpo_megatron.data.check import check_files
    from rfpo_megatron.rewards.registry import record_check_for

    p = argparse.ArgumentParser(prog="rfpo-megatron data", description=data_main.__doc__.splitlines()[0])
    p.add_argument("action", choices=["check"])
    p.add_argument("files", nargs="*", help="jsonl / parquet files, globs, `datasets` dirs (default: the "
                                            "config's data.train_files and data.eval_files)")
    p.add_argument("--config", default=None, help="run config whose data section applies")
    a = p.parse_args(argv)
    overrides = [f for f in a.files if "=" in f and not f.startswith(("/", "."))]
    files = [f for f in a.files if f not in overrides]
    try:
        cfg = load_config(a.config, overrides)
    except ConfigError as exc:
        print(f"rfpo-megatron data: {exc}", file=sys.stderr)
        return 2
    files = files or list(cfg.data.train_files) + list(cfg.data.eval_files)
    if not files:
        print("rfpo-megatron data: no files given (and the config names none)", file=sys.stderr)
        return 2
    report = check_files(files, cfg.data, record_check_for(cfg.data.reward_fn))
    if not report.ok:
        print(f"bad record: {report.error}", file=sys.stderr)
        return 1
    for path, n in report.counts.items():
        print(f"ok: {path}: {n} records")
    return 0


def bench_main(argv: list[str]) -> int:
    """`rfpo-megatron bench --step [...]`: the trainer-step benchmark (rfpo_megatron.bench_step); otherwise the
    fused-kernel benchmark (rfpo_megatron.kernels.bench)."""
    if "--step" in argv:
        from rfpo_megatron.bench_step import main as step_main

        return int(step_main([a for a in argv if a != "--step"]) or 0)
    from rfpo_megatron.kernels.bench import main as kernels_main

    return int(kernels_main(argv) or 0)


def _usage() -> str:
    lines = ["usage: rfpo-megatron <command> [args...]", "", "commands:"]
    lines += [f"  {name:<13} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `rfpo-megatron <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(cmd, COMMANDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"rfpo-megatron: unknown command '{cmd}'{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _, func = COMMANDS[cmd][0].partition(":")
    rc = getattr(importlib.import_module(module_name), func or "main")(rest)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
