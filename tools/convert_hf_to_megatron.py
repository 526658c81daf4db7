#!/usr/bin/env python
"""HF safetensors -> rfpo-mcore checkpoint at --tp/--pp (same as `rfpo-megatron convert hf2mcore`)."""
import sys

from rfpo_megatron.offline.cli import main

if __name__ == "__main__":
    sys.exit(main(["hf2mcore", *sys.argv[1:]]))
