#!/usr/bin/env python
"""Step benchmark of the trainer: per-stage medians, tokens/s, FLOP fraction (thin wrapper of
`rfpo-megatron bench --step`; see rfpo_megatron/bench_step.py)."""
import sys

from rfpo_megatron.bench_step import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
