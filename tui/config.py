"""AgentConfig: every knob of the agent loop in one dataclass, shared by dashboard.py, headless and run_suite.py.
Its field defaults are the defaults: dashboard.py's options read them from here."""

import os
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from tui.credentials import is_local_url, llm_host
from tui.devices import devices_problem, parse_devices
from tui.decision import CONFIRM_RUNS, KEEP_RULES, NOISE_RUNS, PLATEAU
from tui.executor import EXECUTORS
from tui.git_repo import validate_tag
from tui.llm import PROVIDERS
from tui.prompt import ANSWER_FORMATS, SCOPES
from tui.sandbox import SANDBOXES

DEFAULT_TIME_BUDGET = 300.0
DEFAULT_MAX_EXPERIMENTS = 100
PROTECTED = ("prepare.py", "backends")  # read-only for the agent: hash-checked before a result is accepted


class ConfigError(ValueError):
    pass


def default_tag() -> str:
    return time.strftime("%b%d").lower()  # e.g. "mar17", as upstream


def read_time_budget(repo) -> float:
    """prepare.py's TIME_BUDGET without importing it: the env override first, then the constant in the file."""
    raw = os.environ.get("AUTORESEARCH_TIME_BUDGET", "").strip()
    if raw:
        try:
            return float(raw)
        except ValueError:
            pass
    try:
        text = (Path(repo) / "prepare.py").read_text(encoding="utf-8")
    except OSError:
        return DEFAULT_TIME_BUDGET
    m = re.search(r"^TIME_BUDGET(?:_DEFAULT)?\s*=\s*([\d.]+)", text, re.MULTILINE)
    return float(m.group(1)) if m else DEFAULT_TIME_BUDGET


def default_allowance(time_budget: float) -> float:
    """How long a trainer may live beyond its budget: startup, compilation, the warm-up steps the trainers leave out
    of the budget, and the evaluation. Past budget + allowance a run is not kept, whatever it says it trained."""
    return max(60.0, 0.2 * time_budget)


def default_timeout(time_budget: float) -> float:
    """Budget plus a generous allowance for startup, compilation and evaluation."""
    return time_budget + max(300.0, time_budget)


# LLM calls: a local server (often a CPU) reads a long prompt at 20-50 tokens/s and writes at 2-40 tokens/s, so an
# 8k-token prompt and a 2k-token answer can take 10-20 minutes; a hosted API answers in well under 5
HOSTED_LLM_TIMEOUT, LOCAL_LLM_TIMEOUT = 300.0, 1800.0
# an answer is well under 1,500 tokens; a runaway reply (a base model never stops) runs to the cap, which on a local
# CPU server at 5-40 tokens/s costs minutes per call and room in a small context
HOSTED_MAX_TOKENS, LOCAL_MAX_TOKENS = 4096, 2048


def llm_defaults(provider: str, base_url: str | None) -> tuple[float, int]:
    """(llm_timeout, max_tokens) for a provider: longer and shorter for a server on this machine."""
    if is_local_url(llm_host(provider, base_url)):
        return LOCAL_LLM_TIMEOUT, LOCAL_MAX_TOKENS
    return HOSTED_LLM_TIMEOUT, HOSTED_MAX_TOKENS


def valid_resources(value) -> bool:
    """A Ray resource request: a non-empty {name: positive amount}."""
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
        for k, v in value.items())


@dataclass
class AgentConfig:
    repo: Path = Path(".")
    tag: str = field(default_factory=default_tag)
    max_experiments: int = DEFAULT_MAX_EXPERIMENTS  # total for the tag, baseline (exp0) included
    provider: str = "anthropic"
    model: str | None = None  # None: the provider's default (tui.llm.DEFAULT_MODELS)
    base_url: str | None = None
    scope: str = "hparams"  # "hparams" | "file"
    script: str | None = None  # None: the script for the detected backend
    results: Path | None = None  # None: <repo>/results.tsv
    runs_dir: Path | None = None  # None: <repo>/runs
    status_file: Path | None = None  # None: .runner_status.json next to the results file
    timeout: float | None = None  # training deadline in seconds; None: time budget + max(300, time budget)
    budget_allowance: float | None = None  # seconds past the budget a run may take; None: max(60, 20% of the budget)
    time_budget: float | None = None  # None: read from prepare.py / AUTORESEARCH_TIME_BUDGET
    history_len: int = 30  # past results shown in the prompt
    dataset: str = field(default_factory=lambda: os.environ.get("AUTORESEARCH_DATASET") or "climbmix")
    python: str = sys.executable
    seed: int | None = None  # AUTORESEARCH_SEED for the trainer; None leaves the trainer's default
    protected: tuple = PROTECTED
    # keep rule (tui.decision): "confirm" keeps only what beats the best mean by the noise margin, over 2+ runs;
    # "single" keeps any single run that beats the best (the seed's and upstream's rule)
    keep_rule: str = "confirm"
    noise_runs: int = NOISE_RUNS  # baseline runs (seeds 42, 43, ...) that measure the noise floor at the start of a tag
    confirm_runs: int = CONFIRM_RUNS  # extra runs (other seeds) a promising candidate may get before the verdict
    remeasure_noise: bool = False  # measure the noise floor again on the best commit before the next experiment
    plateau: int = PLATEAU  # experiments without a keep before the prompt asks for a new direction (0: never)
    hardware: dict | None = None  # None: detect with backends.get_hardware_info()
    # LLM calls
    # "auto" = structured answers (tool / response_format / format schema) where the provider offers them, falling back
    # to free text for the session when the server fails the schema; "json" = structured only; "text" = free text
    answer_format: str = "auto"
    max_tokens: int | None = None  # the answer's cap; None: llm_defaults (4096 hosted, 2048 on a local server)
    llm_timeout: float | None = None  # seconds per call; None: llm_defaults (300 hosted, 1800 on a local server)
    context_tokens: int | None = None  # the model's context window; None: the server's, the table's or 8192
    max_unusable_answers: int = 5  # unusable answers in a row before the loop stops with a diagnosis (0: never)
    llm_attempts: int = 6
    backoff_base: float = 2.0
    backoff_cap: float = 120.0
    retry_after_cap: float = 600.0
    outage_pause: float = 300.0  # pause after an experiment was skipped because the LLM stayed unavailable
    # guards against burning a night on a broken setup
    max_consecutive_skips: int = 10
    max_consecutive_crashes: int = 20
    kill_grace: float = 5.0
    # where training runs (tui.sandbox): "auto" = bubblewrap on Linux, sandbox-exec on macOS, or none with a loud
    # warning; "bwrap" / "sandbox-exec" = that one or refuse to start; "none" = no sandbox
    sandbox: str = "auto"
    # who carries out the runs (tui.executor.make_executor): "local" = this machine; "ray" = tasks on the Ray cluster at
    # ray_address ("auto": the one started here, or RAY_ADDRESS), each asking for ray_resources (None: one GPU when the
    # cluster has GPUs, else one CPU)
    executor: str = "local"
    ray_address: str = "auto"
    ray_resources: dict | None = None
    # parallel slots (tui.devices, tui.slots): how many experiments train at once; devices, one slot each
    workers: int = 1
    devices: tuple = ()  # or "cuda:0,cuda:1"

    def resolved(self) -> "AgentConfig":
        """A copy with every default filled in and every value checked; raises ConfigError with one line."""
        repo = Path(self.repo).expanduser().resolve()
        if not repo.is_dir():
            raise ConfigError(f"repository directory {repo} does not exist")
        try:
            validate_tag(self.tag)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.provider not in PROVIDERS:
            raise ConfigError(f"unknown provider {self.provider!r}: choose one of {', '.join(PROVIDERS)}")
        if self.scope not in SCOPES:
            raise ConfigError(f"unknown scope {self.scope!r}: choose hparams or file")
        if self.answer_format not in ANSWER_FORMATS:
            raise ConfigError(f"unknown answer format {self.answer_format!r}: choose one of "
                              f"{', '.join(ANSWER_FORMATS)}")
        if self.max_experiments < 1:
            raise ConfigError("--max must be at least 1 (the baseline is experiment 0)")
        if self.keep_rule not in KEEP_RULES:
            raise ConfigError(f"unknown keep rule {self.keep_rule!r}: choose one of {', '.join(KEEP_RULES)}")
        if self.noise_runs < 1:
            raise ConfigError("--noise-runs must be at least 1 (1: no noise-floor measurement)")
        if self.keep_rule == "confirm" and self.noise_runs < 2:
            raise ConfigError("--keep-rule confirm needs --noise-runs 2 or more (it decides with the measured noise "
                              "floor); use --keep-rule single for one baseline run")
        if self.confirm_runs < 0:
            raise ConfigError("--confirm-runs must be 0 or more")
        if self.plateau < 0:
            raise ConfigError("--plateau must be 0 (off) or more")
        if self.sandbox not in SANDBOXES:
            raise ConfigError(f"unknown sandbox {self.sandbox!r}: choose one of {', '.join(SANDBOXES)}")
        if self.executor not in EXECUTORS:
            raise ConfigError(f"unknown executor {self.executor!r}: choose one of {', '.join(EXECUTORS)}")
        if self.ray_resources is not None and not valid_resources(self.ray_resources):
            raise ConfigError(f"--ray-resources must name resources with positive amounts, e.g. '{{\"GPU\": 1}}' "
                              f"(got {self.ray_resources!r})")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError("--timeout must be a positive number of seconds")
        devices = parse_devices(self.devices)
        problem = devices_problem(devices)
        if problem:
            raise ConfigError(problem)
        if self.workers < 1:
            raise ConfigError("--workers must be at least 1")
        if devices and self.workers not in (1, len(devices)):
            raise ConfigError(f"--workers {self.workers} but --devices names {len(devices)}: give one of them (one "
                              f"slot per device)")
        workers = len(devices) if devices else self.workers
        timeout_default, tokens_default = llm_defaults(self.provider, self.base_url)
        max_tokens = self.max_tokens or tokens_default
        if max_tokens < 1 or (self.llm_timeout is not None and self.llm_timeout <= 0):
            raise ConfigError("--max-tokens and --llm-timeout must be positive")
        if self.context_tokens is not None and self.context_tokens <= max_tokens:
            raise ConfigError(f"--context-tokens {self.context_tokens} leaves no room for the prompt next to "
                              f"--max-tokens {max_tokens}: give a larger context or a smaller --max-tokens")
        budget = self.time_budget if self.time_budget is not None else read_time_budget(repo)
        results = Path(self.results).expanduser() if self.results else repo / "results.tsv"
        results = results if results.is_absolute() else (repo / results)
        runs = Path(self.runs_dir).expanduser() if self.runs_dir else repo / "runs"
        runs = runs if runs.is_absolute() else (repo / runs)
        status = Path(self.status_file) if self.status_file else results.parent / ".runner_status.json"
        return replace(self, repo=repo, results=results.resolve(), runs_dir=runs.resolve(), status_file=status,
                       max_tokens=max_tokens, llm_timeout=self.llm_timeout or timeout_default, workers=workers,
                       devices=devices, time_budget=budget, timeout=self.timeout or default_timeout(budget),
                       budget_allowance=(default_allowance(budget) if self.budget_allowance is None
                                         else self.budget_allowance))

    @property
    def branch(self) -> str:
        return f"autoresearch/{self.tag}"
