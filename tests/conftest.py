"""Shared fixtures. Every test stays away from the user's real cache (~/.cache/autoresearch): data, tokenizers, profile
and the measured CPU peak go to a temporary directory for the session (tests that need their own cache set it)."""

import json

import pytest

from fakes.agent import STORED_KEY, TEST_KEY
from fakes.llm_servers import FakeLLMServer
from tui import credentials


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("AUTORESEARCH_CACHE_DIR", str(tmp_path_factory.mktemp("autoresearch-cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _forget_withdrawn_secrets():
    """An agent takes its secrets out of os.environ and keeps them for a later agent of the same process
    (tui.credentials.WITHDRAWN); a test's variables must not outlive the test that set them."""
    yield
    credentials.WITHDRAWN.clear()


@pytest.fixture
def server(monkeypatch):
    """A fake Anthropic Messages API on 127.0.0.1 with scripted replies, and a test key in the environment."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", TEST_KEY)
    s = FakeLLMServer("anthropic").start()
    yield s
    s.stop()


@pytest.fixture
def file_keyring(tmp_path, monkeypatch):
    """STORED_KEY in a keyring file that an agent in this process and its training runs can both read (a run reads
    AUTORESEARCH_TEST_KEYRING: the keyring is what a run can always reach without a sandbox)."""
    import keyring
    from fakes.test_keyring import FileKeyring
    path = tmp_path / "kr.json"
    path.write_text(json.dumps({"autoresearch/anthropic": STORED_KEY}))
    monkeypatch.setenv("AUTORESEARCH_TEST_KEYRING", str(path))
    previous = keyring.get_keyring()
    keyring.set_keyring(FileKeyring())
    yield path
    keyring.set_keyring(previous)
