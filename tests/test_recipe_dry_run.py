"""Recipe dry-run: every shipped GPU recipe (examples/*/config*.yaml) runs a scaled-down step on CPU over gloo.

A recipe is *meant for GPUs* when its rollout engine is not the CPU `embedded` engine or it sets actor.bf16
(examples/tiny_cpu and examples/custom_reward are neither). For each GPU recipe the test loads the YAML with the
project's `load_config` and overrides only

  * actor.hf_model_path -> a tiny random HF model of the recipe's family (read from the hf_model_path name:
    Qwen2.5-<size>B -> Qwen2 with qkv bias, embeddings tied below 7B as the released models; Qwen3-<n>B-A<k>B ->
    Qwen3-MoE, the tests/tiny_hf.py shape: 4 experts, top-2, every second layer dense), with 4 heads /
    2 KV heads (TP = 2 divides both), 2 layers per pipeline stage and a vocab that megatron pads;
  * the layout: TP -> min(TP, 2), PP -> min(PP, 2) (VPP -> min(VPP, 2) once the actor has the field), and DP ->
    4 // (TP * PP), so every case fills 4 ranks (DP = 2 where the layout leaves room, which shards the distributed
    optimizer for real); MoE: EP -> min(EP, 2) (2 of the 4 experts per rank, expert DP = 4 / (EP x expert TP x PP)),
    expert TP as the recipe sets it (min(., 2)). The recipe's own DP (`sbatch -N` x `--gpus-per-node` / (TP * PP))
    is only reported.

Every other flag (sequence parallel, distributed optimizer, CPU-Adam offload, recompute and its knobs, bf16,
grad-reduce overlap, packing, token budget, optimizer and schedule settings, the algo and rfpo sections) stays as
the recipe writes it. Then, the way the trainer does it: config validation, `train.lifecycle.validate_setup`
(check_files=False), `init_parallel`, `train.lifecycle.build_actor` (HF weights loaded), one `compute_logprobs`,
one `train_step` with the recipe's algo/rfpo sections, one weight export (`convert.export.iter_hf_weights`, the
weight-sync source). Checks: the actor honoured each flag (model config, optimizer classes, dtypes), the export
before the step equals the HF source weights, the export after the step equals the gathered full state mapped
to HF names, covers every HF tensor over the PP stages, and an HF transformers model loaded with it gives the
actor's log-probs (bf16 actor vs float32 HF: max <= 0.25, mean <= 0.05 nat; observed 5.5e-2 / 1.5e-2). A flag the actor cannot honour (it raises, or builds something else) fails here.

All scaled recipes (and the documented offload variant) run with world size 4, so they share one spawned world (megatron imported once); the world
re-initialises the model-parallel groups per recipe.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
import time

import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*", "config*.yaml")))
MAX_WORLD = 4
TINY = dict(hidden_size=64, vocab_size=250)  # 250 -> padded to 256 (TP=2: 128 rows per rank)
LENGTHS = [(5, 7), (3, 10), (6, 5), (4, 8), (2, 9)]  # (prompt, response); odd totals: SP pads to a multiple of TP

# Every ActorConfig field is either checked against what the actor built or named here with the reason it is not;
# a new actor flag fails test_every_actor_flag_is_classified until someone decides how the dry-run checks it.
CHECKED = {"tensor_model_parallel_size", "pipeline_model_parallel_size", "sequence_parallel", "recompute",
           "recompute_method", "recompute_num_layers", "bf16", "use_distributed_optimizer", "optimizer_cpu_offload",
           "overlap_grad_reduce", "grad_reduce_bucket_size", "packing", "lr", "weight_decay", "adam_beta1",
           "adam_beta2", "adam_eps", "clip_grad", "min_lr", "lr_decay_style", "lr_warmup_steps",
           "virtual_pipeline_model_parallel_size", "expert_model_parallel_size", "expert_tensor_parallel_size",
           "moe_token_dispatcher_type"}
NOT_CHECKED = {
    "hf_model_path": "swapped for the tiny model",
    "load": "no megatron checkpoint in CI (tests/test_actor_checkpoint.py)",
    "context_parallel_size": "CP needs TE attention and GPUs; config.validate refuses CP > 1",
    "micro_batch_size": "micro-batch split (tests/test_actor_parallel.py); kept as the recipe sets it",
    "max_tokens_per_gpu": "token-budget split (tests/test_actor_parallel.py); kept as the recipe sets it",
    "global_batch_size": "applied by the trainer (mini-batches are train_step calls)",
    "ppo_epochs": "applied by the trainer",
    "use_fused_kernels": "Triton kernels are CUDA-only (tests/test_kernels_*.py)",
    "use_reference": "reference actor is build_actor(with_optimizer=False), no recipe flag of its own",
    "router_replay": "R3 needs rollout routing; the dry-run batch has none (tests/test_router_replay.py, "
                     "tests/test_trainer_moe.py)",
    # MoE only (ignored by the dense recipes): tests/test_actor_moe.py, tests/test_convert_moe.py
    "moe_aux_loss_coef": "MoE only; float64 reference in tests/test_actor_moe.py",
    "moe_z_loss_coef": "MoE only; float64 reference in tests/test_actor_moe.py",
}


def _yaml(path: str) -> dict:
    with open(path) as fh:
        return yaml.safe_load(fh) or {}


def is_gpu_recipe(path: str) -> bool:
    """The rule: the rollout engine is not the CPU `embedded` engine, or the actor trains in bf16."""
    tree = _yaml(path)
    return (tree.get("rollout", {}).get("engine", "embedded") != "embedded"
            or bool(tree.get("actor", {}).get("bf16", False)))



# recipes naming actor fields this checkout lacks (the Qwen3-MoE recipe before the expert-parallel actor) wait
GPU_RECIPES = [p for p in EXAMPLES if is_gpu_recipe(p)]
# Documented variants of a shipped recipe, run as that recipe plus these overrides (name, recipe, overrides, GPUs):
# docs/scaling.md's 32B on one node (TP = 8 with megatron's CPU-Adam offload), so the offload path is dry-run too.
VARIANTS = [("qwen2.5-32b__single_node_offload", "qwen2.5-32b/config.yaml",
             ["actor.tensor_model_parallel_size=8", "actor.pipeline_model_parallel_size=1",
              "actor.optimizer_cpu_offload=true"], 8)]
CASES = [(os.path.relpath(p, os.path.join(ROOT, "examples")).replace(os.sep, "__"), p, [], None)
         for p in GPU_RECIPES] + [(n, os.path.join(ROOT, "examples", r), o, g) for n, r, o, g in VARIANTS]


def _recipe_gpus(path: str) -> int:
    """GPUs the actor runs on: (`sbatch -N` - RFPO_ROLLOUT_NODES) x `--gpus-per-node` (8 without the flag)."""
    text = open(path).read()
    nodes = int(m.group(1)) if (m := re.search(r"sbatch -N (\d+)", text)) else 1
    nodes -= int(m.group(1)) if (m := re.search(r"RFPO_ROLLOUT_NODES=(\d+)", text)) else 0
    per = int(m.group(1)) if (m := re.search(r"--gpus-per-node[= ](\d+)", text)) else 8
    return nodes * per


def model_family(hf_model_path: str) -> dict:
    """Tiny-model settings of the recipe's model family, read from the checkpoint directory name."""
    name = os.path.basename(os.path.normpath(hf_model_path))
    m = re.match(r"(?i)qwen2(?:\.5)?-(\d+(?:\.\d+)?)b", name)
    if m:  # Qwen2 / Qwen2.5: qkv bias (Qwen2Config), embeddings tied for the sub-7B models only
        return dict(family="qwen2", tie_word_embeddings=float(m.group(1)) < 7)
    if re.match(r"(?i)qwen3-\d+(?:\.\d+)?b-a\d+(?:\.\d+)?b", name):  # Qwen3-MoE (30B-A3B, 235B-A22B): untied
        return dict(family="qwen3_moe", tie_word_embeddings=False)
    raise AssertionError(f"recipe model {hf_model_path!r}: no tiny-model builder for this family in "
                         f"tests/test_recipe_dry_run.py (add one: the dry-run must cover every recipe)")


def scaled_case(name: str, path: str, extra: list, gpus, tmp: str) -> dict:
    """The recipe's overrides for the CPU dry-run (layout and model only; after a variant's `extra`) and the tiny
    model it needs."""
    from rfpo_megatron.config import ActorConfig, apply_overrides

    a = apply_overrides(_yaml(path), list(extra)).get("actor", {})
    tp0, pp0 = int(a.get("tensor_model_parallel_size", 1)), int(a.get("pipeline_model_parallel_size", 1))
    vpp0 = a.get("virtual_pipeline_model_parallel_size")
    has_vpp = "virtual_pipeline_model_parallel_size" in {f.name for f in dataclasses.fields(ActorConfig)}
    if vpp0 and int(vpp0) > 1 and not has_vpp:
        pytest.skip(f"{os.path.relpath(path, ROOT)} sets actor.virtual_pipeline_model_parallel_size={vpp0}, which "
                    f"this actor has no field for (VPP lands with issue 13 deliverable 5)")
    dp0 = max(1, (gpus or _recipe_gpus(path)) // (tp0 * pp0))
    tp, pp = min(tp0, 2), min(pp0, 2)
    vpp = min(int(vpp0), 2) if vpp0 and int(vpp0) > 1 else 1
    dp = MAX_WORLD // (tp * pp)  # fill the 4 ranks: DP > 1 wherever the layout leaves room (real dist-opt shards)
    fam = model_family(a.get("hf_model_path", ""))
    model_dir = os.path.join(tmp, name.replace(".yaml", ""))
    from tiny_hf import MOE_HF, make_tiny_hf_model, make_tiny_moe

    overrides = list(extra) + [f"actor.hf_model_path={model_dir}", f"actor.tensor_model_parallel_size={tp}",
                 f"actor.pipeline_model_parallel_size={pp}"]
    ep, etp = 1, None
    if fam["family"] == "qwen3_moe":
        layers = 2 * pp * vpp
        make_tiny_moe(model_dir, dict(MOE_HF, num_hidden_layers=layers, max_position_embeddings=64,
                                      mlp_only_layers=list(range(1, layers, 2)), **TINY))
        ep = min(int(a.get("expert_model_parallel_size", 1) or 1), 2)
        etp0 = a.get("expert_tensor_parallel_size")
        etp = None if etp0 is None else min(int(etp0), 2)
        overrides.append(f"actor.expert_model_parallel_size={ep}")
        if etp is not None:
            overrides.append(f"actor.expert_tensor_parallel_size={etp}")
    else:
        make_tiny_hf_model(model_dir, num_layers=2 * pp * vpp, max_positions=64,
                           tie_word_embeddings=fam["tie_word_embeddings"], **TINY)
    if vpp > 1:
        overrides.append(f"actor.virtual_pipeline_model_parallel_size={vpp}")
    return dict(path=path, name=name, overrides=overrides, tp=tp, pp=pp, vpp=vpp, dp=dp, world=tp * pp * dp,
                ep=ep, etp=tp if etp is None else etp, recipe_layout=(tp0, pp0, dp0), model_dir=model_dir, family=fam)


def _batch(rfpo_enabled: bool, seed: int = 3):
    from rfpo_megatron.actor.batch import ActorBatch

    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, TINY["vocab_size"], (p + r,), generator=g) for p, r in LENGTHS]
    b = ActorBatch(input_ids=ids, prompt_lens=[p for p, _ in LENGTHS])
    b.advantages = [torch.randn(r, generator=g) for _, r in LENGTHS]
    if rfpo_enabled:  # two RFPO fixes with a bounded log R_off, as the fix stage produces them
        b.is_fixed = torch.tensor([False, True, False, False, True])
        b.log_roff = torch.tensor([0.0, 0.4, 0.0, 0.0, -0.3])
    return b.validate()


def _optimizers(opt) -> list:
    return list(getattr(opt, "chained_optimizers", None) or [opt])


def _honoured(actor, tp: int, pp: int) -> dict:
    """What megatron really built, flag by flag (compared with the recipe in the parent)."""
    from megatron.core import parallel_state as mpu

    mc = actor.modules[0].config
    opts = _optimizers(actor.optimizer)
    inner = [getattr(o, "optimizer", None) for o in opts]
    ocfg = opts[0].config
    params = [p for m in actor.modules for p in m.parameters()]
    out = dict(
        tp=mpu.get_tensor_model_parallel_world_size(), pp=mpu.get_pipeline_model_parallel_world_size(),
        dp=mpu.get_data_parallel_world_size(), vpp=len(actor.modules),
        ep=mpu.get_expert_model_parallel_world_size(), etp=mpu.get_expert_tensor_parallel_world_size(),
        moe_token_dispatcher_type=mc.moe_token_dispatcher_type if mc.num_moe_experts else None,
        sequence_parallel=bool(mc.sequence_parallel),
        recompute_granularity=mc.recompute_granularity, recompute_method=mc.recompute_method,
        recompute_num_layers=mc.recompute_num_layers,
        param_dtypes=sorted({str(p.dtype) for p in params}),
        main_grad_dtypes=sorted({str(p.main_grad.dtype) for p in params if getattr(p, "main_grad", None) is not None}),
        optimizer_classes=sorted({type(o).__name__ for o in opts}),
        inner_classes=sorted({type(i).__name__ for i in inner if i is not None}),
        use_distributed_optimizer=bool(ocfg.use_distributed_optimizer),
        optimizer_cpu_offload=bool(ocfg.optimizer_cpu_offload),
        optimizer_offload_fraction=float(ocfg.optimizer_offload_fraction),
        use_precision_aware_optimizer=bool(ocfg.use_precision_aware_optimizer),
        opt_bf16=bool(ocfg.bf16), lr=float(ocfg.lr), min_lr=float(ocfg.min_lr), weight_decay=float(ocfg.weight_decay),
        adam_beta1=float(ocfg.adam_beta1), adam_beta2=float(ocfg.adam_beta2), adam_eps=float(ocfg.adam_eps),
        clip_grad=float(ocfg.clip_grad),
        group_lr=sorted({float(g["lr"]) for o in opts for g in o.param_groups}),
        lr_decay_style=actor.scheduler.lr_decay_style, lr_warmup_steps=int(actor.scheduler.lr_warmup_steps),
        ddp_overlap_grad_reduce=[bool(m.ddp_config.overlap_grad_reduce) for m in actor.model],
        ddp_dist_opt=[bool(m.ddp_config.use_distributed_optimizer) for m in actor.model],
        ddp_bucket_size=[m.ddp_config.bucket_size for m in actor.model],
        layout=str(actor.layout),
    )
    if out["optimizer_cpu_offload"]:  # where megatron keeps the fp32 main params and Adam state
        devs = set()
        for i in inner:
            for group in getattr(i, "param_groups", []):
                devs |= {str(p.device) for p in group["params"]}
        out["offload_param_devices"] = sorted(devs)
    return out


def _world(rank: int, cases: list) -> list:
    """One spawned rank: every case in order, re-initialising the model-parallel groups for each."""
    from rfpo_megatron.actor.parallel import destroy_parallel, init_parallel, parallel_info
    from rfpo_megatron.config import load_config
    from rfpo_megatron.convert.arch import arch_from_hf_config
    from rfpo_megatron.convert.export import iter_hf_weights
    from rfpo_megatron.convert.mapping import mcore_to_hf_state
    from rfpo_megatron.convert.sharding import gather_full_state
    from rfpo_megatron.train.lifecycle import build_actor, validate_setup

    results = []
    for case in cases:
        t0 = time.monotonic()
        cfg = load_config(case["path"], case["overrides"])  # config.validate on the scaled recipe
        validate_setup(cfg, check_files=False)
        a = cfg.actor
        init_parallel(a.tensor_model_parallel_size, a.pipeline_model_parallel_size, seed=cfg.trainer.seed,
                      vpp=a.virtual_pipeline_model_parallel_size, ep=a.expert_model_parallel_size,
                      etp=a.expert_tensor_parallel_size)  # as train.lifecycle does
        info = parallel_info()
        actor = build_actor(cfg)  # the trainer's own build path (Actor + HF weights)
        pre = {n: t.clone() for bucket in iter_hf_weights(actor.modules, actor.hf_config, bucket_bytes=1 << 16)
               for n, t in bucket}
        batch = _batch(cfg.rfpo.enabled)
        logp, _ = actor.compute_logprobs(batch)
        batch.old_logp = logp
        metrics = actor.train_step(batch, cfg.algo, cfg.rfpo if cfg.rfpo.enabled else None)
        flags = _honoured(actor, a.tensor_model_parallel_size, a.pipeline_model_parallel_size)
        post = {n: t.clone() for bucket in iter_hf_weights(actor.modules, actor.hf_config, bucket_bytes=1 << 16)
                for n, t in bucket}
        arch = arch_from_hf_config(actor.hf_config)
        full = mcore_to_hf_state(arch, gather_full_state(actor.modules, vocab_size=arch.vocab_size))
        export_vs_full = {n: (post[n].float() - full[n].float()).abs().max().item() if n in full else None
                          for n in post}
        logp_after, _ = actor.compute_logprobs(_batch(cfg.rfpo.enabled))
        keep = info.tp_rank == 0 and info.dp_rank == 0  # one copy of each PP stage's tensors goes back
        results.append(dict(
            name=case["name"], rank=rank, tp_rank=info.tp_rank, pp_rank=info.pp_rank, dp_rank=info.dp_rank,
            flags=flags, metrics=metrics, logp=logp, logp_after=logp_after, vocab=actor.vocab_size,
            pre=pre if keep else None, post=post if keep else None, export_vs_full=export_vs_full,
            only_in_full=sorted(set(full) - set(post)), seconds=time.monotonic() - t0))
        del actor
        destroy_parallel(keep_process_group=True)
    return results


def _expected(cfg, case: dict) -> dict:
    """What the recipe's actor section asks megatron for, in the names of `_honoured`."""
    a = cfg.actor
    on_gpu = torch.cuda.is_available()
    dist_opt = bool(a.use_distributed_optimizer) if a.use_distributed_optimizer is not None else (
        on_gpu or bool(a.optimizer_cpu_offload))
    exp = dict(tp=case["tp"], pp=case["pp"], dp=case["dp"], vpp=case["vpp"], ep=case["ep"], etp=case["etp"],
               moe_token_dispatcher_type=a.moe_token_dispatcher_type if case["family"]["family"] == "qwen3_moe" else None,
               sequence_parallel=bool(a.sequence_parallel and case["tp"] > 1),
               recompute_granularity=None if a.recompute == "none" else a.recompute,
               param_dtypes=["torch.bfloat16" if a.bf16 else "torch.float32"],
               main_grad_dtypes=["torch.float32"],
               use_distributed_optimizer=dist_opt, optimizer_cpu_offload=bool(a.optimizer_cpu_offload),
               opt_bf16=bool(a.bf16), lr=a.lr, min_lr=a.min_lr, weight_decay=a.weight_decay,
               adam_beta1=a.adam_beta1, adam_beta2=a.adam_beta2, adam_eps=a.adam_eps, clip_grad=a.clip_grad,
               lr_decay_style=a.lr_decay_style, lr_warmup_steps=a.lr_warmup_steps,
               ddp_overlap_grad_reduce=[bool(a.overlap_grad_reduce)] * case["vpp"],
               ddp_dist_opt=[dist_opt] * case["vpp"])
    if a.grad_reduce_bucket_size is not None:
        exp["ddp_bucket_size"] = [a.grad_reduce_bucket_size] * case["vpp"]
    if a.recompute == "full":
        exp.update(recompute_method=a.recompute_method, recompute_num_layers=a.recompute_num_layers)
    if a.lr_warmup_steps == 0 and a.lr_decay_style == "constant":
        exp["group_lr"] = [a.lr]  # the LR the step ran with
    if a.packing != "auto":
        exp["layout"] = a.packing
    return {k: v for k, v in exp.items() if v is not None}


def _check_flags(name: str, flags: dict, exp: dict) -> None:
    def same(x, y):
        if isinstance(y, float) and isinstance(x, (int, float)):
            return abs(x - y) <= 1e-12 * max(1.0, abs(y))
        if isinstance(y, list) and isinstance(x, list) and len(x) == len(y):
            return all(same(a, b) for a, b in zip(x, y))
        return x == y

    bad = {k: (v, flags.get(k)) for k, v in exp.items() if not same(flags.get(k), v)}
    assert not bad, f"{name}: the actor did not honour (recipe asks, actor built): {bad}"
    if exp["use_distributed_optimizer"]:
        assert flags["optimizer_classes"] == ["DistributedOptimizer"], (name, flags["optimizer_classes"])
    if exp["optimizer_cpu_offload"]:  # megatron's hybrid CPU-Adam, everything on the host
        assert flags["inner_classes"] == ["HybridDeviceOptimizer"], (name, flags["inner_classes"])
        assert flags["optimizer_offload_fraction"] == 1.0 and flags["use_precision_aware_optimizer"], (name, flags)
        assert flags["offload_param_devices"] == ["cpu"], (name, flags["offload_param_devices"])


def _hf_logp(model_dir: str, state: dict, batch) -> list:
    """Log-probs of `batch`'s responses under an HF transformers model holding the exported weights (float32).

    The weights are saved as a checkpoint next to the model's config.json and loaded by transformers'
    `from_pretrained`, whose own conversion turns per-expert MoE names into its fused expert parameters."""
    import shutil
    import tempfile

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d:
        shutil.copy(os.path.join(model_dir, "config.json"), d)
        save_file({k: v.float().contiguous() for k, v in state.items()}, os.path.join(d, "model.safetensors"))
        model, info = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    model.eval()
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    tied = model.config.tie_word_embeddings
    assert set(info["missing_keys"]) <= ({"lm_head.weight"} if tied else set()), info["missing_keys"]
    out = []
    with torch.no_grad():
        for x, p in zip(batch.input_ids, batch.prompt_lens):
            lsm = torch.log_softmax(model(x.unsqueeze(0)).logits[0].double(), -1)
            out.append(lsm[p - 1:-1].gather(1, x[p:].unsqueeze(1)).squeeze(1))
    return out


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    from rfpo_megatron.actor.launch import spawn_world

    os.environ["PYTHONPATH"] = os.pathsep.join(
        [ROOT, os.path.join(ROOT, "tests")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    tmp = str(tmp_path_factory.mktemp("recipes"))
    cases = [scaled_case(n, p, o, g, tmp) for n, p, o, g in CASES]
    by_world: dict[int, list] = {}
    for c in cases:
        by_world.setdefault(c["world"], []).append(c)
    results, walls = {}, {}
    for world, group in sorted(by_world.items()):
        t0 = time.monotonic()
        per_rank = spawn_world(_world, world, group, timeout_s=600)
        walls[world] = time.monotonic() - t0
        for c in group:
            results[c["name"]] = [next(r for r in rank_res if r["name"] == c["name"]) for rank_res in per_rank]
    return {c["name"]: (c, results[c["name"]]) for c in cases}, walls


def test_gpu_recipes_are_selected():
    names = {os.path.relpath(p, ROOT) for p in GPU_RECIPES}
    assert len(names) >= 4, names
    assert not any(n.startswith(("examples/tiny_cpu", "examples/custom_reward")) for n in names), names
    for p in GPU_RECIPES:
        assert _yaml(p)["actor"].get("bf16") is True, f"{p}: a GPU recipe trains in bf16"


def test_every_actor_flag_is_classified():
    from rfpo_megatron.config import ActorConfig

    fields = {f.name for f in dataclasses.fields(ActorConfig)}
    new = fields - CHECKED - set(NOT_CHECKED)
    assert not new, f"ActorConfig fields the recipe dry-run neither checks nor explains: {sorted(new)}"


@pytest.mark.parametrize("name,path,extra", [c[:3] for c in CASES], ids=[c[0] for c in CASES])
def test_recipe_dry_run(name, path, extra, dry_runs):
    from rfpo_megatron.config import apply_overrides, load_config

    runs, walls = dry_runs
    case, ranks = runs[name]
    cfg = load_config(path, case["overrides"])
    assert case["world"] <= MAX_WORLD
    recipe = apply_overrides(_yaml(path), list(extra))["actor"]
    if int(recipe.get("tensor_model_parallel_size", 1)) > 1:
        assert case["tp"] > 1, "a TP recipe keeps TP > 1 (so SP is exercised)"
    if int(recipe.get("pipeline_model_parallel_size", 1)) > 1:
        assert case["pp"] > 1
    exp = _expected(cfg, case)
    for r in ranks:
        _check_flags(f"{name} rank {r['rank']}", r["flags"], exp)
        m = r["metrics"]
        assert all(torch.isfinite(torch.tensor(float(v))) for v in m.values()), m
        assert m["train/grad_norm"] > 0, m
        assert abs(m["train/ppo_kl"]) < 1e-6, m  # old log-probs are the current policy's
        for lp, (_, resp) in zip(r["logp"], LENGTHS):
            assert lp.shape == (resp,) and bool(torch.isfinite(lp).all()) and bool((lp <= 0).all())
        for x, y in zip(r["logp"], ranks[0]["logp"]):  # every rank gets the same whole-batch log-probs
            assert torch.equal(x, y)
        assert not r["only_in_full"], r["only_in_full"]
        assert all(v == 0.0 for v in r["export_vs_full"].values()), r["export_vs_full"]
    # the export over the PP stages is exactly the HF model's tensor set
    from safetensors.torch import load_file

    src = {}
    for f in glob.glob(os.path.join(case["model_dir"], "*.safetensors")):
        src.update(load_file(f))
    pre, post = {}, {}
    for r in ranks:
        if r["pre"] is not None:
            assert not (set(pre) & set(r["pre"])), "two PP stages exported the same tensor"
            pre.update(r["pre"])
            post.update(r["post"])
    assert set(pre) == set(post) == set(src) - ({"lm_head.weight"} if case["family"]["tie_word_embeddings"]
                                                else set()), (sorted(set(src) ^ set(pre)))
    dtype = torch.bfloat16 if cfg.actor.bf16 else torch.float32
    for n, t in pre.items():  # before the step: the HF source weights in the actor's dtype, bit for bit
        assert t.dtype == dtype and torch.equal(t, src[n].to(dtype)), n
    assert any(not torch.equal(pre[n], post[n]) for n in pre), "the train step changed no exported weight"
    # the exported weights in an HF model give the actor's log-probs after the step (actor computes in bf16)
    hf = _hf_logp(case["model_dir"], post, _batch(cfg.rfpo.enabled))
    # bf16 activation rounding bounds the agreement; a wrong tensor mapping gives errors of order 1 nat
    errs = torch.cat([(a.double() - b).abs() for a, b in zip(ranks[0]["logp_after"], hf)])
    diff, mean = errs.max().item(), errs.mean().item()
    max_tol, mean_tol = (0.25, 0.05) if cfg.actor.bf16 else (1e-4, 1e-5)
    assert diff < max_tol and mean < mean_tol, (diff, mean)
    secs = max(r["seconds"] for r in ranks)
    print(f"\n{name}: recipe TP/PP/DP={case['recipe_layout']} -> TP={case['tp']} PP={case['pp']} DP={case['dp']}"
          f" VPP={case['vpp']}; SP={exp['sequence_parallel']} recompute={cfg.actor.recompute} bf16={cfg.actor.bf16}"
          f" dist_opt={exp['use_distributed_optimizer']} offload={cfg.actor.optimizer_cpu_offload}; "
          f"{secs:.1f}s in the world (world walls {walls}); export vs HF log-prob diff max {diff:.2e} mean {mean:.2e}")
