"""Shared test setup: dpo's own pytest plugin (fixtures and the ``backend`` marker), enabled the
way a plugin author would enable it."""

pytest_plugins = ["dpo.testing"]

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Runs in tests keep converted models and reference log-probs in a cache of their own,
    not the user's (tests that need a particular cache set DPO_CACHE_DIR themselves)."""
    previous = os.environ.get("DPO_CACHE_DIR")
    os.environ["DPO_CACHE_DIR"] = str(tmp_path_factory.mktemp("dpo-cache"))
    yield
    if previous is None:
        os.environ.pop("DPO_CACHE_DIR", None)
    else:
        os.environ["DPO_CACHE_DIR"] = previous


@pytest.fixture(autouse=True)
def _no_terminal_overrides(monkeypatch: pytest.MonkeyPatch):
    """Output in tests is not a terminal whatever the caller's environment says: these
    variables would make rich treat it as one (a live bar, lines wrapped at COLUMNS)."""
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
