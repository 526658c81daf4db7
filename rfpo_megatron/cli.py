"""Command-line entry point: `rfpo-megatron <command> ...` dispatches to each command's own `main(argv)`."""
from __future__ import annotations

import importlib
import sys

# command -> (module, one-line help). Each module exposes `main(argv: list[str]) -> int | None`.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("rfpo_megatron.trainer", "run RFPO/GRPO training from a YAML config (+ key=value overrides)"),
    "eval": ("rfpo_megatron.evaluate", "evaluate a checkpoint: avg@k / pass@k on held-out jsonl sets"),
    "convert": ("rfpo_megatron.offline.cli", "convert checkpoints HF <-> Megatron (any TP/PP)"),
    "serve": ("rfpo_megatron.rollout.server", "serve the embedded CPU rollout engine over SGLang's HTTP protocol"),
    "plan": ("rfpo_megatron.plan", "per-GPU memory plan and layout recommendation"),
    "bench": ("rfpo_megatron.kernels.bench", "benchmark the fused kernels (GPU)"),
}


def _usage() -> str:
    lines = ["usage: rfpo-megatron <command> [args...]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
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
    module = importlib.import_module(COMMANDS[cmd][0])
    rc = module.main(rest)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
