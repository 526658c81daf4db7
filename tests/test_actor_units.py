"""Actor pieces without a distributed world: micro-batching, packing, ActorBatch, HF config mapping, CPU compat."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from rfpo_megatron.actor.batch import ActorBatch, pad_tokens
from rfpo_megatron.actor.model import padded_vocab_size, transformer_config_from_hf
from rfpo_megatron.actor.packing import make_microbatches, pack_microbatch, split_for_dp


# ------------------------------------------------------------------ micro-batching
def test_make_microbatches_pad_budget_hand_worked():
    # pad cost = count * max_len: [5,7,3] -> 21; +9 -> 36 > 30 close; [9,9,2] -> 27; +8 -> 36 close
    assert make_microbatches([5, 7, 3, 9, 9, 2, 8], max_tokens=30, layout="pad") == [[0, 1, 2], [3, 4, 5], [6]]


def test_make_microbatches_thd_budget_counts_real_tokens():
    assert make_microbatches([5, 7, 3, 9, 9, 2], max_tokens=20, layout="thd") == [[0, 1, 2], [3, 4, 5]]


def test_make_microbatches_oversize_sample_alone_and_fixed_size():
    assert make_microbatches([50, 3, 4], max_tokens=10) == [[0], [1, 2]]
    assert make_microbatches([1, 2, 3, 4, 5], micro_batch_size=2) == [[0, 1], [2, 3], [4]]
    assert make_microbatches([], max_tokens=10) == []
    with pytest.raises(ValueError, match="max_tokens_per_gpu"):
        make_microbatches([1], max_tokens=0)


def test_make_microbatches_respects_budget_random():
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(1, 30, (200,), generator=g).tolist()
    for layout in ("pad", "thd"):
        mbs = make_microbatches(lens, max_tokens=64, layout=layout)
        assert [i for mb in mbs for i in mb] == list(range(200))
        for mb in mbs:
            ls = [lens[i] for i in mb]
            cost = len(ls) * max(ls) if layout == "pad" else sum(ls)
            assert cost <= 64 or len(mb) == 1


def test_split_for_dp_balanced_and_complete():
    lens = [10, 9, 8, 7, 1, 1, 1, 1]
    parts = split_for_dp(lens, 2)
    assert sorted(i for p in parts for i in p) == list(range(8))
    loads = [sum(lens[i] for i in p) for p in parts]
    assert loads == [19, 19]
    assert split_for_dp(lens, 2) == parts  # deterministic
    assert split_for_dp([3], 2) == [[0], []]


# ------------------------------------------------------------------ packing
def test_pack_microbatch_pad_rows_and_labels():
    ids = [torch.tensor([10, 11, 12, 13]), torch.tensor([20, 21, 22]), torch.tensor([30, 31, 32, 33, 34])]
    mb = pack_microbatch(ids, [2, 1, 4], [0, 1], layout="pad", pad_id=0)
    assert mb.input_ids.tolist() == [[10, 11, 12, 13], [20, 21, 22, 0]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    # sample 0: positions 1,2 predict 12,13 ; sample 1 (row offset 4): positions 0,1 predict 21,22
    assert mb.label_rows.tolist() == [1, 2, 4, 5]
    assert mb.labels.tolist() == [12, 13, 21, 22]
    assert mb.resp_lens == [2, 2] and mb.num_tokens == 4 and mb.packed_seq_params is None


def test_pack_microbatch_thd_cu_seqlens():
    ids = [torch.tensor([10, 11, 12, 13]), torch.tensor([20, 21, 22]), torch.tensor([30, 31, 32, 33, 34])]
    mb = pack_microbatch(ids, [2, 1, 4], [1, 2], layout="thd")
    assert mb.input_ids.tolist() == [[20, 21, 22, 30, 31, 32, 33, 34]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    assert mb.label_rows.tolist() == [0, 1, 6]
    assert mb.labels.tolist() == [21, 22, 34]
    psp = mb.packed_seq_params
    assert psp.qkv_format == "thd" and psp.cu_seqlens_q.tolist() == [0, 3, 8] and psp.max_seqlen_q == 5


# ------------------------------------------------------------------ ActorBatch
def test_actor_batch_validation_and_helpers():
    b = ActorBatch.from_prompt_response([[1, 2], [3]], [[4, 5, 6], [7]], advantages=[[1.0, 1.0, 1.0], [0.5]])
    assert b.lengths == [5, 2] and b.response_lens == [3, 1] and len(b) == 2
    assert b.mask_of(0).tolist() == [True, True, True]
    with pytest.raises(ValueError, match=r"advantages\[1\] has 2 values, expected the response length 1"):
        ActorBatch.from_prompt_response([[1, 2], [3]], [[4, 5, 6], [7]], advantages=[[1.0] * 3, [0.5, 0.5]])
    with pytest.raises(ValueError, match=r"prompt_lens\[0\]=0"):
        ActorBatch(input_ids=[[1, 2]], prompt_lens=[0])
    with pytest.raises(ValueError, match="log_roff has 1 values, expected 2"):
        ActorBatch.from_prompt_response([[1], [2]], [[3], [4]], log_roff=[0.0])
    assert pad_tokens([torch.tensor([1.0, 2.0]), torch.tensor([3.0])], fill=-1).tolist() == [[1, 2], [3, -1]]
    ids = pad_tokens([[1, 2, 3], [4], []], fill=9, dtype=torch.long)  # lists too: the package's one padding helper
    assert ids.dtype == torch.long and ids.tolist() == [[1, 2, 3], [4, 9, 9], [9, 9, 9]]
    # fields assigned after construction are checked and converted by validate()
    b.old_logp = [[-1.0, -2.0, -3.0], torch.tensor([-0.5], dtype=torch.float64)]
    assert b.validate() is b and b.old_logp[1].dtype == torch.float32 and torch.is_tensor(b.old_logp[0])
    b.old_logp = [[-1.0], [-0.5]]
    with pytest.raises(ValueError, match=r"old_logp\[0\] has 1 values, expected the response length 3"):
        b.validate()


# ------------------------------------------------------------------ HF config mapping
QWEN25 = dict(model_type="qwen2", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
              intermediate_size=96, vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True)


def test_config_qwen2():
    c = transformer_config_from_hf(QWEN25, tp=2, pp=2)
    assert (c.num_layers, c.hidden_size, c.ffn_hidden_size) == (4, 64, 96)
    assert (c.num_attention_heads, c.num_query_groups, c.kv_channels) == (4, 2, 16)
    assert c.add_qkv_bias and not c.add_bias_linear and not c.qk_layernorm
    assert c.normalization == "RMSNorm" and c.layernorm_epsilon == 1e-6
    assert c.gated_linear_unit and c.activation_func is torch.nn.functional.silu
    assert (c.tensor_model_parallel_size, c.pipeline_model_parallel_size) == (2, 2)


def test_config_llama3_and_qwen3():
    llama = dict(QWEN25, model_type="llama", attention_bias=False, rms_norm_eps=1e-5)
    c = transformer_config_from_hf(llama, tp=1, pp=1)
    assert not c.add_qkv_bias and c.layernorm_epsilon == 1e-5
    qwen3 = dict(QWEN25, model_type="qwen3", head_dim=32)
    c = transformer_config_from_hf(qwen3, tp=1, pp=1, attention_dropout=0.0)
    assert c.qk_layernorm and not c.add_qkv_bias and c.kv_channels == 32  # head_dim != hidden / heads


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="unsupported HF model_type='mistral'"):
        transformer_config_from_hf(dict(QWEN25, model_type="mistral"), tp=1, pp=1)
    with pytest.raises(ValueError, match="num_hidden_layers=4 is not divisible by actor.pipeline_model_parallel_size=3"):
        transformer_config_from_hf(QWEN25, tp=1, pp=3)
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by actor.tensor_model_parallel_size=8"):
        transformer_config_from_hf(QWEN25, tp=8, pp=1)
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        transformer_config_from_hf(dict(QWEN25, hidden_act="gelu"), tp=1, pp=1)


def test_padded_vocab_size():
    assert padded_vocab_size(250, 1) == 256
    assert padded_vocab_size(256, 2) == 256
    assert padded_vocab_size(257, 2) == 512
    assert padded_vocab_size(151936, 4) == 152064  # 297 * 512


# ------------------------------------------------------------------ CPU compat (own process: it is global)
COMPAT_CHECK = textwrap.dedent(
    """
    import torch
    from rfpo_megatron.actor.compat import enable_cpu_compat, CpuRNGStatesTracker
    assert enable_cpu_compat() is True and enable_cpu_compat() is True
    assert torch.empty(3, device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.ones(2).to("cuda:0").device.type == "cpu"
    assert torch.arange(4, device=torch.device("cuda")).tolist() == [0, 1, 2, 3]
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    tr = get_cuda_rng_tracker()
    assert isinstance(tr, CpuRNGStatesTracker)
    tr.reset(); tr.add("a", 123)
    torch.manual_seed(0); before = torch.get_rng_state()
    with tr.fork("a"):
        x1 = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # caller's stream untouched
    with tr.fork("a"):
        x2 = torch.rand(4)
    g = torch.Generator().manual_seed(123)
    ref = torch.rand(8, generator=g)
    assert torch.equal(torch.cat([x1, x2]), ref)  # the named stream continues across forks
    print("COMPAT_OK")
    """
)


def test_cpu_compat_in_subprocess():
    if torch.cuda.is_available():
        pytest.skip("the compat layer is inactive on CUDA machines")
    r = subprocess.run([sys.executable, "-c", COMPAT_CHECK], capture_output=True, text=True, timeout=120)
    assert "COMPAT_OK" in r.stdout, r.stderr[-3000:]


# ------------------------------------------------------------------ rendezvous
def test_rendezvous_torchrun_and_slurm(monkeypatch):
    from rfpo_megatron.actor.parallel import _rendezvous

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
              "SLURM_LOCALID", "SLURM_NNODES"):
        monkeypatch.delenv(k, raising=False)
    assert _rendezvous() == (0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert _rendezvous() == (3, 4, 1)
    monkeypatch.setenv("RANK", "2")  # torchrun variables win
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert _rendezvous()[:2] == (2, 8)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("SLURM_NNODES", "2")
    with pytest.raises(RuntimeError, match="MASTER_ADDR is not set for a multi-node Slurm job"):
        _rendezvous()
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("RANK", "9")
    with pytest.raises(RuntimeError, match="RANK=9 is outside WORLD_SIZE=8"):
        _rendezvous()
