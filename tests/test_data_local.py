"""Local datasets: globs of jsonl/parquet, `datasets` save_to_disk dirs, field mapping, `rfpo-megatron data check`."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rfpo_megatron import cli
from rfpo_megatron.config import load_config
from rfpo_megatron.data.dataset import DataError, load_kwargs, load_prompt_sets, resolve_data_files


def _jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def test_globs_jsonl_and_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    _jsonl(tmp_path / "a.jsonl", [{"prompt": "1+1", "answer": 2}])
    _jsonl(tmp_path / "b.jsonl", [{"prompt": "2+2", "answer": "4"}, {"prompt": "3+3", "answer": "6"}])
    pq.write_table(pa.Table.from_pylist([{"prompt": "5+5", "answer": "10"}]), str(tmp_path / "c.parquet"))
    assert resolve_data_files([str(tmp_path / "*.jsonl")]) == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    ps = load_prompt_sets([str(tmp_path / "*.jsonl"), str(tmp_path / "*.parquet")])
    assert [r["answer"] for r in ps.records] == ["2", "4", "6", "10"]
    assert [r["id"] for r in ps.records] == ["a:1", "b:1", "b:2", "c:1"]
    with pytest.raises(DataError, match="matches no file"):
        resolve_data_files([str(tmp_path / "*.csv")])
    with pytest.raises(DataError, match="not a `datasets` save_to_disk dir"):
        resolve_data_files([str(tmp_path)])


def test_field_mapping(tmp_path):
    f = _jsonl(tmp_path / "m.jsonl", [{"question": "q?", "gt": 7, "steps": "a;b", "uid": "u1", "extra": [1]}])
    cfg = load_config(None, ["data.prompt_key=question", "data.answer_key=gt", "data.solution_key=steps",
                             "data.id_key=uid"])
    rec = load_prompt_sets([f], **load_kwargs(cfg.data)).records[0]
    assert (rec["prompt"], rec["answer"], rec["solution"], rec["id"], rec["extra"]) == ("q?", "7", "a;b", "u1", [1])


def test_hf_dataset_dir(tmp_path):
    d = tmp_path / "hf"
    try:
        import datasets
    except ImportError:
        d.mkdir()
        (d / "state.json").write_text("{}")
        (d / "dataset_info.json").write_text("{}")
        with pytest.raises(DataError, match=r"needs the `datasets` package \(pip install datasets\)"):
            load_prompt_sets([str(d)])
        return
    datasets.Dataset.from_list([{"prompt": "1+2", "answer": "3"}]).save_to_disk(str(d))
    assert load_prompt_sets([str(d)]).records[0]["answer"] == "3"


def test_dataset_dict_dir_asks_for_a_split(tmp_path):
    d = tmp_path / "dd"
    d.mkdir()
    (d / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(DataError, match="DatasetDict with splits"):
        load_prompt_sets([str(d)])


def test_data_check_names_file_line_and_field(tmp_path, capsys):
    good = _jsonl(tmp_path / "good.jsonl", [{"prompt": "p", "answer": "a"}] * 3)
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "answer": "a"}, {"prompt": "p", "answer": "a"},
                                          {"prompt": "p", "answer": ["x"]}])
    assert cli.main(["data", "check", good]) == 0
    assert f"ok: {good}: 3 records" in capsys.readouterr().out
    assert cli.main(["data", "check", good, bad]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"bad record: {bad}:3: field 'answer' is list; expected a string or number"
    mapped = _jsonl(tmp_path / "mapped.jsonl", [{"question": "p", "gt": "a"}, {"question": "", "gt": "a"}])
    assert cli.main(["data", "check", mapped, "data.prompt_key=question", "data.answer_key=gt"]) == 1
    assert f"{mapped}:2: field 'question'" in capsys.readouterr().err


def test_data_check_uses_the_reward_fns_record_check(tmp_path, capsys):
    f = _jsonl(tmp_path / "code.jsonl", [{"prompt": "p", "answer": "", "tests": ["assert True"]},
                                         {"prompt": "p", "answer": "", "tests": [{"name": "t"}]}])
    assert cli.main(["data", "check", f]) == 0
    capsys.readouterr()
    assert cli.main(["data", "check", f, "data.reward_fn=code"]) == 1
    assert f"{f}:2: field 'tests'[0] has neither 'code'" in capsys.readouterr().err


def test_data_check_command_line(tmp_path):
    bad = _jsonl(tmp_path / "x.jsonl", [{"answer": "1"}])
    p = subprocess.run([sys.executable, "-m", "rfpo_megatron.cli", "data", "check", bad], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 1 and f"{bad}:1: field 'prompt' missing" in p.stderr
