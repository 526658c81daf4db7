#!/usr/bin/env python
"""Per-GPU memory plan / layout recommendation (thin wrapper over `rfpo-megatron plan`, rfpo_megatron/plan.py).

    python tools/plan_memory.py --model qwen2.5-32b --config examples/qwen2.5-32b/config.yaml --dp 4
    python tools/plan_memory.py --model qwen3-32b --gpus 8 --seq-len 9216 --tokens-per-microbatch 20480
"""
import sys

from rfpo_megatron.plan import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
