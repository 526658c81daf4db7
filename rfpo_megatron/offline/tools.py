"""Offline directory conversion HF ⇄ rfpo-mcore at any TP/PP (one process, no distributed world).

Both directions validate loudly before writing: the HF config against the megatron architecture the
actor builds from it (`actor.model.transformer_config_from_hf`), every tensor name and shape against
the config, and the written output is re-read and re-checked (nothing silently dropped).
Memory: hf2mcore holds one PP stage (the actor format stores a stage per file) or, with --format
sharded, one stage's TP shards; mcore2hf reads one decoder layer at a time (memory-mapped).
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch

from rfpo_megatron.offline import actor_format
from rfpo_megatron.convert.arch import Arch, ConversionError, arch_from_hf_config, compare_archs, padded_vocab
from rfpo_megatron.convert.hf_io import (
    HFReader,
    HFWriter,
    copy_aux_files,
    read_hf_config,
    write_hf_config,
)
from rfpo_megatron.convert.mapping import (
    rule_or_tied_head,
    all_rules,
    check_hf_tensors,
    hf_to_mcore_tensor,
    mcore_to_hf_tensors,
)
from rfpo_megatron.convert.mcore_io import (
    HF_SUBDIR,
    META_NAME,
    McoreMeta,
    check_files,
    even_stages,
    rank_file,
    read_full_tensors,
    read_meta,
    write_meta,
    write_rank_file,
)
from rfpo_megatron.convert.sharding import shard_tp
from rfpo_megatron.convert.validate import config_diffs, require_no_diffs

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ConversionError(f"--dtype {name!r} is not one of {sorted(set(DTYPES))}")
    return DTYPES[name]


def check_against_actor(arch: Arch, hf_config: dict[str, Any], *, tp: int, pp: int, where: str) -> None:
    """Build the actor's TransformerConfig for (tp, pp) and require it to agree with `arch` field by field."""
    from rfpo_megatron.actor.model import transformer_config_from_hf

    try:
        tconfig = transformer_config_from_hf(hf_config, tp=tp, pp=pp)
    except (ValueError, AssertionError) as err:
        raise ConversionError(f"{where}: the actor cannot build this model at tp={tp}, pp={pp}: {err}") from err
    require_no_diffs(config_diffs(arch, tconfig), what=f"{where} disagrees with the megatron architecture built from it")
    problems = []
    if arch.ffn_hidden_size % tp:
        problems.append(f"intermediate_size={arch.ffn_hidden_size} is not divisible by --tp={tp}")
    if arch.qkv_rows % tp:
        problems.append(f"(num_attention_heads + 2·num_key_value_heads)·head_dim={arch.qkv_rows} is not divisible by --tp={tp}")
    require_no_diffs(problems, what=f"{where} cannot be split at tp={tp}")


def require_empty_dir(out_dir: Path) -> None:
    """The output directory must be new or empty (stale shards of an earlier run would be mixed in)."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConversionError(f"--out {out_dir} exists and is not empty; choose a new directory or remove it")


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, dynamic_ncols=True)


def hf_to_mcore(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tp: int = 1,
    pp: int = 1,
    dtype: str | None = None,
    fmt: str = "actor",
    progress: bool = True,
) -> McoreMeta:
    """Convert an HF safetensors directory into a Megatron-side checkpoint for (tp, pp).

    fmt: "actor" (default; the actor's "full" format, loadable by `actor.checkpoint.load_actor_state` and
    `actor.load`) or "sharded" (rfpo-mcore: per-rank TP shards, see mcore_io). Returns the layout record.
    """
    if fmt not in ("actor", "sharded"):
        raise ConversionError(f"--format {fmt!r} must be 'actor' or 'sharded'")
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    require_empty_dir(out_dir)
    where = str(hf_dir / "config.json")
    cfg = read_hf_config(hf_dir)
    arch = arch_from_hf_config(cfg, where=where)
    if tp < 1:
        raise ConversionError(f"--tp={tp} must be >= 1")
    stages = even_stages(arch.num_layers, pp)
    check_against_actor(arch, cfg, tp=tp, pp=pp, where=where)
    reader = HFReader(hf_dir)
    ignored = check_hf_tensors(arch, reader.shapes(), source=str(hf_dir))
    target_dtype = parse_dtype(dtype)
    if arch.tie_embeddings and "lm_head.weight" in reader.names():
        if not torch.equal(reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")):
            raise ConversionError(
                f"{hf_dir}: tie_word_embeddings=true but lm_head.weight differs from model.embed_tokens.weight; "
                "set tie_word_embeddings=false in config.json"
            )
    vp = padded_vocab(arch.vocab_size, tp)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = sum(len(all_rules(arch, range(*stages[p]), first=p == 0, last=p == pp - 1)) for p in range(pp))
    bar = _progress(total, "hf→mcore", progress)
    written_dtype = None
    for p in range(pp):
        shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
        full_stage: dict[str, torch.Tensor] = {}
        for rule in all_rules(arch, range(*stages[p]), first=p == 0, last=p == pp - 1):
            full = hf_to_mcore_tensor(arch, rule, [reader.get(n) for n in rule.hf])
            if target_dtype is not None:
                full = full.to(target_dtype)
            written_dtype = written_dtype or full.dtype
            if fmt == "actor":
                full_stage[rule.mcore] = full.contiguous()
            else:
                for t in range(tp):
                    shards[t][rule.mcore] = shard_tp(rule.mcore, full, tp, t, padded_vocab=vp)
            bar.update(1)
        if arch.tie_embeddings and pp > 1 and p == pp - 1:  # the last stage's copy of the tied embedding
            emb = reader.get("model.embed_tokens.weight")
            emb = emb.to(target_dtype) if target_dtype is not None else emb
            full_stage["output_layer.weight"] = emb.contiguous()
            for t in range(tp if fmt == "sharded" else 0):
                shards[t]["output_layer.weight"] = shard_tp("output_layer.weight", emb, tp, t, padded_vocab=vp)
        if fmt == "actor":
            actor_format.write_stage(out_dir, p, full_stage)
        else:
            for t in range(tp):
                write_rank_file(rank_file(out_dir, t, p), shards[t], tp_rank=t, pp_rank=p)
        del shards, full_stage
    bar.close()
    out_cfg = _with_dtype(cfg, target_dtype)
    meta = McoreMeta(tp=tp, pp=pp, stages=stages, vocab_size=arch.vocab_size, padded_vocab_size=vp,
                     dtype=str(written_dtype).replace("torch.", ""), hf_config=out_cfg,
                     extra={"source": str(hf_dir), "ignored_hf_tensors": ignored})
    hf_sub = out_dir / HF_SUBDIR
    hf_sub.mkdir(parents=True, exist_ok=True)
    if target_dtype is None:
        shutil.copy2(hf_dir / "config.json", hf_sub / "config.json")  # byte-identical round trip
    else:
        write_hf_config(hf_sub, out_cfg)
    copy_aux_files(hf_dir, hf_sub)
    if fmt == "actor":
        actor_format.write_meta(out_dir, tp=tp, pp=pp, vocab_size=arch.vocab_size, hf_config=out_cfg, source=str(hf_dir))
        check_full_state(arch, actor_format.read_state(out_dir, actor_format.read_meta(out_dir)), source=str(out_dir))
    else:
        write_meta(out_dir, meta)
        check_files(out_dir, meta)
    return meta


def _with_dtype(cfg: dict[str, Any], dtype: torch.dtype | None) -> dict[str, Any]:
    if dtype is None:
        return dict(cfg)
    out = dict(cfg)
    name = str(dtype).replace("torch.", "")
    keys = [k for k in ("torch_dtype", "dtype") if k in out] or ["torch_dtype"]
    for k in keys:
        out[k] = name
    return out


def _layer_groups(names: list[str]) -> Iterable[list[str]]:
    """Group canonical names by decoder layer (non-layer names each form their own group)."""
    def key(n: str) -> str:
        return ".".join(n.split(".")[:3]) if n.startswith("decoder.layers.") else n

    for _, group in itertools.groupby(names, key=key):
        yield list(group)


def mcore_to_hf(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    hf_ref: str | os.PathLike | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    progress: bool = True,
) -> list[str]:
    """Convert an rfpo-mcore checkpoint (any TP/PP) to an HF directory; returns the shard file names.

    hf_ref: optional HF directory whose config.json must describe the same architecture (each
    mismatched field is named) and whose tokenizer/generation files are copied over the stored ones.
    """
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    require_empty_dir(out_dir)
    actor_ckpt = None if (ckpt_dir / META_NAME).is_file() else actor_format.resolve(ckpt_dir)
    if actor_ckpt is not None:
        ameta = actor_format.read_meta(actor_ckpt)
        hf_config, aux_dir = actor_format.hf_config_of(actor_ckpt, ameta, hf_ref)
        arch = arch_from_hf_config(hf_config, where=f"HF config of {actor_ckpt}")
        if int(ameta["vocab_size"]) != arch.vocab_size:
            raise ConversionError(f"{actor_ckpt}/meta.json: vocab_size={ameta['vocab_size']} but config.json has vocab_size={arch.vocab_size}")
        state = actor_format.read_state(actor_ckpt, ameta, hf_config)
        check_full_state(arch, state, source=str(actor_ckpt))
        if ameta["format"] == "dist" and dtype is None:  # the model was rebuilt in fp32: store the saved dtype
            from rfpo_megatron.offline.dist_format import saved_dtype

            kept = saved_dtype(actor_ckpt)
            dtype = str(kept).replace("torch.", "") if kept is not None and kept != torch.float32 else None
        names = [n for n in _canonical_order(arch) if n in state]

        def read_group(group: list[str]) -> dict[str, torch.Tensor]:
            return {n: state[n] for n in group}

        cfg_file = aux_dir / "config.json" if aux_dir is not None else None
    else:
        meta = read_meta(ckpt_dir)
        arch = meta.arch()
        check_files(ckpt_dir, meta)
        hf_config, aux_dir = meta.hf_config, ckpt_dir / HF_SUBDIR
        names = [n for p in range(meta.pp) for n in meta.stage_names(p)]

        def read_group(group: list[str]) -> dict[str, torch.Tensor]:
            return read_full_tensors(ckpt_dir, meta, group)

        cfg_file = ckpt_dir / HF_SUBDIR / "config.json"
    if hf_ref is not None:
        ref_arch = arch_from_hf_config(read_hf_config(hf_ref), where=str(Path(hf_ref) / "config.json"))
        require_no_diffs(compare_archs(ref_arch, arch, expected_name=f"{hf_ref}/config.json", got_name="the checkpoint"),
                         what="--hf-ref config disagrees with the checkpoint")
    target_dtype = parse_dtype(dtype)
    writer = HFWriter(out_dir, max_shard_bytes=max_shard_bytes)
    bar = _progress(len(names), "mcore→hf", progress)
    for group in _layer_groups(names):
        full = read_group(group)
        for name in group:
            rule = rule_or_tied_head(arch, name)
            if rule is not None:
                for hf_name, tensor in mcore_to_hf_tensors(arch, rule, full[name]):
                    writer.add(hf_name, tensor if target_dtype is None else tensor.to(target_dtype))
            bar.update(1)
    bar.close()
    files = writer.close()
    if target_dtype is None and cfg_file is not None and cfg_file.is_file():
        shutil.copy2(cfg_file, out_dir / "config.json")  # byte-identical round trip
    else:
        write_hf_config(out_dir, _with_dtype(hf_config, target_dtype))
    if aux_dir is not None and aux_dir.is_dir():
        copy_aux_files(aux_dir, out_dir)
    if hf_ref is not None:
        copy_aux_files(hf_ref, out_dir)
    # re-read what was written: every expected tensor once, right shapes
    check_hf_tensors(arch, HFReader(out_dir).shapes(), source=f"written {out_dir}")
    return files


def _canonical_order(arch: Arch) -> list[str]:
    names = [r.mcore for r in all_rules(arch)]
    return names + (["output_layer.weight"] if arch.tie_embeddings else [])


def check_full_state(arch: Arch, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Canonical full tensors (vocab unpadded) vs `arch`: ConversionError listing missing/unknown/mis-shaped ones.

    A tied model may carry output_layer.weight (the last PP stage's copy) only if it equals the embedding.
    """
    expected = {r.mcore: (r.mcore_shape, r.fields) for r in all_rules(arch)}
    problems = []
    missing = [n for n in expected if n not in state]
    extra_ok = {"output_layer.weight"} if arch.tie_embeddings else set()
    unknown = [n for n in state if n not in expected and n not in extra_ok]
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing[:12])}")
    if unknown:
        problems.append(f"unknown tensors ({len(unknown)}): {', '.join(unknown[:12])}")
    for n, (shape, fields) in expected.items():
        if n in state and tuple(state[n].shape) != shape:
            problems.append(f"'{n}' has shape {list(state[n].shape)}, config implies {list(shape)} ({fields})")
    if "output_layer.weight" in extra_ok and "output_layer.weight" in state and "embedding.word_embeddings.weight" in state:
        if not torch.equal(state["output_layer.weight"], state["embedding.word_embeddings.weight"]):
            problems.append("tied model: output_layer.weight differs from embedding.word_embeddings.weight")
    if problems:
        raise ConversionError(f"{source} does not match its {arch.model_type} config:\n  - " + "\n  - ".join(problems))


def dump_summary(meta: McoreMeta) -> str:
    return json.dumps({"tp": meta.tp, "pp": meta.pp, "stages": meta.stages, "vocab_size": meta.vocab_size,
                       "padded_vocab_size": meta.padded_vocab_size, "dtype": meta.dtype})
