"""Planner exactness: parameter, gradient and optimizer bytes against real megatron-core tensors.

Two real processes over gloo build the actor's GPTModel (rfpo_megatron.actor.model.build_model) under
tp=2, dp=2 and pp=2, wrap it in megatron's DistributedDataParallel with the distributed optimizer, and
report per-rank parameter numels, the DDP buffers' real sizes/dtypes, the distributed optimizer's own
shard ranges (DistributedOptimizer._build_gbuf_range_map) and the bytes torch.optim.Adam really allocates
for those shards. The planner must reproduce every number exactly.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from rfpo_megatron.plan import RankState, TrainSettings, rank_state_bytes, shape_from_hf, stage_params

CASES = {
    # qwen2: qkv bias, untied; qwen3: q/k norm, tied embeddings; vocab 300 is padded to 128*tp
    "qwen2_untied": dict(model_type="qwen2", vocab_size=300, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False, max_position_embeddings=128),
    "qwen3_tied": dict(model_type="qwen3", vocab_size=300, hidden_size=64, intermediate_size=96,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       tie_word_embeddings=True, max_position_embeddings=128),
    # sizes that are not multiples of 128 (hidden 40, head_dim 10, ffn 72): megatron's 64-element alignment
    "qwen2_tied_odd": dict(model_type="qwen2", vocab_size=300, hidden_size=40, intermediate_size=72,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           tie_word_embeddings=True, max_position_embeddings=128),
    # llama: no biases; a single kv head, replicated over tp=2 (num_query_groups < tp)
    "llama_tied_1kv": dict(model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=96,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                           tie_word_embeddings=True, max_position_embeddings=128),
}
LAYOUTS = [(2, 1, 1), (1, 1, 2), (1, 2, 1)]  # (tp, pp, dp) over 2 processes
DTYPES = ["fp32", "bf16"]

WORKER = textwrap.dedent(
    r'''
    import json, os, sys
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    torch.set_num_threads(1)
    from rfpo_megatron.actor.compat import enable_cpu_compat
    enable_cpu_compat()
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel as DDP, DistributedDataParallelConfig
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from rfpo_megatron.actor.model import build_model

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cases, layouts, dtypes, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = []
    for tp, pp, dp in layouts:
        mpu.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                      create_gloo_process_groups=True)
        tensor_parallel.model_parallel_cuda_manual_seed(1)
        for name, hf in cases.items():
            for dt in dtypes:
                [model] = build_model(hf, params_dtype=torch.bfloat16 if dt == "bf16" else torch.float32, spec="local")
                params = {n: p.numel() for n, p in model.named_parameters()}
                ddp = DDP(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                          use_distributed_optimizer=True), model)
                bufs, owned_total, adam_bytes, main_bytes = [], 0, 0, 0
                for buf in ddp.buffers:
                    bufs.append(dict(numel=buf.grad_data.numel(), grad_elt=buf.grad_data.element_size(),
                                     param_numel=buf.param_data.numel(), param_elt=buf.param_data.element_size()))
                    rmap = DistributedOptimizer._build_gbuf_range_map(buf)
                    owned = sum(r["param"].size for buckets in rmap.values() for b in buckets
                                for r in b["param_map"].values())
                    owned_total += owned
                    # the optimizer's real tensors for these shards: fp32 main copy (bf16 params only) + Adam
                    shard = torch.zeros(owned, dtype=torch.float32, requires_grad=True)
                    opt = torch.optim.Adam([shard], lr=1e-3)
                    shard.grad = torch.ones_like(shard)
                    opt.step()
                    st = opt.state[shard]
                    adam_bytes += sum(v.numel() * v.element_size() for v in st.values() if v.dim() > 0)
                    if buf.param_data.element_size() == 2:
                        main_bytes += shard.numel() * shard.element_size()
                results.append(dict(case=name, dtype=dt, tp=tp, pp=pp, dp=dp, tp_rank=mpu.get_tensor_model_parallel_rank(),
                                    pp_rank=mpu.get_pipeline_model_parallel_rank(), dp_rank=mpu.get_data_parallel_rank(),
                                    params=params, buffers=bufs, owned=owned_total, adam_bytes=adam_bytes,
                                    main_bytes=main_bytes))
                del ddp, model
        mpu.destroy_model_parallel()
    with open(out, "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
    '''
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def real_ranks(tmp_path_factory):
    """Per-rank facts from 2 real gloo processes (run once for the module)."""
    d = tmp_path_factory.mktemp("plan_exact")
    script = d / "worker.py"
    script.write_text(WORKER)
    port = _free_port()
    procs = []
    for r in range(2):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        procs.append(subprocess.Popen(
            [sys.executable, str(script), json.dumps(CASES), json.dumps(LAYOUTS), json.dumps(DTYPES), str(d / f"r{r}.json")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-4000:]
    rows = []
    for r in range(2):
        rows += json.loads((d / f"r{r}.json").read_text())
    return rows


def _settings(dtype: str) -> TrainSettings:
    # LocalNorm (actor/model.py) creates norm weights in params_dtype: one DDP buffer per model
    return TrainSettings(param_dtype=dtype, norms_fp32=False, grad_fp32=True, use_distributed_optimizer=True)


def test_param_names_and_numels_match_real_model(real_ranks):
    assert len(real_ranks) == 2 * len(LAYOUTS) * len(CASES) * len(DTYPES)
    for row in real_ranks:
        m = shape_from_hf(CASES[row["case"]])
        plan = {n: k for n, k, _ in stage_params(m, row["tp"], row["pp"], row["pp_rank"])}
        assert plan == row["params"], (row["case"], row["tp"], row["pp"], row["pp_rank"])


def test_grad_weight_and_optimizer_bytes_exact(real_ranks):
    for row in real_ranks:
        m = shape_from_hf(CASES[row["case"]])
        st: RankState = rank_state_bytes(m, row["tp"], row["pp"], row["pp_rank"], row["dp"], _settings(row["dtype"]),
                                         dp_rank=row["dp_rank"])
        real_bufs = sorted((b["numel"], b["param_elt"]) for b in row["buffers"])
        plan_bufs = sorted(b.numel for b in st.buffers)
        assert [n for n, _ in real_bufs] == plan_bufs, row
        assert st.grads == sum(b["numel"] * b["grad_elt"] for b in row["buffers"]), row
        assert st.weights == sum(b["param_numel"] * b["param_elt"] for b in row["buffers"]), row
        assert st.params == sum(row["params"].values())
        assert st.optimizer == row["adam_bytes"] + row["main_bytes"], row
        assert st.optimizer_fp32_grad == 4 * row["owned"]


def test_dp2_shards_cover_every_element_once(real_ranks):
    """With dp=2 the two ranks' owned elements add up to all parameters (no element twice, none lost)."""
    for case in CASES:
        for dt in DTYPES:
            rows = [r for r in real_ranks if r["case"] == case and r["dtype"] == dt and r["dp"] == 2]
            assert len(rows) == 2
            assert rows[0]["owned"] + rows[1]["owned"] == sum(rows[0]["params"].values())
            assert rows[0]["owned"] != 0 and rows[1]["owned"] != 0
