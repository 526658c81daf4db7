"""`rfpo-megatron convert hf2mcore|mcore2hf ...`: the command-line front of the offline converter."""
from __future__ import annotations

import argparse
import sys

from rfpo_megatron.convert.arch import ConversionError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rfpo-megatron convert", description="Convert checkpoints HF <-> Megatron (the actor's checkpoint format, or sharded rfpo-mcore).")
    sub = parser.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("hf2mcore", help="HF safetensors directory -> rfpo-mcore checkpoint at --tp/--pp")
    a.add_argument("--hf-dir", required=True, help="HF model directory (config.json + *.safetensors)")
    a.add_argument("--out", required=True, help="output checkpoint directory (new or empty)")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the target layout")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the target layout")
    a.add_argument("--dtype", default=None, help="cast weights to fp32|bf16|fp16 (default: keep)")
    a.add_argument("--format", default="actor", choices=["actor", "sharded"],
                   help="actor: the actor's checkpoint (load with actor.load=OUT); sharded: per-(tp,pp)-rank rfpo-mcore files")
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    b = sub.add_parser("mcore2hf", help="actor checkpoint or rfpo-mcore checkpoint (any TP/PP) -> HF safetensors directory")
    b.add_argument("--mcore-dir", required=True, help="actor checkpoint (meta.json; a dir with 'latest'; a trainer step dir) or rfpo-mcore dir (rfpo_mcore.json)")
    b.add_argument("--out", required=True, help="output HF directory (new or empty)")
    b.add_argument("--hf-ref", default=None, help="HF dir whose config must match; its tokenizer files are copied")
    b.add_argument("--dtype", default=None, help="cast weights to fp32|bf16|fp16 (default: keep)")
    b.add_argument("--max-shard-gb", type=float, default=5.0, help="max safetensors shard size in GiB")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from rfpo_megatron.offline import tools as offline

    try:
        if args.direction == "hf2mcore":
            meta = offline.hf_to_mcore(args.hf_dir, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype,
                                       fmt=args.format, progress=not args.no_progress)
            print(f"wrote {args.out} ({args.format} format): {offline.dump_summary(meta)}")
        else:
            files = offline.mcore_to_hf(args.mcore_dir, args.out, dtype=args.dtype, hf_ref=args.hf_ref,
                                        max_shard_bytes=int(args.max_shard_gb * 1024**3), progress=not args.no_progress)
            print(f"wrote {args.out}: {len(files)} safetensors shard(s) + index, config.json")
    except ConversionError as err:
        print(f"rfpo-megatron convert {args.direction}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
