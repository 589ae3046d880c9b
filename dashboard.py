"""
autoresearch dashboard and agent.

    uv run dashboard.py --agent --headless --tag mar17 --max 50      # the research loop, plain log lines
    uv run dashboard.py --setup-key --provider anthropic             # store an API key in the OS secret store

The full-screen dashboard (single run, --watch, --agent with a screen) is built on the same engine (tui/).
"""

import argparse
import getpass
import os
import sys

# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

PROVIDERS = ("anthropic", "openai", "openrouter", "ollama")

EPILOG = """\
agent loop:
  On a new tag the unmodified script runs first (exp0, the baseline); then each experiment asks the LLM for one
  change, commits it as "expN: ...", trains, keeps it if val_bpb beats the best and reverts it otherwise. Results go
  to results.tsv (git-ignored), full training logs to runs/expN.log. Starting again with the same tag resumes.
  The agent refuses to start when tracked files other than the training script have uncommitted changes, or when
  another agent runs in the same repository.

headless signals and exit codes:
  The first Ctrl-C (SIGINT) or SIGTERM kills the current training run, reverts its commit and stops cleanly (that
  experiment runs again on the next start); a second one exits at once. Exit codes: 0 done (--max reached),
  1 fatal error (e.g. authentication failed, dirty work tree), 2 bad arguments, 128+N stopped by signal N.
  A status file (.runner_status.json next to results.tsv) is rewritten on every state change for monitoring.

API keys:
  Looked up in the environment first (ANTHROPIC_API_KEY, OPENAI_API_KEY, OPENROUTER_API_KEY, OLLAMA_API_KEY), then
  in the OS secret store (service "autoresearch", user = provider). Ollama and OpenAI-compatible servers on localhost
  need no key. Keys never reach the training process, the logs, results.tsv or commits.

examples:
  uv run dashboard.py --agent --headless --tag mar17 --max 80
  uv run dashboard.py --agent --headless --provider openai --model gpt-4.1
  uv run dashboard.py --agent --headless --provider openai --base-url http://localhost:8080/v1 --model qwen
  uv run dashboard.py --agent --headless --provider ollama --model qwen2.5-coder:32b --scope file
  uv run dashboard.py --check-key --provider anthropic
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _tag(text: str) -> str:
    from tui.git_repo import validate_tag
    try:
        return validate_tag(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("invalid --tag ", "invalid tag ")) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dashboard.py", description=__doc__.strip().splitlines()[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("single_script", nargs="?", metavar="SCRIPT",
                   help="single run: the training script to run with live metrics (default: the script for the "
                        "detected backend)")

    modes = p.add_argument_group("modes")
    modes.add_argument("--agent", action="store_true", help="run the autonomous research loop")
    modes.add_argument("--headless", action="store_true",
                       help="with --agent: no screen, timestamped log lines (for SSH, tmux, cron, run_suite.py)")
    modes.add_argument("--watch", action="store_true", help="no training: show results.tsv as it changes")

    agent = p.add_argument_group("agent options")
    agent.add_argument("--tag", type=_tag, default=None,
                       help="name of this run; the branch is autoresearch/<tag> (default: today's date, e.g. mar17)")
    agent.add_argument("--max", type=_positive_int, default=None, metavar="N",
                       help="stop once the tag has N experiments, baseline exp0 included (default: 100)")
    agent.add_argument("--provider", choices=PROVIDERS, default="anthropic",
                       help="LLM provider (default: anthropic); openai covers any OpenAI-compatible endpoint")
    agent.add_argument("--model", default=None,
                       help="model name (default: claude-sonnet-4-6 / gpt-4.1 / anthropic/claude-sonnet-4.6 / "
                            "qwen2.5-coder:32b by provider)")
    agent.add_argument("--base-url", default=None, metavar="URL",
                       help="API endpoint, e.g. http://localhost:8080/v1 for llama.cpp/vLLM/LM Studio, or the Ollama "
                            "host (default: the provider's; Ollama: OLLAMA_HOST or localhost:11434)")
    agent.add_argument("--scope", choices=("hparams", "file"), default="hparams",
                       help="what the LLM may edit: hparams = only the hyperparameter block (default); file = "
                            "search/replace edits anywhere in the training script")
    agent.add_argument("--timeout", type=_positive_float, default=None, metavar="SECONDS",
                       help="kill a training run after this many seconds (default: time budget + max(300, budget))")
    agent.add_argument("--script", default=None, metavar="FILE",
                       help="training script for the agent (default: train_mlx.py or train.py for the detected "
                            "backend)")
    agent.add_argument("--results", default=None, metavar="FILE", help="results file (default: results.tsv)")
    agent.add_argument("--repo", default=".", metavar="DIR", help="repository to work in (default: .)")
    agent.add_argument("--seed", type=int, default=None,
                       help="random seed passed to the trainer as AUTORESEARCH_SEED (default: the trainer's)")

    keys = p.add_argument_group("API keys (no screen; combine with --provider)")
    kx = keys.add_mutually_exclusive_group()
    kx.add_argument("--setup-key", action="store_true",
                    help="store an API key in the OS secret store (typed without echo)")
    kx.add_argument("--check-key", action="store_true",
                    help="show where the key comes from, masked to its last 4 characters")
    kx.add_argument("--clear-key", action="store_true", help="remove the stored key")
    return p


# ---------------------------------------------------------------------------
# Key commands
# ---------------------------------------------------------------------------


def key_command(args) -> int:
    from tui import credentials as cr
    provider = args.provider
    env_names = " or ".join(cr.ENV_VARS[provider])
    try:
        if args.check_key:
            cred = cr.find_key(provider, args.base_url)
            if cred.key:
                print(f"{provider}: key from {cred.source}: {cr.mask(cred.key)}")
                return 0
            hint = " (a local server needs none)" if provider == "ollama" else ""
            print(f"{provider}: no key found{hint}; set {env_names}, or run: uv run dashboard.py --setup-key "
                  f"--provider {provider}")
            return 0 if provider == "ollama" else 1
        if args.clear_key:
            removed = cr.clear_key(provider)
            print(f"{provider}: {'removed the stored key' if removed else 'no stored key to remove'}")
            for name in cr.ENV_VARS[provider]:
                if os.environ.get(name):
                    print(f"note: {name} is still set in the environment and takes precedence")
            return 0
        stored = cr.keyring_get(provider)
        if stored:
            print(f"{provider}: replacing the stored key {cr.mask(stored)}")
        key = getpass.getpass(f"{provider} API key (input hidden): ")
        cr.store_key(provider, key)
        print(f"{provider}: key {cr.mask(key.strip())} stored in the OS secret store "
              f"(service {cr.KEYRING_SERVICE!r}, user {provider!r})")
        for name in cr.ENV_VARS[provider]:
            if os.environ.get(name):
                print(f"note: {name} is set in the environment and takes precedence over the stored key")
        return 0
    except cr.CredentialError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (EOFError, KeyboardInterrupt):
        print("\ncancelled: nothing stored", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------


def agent_config(args):
    from tui.config import AgentConfig
    kwargs = dict(repo=args.repo, provider=args.provider, model=args.model, base_url=args.base_url, scope=args.scope,
                  timeout=args.timeout, script=args.script, results=args.results, seed=args.seed)
    if args.tag:
        kwargs["tag"] = args.tag
    if args.max:
        kwargs["max_experiments"] = args.max
    return AgentConfig(**kwargs)


def run_tui(args) -> int:
    """The full-screen dashboard (single run, --watch, --agent with a screen): issue #6."""
    print("the full-screen dashboard is not built yet: run the agent with "
          "`uv run dashboard.py --agent --headless [--tag T --max N ...]`", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.setup_key or args.check_key or args.clear_key:
        if args.agent or args.watch or args.headless:
            parser.error("--setup-key/--check-key/--clear-key cannot be combined with --agent, --watch or --headless")
        return key_command(args)
    if args.headless and not args.agent:
        parser.error("--headless needs --agent")
    if args.agent and args.watch:
        parser.error("--agent and --watch are different modes: choose one")
    if args.agent and args.single_script:
        parser.error(f"unexpected argument {args.single_script!r} with --agent (use --script FILE)")
    if args.agent and args.headless:
        from tui.headless import run_headless
        return run_headless(agent_config(args))
    return run_tui(args)


if __name__ == "__main__":
    sys.exit(main())
