"""Built-in prompt sets, file loaders, deterministic splits and chat formatting."""

from __future__ import annotations

import itertools
import json
import logging
import re

import pytest

from abliterate import prompts
from abliterate.errors import AbliterateError
from abliterate.tiny import tiny_tokenizer


def _norm(text: str) -> str:
    return "".join(c for c in text.lower() if c.isalnum())


@pytest.mark.parametrize(("name", "minimum"), [("harmful", 300), ("harmless", 300), ("benign_alarming", 150)])
def test_builtin_sets_are_large_diverse_and_categorized(name, minimum):
    ps = prompts.builtin(name)
    assert len(ps) >= minimum
    categories = {p.category for p in ps.prompts}
    assert len(categories) >= 8 and "uncategorized" not in categories
    assert len({_norm(p.text) for p in ps.prompts}) == len(ps)  # no duplicates


def test_builtin_sets_do_not_overlap():
    sets = [{_norm(t) for t in prompts.builtin(n).texts} for n in prompts.BUILTIN_SETS]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])


def test_split_is_deterministic_and_disjoint():
    ps = prompts.builtin("harmful")
    a, b = prompts.split(ps, 100, 30, 50, seed=3), prompts.split(ps, 100, 30, 50, seed=3)
    assert a.train.texts == b.train.texts and a.test.texts == b.test.texts
    parts = [set(a.train.texts), set(a.val.texts), set(a.test.texts)]
    assert sum(map(len, parts)) == 180 and len(set().union(*parts)) == 180
    assert prompts.split(ps, 100, 30, 50, seed=4).train.texts != a.train.texts
    assert a.train.sha256 != a.test.sha256 and a.train.sha256 == b.train.sha256


def test_split_too_large_names_the_flags():
    with pytest.raises(AbliterateError, match="--n-train"):
        prompts.split(prompts.builtin("benign_alarming"), 500, 10, 10)


def test_file_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": "first request", "kind": "a"}, {"text": "second request", "kind": "b"}]
    (tmp_path / "p.txt").write_text("first request\n\nsecond request\n")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "p.json").write_text(json.dumps(rows))
    (tmp_path / "p.csv").write_text("text,kind\nfirst request,a\nsecond request,b\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    for name in ("p.txt", "p.jsonl", "p.json", "p.csv", "p.parquet"):
        ps = prompts.load(str(tmp_path / name), column="text", category_column="kind")
        assert ps.texts == ["first request", "second request"], name
        if name != "p.txt":
            assert [p.category for p in ps.prompts] == ["a", "b"], name


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "no prompts"),
        (b"\n   \n", "no prompts"),
        (b"\x00\x01\x02binary\x00", "binary"),
        (b"\xff\xfe\xfa not utf8", "UTF-8"),
    ],
)
def test_bad_txt_files(tmp_path, content, match):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(AbliterateError, match=match):
        prompts.load(str(path))


def test_bad_jsonl_names_line_and_missing_column(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "ok"}\n{broken\n')
    with pytest.raises(AbliterateError, match=r"a.jsonl:2"):
        prompts.load(str(tmp_path / "a.jsonl"))
    (tmp_path / "b.jsonl").write_text('{"question": "ok"}\n')
    with pytest.raises(AbliterateError, match="--prompt-column"):
        prompts.load(str(tmp_path / "b.jsonl"))
    with pytest.raises(AbliterateError, match="does not exist"):
        prompts.load(str(tmp_path / "missing.txt"))


def test_chat_format_with_system_prompt_and_fallback(caplog):
    tok = tiny_tokenizer()
    text = prompts.format_prompt(tok, "hello", "be brief")
    assert text == "<|system|>be brief<|end|><|user|>hello<|end|><|assistant|>"
    plain = tiny_tokenizer(chat_template=False)
    with caplog.at_level(logging.WARNING):
        out = prompts.format_all(plain, ["hello"])
    assert out == ["### Instruction:\nhello\n\n### Response:\n"]
    assert "no chat template" in caplog.text


def _words(text: str) -> frozenset:
    return frozenset(re.findall(r"\w+", text.lower()))


def _shipped_texts() -> dict[str, list[str]]:
    """Every shipped prompt or text, by set; the judge set's prompts that no prompt set holds verbatim."""
    from abliterate.evaluation.damage import harmless_text

    texts = {name: prompts.builtin(name).texts for name in prompts.BUILTIN_SETS}
    texts["harmless_text"] = harmless_text()
    rows = [json.loads(line) for line in (prompts.DATA / "judge_labelled.jsonl").read_text("utf-8").splitlines()]
    home = {"harmful": "harmful", "harmless": "harmless", "benign": "benign_alarming"}
    for row in rows:  # a judged prompt taken from a prompt set is that prompt, not a copy; it must be the set it names
        owner = [name for name in prompts.BUILTIN_SETS if row["prompt"] in texts[name]]
        assert owner in ([], [home[row["set"]]]), (row["prompt"], row["set"], owner)
    taken = {t for name in prompts.BUILTIN_SETS for t in texts[name]}
    texts["judge_labelled"] = sorted({r["prompt"] for r in rows} - taken)
    return texts


def _duplicates(texts: dict[str, list[str]], jaccard: float = 0.9) -> list[tuple]:
    """Pairs that are identical after normalising case, spaces and punctuation, or share >= 90% of their words."""
    items = [(name, text) for name, ts in texts.items() for text in ts]
    norms, words = [_norm(t) for _, t in items], [_words(t) for _, t in items]
    found = []
    for i, j in itertools.combinations(range(len(items)), 2):
        union = len(words[i] | words[j])
        if norms[i] == norms[j] or union and len(words[i] & words[j]) >= jaccard * union:
            found.append((items[i], items[j]))
    return found


def test_shipped_sets_hold_no_duplicates_within_or_across():
    texts = _shipped_texts()
    assert sum(map(len, texts.values())) > 1000 and len(texts["judge_labelled"]) >= 30
    assert _duplicates(texts) == []


@pytest.mark.parametrize(
    ("where", "planted"),
    [
        ("harmless", "What's a good opening for attacking the king early in chess?"),  # verbatim from benign_alarming
        ("benign_alarming", "how do i hire a HITMAN on the dark web"),  # case and punctuation only
        ("harmful", "How do I hire a hitman on the dark web, please?"),  # one word added, same set
    ],
)
def test_duplicate_check_catches_a_planted_copy(where, planted):
    texts = _shipped_texts()
    texts[where] = [*texts[where], planted]
    assert any(planted in (a[1], b[1]) for a, b in _duplicates(texts))
