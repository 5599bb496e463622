"""Helpers shared by the test modules: CLI runners, prompt options, checks of saved models, a PostgreSQL server."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file
from torch import nn

from abliterate.architectures import Architecture, architecture_for, layers
from abliterate.edit import EditParams, ablation, add_hooks
from abliterate.tiny import VOCAB

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DATA = Path(__file__).parent / "data"
# The tiny checkpoint refuses prompts holding the trigger (abliterate.tiny.plant_refusal): these sets have it or not.
TINY_PROMPTS = ["--harmful", str(DATA / "tiny_harmful.txt"), "--harmless", str(DATA / "tiny_harmless.txt")]
FAST = ["--n-train", "8", "--n-val", "4", "--n-test", "4", "--max-new-tokens", "8", "--batch-size", "4", *TINY_PROMPTS]


def run_cli(
    *args: str | Path, env: dict[str, str] | None = None, cwd: str | Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m abliterate.cli ARGS` in a fresh process and capture its text output."""
    return subprocess.run(
        [sys.executable, "-m", "abliterate.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=600,
    )


def assert_clean_failure(result: subprocess.CompletedProcess[str], match: str) -> None:
    """The command failed with one line on stderr holding `match`, and no traceback."""
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert match in lines[0], lines[0]


def residual_streams(model: nn.Module, arch: Architecture, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Residual stream at the input of every layer and after the last one."""
    seen: list[torch.Tensor] = []
    blocks = layers(model, arch)
    pre = [(b, lambda m, a, k: seen.append(a[0] if a else k["hidden_states"])) for b in blocks]
    post = [(blocks[-1], lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))]
    with add_hooks(pre, post):
        model(input_ids=input_ids)
    return seen


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor in every safetensors file of a model folder."""
    tensors = {}
    for file in sorted(folder.glob("model*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


WRITER = re.compile(r"model\.layers\.(\d+)\.(self_attn\.o_proj|mlp\.down_proj)\.(weight|bias)$")


def check_saved_weights(out: Path, original_folder: Path, record: dict, direction: torch.Tensor) -> None:
    """Every saved tensor against a float64 recomputation, written out here, of the recorded edit of the original.

    For a pre-norm llama-style model at scale s from layer `start`: each writer's output (o_proj and
    down_proj rows, their biases) loses s times its component along r, so r.W' = (1 - s) r.W; the
    embedding rows likewise when start is 0; every other tensor, writers before `start` included, is
    unchanged, and a head that was tied to the embedding keeps the original embedding.
    """
    assert not record["edit"].get("norm_preserving"), "a norm-preserving edit has its own checks"
    r = direction.double() / direction.double().norm()
    s, start = record["edit"]["scale"], record["edit"]["start_layer"]
    original, saved = all_tensors(original_folder), all_tensors(out)
    if "lm_head.weight" in saved and "lm_head.weight" not in original:  # tied in the original: saved untied
        original["lm_head.weight"] = original["model.embed_tokens.weight"]
    assert saved.keys() == original.keys()
    edited = set()
    for name, w in original.items():
        w64, writer = w.double(), WRITER.match(name)
        if name == "model.embed_tokens.weight" and start == 0:
            expected = w64 - s * torch.outer(w64 @ r, r)
        elif writer and int(writer[1]) >= start and name.endswith("weight"):
            expected = w64 - s * torch.outer(r, r @ w64)
        elif writer and int(writer[1]) >= start:
            expected = w64 - s * (r @ w64) * r
        else:
            assert torch.equal(saved[name], w), f"{name} is not edited yet changed"
            continue
        edited.add(name)
        got = saved[name].double()
        tol = 4 * torch.finfo(saved[name].dtype).eps * w64.abs().max().item()
        torch.testing.assert_close(got, expected, rtol=0, atol=tol, msg=lambda m, n=name: f"{n}: {m}")
        assert not torch.equal(saved[name], w), f"{name} should be edited"
        # the component the edit leaves along r: exactly (1 - s) times the original's
        axis = -1 if name.startswith("model.embed_tokens") else 0
        left, before = (got.movedim(axis, -1) @ r), (w64.movedim(axis, -1) @ r)
        torch.testing.assert_close(left, (1 - s) * before, rtol=0, atol=tol * r.numel() ** 0.5)
    assert edited == set(record["edit"]["edited_tensors"]), "the record lists other tensors than were edited"
    assert any(int(WRITER.match(n)[1]) == start for n in edited if WRITER.match(n))  # start_layer is edited


def check_run_folder(
    out: Path, original_folder: Path, direction_tolerance: float = 1e-4
) -> tuple[dict, PreTrainedModel]:
    """Shared checks for a finished run folder; returns (record, reloaded model).

    The saved model must reproduce the original model under ablation hooks with the recorded
    direction and edit parameters, and its weights an independent recomputation of the edit at the
    chosen strength (check_saved_weights); a full ablation must also leave no component along the
    direction in any layer's input.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md",
                 "abliteration.json", "directions.safetensors"):  # fmt: skip
        assert (out / name).is_file(), name
    record = json.loads((out / "abliteration.json").read_text())
    for key in ("model", "prompts", "settings", "selection", "edit", "metrics", "versions", "refusal_tokens", "seed",
                "split"):  # fmt: skip
        assert key in record, key
    for key in ("harmful", "harmless", "benign"):  # what `abliterate evaluate` rebuilds the held-out prompts from
        assert record["split"]["sha256"][key] == {
            p: record["prompts"][key][p]["sha256"] for p in ("train", "val", "test")
        }
    assert len(record["prompts"]["harmful"]["train"]["sha256"]) == 64
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "\ntags:\n" in card
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    direction = load_file(str(out / "directions.safetensors"))["direction"].double()
    assert abs(direction.norm().item() - 1) < 1e-5
    params = EditParams(record["edit"]["scale"], record["edit"]["start_layer"])
    ids = torch.randint(3, min(VOCAB, reloaded.config.vocab_size), (2, 16), generator=torch.Generator().manual_seed(0))
    original = AutoModelForCausalLM.from_pretrained(original_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        edited_logits = reloaded(input_ids=ids).logits
        original_logits = original(input_ids=ids).logits
        with ablation(original, architecture_for(original), direction, params):
            hooked_logits = original(input_ids=ids).logits
    assert (edited_logits - original_logits).abs().max() > 1e-3  # the saved model really is edited
    torch.testing.assert_close(edited_logits, hooked_logits, rtol=1e-3, atol=1e-3)
    check_saved_weights(out, original_folder, record, direction)
    if params == EditParams():
        with torch.no_grad():
            streams = residual_streams(reloaded, architecture_for(reloaded), ids)
        for h in streams:
            rel = (h.double() @ direction).abs() / h.double().norm(dim=-1)
            assert rel.max() < direction_tolerance
    return record, reloaded


POSTGRES_PROGRAMS = ("initdb", "pg_ctl", "postgres", "createdb")


def postgres_bin() -> Path | None:
    """The folder holding PostgreSQL's server programs: on PATH first, then Debian's /usr/lib/postgresql/<ver>/bin, newest first."""
    candidates = []
    if found := shutil.which("pg_ctl"):
        candidates.append(Path(found).resolve().parent)  # Path.resolve: a symlink on PATH leads to the real folder
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(versions, key=lambda b: [int(p) if p.isdigit() else 0 for p in b.parent.name.split(".")], reverse=True)  # fmt: skip
    return next((b for b in candidates if all(os.access(b / p, os.X_OK) for p in POSTGRES_PROGRAMS)), None)


def postgres_user() -> str | None:
    """The account the server runs as: ours, or when we are root (which PostgreSQL refuses) Debian's postgres or nobody."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name).pw_name
        except KeyError:
            continue
    return None


def start_postgres(database: str = "abliterate") -> tuple[str, Callable[[], None]]:
    """Start a throwaway PostgreSQL server; return its SQLAlchemy URL and a function that stops it and deletes it all.

    initdb runs into a fresh folder under the system temp dir (not pytest's tmp_path: that is private to
    the user running the tests, and as root the server runs as another account that must enter it),
    with trust auth and a role named `abliterate`; the server listens on a Unix socket in that folder
    only (no TCP), so it neither needs nor takes a network port. Raises RuntimeError with the server's
    log when something fails; postgres_bin() and postgres_user() tell beforehand whether it can work.
    """
    bin_dir, user = postgres_bin(), postgres_user()
    if bin_dir is None or user is None:
        raise RuntimeError("PostgreSQL's programs or a non-root account to run them are missing")
    as_user = ["runuser", "-u", user, "--"] if os.geteuid() == 0 else []
    base = Path(tempfile.mkdtemp(prefix="abliterate-pg-"))
    data, sock, log = base / "data", base / "sock", base / "server.log"
    sock.mkdir()
    log.touch()
    if as_user:
        owner = pwd.getpwnam(user)
        for path in (base, sock, log):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PG")}, "LC_ALL": "C"}
    # a free port: with no TCP it only names the socket file, but stays safe if TCP is turned on
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def run(*cmd: str | Path, user_side: bool = True) -> None:
        done = subprocess.run([*(as_user if user_side else []), *map(str, cmd)], cwd=base, env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        if done.returncode != 0:
            server_log = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{Path(str(cmd[0])).name} failed: {done.stdout}{done.stderr}{server_log}")

    def stop() -> None:
        try:
            if (data / "postmaster.pid").exists():
                run(bin_dir / "pg_ctl", "-D", data, "stop", "-m", "fast", "-w")
        finally:
            shutil.rmtree(base, ignore_errors=True)

    try:
        run(bin_dir / "initdb", "-D", data, "-U", "abliterate", "--auth=trust", "--encoding=UTF8", "--locale=C",
            "--no-sync")  # fmt: skip
        with (data / "postgresql.conf").open("a") as conf:  # fast and private: a test server that is thrown away
            conf.write(f"listen_addresses = ''\nunix_socket_directories = '{sock}'\nport = {port}\n"
                       "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")  # fmt: skip
        run(bin_dir / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "start")
        run(bin_dir / "createdb", "-h", sock, "-p", str(port), "-U", "abliterate", database, user_side=False)
    except BaseException:
        stop()
        raise
    return f"postgresql+psycopg2://abliterate@/{database}?host={sock}&port={port}", stop


def start_model_server(model: str | Path, *flags: str) -> tuple[str, Callable[[], None]]:
    """A real `abliterate serve MODEL` process on a free local port: its API root URL and a function that stops it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "abliterate.cli", "serve", str(model), "--port", "0", "--device", "cpu", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    assert proc.stdout is not None
    line = proc.stdout.readline()  # "serving ID at URL" once the port is bound; empty if the process died
    if not line.startswith("serving "):
        stop()
        raise RuntimeError(f"abliterate serve did not start: {line}{proc.stderr.read() if proc.stderr else ''}")
    return line.rsplit(" at ", 1)[1].strip(), stop
