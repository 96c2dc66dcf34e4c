"""Prompt sets: file formats, metadata, the per-epoch order and the fingerprint a resume checks."""

import json

import pytest

from services.training.prompts import PromptSet, load_prompt_file

pytestmark = pytest.mark.unit


def test_txt_jsonl_and_csv(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert load_prompt_file(tmp_path / "p.txt").prompts == ("a cat", "a dog")
    rows = [{"prompt": "two cats", "count": 2, "tag": "counting"}, {"prompt": "a dog", "count": 1}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    s = load_prompt_file(tmp_path / "p.jsonl")
    assert s.prompts == ("two cats", "a dog") and s.metadata == ({"count": 2, "tag": "counting"}, {"count": 1})
    (tmp_path / "p.csv").write_text("prompt,target\na handwritten digit 3,3\na handwritten digit 5,5\n")
    c = load_prompt_file(tmp_path / "p.csv")
    assert c.prompts[1] == "a handwritten digit 5" and c.metadata[1] == {"target": "5"}


def test_file_errors_name_the_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*\"prompt\""):
        load_prompt_file(tmp_path / "bad.jsonl")
    (tmp_path / "bad2.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad2.jsonl:1: not JSON"):
        load_prompt_file(tmp_path / "bad2.jsonl")
    (tmp_path / "bad.csv").write_text("text\nx\n")
    with pytest.raises(ValueError, match='"prompt" column'):
        load_prompt_file(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="unknown prompt file type"):
        (tmp_path / "p.md").write_text("x")
        load_prompt_file(tmp_path / "p.md")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_prompt_file(tmp_path / "missing.txt")


def test_each_epoch_is_a_fresh_deterministic_permutation():
    prompts = tuple(f"p{i}" for i in range(7))
    s = PromptSet(prompts, shuffle=True, seed=3)
    epochs = [[s.index(e * 7 + j) for j in range(7)] for e in range(3)]
    assert all(sorted(e) == list(range(7)) for e in epochs)  # every prompt once per epoch
    assert epochs[0] != epochs[1] and epochs[0] != list(range(7))  # a new order each epoch
    assert [PromptSet(prompts, shuffle=True, seed=3).index(c) for c in range(21)] == sum(epochs, [])  # reproducible
    assert [PromptSet(prompts, shuffle=True, seed=4).index(c) for c in range(7)] != epochs[0]  # the seed matters
    assert [PromptSet(prompts).index(c) for c in range(9)] == [0, 1, 2, 3, 4, 5, 6, 0, 1]  # unshuffled: file order


def test_fingerprint_follows_content_not_order_of_reading():
    a = PromptSet(("x", "y"), ({"k": 1}, {"k": 2}))
    assert a.fingerprint == PromptSet(("x", "y"), ({"k": 1}, {"k": 2}), shuffle=True).fingerprint
    assert a.fingerprint != PromptSet(("x", "y"), ({"k": 1}, {"k": 3})).fingerprint
