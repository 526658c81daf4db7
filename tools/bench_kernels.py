#!/usr/bin/env python
"""GPU benchmark of the fused kernels (thin wrapper of `rfpo-megatron bench`; see rfpo_megatron/kernels/bench.py)."""
import sys

from rfpo_megatron.kernels.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
