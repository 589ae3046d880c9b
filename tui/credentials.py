"""API keys: environment first, then the OS secret store (keyring), and the scrubbed environment for child processes.

A key never goes on a command line, into a log, results.tsv, a commit, the status file, or the training subprocess.
keyring picks the platform store (macOS Keychain, Linux Secret Service, Windows Credential Locker); entries live under
service "autoresearch" with the provider name as the user name.
"""

import os
import re
from dataclasses import dataclass
from urllib.parse import urlparse

from tui.llm import PROVIDERS

KEYRING_SERVICE = "autoresearch"

# provider (each of PROVIDERS) -> environment variables that may hold its key, in order of preference
ENV_VARS = {
    "anthropic": ("ANTHROPIC_API_KEY",),
    "openai": ("OPENAI_API_KEY",),
    "openrouter": ("OPENROUTER_API_KEY", "OPENAI_API_KEY"),
    "ollama": ("OLLAMA_API_KEY",),  # only for hosted Ollama; a local server needs none
}

# environment variables a training child must never see: secrets by name, plus every provider's own settings
SECRET_NAME_RE = re.compile(r"(_API_KEY$|_TOKEN$|SECRET|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|PRIVATE_KEY|^API_KEY$)",
                            re.IGNORECASE)
PROVIDER_PREFIXES = ("ANTHROPIC_", "OPENAI_", "OPENROUTER_", "OLLAMA_", "AZURE_OPENAI_", "CLAUDE_")


class CredentialError(RuntimeError):
    pass


@dataclass
class Credential:
    provider: str
    key: str | None
    source: str  # "env ANTHROPIC_API_KEY", "keyring", "none (local server)"

    def __repr__(self) -> str:  # never print the key by accident
        return f"Credential(provider={self.provider!r}, key={mask(self.key)!r}, source={self.source!r})"


def mask(key: str | None) -> str:
    if not key:
        return "(none)"
    return "****" + key[-4:] if len(key) > 8 else "****"


def is_local_url(url: str | None) -> bool:
    host = (urlparse(url).hostname or "") if url else ""
    return host in ("localhost", "127.0.0.1", "::1", "0.0.0.0") or host.endswith(".local")


def _check_provider(provider: str) -> None:
    if provider not in PROVIDERS:
        raise CredentialError(f"unknown provider {provider!r}: choose one of {', '.join(PROVIDERS)}")


# ---------------------------------------------------------------------------
# keyring access (every keyring failure becomes one readable line)
# ---------------------------------------------------------------------------


def _keyring():
    try:
        import keyring
        import keyring.errors  # noqa: F401
    except ImportError:
        raise CredentialError("the keyring package is not installed; set the API key in the environment "
                              "instead") from None
    return keyring


def keyring_get(provider: str) -> str | None:
    kr = _keyring()
    try:
        return kr.get_password(KEYRING_SERVICE, provider) or None
    except Exception:  # no usable backend (headless Linux without Secret Service, locked store, ...)
        return None


def store_key(provider: str, key: str) -> None:
    _check_provider(provider)
    key = key.strip()
    if not key:
        raise CredentialError("empty key: nothing stored")
    kr = _keyring()
    try:
        kr.set_password(KEYRING_SERVICE, provider, key)
    except Exception as e:
        env = ENV_VARS[provider][0]
        raise CredentialError(f"could not store the key in the OS secret store ({type(e).__name__}: {e}); "
                              f"set {env} in the environment instead") from None


def clear_key(provider: str) -> bool:
    """Remove the stored key. Returns False when there was none."""
    _check_provider(provider)
    kr = _keyring()
    try:
        if kr.get_password(KEYRING_SERVICE, provider) is None:
            return False
        kr.delete_password(KEYRING_SERVICE, provider)
        return True
    except Exception as e:
        raise CredentialError(f"could not clear the key from the OS secret store ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------


def find_key(provider: str, base_url: str | None = None, environ=None) -> Credential:
    """Environment first, then keyring. Returns a Credential with key None when nothing was found."""
    _check_provider(provider)
    environ = os.environ if environ is None else environ
    names = ENV_VARS[provider]
    if provider == "openai" and base_url and "openrouter.ai" in base_url:
        names = ("OPENROUTER_API_KEY",) + names
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return Credential(provider, value, f"env {name}")
    stored = keyring_get(provider)
    if stored:
        return Credential(provider, stored, "keyring")
    return Credential(provider, None, "none")


def resolve_key(provider: str, base_url: str | None = None, environ=None) -> Credential:
    """Like find_key, but a provider that needs a key and has none is an error that says how to set one up."""
    cred = find_key(provider, base_url, environ)
    if cred.key:
        return cred
    if provider == "ollama" or (provider == "openai" and is_local_url(base_url)):
        return Credential(provider, None, "none (local server)")
    env = ENV_VARS[provider][0]
    raise CredentialError(f"no API key for {provider}: set {env}, or run: uv run dashboard.py --setup-key "
                          f"--provider {provider}")


# ---------------------------------------------------------------------------
# The training child's environment
# ---------------------------------------------------------------------------


def is_secret_name(name: str) -> bool:
    """Variables that hold secrets by their name (keys, tokens, passwords)."""
    return bool(SECRET_NAME_RE.search(name))


def is_child_hidden(name: str) -> bool:
    """Variables a training child never sees: secrets, plus every LLM provider's settings."""
    return is_secret_name(name) or name.upper().startswith(PROVIDER_PREFIXES)


def scrub_env(environ=None, secrets=()) -> dict:
    """A copy of environ without secrets: by variable name, and any variable whose value contains a known key."""
    environ = os.environ if environ is None else environ
    secrets = [s for s in secrets if s and len(s) >= 8]
    return {k: v for k, v in environ.items()
            if not is_child_hidden(k) and not any(s in v for s in secrets)}


class Redactor:
    """Replaces known key values in any text we write (logs, results, commit messages, status file)."""

    def __init__(self, secrets=()):
        self.secrets = [s for s in secrets if s and len(s) >= 8]

    def __call__(self, text):
        if not isinstance(text, str) or not self.secrets:
            return text
        for s in self.secrets:
            text = text.replace(s, "[redacted]")
        return text
