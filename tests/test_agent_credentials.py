"""Key lookup (env first, then keyring), masking, storage, and the scrubbed child environment."""

import keyring
import pytest
from keyring.backends import fail

from fakes.test_keyring import MemoryKeyring
from tui.credentials import (ENV_VARS, CredentialError, Redactor, clear_key, find_key, mask, resolve_key, scrub_env,
                             store_key)


@pytest.fixture
def memory_keyring(monkeypatch):
    for names in ENV_VARS.values():
        for name in names:
            monkeypatch.delenv(name, raising=False)
    previous = keyring.get_keyring()
    kr = MemoryKeyring()
    keyring.set_keyring(kr)
    yield kr
    keyring.set_keyring(previous)


def test_env_first_then_keyring_then_nothing(memory_keyring, monkeypatch):
    assert find_key("anthropic").key is None
    store_key("anthropic", "  sk-ant-stored-abcd1234\n")
    cred = find_key("anthropic")
    assert (cred.key, cred.source) == ("sk-ant-stored-abcd1234", "keyring")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-env-wxyz9876")
    cred = find_key("anthropic")
    assert (cred.key, cred.source) == ("sk-ant-env-wxyz9876", "env ANTHROPIC_API_KEY")
    assert "wxyz9876" not in repr(cred) and mask(cred.key) == "****9876"
    assert find_key("openai").key is None  # keys are per provider
    assert clear_key("anthropic") is True and clear_key("anthropic") is False
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    assert find_key("anthropic").key is None


def test_missing_key_error_says_what_to_run(memory_keyring):
    with pytest.raises(CredentialError, match="--setup-key --provider openai"):
        resolve_key("openai")
    assert resolve_key("ollama").key is None  # a local Ollama needs no key
    assert resolve_key("openai", "http://localhost:8080/v1").source == "none (local server)"


def test_openrouter_key_preferred_for_openrouter_urls(memory_keyring, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-000000001111")
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-or-000000002222")
    assert find_key("openai", "https://openrouter.ai/api/v1").source == "env OPENROUTER_API_KEY"
    assert find_key("openai").source == "env OPENAI_API_KEY"
    assert find_key("openrouter").key.endswith("2222")


def test_no_secret_store_is_one_line_not_a_traceback(monkeypatch):
    previous = keyring.get_keyring()
    keyring.set_keyring(fail.Keyring())
    try:
        monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
        assert find_key("anthropic").key is None
        with pytest.raises(CredentialError, match="set ANTHROPIC_API_KEY"):
            store_key("anthropic", "sk-ant-xxxxxxxxxxxx")
    finally:
        keyring.set_keyring(previous)


def test_scrub_env_removes_keys_tokens_secrets_and_provider_settings():
    env = {"PATH": "/usr/bin", "HOME": "/home/u", "ANTHROPIC_API_KEY": "a" * 20, "OPENAI_API_KEY": "b" * 20,
           "HF_TOKEN": "c" * 20, "GITHUB_TOKEN": "d" * 20, "AWS_SECRET_ACCESS_KEY": "e" * 20, "DB_PASSWORD": "f" * 20,
           "OPENAI_BASE_URL": "https://x", "OLLAMA_HOST": "h:1", "ANTHROPIC_MODEL": "m",
           "AUTORESEARCH_TIME_BUDGET": "5", "CUDA_VISIBLE_DEVICES": "0", "TOKENIZERS_PARALLELISM": "false",
           "INNOCENT": "contains sk-ant-api03-zzzzzzzzzz inside"}
    out = scrub_env(env, secrets=["sk-ant-api03-zzzzzzzzzz"])
    assert set(out) == {"PATH", "HOME", "AUTORESEARCH_TIME_BUDGET", "CUDA_VISIBLE_DEVICES", "TOKENIZERS_PARALLELISM"}


def test_redactor():
    r = Redactor(["sk-ant-api03-SECRET", "short"])
    assert r("key sk-ant-api03-SECRET here, short stays") == "key [redacted] here, short stays"
