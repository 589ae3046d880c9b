"""API keys: environment first, then the OS secret store (keyring), and the scrubbed environment for child processes.

A key never goes on a command line, into a log, results.tsv, a commit, the status file, or the training subprocess.
keyring picks the platform store (macOS Keychain, Linux Secret Service, Windows Credential Locker); entries live under
service "autoresearch" with the provider name as the user name.

Once the LLM client is built the agent keeps its secrets in memory only (withdraw_secrets, harden_process): the
code a training run executes is LLM-written, so it is treated as hostile, and it starts as the agent's child.
"""

import base64
import os
import re
import sys
from dataclasses import dataclass
from urllib.parse import urlparse

from tui.atomic import read_regular, write_atomic
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
MIN_SECRET = 8  # shorter values are not treated as secrets (too many false matches)
REDACTED = "[redacted]"


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


BASE_URL_VARS = {"anthropic": "ANTHROPIC_BASE_URL", "openai": "OPENAI_BASE_URL"}  # what the SDKs read themselves


def llm_host(provider: str, base_url: str | None) -> str:
    """The URL the provider's client talks to when it is not the vendor's own: --base-url, the SDK's environment
    variable, or Ollama's host (OLLAMA_HOST or its default); "" for the vendor's API."""
    host = base_url or os.environ.get(BASE_URL_VARS.get(provider, ""), "")
    if provider == "ollama":
        host = host or os.environ.get("OLLAMA_HOST") or "127.0.0.1:11434"
    return host if not host or "://" in host else "http://" + host


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
        value = environ.get(name, "").strip() or (WITHDRAWN.get(name, "").strip() if environ is os.environ else "")
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
    secrets = [s for s in secrets if s and len(s) >= MIN_SECRET]
    return {k: v for k, v in environ.items()
            if not is_child_hidden(k) and not any(s in v for s in secrets)}


# ---------------------------------------------------------------------------
# Secrets in memory only: out of the environment, out of reach of the agent's children
# ---------------------------------------------------------------------------

# variables withdraw_secrets() took out of os.environ (name -> value): a second agent started by the same process
# (the dashboard, tests) still finds its key, and no child process inherits it
WITHDRAWN: dict = {}

PR_SET_DUMPABLE, PR_CAPBSET_DROP, CAP_SYS_PTRACE = 4, 24, 19  # <linux/prctl.h>, <linux/capability.h>


def known_env_secrets() -> list:
    """Values of the secret-named variables this process was given (still in os.environ or already withdrawn)."""
    return list(dict.fromkeys(v for env in (os.environ, WITHDRAWN) for k, v in env.items()
                              if is_secret_name(k) and len(v) >= MIN_SECRET))


def withdraw_secrets(secrets=()) -> None:
    """Take every secret-named variable, and every variable holding one of `secrets`, out of os.environ (kept in
    WITHDRAWN) and overwrite the known secrets in the environment block the process started with."""
    known = [s for s in secrets if s and len(s) >= MIN_SECRET]
    names = [k for k, v in os.environ.items() if is_secret_name(k) or any(s in v for s in known)]
    _blank_initial_environment(known + [os.environ[k] for k in names])
    for name in names:
        WITHDRAWN[name] = os.environ.pop(name)


def _blank_initial_environment(values) -> None:
    """/proc/<pid>/environ shows the block the process was started with, whatever os.environ (and unsetenv) did
    since, and on Linux a child running as the same user or as root can read it. Overwrite every known secret in
    that block in place (same length: no other variable moves)."""
    values = [v.encode("utf-8") for v in values if len(v) >= MIN_SECRET]
    if not sys.platform.startswith("linux") or not values:
        return
    try:
        import ctypes
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[47]), int(fields[48])  # fields 50 and 51 of proc(5): env_start, env_end
        if not 0 < start < end:
            return
        block = ctypes.string_at(start, end - start)
    except (OSError, ValueError, IndexError):
        return
    for raw in values:
        i = block.find(raw)
        while i >= 0:
            ctypes.memset(start + i, ord("*"), len(raw))
            i = block.find(raw, i + len(raw))


def harden_process() -> None:
    """Linux: the agent's children cannot read its memory (where the key lives). Not dumpable: /proc/<pid>/mem and
    ptrace are closed to other processes of the same user. That does not stop root, so as root also drop
    CAP_SYS_PTRACE from the bounding set: every program the agent starts from now on runs without it (the agent
    itself keeps its own capabilities). Without CAP_SETPCAP the drop fails, and there is nothing to drop. The bounding
    set belongs to the thread: call this on the thread that starts the children (the loop's)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    arg = ctypes.c_ulong
    libc.prctl(PR_SET_DUMPABLE, arg(0), arg(0), arg(0), arg(0))
    libc.prctl(PR_CAPBSET_DROP, arg(CAP_SYS_PTRACE), arg(0), arg(0), arg(0))


# ---------------------------------------------------------------------------
# Redaction
# ---------------------------------------------------------------------------

def secret_forms(secret: str) -> set:
    """The spellings of a secret a hostile program is most likely to print: raw, reversed, hex (lower and upper),
    base64 (standard and URL-safe, with and without padding) and, for base64 of a longer text that contains the
    secret, the characters that depend on the secret alone at each of the 3 byte offsets it can start at."""
    raw = secret.encode("utf-8")
    forms = {secret, secret[::-1], raw.hex(), raw.hex().upper()}
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        full = encode(raw).decode("ascii")
        forms |= {full, full.rstrip("=")}
        for offset in range(3):
            body = raw[(3 - offset) % 3:]
            forms.add(encode(body[:len(body) - len(body) % 3]).decode("ascii"))
    return {f for f in forms if len(f) >= MIN_SECRET}


class Redactor:
    """Replaces every known secret, in each of its secret_forms, in any text we write or send (logs, results,
    commit messages, the status file, prompts)."""

    def __init__(self, secrets=()):
        self.secrets = list(dict.fromkeys(s for s in secrets if s and len(s) >= MIN_SECRET))
        # longest first: at any position the whole form is replaced, not a shorter form inside it
        forms = sorted({f for s in self.secrets for f in secret_forms(s)}, key=lambda f: (-len(f), f))
        self._pattern = re.compile("|".join(map(re.escape, forms))) if forms else None

    def __call__(self, text):
        if not isinstance(text, str) or self._pattern is None:
            return text
        return self._pattern.sub(REDACTED, text)

    def finds(self, text: str) -> bool:
        """Does text hold a known secret in any of its forms?"""
        return self._pattern is not None and self._pattern.search(text) is not None

    def redact_bytes(self, data: bytes) -> bytes:
        """Bytes that need not be UTF-8 (a log, a binary file): undecodable bytes pass through unchanged."""
        if self._pattern is None:
            return data
        return self(data.decode("utf-8", errors="surrogateescape")).encode("utf-8", errors="surrogateescape")

    def redact_file(self, path) -> bool:
        """Rewrite a file (atomically) without the secrets it holds; True when it held one."""
        try:
            data = read_regular(path)
        except OSError:
            return False
        clean = self.redact_bytes(data)
        if clean == data:
            return False
        write_atomic(path, clean)
        return True
