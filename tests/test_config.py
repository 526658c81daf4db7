"""Config loading, overrides and the one-line errors a user sees."""
import os
import subprocess
import sys

import pytest
import yaml

from rfpo_megatron.config import ConfigError, load_config, save_config, to_dict


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"algo": {"adv_estimator": "rloo"}, "rfpo": {"fix": {"attempts": 3}}}))
    cfg = load_config(str(path), ["algo.clip_ratio_high=0.28", "rfpo.enabled=false", "data.train_files=[a.jsonl,b.jsonl]",
                                  "algo.clip_ratio_c=3", "algo.tis_cap=null"])
    assert cfg.algo.adv_estimator == "rloo"
    assert cfg.rfpo.fix.attempts == 3
    assert cfg.algo.clip_ratio_high == pytest.approx(0.28)
    assert cfg.rfpo.enabled is False
    assert cfg.data.train_files == ["a.jsonl", "b.jsonl"]
    assert cfg.algo.clip_ratio_c == 3.0 and isinstance(cfg.algo.clip_ratio_c, float)
    assert cfg.algo.tis_cap is None
    # round trip through YAML
    out = tmp_path / "dump.yaml"
    save_config(cfg, str(out))
    assert to_dict(load_config(str(out))) == to_dict(cfg)


@pytest.mark.parametrize(
    "override, must_contain",
    [
        ("algo.adv_estimator=grpoo", ["algo.adv_estimator", "grpoo", "did you mean 'grpo'"]),
        ("algo.policy_loss=cipso", ["algo.policy_loss", "did you mean 'cispo'"]),
        ("algo.clip_ratio_lwo=0.1", ["unknown config key 'algo.clip_ratio_lwo'", "clip_ratio_low"]),
        ("rfpo.fix.variant=referense", ["rfpo.fix.variant", "did you mean 'reference'"]),
        ("actor.lr=fast", ["actor.lr", "expected float", "fast"]),
        ("algo.clip_ratio_c=0.9", ["algo.clip_ratio_c", "> 1"]),
        ("rollout.n_samples=0", ["rollout.n_samples", "allowed range"]),
        ("trainer.stepz=3", ["trainer.stepz", "did you mean 'steps'"]),
        ("noequals", ["section.key=value"]),
        ("rfpo.offpolicy_shaping=lufy", ["rfpo.offpolicy_shaping", "did you mean 'luffy'"]),
        ("rfpo.shaping_c=0", ["rfpo.shaping_c", "allowed range"]),
        ("rfpo.offpolicy_shaping=guide rfpo.fix.temperature=0.5", ["rfpo.offpolicy_shaping", "rfpo.fix.temperature"]),
    ],
)
def test_bad_values_name_the_field(override, must_contain):
    with pytest.raises(ConfigError) as info:
        load_config(None, override.split(" "))
    msg = str(info.value)
    assert "\n" not in msg
    for part in must_contain:
        assert part in msg, (part, msg)


def test_missing_file_message(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))


def test_cli_unknown_command_hint():
    out = subprocess.run([sys.executable, "-m", "rfpo_megatron.cli", "trian"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "did you mean 'train'" in out.stderr
    out = subprocess.run([sys.executable, "-m", "rfpo_megatron.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "convert" in out.stdout and "train" in out.stdout


def test_config_docs_are_current():
    import pathlib

    tool = pathlib.Path(__file__).resolve().parent.parent / "tools" / "gen_config_docs.py"
    root = str(tool.parent.parent)  # the tool reads the config module of THIS tree (not an installed copy)
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, str(tool), "--check"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr


def test_fix_variant_list_reaches_the_fix_stage():
    """rfpo.fix.variant takes one name, "a,b" or a YAML list; the fix stage cycles the list over targets."""
    from rfpo_megatron.fix.stage import FixStageConfig

    base = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "tiny_cpu",
                        "config.yaml")
    assert load_config(base, []).rfpo.fix.variant == ["reference"]
    for text in ("error_info,reference", "[error_info, reference]"):
        cfg = load_config(base, [f"rfpo.fix.variant={text}"])
        assert cfg.rfpo.fix.variant == ["error_info", "reference"]
        assert FixStageConfig.from_any(cfg.rfpo.fix).variants == ["error_info", "reference"]
    with pytest.raises(ConfigError, match="'rfpo.fix.variant' is empty"):
        load_config(base, ["rfpo.fix.variant="])
    with pytest.raises(ConfigError, match="did you mean 'rewrite'"):
        load_config(base, ["rfpo.fix.variant=reference,rewrit"])


def test_one_unknown_name_message_everywhere():
    """Config values, registry lookups and reward names fail with the same one-line style naming the field."""
    from rfpo_megatron.algos import get_adv_estimator
    from rfpo_megatron.config import unknown_name_message
    from rfpo_megatron.rewards import get_reward_fn

    assert unknown_name_message("algo.x", "ab", ["abc", "z"]) == "config field 'algo.x': 'ab' is not one of ['abc', 'z'] (did you mean 'abc'?)"
    with pytest.raises(ConfigError, match=r"config field 'algo.adv_estimator': 'grpoo' is not one of .*did you mean 'grpo'"):
        load_config(None, ["algo.adv_estimator=grpoo"])
    with pytest.raises(ValueError, match=r"config field 'algo.adv_estimator': 'grpoo' is not one of .*did you mean 'grpo'"):
        get_adv_estimator("grpoo")
    with pytest.raises(ValueError, match=r"config field 'data.reward_fn': 'mathh' is not one of .*did you mean 'math'"):
        get_reward_fn("mathh")


def test_setup_checks_in_one_place_before_anything_is_built(tmp_path):
    """validate_setup: what the actor cannot run (CP, CPU offload without bf16, at load), the reward name and the input paths,
    each naming the config field, with no model, engine or process group built."""
    from rfpo_megatron.train import validate_setup

    with pytest.raises(ConfigError, match=r"config field 'actor.context_parallel_size': 2 is not supported"):
        load_config(None, ["actor.context_parallel_size=2"])
    with pytest.raises(ConfigError, match=r"config field 'actor.optimizer_cpu_offload': true needs actor.bf16=true"):
        load_config(None, ["actor.optimizer_cpu_offload=true"])
    with pytest.raises(ConfigError, match=r"'actor.optimizer_cpu_offload': true needs actor.use_distributed_optimizer"):
        load_config(None, ["actor.optimizer_cpu_offload=true", "actor.bf16=true", "actor.use_distributed_optimizer=false"])
    validate_setup(load_config(None, ["actor.sequence_parallel=true"]), check_files=False)
    with pytest.raises(ConfigError, match=r"config field 'data.reward_fn': 'nope' is not one of"):
        validate_setup(load_config(None, ["data.reward_fn=nope"]), check_files=False)
    with pytest.raises(ConfigError, match=r"config field 'actor.hf_model_path'"):
        validate_setup(load_config(None, [f"actor.hf_model_path={tmp_path}"]))
    validate_setup(load_config(None, []), check_files=False)

