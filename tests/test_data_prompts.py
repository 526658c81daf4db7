"""Prompt data: validation errors with file:line + field, skip_bad_records, parquet, formatting, sampler."""
import json
import logging
import os
import sys

import pytest

from rfpo_megatron.data.batching import build_prompts, chunks
from rfpo_megatron.data.dataset import DataError, load_prompt_set, load_prompt_sets
from rfpo_megatron.data.sampler import PromptSampler
from rfpo_megatron.data.template import PromptFormat, encode_prompt, format_prompt

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples", "tiny_cpu"))


def _write(path, lines):
    with open(path, "w") as f:
        for ln in lines:
            f.write((ln if isinstance(ln, str) else json.dumps(ln)) + "\n")
    return str(path)


GOOD = {"prompt": "1+1", "answer": "2"}


@pytest.mark.parametrize("bad, field_msg", [
    ({"answer": "2"}, "field 'prompt' missing"),
    ({"prompt": "", "answer": "2"}, "field 'prompt' is str"),
    ({"prompt": 5, "answer": "2"}, "field 'prompt' is int"),
    ({"prompt": "q"}, "field 'answer' missing"),
    ({"prompt": "q", "answer": ["x"]}, "field 'answer' is list"),
    ({"prompt": "q", "answer": "1", "solution": 3}, "field 'solution' is int"),
    ({"prompt": "q", "answer": "1", "hints": [1]}, "field 'hints' must be"),
    ({"prompt": "q", "answer": "1", "id": {"a": 1}}, "field 'id' is dict"),
    ({"prompt": [{"content": "x"}], "answer": "1"}, "field 'prompt': a message list"),
    ("{not json", "invalid JSON"),
    ("[1, 2]", "record is a list"),
])
def test_bad_record_names_file_line_and_field(tmp_path, bad, field_msg):
    path = _write(tmp_path / "p.jsonl", [GOOD, "", GOOD, bad, GOOD])  # bad record on line 4
    with pytest.raises(DataError) as e:
        load_prompt_set(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:4: ") and field_msg in msg and "skip_bad_records" in msg


def test_skip_bad_records_logs_count(tmp_path, caplog):
    path = _write(tmp_path / "p.jsonl", [GOOD, {"prompt": "q"}, "{", {"prompt": "2+2", "answer": 4}])
    with caplog.at_level(logging.WARNING):
        ps = load_prompt_set(path, skip_bad_records=True)
    assert ps.num_skipped == 2 and len(ps) == 2
    assert "skipped 2 bad record(s)" in caplog.text
    # numbers become strings, default ids are file:line, hints str -> list
    assert ps[1]["answer"] == "4" and ps[0]["id"] == "p:1" and ps[1]["id"] == "p:4"


def test_fields_and_extras_kept(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"prompt": "q", "answer": 1.5, "solution": "s", "hints": "h",
                                          "id": 7, "digits": 3}])
    r = load_prompt_set(path)[0]
    assert r == {"prompt": "q", "answer": "1.5", "solution": "s", "hints": ["h"], "id": "7", "digits": 3}


def test_parquet_and_multiple_files(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a", "b", None], "answer": ["1", "2", "3"]}), str(tmp_path / "t.parquet"))
    with pytest.raises(DataError, match=r"t\.parquet:3: field 'prompt' missing"):
        load_prompt_set(str(tmp_path / "t.parquet"))
    j = _write(tmp_path / "j.jsonl", [GOOD])
    both = load_prompt_sets([j, str(tmp_path / "t.parquet")], skip_bad_records=True)
    assert [r["prompt"] for r in both.records] == ["1+1", "a", "b"] and both.num_skipped == 1


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_prompt_set(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="no usable records"):
        load_prompt_set(_write(tmp_path / "e.jsonl", [""]))


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    from tiny_assets import build_tokenizer

    return build_tokenizer(str(tmp_path_factory.mktemp("tok")))


def test_chat_and_plain_formatting(tiny_tok):
    assert format_prompt(tiny_tok, "12+3") == "<|user|>12+3<|assistant|>"
    ids = encode_prompt(tiny_tok, "12+3")
    # special tokens are single ids, characters one id each
    assert len(ids) == 1 + 4 + 1 and ids[0] == tiny_tok.convert_tokens_to_ids("<|user|>")
    assert tiny_tok.decode(ids) == "<|user|>12+3<|assistant|>"
    plain = PromptFormat(mode="plain", plain_template="Q: {prompt}\nA:")
    assert format_prompt(tiny_tok, "12+3", plain) == "Q: 12+3\nA:"
    assert encode_prompt(tiny_tok, "12+3", plain) == tiny_tok("Q: 12+3\nA:", add_special_tokens=False)["input_ids"]
    sysf = PromptFormat(system_prompt="S")
    assert format_prompt(tiny_tok, [{"role": "user", "content": "x"}], sysf) == "S<|user|>x<|assistant|>"
    assert PromptFormat.from_any({"mode": "plain"}).mode == "plain"

    class NoChat:
        chat_template = None

    with pytest.raises(ValueError, match="no chat_template"):
        format_prompt(NoChat(), "x", PromptFormat(mode="chat"))
    assert format_prompt(NoChat(), "x") == "x"  # auto falls back to plain
    with pytest.raises(ValueError, match="mode='bogus'"):
        format_prompt(NoChat(), "x", PromptFormat(mode="bogus"))


def test_build_prompts_and_padding(tiny_tok):
    items = build_prompts([{"prompt": "1+2", "id": "a"}, {"prompt": "10+20", "id": "b"}], tiny_tok)
    assert [len(i.prompt_ids) for i in items] == [5, 7] and items[1].prompt_text == "<|user|>10+20<|assistant|>"
    with pytest.raises(ValueError, match="record 'b'.*max_prompt_length=6"):
        build_prompts([{"prompt": "1+2", "id": "a"}, {"prompt": "10+20", "id": "b"}], tiny_tok, max_prompt_len=6)
    assert list(chunks([1, 2, 3, 4, 5], 2)) == [[1, 2], [3, 4], [5]]


def test_sampler_covers_epochs_and_is_deterministic():
    s = PromptSampler(10, batch_size=4, seed=3)
    batches = [s.next_indices() for _ in range(5)]  # 20 indices = 2 epochs
    flat = [i for b in batches for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # reshuffled per epoch
    assert s.state_dict()["epoch"] == 2 and s.state_dict()["position"] == 0
    s2 = PromptSampler(10, batch_size=4, seed=3)
    assert [s2.next_indices() for _ in range(5)] == batches
    assert PromptSampler(10, 4, seed=3, shuffle=False).next_indices(12) == list(range(10)) + [0, 1]


def test_sampler_resume_equals_uninterrupted():
    ref = PromptSampler(7, batch_size=3, seed=11)
    want = [ref.next_indices() for _ in range(9)]
    a = PromptSampler(7, batch_size=3, seed=11)
    got = [a.next_indices() for _ in range(4)]
    state = json.loads(json.dumps(a.state_dict()))  # checkpoint round trip
    b = PromptSampler(7, batch_size=3, seed=11)
    b.load_state_dict(state)
    got += [b.next_indices() for _ in range(5)]
    assert got == want
    with pytest.raises(ValueError, match="same data.train_files"):
        PromptSampler(8, 3).load_state_dict(state)
    with pytest.raises(ValueError, match="empty"):
        PromptSampler(0, 3)
