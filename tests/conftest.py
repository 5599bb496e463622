"""Shared fixtures: tiny random models of many architectures, built from configs with no download."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

import pytest
import torch

from abliterate.tiny import save_tiny_checkpoint

# Tests never touch the user's cache; set ABLITERATE_TEST_CACHE to reuse downloads between sessions.
_OWN_CACHE = None if os.environ.get("ABLITERATE_TEST_CACHE") else tempfile.mkdtemp(prefix="abliterate-test-cache-")
os.environ["ABLITERATE_CACHE"] = os.environ.get("ABLITERATE_TEST_CACHE") or _OWN_CACHE


@pytest.fixture(scope="session", autouse=True)
def _remove_test_cache():
    """Delete the session's own cache folder at the end."""
    yield
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture
def rng():
    """A seeded torch generator."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A saved tiny llama with a chat template, shared by the tests that only read it."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def postgres_url():
    """A real throwaway PostgreSQL server (helpers.start_postgres) for the session: its SQLAlchemy URL.

    Skips, naming what is missing, only where the server or its client cannot be had; a server that
    is there yet fails to start is an error.
    """
    from helpers import postgres_bin, postgres_user, start_postgres

    missing = [m for m in ("optuna", "psycopg2") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed: pip install -e '.[search]' (scripts/test.sh does)")
    if postgres_bin() is None:
        pytest.skip("PostgreSQL's initdb/pg_ctl not on PATH nor in /usr/lib/postgresql/*/bin: "
                    "apt-get install postgresql (scripts/test.sh does when root or sudo may)")  # fmt: skip
    if postgres_user() is None or (os.geteuid() == 0 and shutil.which("runuser") is None):
        pytest.skip("running as root with no postgres/nobody account or no runuser to start PostgreSQL as")
    url, stop = start_postgres()
    yield url
    stop()
