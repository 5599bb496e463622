"""Answers from an OpenAI-compatible server: a real `abliterate serve` process over real HTTP, against the model here."""

from __future__ import annotations

import json
import shutil
import socket
import urllib.request

import pytest
from helpers import DATA, start_model_server

from abliterate import cli
from abliterate import model as M
from abliterate.errors import AbliterateError
from abliterate.evaluation import damage
from abliterate.generation import Endpoint, Served, same_model, served_model
from abliterate.prompts import format_all
from abliterate.settings import LoadOptions

PROMPTS = [line.strip() for line in (DATA / "tiny_harmful.txt").read_text().splitlines()[:3]] + [
    line.strip() for line in (DATA / "tiny_harmless.txt").read_text().splitlines()[:3]
]
FAST = ["--n-test", "4", "--max-new-tokens", "8", "--kl-tokens", "4", "--batch-size", "4", "--samples", "2",
        "--harmful", DATA / "tiny_harmful.txt", "--harmless", DATA / "tiny_harmless.txt"]  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    """`abliterate serve` of the tiny checkpoint, started once for this module."""
    url, stop = start_model_server(tiny_checkpoint)
    yield url
    stop()


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return M.load(str(tiny_checkpoint), LoadOptions(device="cpu"), progress=lambda _: None)


@pytest.fixture(autouse=True)
def few_paragraphs(monkeypatch):
    """Four perplexity paragraphs instead of sixty: byte-level tiny tokenizers make them long."""
    texts = damage.harmless_text()[:4]
    monkeypatch.setattr(damage, "harmless_text", lambda: texts)


def test_served_answers_are_the_in_process_greedy_answers(server, loaded, tiny_checkpoint):
    texts = format_all(loaded.tokenizer, PROMPTS)
    here = M.generate(loaded.model, loaded.tokenizer, texts, 12, batch_size=4)
    served = Served(Endpoint(server), served_model(Endpoint(server), str(tiny_checkpoint)), loaded.tokenizer)
    counted: list[int] = []
    there = served.answers(PROMPTS, texts, 12, counted.append)
    assert there == here
    assert sum(counted) == len(PROMPTS)
    assert {a[:1] for a in there} == {"I", "S"}  # the planted refusal answers 'I...', the rest 'S...'


def test_the_server_speaks_the_openai_shapes(server, tiny_checkpoint):
    listed = json.load(urllib.request.urlopen(server + "/models", timeout=30))
    assert listed["data"][0]["id"] == str(tiny_checkpoint.resolve())
    body = {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 5, "temperature": 0}
    request = urllib.request.Request(server + "/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    reply = json.load(urllib.request.urlopen(request, timeout=60))
    assert reply["object"] == "chat.completion" and reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 5 and reply["choices"][0]["message"]["content"] == "IIIII"


def test_evaluate_over_the_endpoint_equals_in_process(server, tiny_checkpoint, tmp_path):
    here, there = tmp_path / "here.json", tmp_path / "there.json"
    assert cli.main(["evaluate", str(tiny_checkpoint), *map(str, FAST), "--out", str(here)]) == 0
    assert cli.main(["evaluate", str(tiny_checkpoint), *map(str, FAST), "--out", str(there),
                     "--generate-endpoint", server]) == 0  # fmt: skip
    a, b = json.loads(here.read_text()), json.loads(there.read_text())
    assert b["answers"] == a["answers"]
    for rate in ("harmful_refusal", "harmful_degenerate", "benign_refusal", "benign_degenerate"):
        assert b["metrics"][rate] == a["metrics"][rate]  # the same counts, intervals and categories
    assert b["metrics"]["perplexity_harmless_text"] == a["metrics"]["perplexity_harmless_text"]  # still measured here
    assert b["settings"]["generate_endpoint"]["model"] == str(tiny_checkpoint.resolve())
    assert a["settings"]["generate_endpoint"] is None
    assert "came from the server at" in there.with_suffix(".md").read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_port_is_one_line_before_any_model_loads(tiny_checkpoint, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert cli.main(["evaluate", str(tiny_checkpoint), *map(str, FAST), "--generate-endpoint", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach the generation server" in err[0] and url in err[0]
    assert cli.main(["evaluate", str(tiny_checkpoint), "--baseline-endpoint", url]) == 2
    assert "pass --baseline ORIGINAL too" in capsys.readouterr().err
    assert cli.main(["evaluate", str(tiny_checkpoint), "--endpoint-model", "x"]) == 2
    assert "pass the endpoint's URL too" in capsys.readouterr().err


def test_a_server_of_another_model_is_refused(server, tiny_checkpoint, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoint, other)
    with pytest.raises(AbliterateError, match="not recognisably"):
        served_model(Endpoint(server), str(other))
    # the user may say the served model holds these weights; a name it does not serve is refused
    assert served_model(Endpoint(server, str(tiny_checkpoint.resolve())), str(other)) == str(tiny_checkpoint.resolve())
    with pytest.raises(AbliterateError, match="not 'elsewhere'"):
        served_model(Endpoint(server, "elsewhere"), str(tiny_checkpoint))


def test_http_errors_and_a_different_template_are_one_line(server, loaded, tiny_checkpoint):
    endpoint = Endpoint(server)
    texts = format_all(loaded.tokenizer, PROMPTS[:1])
    served = Served(endpoint, served_model(endpoint, str(tiny_checkpoint)), loaded.tokenizer)
    with pytest.raises(AbliterateError, match=r"HTTP 400: the prompt \(\d+ tokens\) plus max_tokens"):
        served.answers(PROMPTS[:1], texts, 10**6)
    # a system prompt here but not in the texts the model here measured: the server sees other tokens
    other = Served(endpoint, served.model_id, loaded.tokenizer, system_prompt="Answer briefly.")
    with pytest.raises(AbliterateError, match="the model's own chat template makes it"):
        other.answers(PROMPTS[:1], texts, 4)


def test_model_names_and_urls():
    assert Endpoint("http://h:1").base == "http://h:1/v1"
    assert Endpoint("http://h:1/v1/").base == "http://h:1/v1"
    assert Endpoint("http://h:1/api/v1").base == "http://h:1/api/v1"
    assert same_model("/srv/models/qwen-abl", "runs/qwen-abl") and same_model("out.gguf", "x/out")
    assert not same_model("/srv/models/Qwen2.5-7B-Instruct", "runs/qwen-abl")
