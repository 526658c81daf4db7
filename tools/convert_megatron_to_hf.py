#!/usr/bin/env python
"""rfpo-mcore checkpoint (any TP/PP) -> HF safetensors (same as `rfpo-megatron convert mcore2hf`)."""
import sys

from rfpo_megatron.offline.cli import main

if __name__ == "__main__":
    sys.exit(main(["mcore2hf", *sys.argv[1:]]))
