"""The HTML report: written by every run, re-rendered by `abliterate report`, and readable in Chromium."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from helpers import FAST
from PIL import Image

from abliterate import cli
from abliterate.evaluation.metrics import Metrics
from abliterate.output.html import PLOTS as ALL_PLOTS
from abliterate.output.html import load_run, pareto_front, projections, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed; scripts/test.sh installs it as root or with sudo"
)

PLOTS = [name for name in ALL_PLOTS if name != "search_front"]  # a run that selects on the ladder searches nothing


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_checkpoint) -> Path:
    """One tiny end-to-end run; the pipeline itself writes the report."""
    out = tmp_path_factory.mktemp("report") / "run"
    assert cli.main(["run", str(tiny_checkpoint), "--out", str(out), *FAST]) == 0
    return out


def copy_run(run_dir: Path, dest: Path) -> Path:
    """The run's records without the model weights, enough to re-render the report."""
    dest.mkdir()
    for name in ("abliteration.json", "directions.safetensors", "evaluation.json"):
        shutil.copyfile(run_dir / name, dest / name)
    return dest


class Page(HTMLParser):
    """Collects <img> attributes, table rows by table class, and script tags."""

    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, str] = {}
        self.rows: dict[str, int] = {}
        self.scripts = 0
        self._table: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images[a.get("id", "")] = a.get("src", "")
        elif tag == "table":
            self._table.append(a.get("class", ""))
        elif tag == "tr" and self._table and self._table[-1]:
            self.rows[self._table[-1]] = self.rows.get(self._table[-1], 0) + 1
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag == "table":
            self._table.pop()


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    return page


def decode_png(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    data = base64.b64decode(src[len(prefix) :])
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_run_writes_report_with_every_plot(run_dir):
    record = json.loads((run_dir / "abliteration.json").read_text())
    assert any(c["trials"] for c in record["selection"]["candidates"])  # a search ran, so a Pareto plot is due
    page = parse((run_dir / "report.html").read_text(encoding="utf-8"))
    assert set(page.images) == {f"plot-{name}" for name in PLOTS}
    for name in PLOTS:
        embedded = decode_png(page.images[f"plot-{name}"])
        on_disk = Image.open(run_dir / "report" / f"{name}.png")
        assert embedded.size == on_disk.size and min(embedded.size) > 100
        pixels = np.asarray(embedded.convert("L"))
        assert pixels.std() > 5  # something was drawn
    assert page.rows["samples"] == 2 * (1 + 4)  # header + 4 test prompts, harmful and benign
    assert page.rows["metrics"] == 1 + len(Metrics.from_dict(record["metrics"]).rows())
    assert page.scripts == 0


def test_projection_gap_at_the_chosen_layer_is_the_mean_difference(run_dir):
    run = load_run(run_dir)
    harmful, harmless = projections(run)
    layer, pos = run.record.selection["layer"], run.position
    gap = harmful[layer] - harmless[layer]
    diff = run.tensors["harmful_means"][pos, layer] - run.tensors["harmless_means"][pos, layer]
    # The direction is the normalized mean difference, so the means sit |diff| apart along it.
    assert gap > 0 and gap == pytest.approx(np.linalg.norm(diff), rel=1e-4)
    assert len(harmful) == run.record.model.num_layers + 1


@needs_chromium
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    url = (run_dir / "report.html").resolve().as_uri()
    dom = chromium(f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = parse(dom.stdout)
    assert set(page.images) == {f"plot-{name}" for name in PLOTS}
    for src in page.images.values():
        assert min(decode_png(src).size) > 100
    assert page.rows["samples"] == 10 and page.rows["categories"] > 2
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["harmful"][0]["prompt"] in dom.stdout.replace("&amp;", "&").replace("&#x27;", "'")
    shot = tmp_path / "shot.png"
    r = chromium(f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2400", f"--screenshot={shot}", url)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (2400, 1200)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # text and plots, not a blank page


HOSTILE = "<script>document.title='pwned'</script><img src=x onerror=alert(1)> & done"


def hostile_run(run_dir: Path, dest: Path) -> Path:
    """A copy of the run whose first harmful answer is an HTML/script injection attempt."""
    folder = copy_run(run_dir, dest)
    evaluation = json.loads((folder / "evaluation.json").read_text())
    evaluation["harmful"][0]["after"] = HOSTILE
    evaluation["harmful"][0]["after_label"] = "compliance"
    evaluation["harmful"][0]["before_label"] = "refusal"  # a changed label: shown first
    (folder / "evaluation.json").write_text(json.dumps(evaluation))
    return folder


def test_report_command_rerenders_and_escapes_model_text(run_dir, tmp_path, capsys):
    folder = hostile_run(run_dir, tmp_path / "copy")
    hostile = HOSTILE
    assert cli.main(["report", str(folder)]) == 0
    assert capsys.readouterr().out.strip() == str(folder / "report.html")
    text = (folder / "report.html").read_text(encoding="utf-8")
    assert hostile not in text and "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;" in text
    page = parse(text)
    assert page.scripts == 0 and "x" not in page.images and len(page.images) == len(PLOTS)
    assert sorted(p.name for p in (folder / "report").iterdir()) == sorted(f"{n}.png" for n in PLOTS)


@needs_chromium
def test_escaped_model_text_stays_inert_in_chromium(run_dir, tmp_path):
    folder = hostile_run(run_dir, tmp_path / "copy")
    write_report(folder)
    dom = chromium(f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", (folder / "report.html").as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "pwned" not in dom.stdout.split("</title>")[0] and parse(dom.stdout).scripts == 0
    assert "<script>document.title='pwned'</script>" in dom.stdout.replace("&lt;", "<").replace("&gt;", ">")


def test_report_of_a_run_without_evaluation(run_dir, tmp_path):
    folder = copy_run(run_dir, tmp_path / "noeval")
    (folder / "evaluation.json").unlink()
    record = json.loads((folder / "abliteration.json").read_text())
    record["metrics"] = {}
    for c in record["selection"]["candidates"]:
        c["trials"] = []
    (folder / "abliteration.json").write_text(json.dumps(record))
    (folder / "report").mkdir()
    (folder / "report" / "stale.png").write_bytes(b"old")
    page_path = write_report(folder)
    text = page_path.read_text(encoding="utf-8")
    page = parse(text)
    assert set(page.images) == {"plot-layer_scores", "plot-layer_cosine", "plot-projections"}
    assert "Not evaluated" in text and "No strength search ran" in text and "samples" not in page.rows
    assert sorted(p.name for p in (folder / "report").iterdir()) == ["layer_cosine.png", "layer_scores.png",
                                                                     "projections.png"]  # fmt: skip


def test_report_command_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "pass the folder of a finished run" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "abliteration.json").write_text("{not json")
    (tmp_path / "directions.safetensors").write_bytes(b"")
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "damaged run record" in capsys.readouterr().err
    (tmp_path / "abliteration.json").write_text("{}")
    assert cli.main(["report", str(tmp_path)]) == 2  # a truncated directions file
    assert "damaged run record" in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()


def test_pareto_front_keeps_only_undominated_edits():
    points = [
        {"kl": 0.30, "refusal": -4.0},
        {"kl": 0.10, "refusal": -2.0},
        {"kl": 0.20, "refusal": -1.0},  # dominated by kl 0.10 / refusal -2.0
        {"kl": 0.05, "refusal": 1.0},
        {"kl": 0.40, "refusal": -3.0},  # dominated by kl 0.30 / refusal -4.0
    ]
    front = pareto_front(points, induce=False)
    assert [(p["kl"], p["refusal"]) for p in front] == [(0.05, 1.0), (0.10, -2.0), (0.30, -4.0)]
    # Inducing wants more refusal: now the kl 0.05 / refusal 1.0 edit beats everything above it.
    assert [(p["kl"], p["refusal"]) for p in pareto_front(points, induce=True)] == [(0.05, 1.0)]


def test_report_markdown_prints_the_recorded_table_and_writes_nothing(run_dir, tmp_path, capsys):
    folder = copy_run(run_dir, tmp_path / "md")
    before = sorted(p.name for p in folder.rglob("*"))
    assert cli.main(["report", str(folder), "--markdown"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    metrics = Metrics.from_dict(json.loads((folder / "abliteration.json").read_text())["metrics"])
    assert lines[0] == "| metric | original | abliterated | paired p |" and lines[1] == "|---|---|---|---|"
    assert lines[2:] == ["| " + " | ".join(row) + " |" for row in metrics.rows()]
    assert lines[2].startswith("| Refusal, harmful test prompts | ") and lines[2].count("/4)") == 2
    assert sorted(p.name for p in folder.rglob("*")) == before  # nothing written
    record = json.loads((folder / "abliteration.json").read_text())
    (folder / "abliteration.json").write_text(json.dumps({**record, "metrics": {}}))
    assert cli.main(["report", str(folder), "--markdown"]) == 2
    assert "not evaluated" in capsys.readouterr().err
