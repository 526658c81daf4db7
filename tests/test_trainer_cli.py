"""`rfpo-megatron train` user errors: one line naming the field / file and the fix, exit code 2, no traceback."""
from __future__ import annotations

import os

import pytest

from test_trainer_fixtures import ROOT, build_assets, tiny_overrides

from rfpo_megatron import trainer as T

CONFIG = os.path.join(ROOT, "examples", "tiny_cpu", "config.yaml")


def _err(capsys, argv):
    rc = T.main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


def test_missing_model_dir(capsys, tmp_path):
    rc, err = _err(capsys, [CONFIG, f"actor.hf_model_path={tmp_path}/nope"])
    assert rc == 2 and "actor.hf_model_path" in err and "prepare.py" in err and len(err.splitlines()) == 1


def test_unknown_key_and_bad_value(capsys):
    rc, err = _err(capsys, [CONFIG, "trainer.stepz=3"])
    assert rc == 2 and "trainer.stepz" in err and "did you mean 'steps'" in err
    rc, err = _err(capsys, [CONFIG, "algo.adv_estimator=grpoo"])
    assert rc == 2 and "grpo" in err


def test_missing_and_malformed_data(capsys, tmp_path):
    assets = build_assets(str(tmp_path / "a"))
    base = tiny_overrides(assets, str(tmp_path / "out"))
    rc, err = _err(capsys, [CONFIG, *base, f"data.train_files=[{tmp_path}/missing.jsonl]"])
    assert rc == 2 and "missing.jsonl" in err and "data.train_files" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1", "answer": "2"}\n{"answer": "3"}\n')
    rc, err = _err(capsys, [CONFIG, *base, f"data.train_files=[{bad}]"])
    assert rc == 2 and f"{bad}:2" in err and "prompt" in err


def test_gae_without_critic_values_is_refused():
    """gae is wired (tests/test_critic.py); called without the critic's values it names what is missing."""
    from rfpo_megatron.config import ConfigError, load_config
    from rfpo_megatron.train import advantages

    cfg = load_config(CONFIG, ["algo.adv_estimator=gae"])
    with pytest.raises(ConfigError, match="critic's values"):
        advantages(cfg, None, None, None)


def test_unknown_reward_fn(capsys, tmp_path):
    assets = build_assets(str(tmp_path / "a"))
    rc, err = _err(capsys, [CONFIG, *tiny_overrides(assets, str(tmp_path / "out")), "data.reward_fn=nope"])
    assert rc == 2 and "config field 'data.reward_fn': 'nope' is not one of" in err and "arithmetic" in err
