"""
autoresearch dashboard and agent.

    uv run dashboard.py                                              # one training run with live metrics
    uv run dashboard.py --watch                                      # results.tsv, charts and the newest log, live
    uv run dashboard.py --agent --tag mar17 --max 50                 # the research loop on the full screen
    uv run dashboard.py --agent --headless --tag mar17 --max 50      # the research loop, plain log lines
    uv run dashboard.py --setup-key --provider anthropic             # store an API key in the OS secret store
"""

import argparse
import dataclasses
import getpass
import os
import sys

from tui import cli_args
from tui.config import AgentConfig
from tui.credentials import ENV_VARS
from tui.decision import KEEP_RULES
from tui.executor import EXECUTORS
from tui.llm import DEFAULT_MODELS, PROVIDERS
from tui.prompt import ANSWER_FORMATS, SCOPES
from tui.sandbox import INSTALL, SANDBOXES

# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

# AgentConfig's field defaults are the agent's defaults; the options below only show and pass them on
DEFAULTS = {f.name: f.default for f in dataclasses.fields(AgentConfig) if f.default is not dataclasses.MISSING}

KEY_VARS = ", ".join(dict.fromkeys(name for names in ENV_VARS.values() for name in names))

EPILOG = f"""\
screen (single run, --watch, --agent):
  Panels: training (progress, loss, tok/s, MFU; the summary when done), hardware (chip, memory of the training
  process and its children, system/unified and GPU memory), agent loop status (agent mode; --watch reads the
  status file of a headless agent), experiments table from results.tsv, training-loss and val_bpb charts, activity.
  Keys: q quit (stops the agent cleanly and kills the training process group; q again forces), p pause/resume the
  agent after the current experiment, s stop the current experiment now (killed, reverted, recorded as skip),
  enter on a table row: that experiment's diff and log tail, d dark/light, r reload, v next view (small terminals).
  The screen needs a terminal; use --agent --headless for logs, cron and pipes.

agent loop:
  On a new tag the unmodified script runs first (exp0, the baseline, 3 times with different seeds: the noise floor);
  then each experiment asks the LLM for one change, commits it as "expN: ...", trains, and keeps it only if its mean
  val_bpb over confirmation runs beats the best by more than 2 sigma of that noise (--keep-rule); otherwise it
  reverts the training script. Results go
  to results.tsv (git-ignored), full training logs to runs/expN.log. Starting again with the same tag resumes.
  The agent refuses to start when tracked files other than the training script have uncommitted changes, or when
  another agent runs in the same repository.

headless signals and exit codes:
  The first Ctrl-C (SIGINT) or SIGTERM kills the current training run, reverts its commit and stops cleanly (that
  experiment runs again on the next start); a second one exits at once. Exit codes: 0 done (--max reached),
  1 fatal error (e.g. authentication failed, dirty work tree), 2 bad arguments, 128+N stopped by signal N.
  A status file (.runner_status.json next to results.tsv) is rewritten on every state change for monitoring.

API keys:
  Looked up in the environment first ({KEY_VARS}), then
  in the OS secret store (service "autoresearch", user = provider). Ollama and OpenAI-compatible servers on localhost
  need no key. Keys never reach the training process, the logs, results.tsv or commits.

examples:
  uv run dashboard.py --agent --headless --tag mar17 --max 80
  uv run dashboard.py --agent --headless --provider openai --model gpt-4.1
  uv run dashboard.py --agent --headless --provider openai --base-url http://localhost:8080/v1 --model qwen
  uv run dashboard.py --agent --headless --provider ollama --model qwen2.5-coder:32b --scope file
  uv run dashboard.py --check-key --provider anthropic
"""


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(prog="dashboard.py", description=__doc__.strip().splitlines()[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("single_script", nargs="?", metavar="SCRIPT",
                   help="single run: the training script to run with live metrics (default: the script for the "
                        "detected backend)")

    modes = p.add_argument_group("modes")
    modes.add_argument("--agent", action="store_true", help="run the autonomous research loop")
    modes.add_argument("--headless", action="store_true",
                       help="with --agent: no screen, timestamped log lines (for SSH, tmux, cron, run_suite.py)")
    modes.add_argument("--watch", action="store_true",
                       help="no training: show results.tsv, the charts, the newest runs/expN.log and a headless "
                            "agent's status, refreshed as they change")

    agent = p.add_argument_group("agent options")
    agent.add_argument("--tag", type=cli_args.tag, default=None,
                       help="name of this run; the branch is autoresearch/<tag> (default: today's date, e.g. "
                            "mar17); with --watch: show only this tag's rows")
    agent.add_argument("--max", type=cli_args.positive_int, default=None, metavar="N",
                       help=f"stop once the tag has N experiments, baseline exp0 included (default: "
                            f"{d['max_experiments']})")
    agent.add_argument("--provider", choices=PROVIDERS, default=d["provider"],
                       help=f"LLM provider (default: {d['provider']}); openai covers any OpenAI-compatible endpoint")
    agent.add_argument("--model", default=d["model"],
                       help=f"model name (default: {' / '.join(DEFAULT_MODELS.values())} by provider)")
    agent.add_argument("--base-url", default=d["base_url"], metavar="URL",
                       help="API endpoint, e.g. http://localhost:8080/v1 for llama.cpp/vLLM/LM Studio, or the Ollama "
                            "host (default: the provider's; Ollama: OLLAMA_HOST or localhost:11434)")
    agent.add_argument("--max-tokens", type=cli_args.positive_int, default=d["max_tokens"], metavar="N",
                       help="the longest answer the LLM may write, in tokens (default: 4096; 2048 for a server on "
                            "this machine, where every token costs time)")
    agent.add_argument("--llm-timeout", type=cli_args.positive_float, default=d["llm_timeout"], metavar="SECONDS",
                       help="give up on an LLM call after this long; it is then asked once with a smaller prompt, "
                            "never resent unchanged (default: 300; 1800 for a server on this machine: a CPU needs "
                            "minutes for a long prompt)")
    agent.add_argument("--context-tokens", type=cli_args.positive_int, default=d["context_tokens"], metavar="N",
                       help="the model's context window: prompts are trimmed to fit it with room for the answer "
                            "(default: what the server says - llama.cpp, Ollama - or the hosted model's, else 8192)")
    agent.add_argument("--scope", choices=SCOPES, default=d["scope"],
                       help=f"what the LLM may edit: hparams = only the hyperparameter block; file = search/replace "
                            f"edits anywhere in the training script (default: {d['scope']})")
    agent.add_argument("--answer-format", choices=ANSWER_FORMATS, default=d["answer_format"],
                       help=f"how the LLM answers: json = a JSON object the server must follow (Anthropic tool, "
                            f"OpenAI response_format, Ollama format); text = the DESCRIPTION/REASONING/CODE format; "
                            f"auto = json, falling back to text for the session if the server rejects or ignores the "
                            f"schema (default: {d['answer_format']})")
    agent.add_argument("--timeout", type=cli_args.positive_float, default=d["timeout"], metavar="SECONDS",
                       help="kill a training run after this many seconds (default: time budget + max(300, budget))")
    agent.add_argument("--script", default=d["script"], metavar="FILE",
                       help="training script for the agent (default: train_mlx.py or train.py for the detected "
                            "backend)")
    agent.add_argument("--results", default=d["results"], metavar="FILE",
                       help="results file (default: results.tsv in --repo); --watch shows this one")
    agent.add_argument("--repo", default=".", metavar="DIR", help="repository to work in (default: .)")
    agent.add_argument("--seed", type=int, default=d["seed"],
                       help="random seed passed to the trainer as AUTORESEARCH_SEED (default: the trainer's)")
    agent.add_argument("--sandbox", choices=SANDBOXES, default=d["sandbox"],
                       help=f"where the LLM-written training code runs: auto = bubblewrap on Linux ({INSTALL}), "
                            f"sandbox-exec on macOS, else none with a warning; bwrap / sandbox-exec = that one or "
                            f"refuse to start; none = no sandbox (default: {d['sandbox']})")
    agent.add_argument("--executor", choices=EXECUTORS, default=d["executor"],
                       help=f"where experiments run: local = this machine; ray = one Ray task each on the Ray cluster "
                            f"at --ray-address (needs `uv sync --extra ray`) (default: {d['executor']})")
    agent.add_argument("--ray-address", default=d["ray_address"], metavar="auto|HOST:PORT",
                       help=f"with --executor ray: the cluster (auto = the one `ray start --head` started here, or "
                            f"RAY_ADDRESS) (default: {d['ray_address']})")
    agent.add_argument("--ray-resources", type=cli_args.resources, default=d["ray_resources"], metavar="JSON",
                       help="with --executor ray: what each experiment asks of a node, e.g. '{\"GPU\": 1}' or "
                            "'{\"CPU\": 8}' (default: one GPU when the cluster has GPUs, else one CPU)")
    agent.add_argument("--workers", type=cli_args.positive_int, default=d["workers"], metavar="N",
                       help="experiments that train at once on this machine; on a CPU they split the cores "
                            f"(default: {d['workers']})")
    agent.add_argument("--devices", default=None, metavar="LIST",
                       help="one slot per device, e.g. cuda:0,cuda:1 (each run sees only its device); devices of "
                            "one class only")

    noise = p.add_argument_group("noise floor and keep rule (agent)")
    noise.add_argument("--keep-rule", choices=KEEP_RULES, default=d["keep_rule"],
                       help=f"confirm = keep only a change whose mean over 2+ runs beats the best mean by 2 sigma of "
                            f"the measured run-to-run noise; single = keep any single run that beats the best, "
                            f"upstream's rule (default: {d['keep_rule']})")
    noise.add_argument("--noise-runs", type=cli_args.positive_int, default=d["noise_runs"], metavar="N",
                       help=f"baseline runs with seeds 42, 43, ... that measure the noise floor at the start of a "
                            f"tag (default: {d['noise_runs']}; confirm needs 2 or more)")
    noise.add_argument("--confirm-runs", type=cli_args.count, default=d["confirm_runs"], metavar="N",
                       help=f"extra runs with other seeds a promising change may get before the verdict (default: "
                            f"{d['confirm_runs']})")
    noise.add_argument("--remeasure-noise", action="store_true", default=d["remeasure_noise"],
                       help="measure the noise floor again on the best commit before the next experiment")
    noise.add_argument("--plateau", type=cli_args.count, default=d["plateau"], metavar="N",
                       help=f"after N experiments in a row without a keep, ask the LLM to change direction "
                            f"(default: {d['plateau']}; 0 = never)")

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
    kwargs = dict(repo=args.repo, provider=args.provider, model=args.model, base_url=args.base_url, scope=args.scope,
                  answer_format=args.answer_format, timeout=args.timeout, script=args.script, results=args.results,
                  seed=args.seed,
                  keep_rule=args.keep_rule, noise_runs=args.noise_runs, confirm_runs=args.confirm_runs,
                  remeasure_noise=args.remeasure_noise, plateau=args.plateau, sandbox=args.sandbox,
                  executor=args.executor, ray_address=args.ray_address, ray_resources=args.ray_resources,
                  workers=args.workers, devices=args.devices or (), max_tokens=args.max_tokens,
                  llm_timeout=args.llm_timeout, context_tokens=args.context_tokens)
    if args.tag:
        kwargs["tag"] = args.tag
    if args.max:
        kwargs["max_experiments"] = args.max
    return AgentConfig(**kwargs)


AGENT_ONLY = ("max", "model", "base_url", "answer_format", "max_tokens", "llm_timeout", "context_tokens", "timeout",
              "script", "seed", "keep_rule", "noise_runs", "confirm_runs",
              "remeasure_noise", "plateau", "sandbox", "executor", "ray_address", "ray_resources", "workers",
              "devices")  # options with no meaning outside --agent


def _single_script(args) -> str:
    """The script for a single run: the argument, or the one for the detected backend. Raises SystemExit(2)."""
    if args.single_script:
        return os.path.abspath(args.single_script)
    import backends
    try:
        script = backends.training_script_for(backends.detect_backend())
    except Exception as e:  # BackendUnavailable carries a one-line message
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    path = os.path.join(args.repo, script)
    if not os.path.isfile(path):
        print(f"error: {script} not found in {os.path.abspath(args.repo)}: run the dashboard in your autoresearch "
              f"checkout, or pass the script (uv run dashboard.py path/to/{script})", file=sys.stderr)
        raise SystemExit(2)
    return os.path.abspath(path)


def run_tui(args) -> int:
    """The full-screen dashboard: one training run, --watch, or --agent."""
    if not (sys.stdin.isatty() and sys.stderr.isatty()):  # Textual draws on stderr, so stdout may be piped
        print("error: the dashboard needs a terminal (stdin and stderr are not one); for logs, cron or pipes run "
              "the agent with `uv run dashboard.py --agent --headless [--tag T --max N ...]`", file=sys.stderr)
        return 2
    from tui.app import DashboardApp
    from tui.config import ConfigError
    if args.agent:
        try:
            app = DashboardApp("agent", agent_config=agent_config(args), signal_handlers=True)
        except (ConfigError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    elif args.watch:
        app = DashboardApp("watch", repo=args.repo, results=args.results, tag=args.tag, signal_handlers=True)
    else:
        app = DashboardApp("single", repo=args.repo, script=_single_script(args), results=args.results,
                           signal_handlers=True)
    try:
        app.run()
    finally:
        app.shutdown_engine()
    if app.final_error:
        print(f"error: {app.final_error}", file=sys.stderr)
    return app.return_code if app.return_code not in (None, 0) else app.exit_status


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
    if not args.agent:
        given = [f"--{name.replace('_', '-')}" for name in AGENT_ONLY if getattr(args, name) != parser.get_default(name)]
        if args.tag and not args.watch:
            given.insert(0, "--tag")
        if given:
            parser.error(f"{', '.join(given)} only applies to --agent" + ("" if args.watch else
                         " (a single run takes the script as its argument)"))
    if args.watch and args.single_script:
        parser.error(f"unexpected argument {args.single_script!r} with --watch (use --results FILE)")
    if args.single_script and not os.path.isfile(args.single_script):
        parser.error(f"training script {args.single_script!r} not found")
    if args.repo and not os.path.isdir(args.repo):
        parser.error(f"--repo {args.repo!r} is not a directory")
    return run_tui(args)


if __name__ == "__main__":
    code = main()
    import gc
    gc.freeze()  # everything we wrote is flushed; the final collection over torch's objects would only cost seconds
    sys.exit(code)
