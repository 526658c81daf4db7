"""Shared fixtures for the trainer tests: a tiny random Qwen2 + char tokenizer + addition data in a temp dir.

Imported by tests/test_trainer_*.py (`from test_trainer_fixtures import tiny_run`); its own test checks
that the assets load with transformers.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples", "tiny_cpu"))


def build_assets(root: str, hidden: int = 32, layers: int = 2, n_train: int = 16, n_eval: int = 4) -> dict:
    """Tiny HF model dir + data files under `root` (cached: rebuilt only when missing)."""
    import torch
    from transformers import Qwen2ForCausalLM

    from rfpo_megatron.rewards.addition import make_split, write_jsonl
    from tiny_assets import build_tokenizer, tiny_qwen2_config

    model_dir = os.path.join(root, "model")
    data_dir = os.path.join(root, "data")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        tok = build_tokenizer(model_dir)
        torch.manual_seed(0)
        cfg = tiny_qwen2_config(tok, hidden=hidden, layers=layers, heads=4, kv_heads=2, max_pos=256)
        cfg.intermediate_size = hidden * 2
        Qwen2ForCausalLM(cfg).save_pretrained(model_dir)
    if not os.path.isfile(os.path.join(data_dir, "train.jsonl")):
        os.makedirs(data_dir, exist_ok=True)
        write_jsonl(os.path.join(data_dir, "train.jsonl"), make_split(n_train, [1], seed=1, prefix="tr"))
        write_jsonl(os.path.join(data_dir, "eval_easy.jsonl"), make_split(n_eval, [1], seed=2, prefix="ev"))
    return {"model": model_dir, "train": os.path.join(data_dir, "train.jsonl"),
            "eval": os.path.join(data_dir, "eval_easy.jsonl")}


def tiny_overrides(assets: dict, out: str, **extra) -> list[str]:
    """key=value overrides of a tiny, fast CPU run writing under `out`."""
    kv = {
        "actor.hf_model_path": assets["model"], "actor.micro_batch_size": 16, "actor.lr": 1e-3,
        "actor.use_distributed_optimizer": False,
        "rollout.n_samples": 4, "rollout.max_new_tokens": 8, "rollout.temperature": 1.0,
        "data.train_files": f"[{assets['train']}]", "data.eval_files": "[]", "data.reward_fn": "arithmetic",
        "data.prompts_per_step": 2, "data.max_prompt_len": 256,
        "rfpo.fix.variant": "reference", "rfpo.fix.attempts": 1, "rfpo.fix.max_per_group": 1,
        "logging.log_dir": os.path.join(out, "logs"), "logging.wandb_mode": "offline",
        "logging.console": True,
        "trainer.steps": 2, "trainer.seed": 3, "trainer.save_interval": 1,
        "trainer.save_dir": os.path.join(out, "ckpt"), "trainer.heartbeat_file": os.path.join(out, "heartbeat"),
        "algo.max_response_len": 8,
    }
    kv.update(extra)
    return [f"{k}={v}" for k, v in kv.items()]


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    return build_assets(str(tmp_path_factory.mktemp("tiny_assets")))


def test_tiny_assets_load(tiny_assets):
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_assets["model"])
    cfg = AutoConfig.from_pretrained(tiny_assets["model"])
    assert cfg.model_type == "qwen2" and cfg.hidden_size == 32
    assert tok.decode(tok("12+34", add_special_tokens=False)["input_ids"]) == "12+34"
    with open(tiny_assets["train"]) as fh:
        rec = json.loads(fh.readline())
    assert int(rec["answer"]) == rec["a"] + rec["b"]


class FirstCharDigit:
    """Test reward: 1.0 when the response starts with a digit, else 0.0 (a random tiny model gets it ~10%
    of the time, so groups are mixed, all-wrong groups occur and some fixes succeed)."""

    def score(self, response_text, answer, record):
        from rfpo_megatron.rewards.base import RewardResult

        ok = bool(response_text) and response_text[0].isdigit()
        return RewardResult(1.0 if ok else 0.0, "" if ok else "does not start with a digit")


class EvenLength:
    """Test reward: 1.0 when the (final-turn) response text has an even number of characters: about half of
    a random model's responses and of its fixes pass, so with rfpo.fix.trigger=any_wrong fixes are placed
    in nearly every step."""

    def score(self, response_text, answer, record):
        from rfpo_megatron.rewards.base import RewardResult

        ok = len(response_text) % 2 == 0
        return RewardResult(1.0 if ok else 0.0, "" if ok else "odd length")


def register_test_reward() -> None:
    from rfpo_megatron.rewards.registry import register_reward

    register_reward("first_char_digit")(lambda **kw: FirstCharDigit())
    register_reward("even_length")(lambda **kw: EvenLength())


def run_trainer_cmd(argv: list[str], command: str = "train") -> list[str]:
    """The command line of a real subprocess `rfpo-megatron train|eval ARGV` with the test reward registered."""
    return [sys.executable, os.path.abspath(__file__), command, *argv]


def trainer_env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("WANDB_API_KEY", None)
    env["WANDB_MODE"] = "offline"
    env.pop("MASTER_PORT", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


if __name__ == "__main__":  # subprocess entry: python tests/test_trainer_fixtures.py train CONFIG [k=v ...]
    import torch

    torch.set_num_threads(1)
    register_test_reward()
    if os.environ.get("RFPO_TEST_SIGTERM_IN_TRAIN_STEP"):  # a real SIGTERM at a deterministic point: inside
        import signal                                       # the optimizer update of that RL step

        from rfpo_megatron.actor.actor import Actor

        at, real = int(os.environ["RFPO_TEST_SIGTERM_IN_TRAIN_STEP"]), Actor.train_step

        def train_step(self, *a, **kw):
            if self.step + 1 == at:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(self, *a, **kw)

        Actor.train_step = train_step
    if os.environ.get("RFPO_TEST_ENGINE_STOPS"):  # "STAGE:STEP": what Slurm does to a job step -- at STAGE
        import signal                                # (rollout | sync) of STEP the rollout server gets SIGTERM
        import threading                             # and dies first; rank 0's own SIGTERM comes 0.3 s later

        import rfpo_megatron.trainer as T

        stage, at = os.environ["RFPO_TEST_ENGINE_STOPS"].split(":")
        target = {"rollout": "rollout", "sync": "sync_weights"}[stage]
        real_fn = getattr(T, target)

        def stop_the_engine_then(rt, *a, **kw):
            if rt.step + 1 == int(at) and rt.is_rank0:
                for proc in rt.engine.processes:
                    proc.popen.send_signal(signal.SIGTERM)
                    proc.popen.wait(30)
                threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
            return real_fn(rt, *a, **kw)

        setattr(T, target, stop_the_engine_then)
    if os.environ.get("RFPO_TEST_TRAIN_SLEEP_S"):  # a slow actor: every optimizer step sleeps this long first
        import time

        from rfpo_megatron.actor.actor import Actor

        pause, real_step = float(os.environ["RFPO_TEST_TRAIN_SLEEP_S"]), Actor.train_step

        def slow_train_step(self, *a, **kw):
            time.sleep(pause)
            return real_step(self, *a, **kw)

        Actor.train_step = slow_train_step
    if os.environ.get("RFPO_TEST_TRAINED_LOG"):  # one JSON line per trained step: the samples it trained on
        import json

        import rfpo_megatron.trainer as T

        log_path, seen = os.environ["RFPO_TEST_TRAINED_LOG"], {}
        real_build, real_update = T.build_batch, T.update_policy

        def build_batch(groups, *a, **kw):
            seen["prompts"] = [str(g.record.get("id")) for g in groups]
            seen["samples"] = [[s.weight_version, s.token_versions, s.is_fixed] for g in groups for s in g.samples]
            return real_build(groups, *a, **kw)

        def update_policy(rt, *a, **kw):  # written once the update ran: the step is committed
            out = real_update(rt, *a, **kw)
            if rt.is_rank0:
                with open(log_path, "a") as fh:
                    fh.write(json.dumps({"step": rt.step + 1, **seen}) + "\n")
            return out

        T.build_batch, T.update_policy = build_batch, update_policy
    if sys.argv[1] == "train":
        from rfpo_megatron.trainer import main

        sys.exit(main(sys.argv[2:]))
    if sys.argv[1] == "eval":
        from rfpo_megatron.evaluate import main

        sys.exit(main(sys.argv[2:]))
    sys.exit(f"unknown command {sys.argv[1]}")
