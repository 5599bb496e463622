"""Shared fixtures: tiny random models of many architectures, built from configs with no download."""

from __future__ import annotations

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
