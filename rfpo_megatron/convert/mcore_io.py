"""The on-disk Megatron-side checkpoint format (`rfpo-mcore` v1): per-(TP, PP)-rank safetensors + layout metadata.

Layout of a checkpoint directory::

    rfpo_mcore.json                      format, version, tp, pp, stages, vocab sizes, dtype, hf_config
    hf/                                  config.json, generation_config.json, tokenizer files (copied)
    mp_rank_{tp:02d}_{pp:03d}/model.safetensors
                                         this rank's TP shards of its PP stage, CANONICAL names
                                         (local-spec names, GLOBAL 0-based layer numbers), vocab
                                         tensors padded to padded_vocab_size and split over TP

`stages[p] = [first, end)` are the global layers of PP stage p. A tied model with PP > 1 also stores
output_layer.weight (the last stage's copy of the embedding). Any TP/PP layout loads any saved
layout: `load_weights` reads its own file when the layouts match, else merges the TP shards of the
stages it needs and re-splits (`sharding.load_full_state`).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rfpo_megatron.convert.arch import Arch, ConversionError, arch_from_hf_config
from rfpo_megatron.convert.mapping import all_rules
from rfpo_megatron.convert.sharding import canonical_params, load_full_state, merge_tp, tp_kind, unwrap

META_NAME = "rfpo_mcore.json"
FORMAT = "rfpo-mcore"
VERSION = 1
HF_SUBDIR = "hf"


@dataclass
class McoreMeta:
    """Layout metadata of an rfpo-mcore checkpoint (the content of rfpo_mcore.json)."""

    tp: int
    pp: int
    stages: list[list[int]]
    vocab_size: int
    padded_vocab_size: int
    dtype: str
    hf_config: dict[str, Any]
    format: str = FORMAT
    version: int = VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def arch(self) -> Arch:
        return arch_from_hf_config(self.hf_config, where=f"{META_NAME} hf_config")

    def stage_names(self, p: int) -> list[str]:
        """Canonical names stored in every TP rank file of PP stage p."""
        return stage_names(self.arch(), self.stages, p)


def even_stages(num_layers: int, pp: int) -> list[list[int]]:
    """[[first, end), ...] for an even split; ConversionError naming --pp if it does not divide."""
    if pp < 1 or num_layers % pp:
        raise ConversionError(f"--pp={pp} must divide num_hidden_layers={num_layers}")
    n = num_layers // pp
    return [[p * n, (p + 1) * n] for p in range(pp)]


def stage_names(arch: Arch, stages: Sequence[Sequence[int]], p: int) -> list[str]:
    pp = len(stages)
    names = [r.mcore for r in all_rules(arch, range(*stages[p]), first=p == 0, last=p == pp - 1)]
    if arch.tie_embeddings and pp > 1 and p == pp - 1:
        names.append("output_layer.weight")
    return names


def shard_shape(name: str, full_shape: Sequence[int], tp: int, padded_vocab: int) -> tuple[int, ...]:
    """Shape of one TP shard of a canonical tensor whose unpadded full shape is `full_shape`."""
    shape = list(full_shape)
    kind = tp_kind(name)
    if kind == "vocab":
        shape[0] = padded_vocab // tp
    elif kind in ("col", "glu"):
        shape[0] //= tp
    elif kind == "row":
        shape[1] //= tp
    return tuple(shape)


def rank_file(ckpt_dir: str | os.PathLike, tp_rank: int, pp_rank: int) -> Path:
    return Path(ckpt_dir) / f"mp_rank_{tp_rank:02d}_{pp_rank:03d}" / "model.safetensors"


def write_meta(ckpt_dir: str | os.PathLike, meta: McoreMeta) -> None:
    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    (Path(ckpt_dir) / META_NAME).write_text(json.dumps(asdict(meta), indent=2, sort_keys=True) + "\n")


def read_meta(ckpt_dir: str | os.PathLike) -> McoreMeta:
    path = Path(ckpt_dir) / META_NAME
    if not path.is_file():
        raise ConversionError(f"{path} not found: not an rfpo-mcore checkpoint (convert with `rfpo-megatron convert hf2mcore`)")
    raw = json.loads(path.read_text())
    if raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise ConversionError(f"{path}: format {raw.get('format')!r} v{raw.get('version')} is not {FORMAT} v{VERSION}")
    meta = McoreMeta(**raw)
    if len(meta.stages) != meta.pp:
        raise ConversionError(f"{path}: 'stages' has {len(meta.stages)} entries but pp={meta.pp}")
    return meta


def write_rank_file(path: Path, tensors: dict[str, torch.Tensor], *, tp_rank: int, pp_rank: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"format": FORMAT, "tp_rank": str(tp_rank), "pp_rank": str(pp_rank)})
    os.replace(tmp, path)


def check_files(ckpt_dir: str | os.PathLike, meta: McoreMeta) -> None:
    """Every rank file exists and holds exactly the expected names and shard shapes; ConversionError lists problems."""
    arch = meta.arch()
    full_shapes = {r.mcore: r.mcore_shape for r in all_rules(arch)}
    full_shapes["output_layer.weight"] = (arch.vocab_size, arch.hidden_size)
    problems: list[str] = []
    for p in range(meta.pp):
        expected = meta.stage_names(p)
        for t in range(meta.tp):
            path = rank_file(ckpt_dir, t, p)
            if not path.is_file():
                problems.append(f"missing file {path}")
                continue
            with safe_open(path, framework="pt") as f:
                got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            missing = [n for n in expected if n not in got]
            unknown = [n for n in got if n not in expected]
            if missing:
                problems.append(f"{path.parent.name}: missing tensors {missing[:8]}{' …' if len(missing) > 8 else ''}")
            if unknown:
                problems.append(f"{path.parent.name}: unknown tensors {unknown[:8]}{' …' if len(unknown) > 8 else ''}")
            for n in expected:
                if n in got:
                    want = shard_shape(n, full_shapes[n], meta.tp, meta.padded_vocab_size)
                    if got[n] != want:
                        problems.append(f"{path.parent.name}: '{n}' has shape {list(got[n])}, expected {list(want)}")
    if problems:
        raise ConversionError(f"{ckpt_dir} is inconsistent with {META_NAME}:\n  - " + "\n  - ".join(problems[:40]))


def read_full_tensors(
    ckpt_dir: str | os.PathLike, meta: McoreMeta, names: Iterable[str], *, strip_vocab: bool = True
) -> dict[str, torch.Tensor]:
    """Full (TP-merged) canonical tensors for `names`; vocab tensors cut to vocab_size if strip_vocab."""
    arch = meta.arch()
    wanted = list(names)
    by_stage: dict[int, list[str]] = {}
    for n in wanted:
        by_stage.setdefault(_stage_of(n, meta, arch), []).append(n)
    out: dict[str, torch.Tensor] = {}
    for p, stage_list in by_stage.items():
        handles = [safe_open(rank_file(ckpt_dir, t, p), framework="pt") for t in range(meta.tp)]
        for n in stage_list:
            shards = [h.get_tensor(n) for h in handles]
            out[n] = merge_tp(n, shards, vocab_size=meta.vocab_size if strip_vocab else None)
    return out


def _stage_of(name: str, meta: McoreMeta, arch: Arch) -> int:
    if name.startswith("decoder.layers."):
        i = int(name.split(".")[2])
        for p, (a, b) in enumerate(meta.stages):
            if a <= i < b:
                return p
        raise ConversionError(f"'{name}': layer {i} is outside every stage {meta.stages}")
    if name.startswith("embedding."):
        return 0
    return meta.pp - 1


# ---- live models (collective) ----------------------------------------------------------------------


def _stage_ranges(model_chunks: Sequence[torch.nn.Module]) -> tuple[int, int]:
    nums = [int(layer.layer_number) - 1 for c in model_chunks for layer in unwrap(c).decoder.layers]
    return (min(nums), max(nums) + 1) if nums else (0, 0)


def save_weights(
    model_chunks: Sequence[torch.nn.Module],
    ckpt_dir: str | os.PathLike,
    hf_config: dict[str, Any],
    *,
    hf_source_dir: str | os.PathLike | None = None,
) -> None:
    """Write this model's weights as an rfpo-mcore checkpoint (collective over all ranks).

    Each (TP, PP) rank with DP rank 0 writes its own shard file (no gathering); global rank 0 writes
    rfpo_mcore.json and hf/ (config.json from `hf_config`, aux files copied from hf_source_dir).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from rfpo_megatron.convert.hf_io import copy_aux_files, write_hf_config

    arch = arch_from_hf_config(hf_config)
    if arch.is_moe and (ps.get_expert_model_parallel_world_size() > 1
                        or ps.get_expert_tensor_parallel_world_size() != ps.get_tensor_model_parallel_world_size()):
        raise ConversionError(
            "the rfpo-mcore format stores one file per (TP, PP) rank and cannot hold experts spread over "
            "expert_model_parallel_size > 1 (or split over an expert TP other than TP); save with "
            "actor.checkpoint.save_actor_state or convert.export.save_hf")
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    t, p = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    ranges: list[Any] = [None] * pp
    dist.all_gather_object(ranges, _stage_ranges(model_chunks), group=ps.get_pipeline_model_parallel_group())
    tensors = {name: param for name, param in canonical_params(model_chunks)}
    first = next(iter(tensors.values()))
    padded = None
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in tensors:
            padded = tensors[name].shape[0] * tp
    padded_list: list[Any] = [None] * pp
    dist.all_gather_object(padded_list, padded, group=ps.get_pipeline_model_parallel_group())
    padded = next(x for x in padded_list if x is not None)
    if ps.get_data_parallel_rank() == 0:
        write_rank_file(rank_file(ckpt_dir, t, p), tensors, tp_rank=t, pp_rank=p)
    if dist.get_rank() == 0:
        meta = McoreMeta(tp=tp, pp=pp, stages=[list(r) for r in ranges], vocab_size=arch.vocab_size,
                         padded_vocab_size=padded, dtype=str(first.dtype).replace("torch.", ""), hf_config=dict(hf_config))
        write_meta(ckpt_dir, meta)
        hf_dir = Path(ckpt_dir) / HF_SUBDIR
        write_hf_config(hf_dir, dict(hf_config))
        if hf_source_dir is not None:
            copy_aux_files(hf_source_dir, hf_dir)
    dist.barrier()


def load_weights(model_chunks: Sequence[torch.nn.Module], ckpt_dir: str | os.PathLike) -> McoreMeta:
    """Load an rfpo-mcore checkpoint of any TP/PP layout into this rank's chunks; returns its metadata.

    The checkpoint's hf_config is compared with the model first (ConversionError naming each
    mismatched field); file contents are checked against the metadata (missing/unknown/shape).
    """
    from megatron.core import parallel_state as ps

    from rfpo_megatron.convert.validate import model_diffs, require_no_diffs

    meta = read_meta(ckpt_dir)
    arch = meta.arch()
    for chunk in model_chunks:
        require_no_diffs(model_diffs(arch, chunk), what=f"checkpoint {ckpt_dir} does not match the model")
    check_files(ckpt_dir, meta)
    tp, t, p = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    names = [n for n, _ in canonical_params(model_chunks)]
    experts_apart = arch.is_moe and (ps.get_expert_model_parallel_world_size() > 1
                                     or ps.get_expert_tensor_parallel_world_size() != tp)  # files hold TP splits
    same_layout = not experts_apart and tp == meta.tp and ps.get_pipeline_model_parallel_world_size() == meta.pp and list(
        _stage_ranges(model_chunks)) == list(meta.stages[p])
    if same_layout:
        with safe_open(rank_file(ckpt_dir, t, p), framework="pt") as f:
            own = {n: f.get_tensor(n) for n in names if n in f.keys()}
        missing = [n for n in names if n not in own]
        if missing:
            raise ConversionError(f"{rank_file(ckpt_dir, t, p)}: missing tensors {missing[:8]}")
        params = dict(canonical_params(model_chunks))
        with torch.no_grad():
            for n, tensor in own.items():
                if params[n].shape != tensor.shape:
                    raise ConversionError(f"'{n}': checkpoint shard {list(tensor.shape)} vs model {list(params[n].shape)}")
                params[n].copy_(tensor.to(dtype=params[n].dtype, device=params[n].device))
        return meta
    # different layout: gather the full tensors this stage needs, then take our shard
    stored = {n for s in range(meta.pp) for n in meta.stage_names(s)}
    wanted = [n for n in names if n in stored]
    if "output_layer.weight" in names and "output_layer.weight" not in stored:
        wanted.append("embedding.word_embeddings.weight")  # tied: the head is the embedding
    full = read_full_tensors(ckpt_dir, meta, wanted)
    load_full_state(model_chunks, full, vocab_size=meta.vocab_size)
    return meta
