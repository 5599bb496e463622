"""Optuna studies shared by separate processes: on a real PostgreSQL server the test starts, and on a local SQLite file.

The workers are fresh `python -c` processes that join one study with optuna.load_study; every trial
records which worker ran it, and its value is a deterministic function of its parameter.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna", reason="optuna not installed: pip install -e '.[search]' (scripts/test.sh does)")

# One worker: joins the study, waits at a file barrier for its peers (so their runs overlap), then
# optimizes n_trials, or until the study has `until` complete trials; `kill_after` SIGKILLs it once
# it has finished that many trials, as a crash would.
WORKER = r"""
import json, os, signal, sys, time
from pathlib import Path
import optuna
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

cfg = json.loads(sys.argv[1])
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.load_study(study_name=cfg["study"], storage=cfg["storage"],
                          sampler=optuna.samplers.RandomSampler(seed=cfg["seed"]))
barrier = Path(cfg["barrier"])
(barrier / cfg["worker"]).touch()
deadline = time.monotonic() + 30
while len(list(barrier.iterdir())) < cfg["peers"] and time.monotonic() < deadline:
    time.sleep(0.01)
done = 0

def objective(trial):
    x = trial.suggest_int("x", 0, 1000)
    trial.set_user_attr("worker", cfg["worker"])
    trial.set_user_attr("pid", os.getpid())
    time.sleep(0.05)
    return (x - 500) ** 2

def crash(study, trial):
    global done
    done += 1
    if done == cfg.get("kill_after"):
        os.kill(os.getpid(), signal.SIGKILL)

callbacks = [crash]
if cfg.get("until"):
    callbacks.append(MaxTrialsCallback(cfg["until"], states=(TrialState.COMPLETE,)))
print(os.getpid(), flush=True)
study.optimize(objective, n_trials=cfg.get("n_trials"), callbacks=callbacks)
"""


def _start(storage: str, study: str, barrier: Path, worker: str, peers: int, **cfg: int) -> subprocess.Popen[str]:
    barrier.mkdir(exist_ok=True)
    config = {"storage": storage, "study": study, "barrier": str(barrier), "worker": worker, "peers": peers,
              "seed": len(worker), **cfg}  # fmt: skip
    return subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=barrier)  # fmt: skip


def _finish(proc: subprocess.Popen[str], returncode: int = 0) -> int:
    """Wait for a worker; check how it ended; its pid."""
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == returncode, err
    return int(out.split()[0])


def _check_study(storage: str, name: str, total: int) -> list[optuna.trial.FrozenTrial]:
    """`total` complete trials, nothing else, numbered 0..total-1 once each, each value its objective's."""
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * total
    assert sorted(t.number for t in trials) == list(range(total))
    assert all(t.value == (t.params["x"] - 500) ** 2 for t in trials)
    return trials


def _two_concurrent_workers(storage: str, tmp_path: Path, per_worker: tuple[int, int]) -> None:
    """Two processes optimize one study at once; each one's trials all land, and their runs overlap."""
    optuna.create_study(study_name="shared", storage=storage)
    procs = [_start(storage, "shared", tmp_path / "barrier", w, 2, n_trials=n) for w, n in zip("ab", per_worker)]
    pids = dict(zip("ab", (_finish(p) for p in procs)))
    trials = _check_study(storage, "shared", sum(per_worker))
    spans = {}
    for worker, n in zip("ab", per_worker):
        own = [t for t in trials if t.user_attrs["worker"] == worker]
        assert len(own) == n and {t.user_attrs["pid"] for t in own} == {pids[worker]}
        spans[worker] = (min(t.datetime_start for t in own), max(t.datetime_complete for t in own))
    assert max(s for s, _ in spans.values()) < min(e for _, e in spans.values()), f"the workers took turns: {spans}"


def test_processes_share_a_study_on_postgres(postgres_url: str, tmp_path: Path) -> None:
    """Optuna's RDBStorage on the session's PostgreSQL server: two workers, one study, every trial once."""
    _two_concurrent_workers(postgres_url, tmp_path, (8, 6))


def test_processes_share_a_study_on_a_sqlite_file(tmp_path: Path) -> None:
    """The default local storage, a SQLite file, takes two workers at once too."""
    _two_concurrent_workers(f"sqlite:///{tmp_path / 'study.db'}", tmp_path, (6, 5))


def test_a_killed_worker_is_resumed_from_a_sqlite_file(tmp_path: Path) -> None:
    """A worker SIGKILLed after 4 trials leaves them stored; a second one continues to the total asked."""
    storage, total = f"sqlite:///{tmp_path / 'study.db'}", 10
    optuna.create_study(study_name="resumed", storage=storage)
    first = _finish(_start(storage, "resumed", tmp_path / "b1", "first", 1, until=total, kill_after=4),
                    returncode=-signal.SIGKILL)  # fmt: skip
    assert len(optuna.load_study(study_name="resumed", storage=storage).get_trials()) == 4
    second = _finish(_start(storage, "resumed", tmp_path / "b2", "second", 1, until=total))
    trials = sorted(_check_study(storage, "resumed", total), key=lambda t: t.number)
    assert [t.user_attrs["pid"] for t in trials] == [first] * 4 + [second] * (total - 4)
