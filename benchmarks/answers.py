"""
Usable answers and LLM round trips per experiment, free text against structured, for each provider protocol.

    uv run benchmarks/answers.py
    uv run benchmarks/answers.py --json answers.json     # also write the figures as JSON

Each protocol (Anthropic Messages, OpenAI chat completions, Ollama /api/chat) is served for real on loopback by the
protocol servers of the tests (tests/fakes/llm_servers.py, which check the request as the real services do) and driven
by the real SDK client through the engine's own Proposer: the same request building, answer reading, validation and
one corrective retry as a night of experiments, against the real train.py. No model runs here: every reply is taken
from a fixed set of answers, 40 experiments per scope, each one intent (a change to one constant of train.py) written
in the shapes models answer in, the failure shapes of issue 14 among them:

    clean             the format followed
    prose around      chatter before the fields and after the code (usable as it is)
    heading:          markdown headings with the colon, "## DESCRIPTION: ..." (usable as it is)
    heading, no colon "## Description" on a line of its own, the text below it
    copied prompt     the answer format sent back, placeholders and all (one model does it again after the retry)
    placeholders      a real change, but the description left as the format's placeholder
    missing fields    the code without DESCRIPTION / REASONING
    truncated         cut at the output cap (stop reason max_tokens; one model is cut again on the retry)
    dropped names     hparams: only the changed line sent as the "complete block"; file: an edit that deletes a
                      definition the script still uses
    new constant      hparams: the change plus a constant the block did not have

After a refusal the model's second answer is the clean one, except where noted above.

The structured column models a server that constrains decoding to the schema (llama.cpp, vLLM, Ollama, OpenAI strict;
Anthropic's forced tool): it can only emit a JSON object of the schema, so the shapes that are about the text format
(prose, headings, missing fields) become the clean object, while faults of meaning stay: the copied prompt and the
placeholder become the format's field descriptions copied as the labels of a real change (the engine describes the
change itself, as it does for a free-text placeholder), the new constant becomes a name the block does not have
(refused; a server that constrains decoding could not even send it, the schema names every constant, but Anthropic's
tool input is not constrained), a file edit still deletes a used definition (refused). The recorded structured hparams
answers are lists of name/value pairs, the shape an unconstrained model sends; the engine reads it like the schema's
object. A structured hparams answer is a few lines (no block to repeat), so it fits the output cap the text answer
ran into; a file edit is as long as JSON as in text and is cut all the same.
"""

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fakes.llm_servers import FakeLLMServer  # noqa: E402
from tui.config import AgentConfig  # noqa: E402
from tui.controls import Controls, SkipExperiment  # noqa: E402
from tui.llm import Usage, make_provider  # noqa: E402
from tui.prompt import FIELD_HELP, PromptContext, find_hparams, set_hparams, system_prompt  # noqa: E402
from tui.proposer import Proposer  # noqa: E402

SOURCE = (ROOT / "train.py").read_text()
PROTOCOLS = ("anthropic", "openai", "ollama")
MODELS = {"anthropic": "claude-sonnet-4-6", "openai": "gpt-4.1", "ollama": "qwen2.5-coder:7b"}
KEY = "sk-benchmark-not-a-key"

# the intents: one constant of train.py and its new value, 40 experiments per scope
CHANGES = [("MATRIX_LR", "0.03"), ("MATRIX_LR", "0.05"), ("EMBEDDING_LR", "0.4"), ("EMBEDDING_LR", "0.8"),
           ("UNEMBEDDING_LR", "0.006"), ("UNEMBEDDING_LR", "0.003"), ("SCALAR_LR", "0.3"), ("SCALAR_LR", "0.7"),
           ("WEIGHT_DECAY", "0.1"), ("WEIGHT_DECAY", "0.3"), ("WARMUP_RATIO", "0.05"), ("WARMUP_RATIO", "0.02"),
           ("WARMDOWN_RATIO", "0.6"), ("WARMDOWN_RATIO", "0.4"), ("FINAL_LR_FRAC", "0.1"), ("FINAL_LR_FRAC", "0.05"),
           ("ADAM_BETAS", "(0.9, 0.95)"), ("ADAM_BETAS", "(0.8, 0.99)"), ("ASPECT_RATIO", "48"),
           ("ASPECT_RATIO", "80"), ("HEAD_DIM", "64"), ("WINDOW_PATTERN", '"SSLL"'), ("WINDOW_PATTERN", '"L"'),
           ("TOTAL_BATCH_SIZE", "2 ** 18"), ("TOTAL_BATCH_SIZE", "2 ** 20"), ("DEPTH", "6"), ("DEPTH", "10"),
           ("DEVICE_BATCH_SIZE", "16"), ("MATRIX_LR", "0.045"), ("EMBEDDING_LR", "0.5")]
CHANGES = (CHANGES * 2)[:40]
# the shape of each experiment's first answer, in order over the 40 (the rest are clean)
SHAPES = {
    "hparams": ["prose around"] * 3 + ["heading:"] * 2 + ["heading, no colon"] + ["copied prompt"] * 3
    + ["placeholders"] * 2 + ["missing fields"] * 3 + ["truncated"] * 2 + ["dropped names"] * 2 + ["new constant"],
    "file": ["prose around"] * 3 + ["heading:"] * 2 + ["heading, no colon"] + ["copied prompt"] * 3
    + ["placeholders"] * 2 + ["missing fields"] * 3 + ["truncated"] * 2 + ["dropped names"] * 3,
}
STUBBORN = {"copied prompt", "truncated"}  # the first experiment of these shapes fails its retry the same way
PLACEHOLDER = "<one line, under 80 characters, saying what you changed>"


# ---------------------------------------------------------------------------
# The answers
# ---------------------------------------------------------------------------


@dataclass
class Answer:
    text: str = ""  # free text
    data: dict | None = None  # structured
    truncated: bool = False


@dataclass
class Case:
    scope: str
    shape: str
    first: Answer
    retry: Answer
    first_json: Answer
    retry_json: Answer


def _line(name: str) -> str:
    span = find_hparams(SOURCE)
    return next(ln.rstrip("\n") for ln in span.lines[span.body_start:span.body_end] if ln.startswith(name + " "))


def _new_line(name: str, value: str) -> str:
    span = find_hparams(set_hparams(SOURCE, {name: value}))
    return next(ln.rstrip("\n") for ln in span.lines[span.body_start:span.body_end] if ln.startswith(name + " "))


def _fields(name: str, value: str) -> tuple:
    return f"{name} {value}", f"Setting {name} to {value} should use the fixed budget better."


def _text(scope: str, name: str, value: str, shape: str) -> Answer:
    description, reasoning = _fields(name, value)
    if scope == "hparams":
        block = find_hparams(set_hparams(SOURCE, {name: value})).body.strip("\n") + "\n"
        if shape == "new constant":
            block += "LABEL_SMOOTHING = 0.1\n"
        if shape == "dropped names":
            block = _new_line(name, value) + "\n"
        code = f"CODE:\n```python\n{block}```\n"
    else:
        edits = [(_line(name), _new_line(name, value))]
        if shape == "dropped names":
            other = "WARMDOWN_RATIO" if name != "WARMDOWN_RATIO" else "WARMUP_RATIO"
            edits.append((_line(other) + "\n", ""))
        code = "".join(f"<<<<<<< SEARCH\n{s}\n=======\n{r}\n>>>>>>> REPLACE\n" for s, r in edits)
    fields = f"DESCRIPTION: {description}\nREASONING: {reasoning}\n"
    if shape == "prose around":
        return Answer(f"Looking at the results so far, here is my next experiment.\n\n{fields}{code}\n"
                      f"Let me know how it goes!\n")
    if shape == "heading:":
        return Answer(f"## DESCRIPTION: {description}\n## REASONING: {reasoning}\n" + code.replace("CODE:", "## CODE:"))
    if shape == "heading, no colon":
        return Answer(f"## Description\n{description}\n\n## Reasoning\n{reasoning}\n\n## Code\n"
                      + code.replace("CODE:\n", ""))
    if shape == "copied prompt":
        return Answer(system_prompt(scope, "train.py", 300).split("nothing else:\n", 1)[1])
    if shape == "placeholders":
        return Answer(f"DESCRIPTION: {PLACEHOLDER}\nREASONING: {reasoning}\n{code}")
    if shape == "missing fields":
        return Answer(code.replace("CODE:\n", ""))
    if shape == "truncated":
        whole = fields + code
        return Answer(whole[:len(whole) * 2 // 3], truncated=True)
    return Answer(fields + code)


def _json(scope: str, name: str, value: str, shape: str) -> Answer:
    description, reasoning = _fields(name, value)
    if shape in ("copied prompt", "placeholders"):  # a schema cannot stop a model copying its field descriptions
        description = FIELD_HELP["description"]
        reasoning = FIELD_HELP["reasoning"] if shape == "copied prompt" else reasoning
    data = {"description": description, "reasoning": reasoning}
    if scope == "hparams":
        pairs = [{"name": name, "value": value}]
        if shape == "new constant":
            pairs = [{"name": "LABEL_SMOOTHING", "value": "0.1"}]
        data["hparams"] = pairs
        return Answer(data=data)
    edits = [{"search": _line(name), "replace": _new_line(name, value)}]
    if shape == "dropped names":
        other = "WARMDOWN_RATIO" if name != "WARMDOWN_RATIO" else "WARMUP_RATIO"
        edits.append({"search": _line(other) + "\n", "replace": ""})
    data["edits"] = edits
    return Answer(data=data, truncated=shape == "truncated")


def cases(scope: str) -> list:
    out, seen = [], set()
    shapes = SHAPES[scope] + ["clean"] * (len(CHANGES) - len(SHAPES[scope]))
    for (name, value), shape in zip(CHANGES, shapes):
        again = shape in STUBBORN and shape not in seen
        seen.add(shape)
        retry_shape = shape if again else "clean"
        out.append(Case(scope, shape, _text(scope, name, value, shape), _text(scope, name, value, retry_shape),
                        _json(scope, name, value, shape), _json(scope, name, value, retry_shape)))
    return out


# ---------------------------------------------------------------------------
# Running them through the engine
# ---------------------------------------------------------------------------


class Status:
    """The loop's state line, which the Proposer reports retries to; nobody watches it here."""
    state, message = None, ""

    def set(self, state, message=""):
        self.state, self.message = state, message


@dataclass
class Tally:
    experiments: int = 0
    first: int = 0  # usable on the first call
    usable: int = 0  # usable after the corrective retry
    calls: int = 0
    by_shape: dict = field(default_factory=dict)  # shape -> [experiments, first, usable]

    def add(self, shape: str, calls: int, ok: bool) -> None:
        self.experiments += 1
        self.first += ok and calls == 1
        self.usable += ok
        self.calls += calls
        s = self.by_shape.setdefault(shape, [0, 0, 0])
        s[0], s[1], s[2] = s[0] + 1, s[1] + (ok and calls == 1), s[2] + ok


def _reply(server, answer: Answer):
    stop = "max_tokens" if answer.truncated else "end"
    if answer.data is not None:
        return server.structured(answer.data, stop=stop if answer.truncated else "tool")
    return server.text(answer.text, stop=stop)


def run(protocol: str, answer_format: str, scope: str, warnings: list) -> Tally:
    server = FakeLLMServer(protocol).start()
    try:
        cfg = AgentConfig(provider=protocol, model=MODELS[protocol], answer_format=answer_format, scope=scope,
                          llm_attempts=1, llm_timeout=30.0, max_tokens=4096, max_unusable_answers=0,
                          runs_dir=Path(tempfile.mkdtemp(prefix="ar-answers-")))
        provider = make_provider(protocol, MODELS[protocol], KEY, server.base_url, timeout=30.0)
        proposer = Proposer(cfg, Controls(), Status(), lambda m, level="info": warnings.append(m), provider)
        proposer.learn_window()  # what connect() ends with
        tally = Tally()
        structured = answer_format == "json"
        for n, case in enumerate(cases(scope), 1):
            first, retry = (case.first_json, case.retry_json) if structured else (case.first, case.retry)
            server.chat_replies.clear()
            server.push(_reply(server, first), _reply(server, retry))
            before = len(server.chat_requests())
            ctx = PromptContext(exp=n, scope=scope, script_name="train.py", source=SOURCE, history=[])
            try:
                proposer.propose(ctx, Usage())
                ok = True
            except SkipExperiment:
                ok = False
            tally.add(case.shape, len(server.chat_requests()) - before, ok)
        return tally
    finally:
        server.stop()


def pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f} %" if b else "-"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args()
    t0 = time.time()
    results, warnings = {}, []
    for protocol in PROTOCOLS:
        for fmt in ("text", "json"):
            for scope in ("hparams", "file"):
                results[(protocol, fmt, scope)] = run(protocol, fmt, scope, warnings)
    fallbacks = [w for w in warnings if "answer format for the rest of the session" in w]

    print(f"{'protocol':<10} {'format':<11} {'scope':<8} {'exps':>5} {'usable 1st call':>16} "
          f"{'after retry':>12} {'calls/exp':>10}")
    for protocol in PROTOCOLS:
        for fmt in ("text", "json"):
            label = "free text" if fmt == "text" else "structured"
            both = Tally()
            for scope in ("hparams", "file"):
                t = results[(protocol, fmt, scope)]
                print(f"{protocol:<10} {label:<11} {scope:<8} {t.experiments:>5} {pct(t.first, t.experiments):>16} "
                      f"{pct(t.usable, t.experiments):>12} {t.calls / t.experiments:>10.3f}")
                both.experiments += t.experiments
                both.first += t.first
                both.usable += t.usable
                both.calls += t.calls
            print(f"{protocol:<10} {label:<11} {'both':<8} {both.experiments:>5} "
                  f"{pct(both.first, both.experiments):>16} {pct(both.usable, both.experiments):>12} "
                  f"{both.calls / both.experiments:>10.3f}")
    print()
    print("by shape of the first answer (the same on every protocol; usable 1st call / after retry, of n):")
    print(f"{'shape':<18} {'scope':<8} {'n':>3} {'free text':>14} {'structured':>14}")
    for scope in ("hparams", "file"):
        text, js = results[("anthropic", "text", scope)].by_shape, results[("anthropic", "json", scope)].by_shape
        for shape in text:
            n, f1, u1 = text[shape]
            _, f2, u2 = js[shape]
            print(f"{shape:<18} {scope:<8} {n:>3} {f'{f1}/{u1}':>14} {f'{f2}/{u2}':>14}")
    same = all(results[(p, f, s)].by_shape == results[("anthropic", f, s)].by_shape
               for p in PROTOCOLS for f in ("text", "json") for s in ("hparams", "file"))
    print(f"\nprotocols agree: {'yes' if same else 'NO'}; fallbacks to text: {len(fallbacks)}; "
          f"{time.time() - t0:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"/".join(k): {"experiments": t.experiments, "usable_first_call": t.first, "usable": t.usable,
                           "calls": t.calls, "by_shape": t.by_shape} for k, t in results.items()}, indent=1))


if __name__ == "__main__":
    main()
