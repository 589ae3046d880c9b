"""
Run the research agent over several datasets in turn: each on its own branch, with its own results file.

Usage:
    uv run run_suite.py --datasets climbmix,fineweb-edu,tinystories --max 50 --tag mar17
    uv run run_suite.py --tag mar17 --skip-completed          # resume: same datasets, --max and agent options
    uv run run_suite.py --tag mar17 --status
    uv run run_suite.py --datasets fineweb-edu,cosmopedia-v2 --prepare-only
    uv run run_suite.py --datasets fineweb-edu,tinystories --max 30 --provider openai --model gpt-4.1 --keep-rule single
    uv run compare_datasets.py --tag mar17

Every option run_suite.py does not know itself is an agent option, passed to each dataset's agent exactly as
`dashboard.py --agent --headless` takes it (--provider, --model, --base-url, --scope, --script, --timeout, --seed,
--keep-rule, ...; see dashboard.py --help). The suite sets --tag, --max, --results and --repo per dataset.

For each dataset the suite prepares it when needed (convert_dataset.py, which also trains its tokenizer), creates
the branch autoresearch/<tag>-<dataset> from the commit the suite started on (every dataset starts from the same
code), and runs the headless agent with AUTORESEARCH_DATASET=<dataset>: results in results/<dataset>/results.tsv,
training logs in results/<dataset>/runs/, status in results/<dataset>/.runner_status.json. results/suite-<tag>.json
records the start commit and a fingerprint of every dataset, so a resumed suite refuses data that changed under it.

Signals: the first Ctrl-C or SIGTERM is passed to the running agent, which kills its training run, reverts that
experiment and stops; then the suite stops. A second one makes the agent exit at once. Resume with --skip-completed.
(The agent runs in its own session: after kill -9 of the suite it carries on; --status shows its pid.)
Exit codes: 0 every dataset reached --max, 1 a dataset's agent failed (the others still ran), 2 bad arguments,
128+N stopped by signal N.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import convert_dataset
from prepare import PrepareError
from tui.atomic import write_json_atomic
from tui import cli_args
from tui.git_repo import GitError, GitRepo, validate_tag
from tui.lock import AgentLock, LockHeld, read_info
from tui.results import ResultsFile, rows_for_tag, summarize
from tui.status_file import STATUS_NAME, read_status

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

DEFAULT_DATASETS = ("climbmix", "fineweb-edu", "cosmopedia-v2", "slimpajama", "fineweb-edu-high", "tinystories",
                    "github-code-python")
DEFAULT_MAX = 80
DEFAULT_NUM_SHARDS = 10
RESULTS_DIR = "results"
SUITE_LOCK = ".suite.lock"
HERE = Path(__file__).resolve().parent
SUITE_OWNED = ("tag", "max", "results", "repo")   # agent options the suite sets itself, per dataset

# ---------------------------------------------------------------------------
# Where things are
# ---------------------------------------------------------------------------


def results_path(results_dir, dataset):
    return Path(results_dir) / dataset / "results.tsv"


def manifest_path(results_dir, tag):
    return Path(results_dir) / f"suite-{tag}.json"


def branch_for(tag, dataset):
    return f"autoresearch/{tag}-{dataset}"


def load_manifest(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def save_manifest(path, manifest):
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json_atomic(path, manifest)


def progress(results_dir, tag, dataset):
    """The dataset's agent run so far: tui.results.Summary of the rows of tag <tag>-<dataset>."""
    path = results_path(results_dir, dataset)
    rows = rows_for_tag(ResultsFile(path).load(), f"{tag}-{dataset}") if path.exists() else []
    return summarize(rows)


def _alive(pid):
    try:
        os.kill(int(pid), 0)
        return True
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True

# ---------------------------------------------------------------------------
# --status
# ---------------------------------------------------------------------------


def status_table(results_dir, tag, datasets, max_experiments):
    lines = [f"  {'dataset':<20} {'data':<16} {'experiments':>11} {'kept':>5} {'crashed':>8} {'best val_bpb':>13}  "
             f"state"]
    for ds in datasets:
        info = convert_dataset.prepared_info(ds)
        data = f"{info['train_shards']}+val shards" if info["ready"] else (
            "no tokenizer" if info["train_shards"] else "not prepared")
        s = progress(results_dir, tag, ds)
        done = s.next_exp
        st = read_status(results_path(results_dir, ds).parent / STATUS_NAME)
        if st.get("alive") and st.get("tag") == f"{tag}-{ds}" and _alive(st.get("pid")):
            state = f"running (pid {st['pid']}: {st.get('state', '?')})"
        elif done >= max_experiments:
            state = "done"
        elif done:
            state = "stopped (resume with --skip-completed)"
        else:
            state = "pending"
        best = f"{s.best_val_bpb:.6f}" if s.best_val_bpb is not None else "-"
        lines.append(f"  {ds:<20} {data:<16} {f'{done}/{max_experiments}':>11} {s.kept:>5} {s.crashed:>8} "
                     f"{best:>13}  {state}")
    return "\n".join(lines)


def status_command(args, results_dir):
    manifest = load_manifest(manifest_path(results_dir, args.tag)) or {}
    datasets = args.datasets or manifest.get("datasets") or list(DEFAULT_DATASETS)
    max_experiments = args.max or manifest.get("max") or DEFAULT_MAX
    head = f"Suite {args.tag!r}: {len(datasets)} dataset(s), --max {max_experiments}, results in {results_dir}"
    if manifest:
        head += (f"\n  started {manifest.get('created', '?')} on {manifest.get('base_branch', '?')} @ "
                 f"{str(manifest.get('base_commit', '?'))[:12]}, provider {manifest.get('provider')}"
                 + (f" {manifest['model']}" if manifest.get("model") else ""))
    else:
        head += " (not started yet)"
    lock = read_info(Path(results_dir) / SUITE_LOCK)
    if lock.get("pid") and _alive(lock["pid"]):
        head += f"\n  a suite is running (pid {lock['pid']}, since {lock.get('started_at', '?')})"
    print(head)
    print(status_table(results_dir, args.tag, datasets, max_experiments))
    return 0

# ---------------------------------------------------------------------------
# Child processes: preparation and one agent run per dataset, each in its own session so that only the suite
# decides which signal reaches them (a terminal's Ctrl-C would otherwise hit both and count as two)
# ---------------------------------------------------------------------------


class Children:
    def __init__(self):
        self.current = None
        self.received = []

    def on_signal(self, signum, frame):
        self.received.append(signum)
        name = signal.Signals(signum).name
        child = self.current
        if child is not None and child.poll() is None:
            try:
                os.kill(child.pid, signum)
            except ProcessLookupError:
                pass
            msg = (f"\nrun_suite: {name}: passed to the running child (pid {child.pid}); the suite stops after it"
                   + (" (sent again: it exits at once)" if len(self.received) > 1 else "") + "\n")
        else:
            msg = f"\nrun_suite: {name}: stopping\n"
        os.write(2, msg.encode())   # no print() in a signal handler: it may interrupt another print

    def install(self):
        for s in (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()):
            signal.signal(s, self.on_signal)

    def run(self, cmd, env, cwd=None):
        self.current = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True)
        if self.received:                      # a signal that arrived while the child was being started
            os.kill(self.current.pid, self.received[-1])
        try:
            return self.current.wait()
        finally:
            self.current = None


def child_env(dataset):
    env = dict(os.environ)
    env.update(AUTORESEARCH_DATASET=dataset, PYTHONUNBUFFERED="1")
    return env


def parse_agent_options(options, **suite_set):
    """The agent's options parsed by dashboard.py's own parser, so every agent option (present and future) passes
    through unchanged; the suite's per-dataset values come last and win."""
    import dashboard
    parser = dashboard.build_parser()
    parser.prog = "run_suite.py (agent options, see dashboard.py --help)"
    argv = ["--agent", "--headless", *options]
    for key, value in suite_set.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return parser.parse_args(argv)


def check_agent_options(options):
    """Usage error now, not in the first dataset's child, for a bad or misplaced agent option."""
    args = parse_agent_options(options)
    given = [f"--{k}" for k in SUITE_OWNED if getattr(args, k, None) not in (None, ".")]
    if given:
        usage_error(f"{', '.join(given)} is set by the suite for each dataset (use the suite's --tag, --max, "
                    f"--results-dir, --repo)")
    if args.setup_key or args.check_key or args.clear_key or args.watch or args.single_script:
        usage_error("only agent options can be passed through to the agents (see dashboard.py --help)")
    return args


def usage_error(message):
    print(f"usage: run_suite.py --datasets A,B --max N --tag T [options] [agent options]\n"
          f"run_suite.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def agent_child(spec_json):
    """One dataset's agent (run_suite.py --agent-child SPEC): tui.headless with the suite's tag, results and logs."""
    import dataclasses

    import dashboard
    from tui.headless import run_headless
    spec = json.loads(spec_json)
    args = parse_agent_options(spec["options"], repo=spec["repo"], tag=spec["tag"], max=spec["max"],
                               results=spec["results"])
    config = dataclasses.replace(dashboard.agent_config(args), runs_dir=Path(spec["runs_dir"]), dataset=spec["dataset"])
    return run_headless(config)

# ---------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------


def banner(text):
    print(f"\n{'=' * 100}\n{text}\n{'=' * 100}", flush=True)


def check_datasets(datasets):
    for ds in datasets:
        if ds not in convert_dataset.REGISTRY and not convert_dataset.prepared_info(ds)["ready"]:
            raise PrepareError(f"dataset {ds!r} is neither in the registry ({', '.join(convert_dataset.REGISTRY)}) "
                               f"nor prepared; import local data with: uv run convert_dataset.py --text PATH "
                               f"--name {ds}")


def prepare_dataset(children, ds, num_shards):
    """Convert the dataset unless it is ready. Returns the child's exit code (0 when nothing was needed)."""
    if convert_dataset.prepared_info(ds)["ready"]:
        return 0
    if ds not in convert_dataset.REGISTRY:
        print(f"dataset {ds!r} is not ready and not in the registry: prepare it with convert_dataset.py --text",
              file=sys.stderr)
        return 1
    print(f"preparing {ds}: uv run convert_dataset.py {ds} --num-shards {num_shards}", flush=True)
    return children.run([sys.executable, str(HERE / "convert_dataset.py"), ds, "--num-shards", str(num_shards)],
                        child_env(ds))


def check_fingerprint(manifest, ds):
    """Record the dataset's fingerprint the first time; refuse a dataset whose contents changed since."""
    entry = manifest["datasets"].setdefault(ds, {})
    fp = convert_dataset.fingerprint(ds)
    if entry.get("fingerprint") and entry["fingerprint"] != fp:
        raise PrepareError(f"dataset {ds!r} changed since suite {manifest['tag']!r} started "
                           f"({entry['fingerprint'][:21]} -> {fp[:21]}): its results would not be comparable; "
                           f"use a new --tag")
    entry["fingerprint"] = fp
    info = convert_dataset.prepared_info(ds)
    m = info["manifest"] or {}
    entry.update(train_shards=info["train_shards"], documents=info["documents"], revision=m.get("revision"))


def run_suite(args, agent_options, results_dir, repo):
    tag = args.tag
    mpath = manifest_path(results_dir, tag)
    recorded = load_manifest(mpath) or {}
    # a resumed suite keeps its datasets and --max unless they are given again
    datasets = args.datasets or recorded.get("order") or list(DEFAULT_DATASETS)
    max_experiments = args.max or recorded.get("max") or DEFAULT_MAX
    if args.skip_completed and not agent_options and recorded.get("agent_options"):
        agent_options = list(recorded["agent_options"])       # ... and its agent options
        print(f"agent options of suite {tag!r}: {' '.join(agent_options)}")
    for ds in datasets:
        try:
            validate_tag(f"{tag}-{ds}")
        except ValueError:
            raise PrepareError(f"tag {tag!r} plus dataset {ds!r} does not make a valid branch name "
                               f"(autoresearch/{tag}-{ds}): use a shorter --tag") from None
    check_datasets(datasets)
    git = GitRepo(repo)
    if not args.prepare_only:
        if not git.is_repo() or not git.has_commits():
            raise PrepareError(f"{repo} is not a git repository with commits: run the suite in your autoresearch "
                               f"checkout (or pass --repo)")
        started = {ds: progress(results_dir, tag, ds).next_exp for ds in datasets}
        if any(started.values()) and not args.skip_completed:
            done = ", ".join(f"{ds}: {n}" for ds, n in started.items() if n)
            raise PrepareError(f"suite {tag!r} already has results ({done} experiments): resume it with "
                               f"--skip-completed, or start a new one with another --tag")

    results_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = AgentLock(results_dir / SUITE_LOCK).acquire()
    except LockHeld:
        info = read_info(results_dir / SUITE_LOCK)
        raise PrepareError(f"another run_suite.py is running (pid {info.get('pid', '?')}, started "
                           f"{info.get('started_at', '?')}); see: uv run run_suite.py --tag {tag} --status") from None
    manifest = load_manifest(mpath) or dict(tag=tag, created=time.strftime("%Y-%m-%dT%H:%M:%S"), datasets={})
    manifest.setdefault("datasets", {})
    if not args.prepare_only:
        if "base_commit" not in manifest:
            manifest.update(base_commit=git.head(), base_branch=git.current_branch())
        agent = parse_agent_options(agent_options)
        manifest.update(max=max_experiments, order=datasets, provider=agent.provider, model=agent.model,
                        agent_options=agent_options, python=sys.version.split()[0], platform=sys.platform)
    start_branch = git.current_branch() if git.is_repo() and git.has_commits() else None

    if not args.prepare_only:
        save_manifest(mpath, manifest)
        print(f"suite {tag!r}: {', '.join(datasets)}; --max {max_experiments}; every branch starts at "
              f"{manifest['base_branch']} @ {manifest['base_commit'][:12]}", flush=True)
    children = Children()
    children.install()
    outcome = {}
    try:
        for i, ds in enumerate(datasets, 1):
            if children.received:
                break
            if args.skip_completed and not args.prepare_only:
                s = progress(results_dir, tag, ds)
                if s.next_exp >= max_experiments:
                    print(f"[{i}/{len(datasets)}] {ds}: complete ({s.next_exp}/{max_experiments}), skipped", flush=True)
                    outcome[ds] = "done"
                    continue
            banner(f"[{i}/{len(datasets)}] {ds}: branch {branch_for(tag, ds)}, results "
                   f"{results_path(results_dir, ds)}, --max {max_experiments}")
            rc = prepare_dataset(children, ds, args.num_shards)
            if children.received:
                break
            if rc != 0:
                print(f"{ds}: preparation failed (exit {rc}); going on with the next dataset", file=sys.stderr)
                outcome[ds] = "failed"
                continue
            check_fingerprint(manifest, ds)
            save_manifest(mpath, manifest)
            if args.prepare_only:
                outcome[ds] = "prepared"
                continue
            branch = branch_for(tag, ds)
            if not git.branch_exists(branch):
                try:
                    git.run("branch", branch, manifest["base_commit"])   # every dataset starts from the same commit
                except GitError as e:
                    raise PrepareError(f"cannot create branch {branch} at the suite's start commit "
                                       f"{manifest['base_commit'][:12]}: {e}") from None
            spec = dict(repo=str(repo), tag=f"{tag}-{ds}", max=max_experiments, dataset=ds,
                        results=str(results_path(results_dir, ds)), runs_dir=str(results_dir / ds / "runs"),
                        options=agent_options)
            rc = children.run([sys.executable, str(HERE / "run_suite.py"), "--agent-child", json.dumps(spec)],
                              child_env(ds), cwd=repo)
            manifest["datasets"][ds]["last_exit"] = rc
            save_manifest(mpath, manifest)
            if children.received or rc >= 128:
                outcome[ds] = "stopped"
                break
            if rc == 2:
                raise PrepareError(f"the agent for {ds} refused its configuration (exit 2, see above); the other "
                                   f"datasets would fail the same way")
            outcome[ds] = "done" if rc == 0 else "failed"
            if rc != 0:
                print(f"{ds}: the agent stopped with an error (exit {rc}); going on with the next dataset",
                      file=sys.stderr)
    finally:
        lock.release()
        if start_branch and not args.prepare_only:
            try:
                if git.current_branch() != start_branch and not git.dirty_tracked_files():
                    git.run("checkout", "-q", start_branch)
            except GitError as e:
                print(f"note: could not return to branch {start_branch}: {e}", file=sys.stderr)

    print(f"\nSuite {tag!r}" + (" (preparation only)" if args.prepare_only else "") + ":")
    print(status_table(results_dir, tag, datasets, max_experiments))
    if children.received:
        sig = children.received[0]
        print(f"stopped by {signal.Signals(sig).name}; resume with: uv run run_suite.py --tag {tag} --skip-completed",
              file=sys.stderr)
        return 128 + sig
    if not args.prepare_only:
        print(f"compare with: uv run compare_datasets.py --tag {tag}")
    return 1 if "failed" in outcome.values() else 0

# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _dataset_list(text):
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one dataset, e.g. --datasets climbmix,fineweb-edu")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError("a dataset is listed twice")
    return names


def build_parser():
    from tui.config import default_tag
    doc = __doc__.strip()
    p = argparse.ArgumentParser(prog="run_suite.py", description=doc.splitlines()[0], allow_abbrev=False,
                                epilog=doc.split("\n", 1)[1].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", type=_dataset_list, default=None,
                   help=f"comma-separated datasets, in order (default: the resumed suite's, else "
                        f"{','.join(DEFAULT_DATASETS)})")
    p.add_argument("--max", type=cli_args.positive_int, default=None, metavar="N",
                   help=f"experiments per dataset, baseline included (default: the resumed suite's, else "
                        f"{DEFAULT_MAX})")
    p.add_argument("--tag", type=cli_args.tag, default=default_tag(),
                   help="name of this suite; branches are autoresearch/<tag>-<dataset> (default: today, e.g. mar17)")
    p.add_argument("--skip-completed", action="store_true",
                   help="resume: skip datasets that reached --max, continue the others where they stopped")
    p.add_argument("--status", action="store_true", help="print the suite's progress and exit")
    p.add_argument("--prepare-only", action="store_true", help="prepare (convert + tokenize) the datasets and exit")
    p.add_argument("--num-shards", type=cli_args.positive_int, default=DEFAULT_NUM_SHARDS,
                   help=f"training shards when a dataset has to be prepared (default {DEFAULT_NUM_SHARDS})")
    p.add_argument("--results-dir", default=RESULTS_DIR, metavar="DIR",
                   help="where results/<dataset>/ go, relative to --repo (default: results)")
    p.add_argument("--repo", default=".", metavar="DIR", help="repository the agent works in (default: .)")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--agent-child"] and len(argv) == 2:
        return agent_child(argv[1])
    parser = build_parser()
    args, agent_options = parser.parse_known_args(argv)
    if args.status and args.prepare_only:
        parser.error("--status and --prepare-only are different commands: choose one")
    if agent_options and not args.status:
        check_agent_options(agent_options)
    repo = Path(args.repo).expanduser().resolve()
    if not repo.is_dir():
        parser.error(f"--repo {args.repo}: no such directory")
    results_dir = Path(args.results_dir).expanduser()
    results_dir = results_dir if results_dir.is_absolute() else repo / results_dir
    if args.status:
        return status_command(args, results_dir)
    return run_suite(args, agent_options, results_dir, repo)


if __name__ == "__main__":
    sys.exit(main())
