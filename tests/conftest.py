"""Keep every test away from the user's real cache (~/.cache/autoresearch): data, tokenizers, profile and the measured
CPU peak all go to a temporary directory for the session. Tests that need their own cache set it themselves."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("AUTORESEARCH_CACHE_DIR", str(tmp_path_factory.mktemp("autoresearch-cache")))
    yield
    mp.undo()
