"""How much the model can read: its context window, a prompt's size in tokens, and the request fitted to both.

Window: what the server says (llama.cpp's /props, Ollama's /api/show: Provider.context_window), else the table of
hosted models below, else DEFAULT_WINDOW. --context-tokens overrides all of them, except that it cannot exceed what
the server says it has.

Counting: tiktoken's encodings download their BPE file on first use and the environment ships none (the tokenizer
prepare.py trains is a pickle in the data cache, which a run could have planted: never unpickled in the agent), and no
model's tokenizer is known here anyway. So a prompt is counted as characters / chars_per_token, starting from the
conservative CHARS_PER_TOKEN and learning the real ratio from what the server reports: the prompt tokens of every
answered call (usage) and the numbers in a context-overflow error.

Fitting (fit): the user prompt as tui.prompt builds it; if the request (system prompt, user prompt, what follows it,
the answer's max_tokens) does not fit the window, the history is shortened (oldest first), then the script view (file
scope: its first lines only), then the answer's cap down to MIN_ANSWER_TOKENS; the Request says what was trimmed.
"""

import math
from dataclasses import dataclass, replace

from tui.llm import family_lookup
from tui.prompt import PromptContext, user_prompt
from tui.results import group_experiments

DEFAULT_WINDOW = 8192  # an unknown model on a server that does not say: the common llama.cpp / vLLM setting
# hosted models' context windows in tokens (as published by the vendors); a dated snapshot gets its family's
WINDOWS = {
    "claude-opus-4": 200_000, "claude-sonnet-4": 200_000, "claude-haiku-4": 200_000, "claude-3": 200_000,
    "gpt-4.1": 1_047_576, "gpt-4o": 128_000, "gpt-4-turbo": 128_000, "gpt-5": 400_000,
    "o3": 200_000, "o4-mini": 200_000,
}

CHARS_PER_TOKEN = 2.8  # code runs at 3-4.5 characters a token (Gemma 3 on train.py: 3.1), English prose at 4+
CHARS_PER_TOKEN_RANGE = (2.0, 4.5)  # what a server's count may teach (a fake or odd usage figure cannot break it)
LEARN_MIN_CHARS = 2000  # a request this short says little about the ratio (the chat template weighs too much)
TEMPLATE_TOKENS = 16  # per message: the chat template's role markers
MARGIN = 0.05  # of the window, for the estimate's error
MIN_ANSWER_TOKENS = 1024  # the smallest output cap that holds an answer (a block of ~30 lines or a few edits)
MIN_SCRIPT_LINES = 40  # file scope: fewer lines of the script than this are no view of it


class ContextTooSmall(ValueError):
    """Not even the smallest prompt fits the window with room for an answer."""


def hosted_window(model: str) -> int | None:
    return family_lookup(WINDOWS, model)


def choose_window(told: int | None, model: str, explicit: int | None) -> tuple[int, str]:
    """(window, where it comes from): --context-tokens (never more than the server has), the server, the table, the
    default."""
    if explicit and told and explicit > told:
        return told, f"the server's (--context-tokens {explicit:,} is more than the server has)"
    if explicit:
        return explicit, "--context-tokens"
    if told:
        return told, "the server's"
    table = hosted_window(model)
    if table:
        return table, f"{model}'s"
    return DEFAULT_WINDOW, "a default for a model that does not say (pass --context-tokens)"


class TokenCounter:
    """Estimated tokens of a text, from a characters-per-token ratio that the server's own counts correct."""

    def __init__(self, chars_per_token: float = CHARS_PER_TOKEN):
        self.chars_per_token = chars_per_token

    def __call__(self, text: str) -> int:
        return math.ceil(len(text) / self.chars_per_token)

    def learn(self, chars: int, tokens: int) -> None:
        """The server counted `tokens` for a request of `chars` characters."""
        if chars >= LEARN_MIN_CHARS and tokens > 0:
            low, high = CHARS_PER_TOKEN_RANGE
            self.chars_per_token = min(max(chars / tokens, low), high)


def request_chars(system: str, messages: list) -> int:
    return len(system) + sum(len(m["content"]) for m in messages)


@dataclass
class Request:
    system: str
    messages: list  # the user prompt, then what follows it (the corrective retry's turns)
    max_tokens: int
    tokens: int  # estimated tokens of system + messages
    trimmed: str = ""  # what fitting left out, for the log ("" nothing)

    @property
    def chars(self) -> int:
        return request_chars(self.system, self.messages)


def fit(ctx: PromptContext, system: str, window: int, max_tokens: int, count: TokenCounter, tail=(),
        cap: int | None = None) -> Request:
    """The request for ctx that fits `window`: tail = the messages after the user prompt; cap = trim towards this
    many prompt tokens (a smaller request after a timeout or an overflow; the smallest view when it cannot get
    there). Raises ContextTooSmall."""
    tail = list(tail)
    fixed = count(system) + sum(count(m["content"]) for m in tail) + TEMPLATE_TOKENS * (2 + len(tail))
    usable = int(window * (1 - MARGIN))
    groups = min(ctx.history_len, len(group_experiments(ctx.history)))
    lines = len(ctx.source.rstrip("\n").split("\n")) if ctx.scope == "file" else None

    def build(history: int, script_lines: int | None) -> tuple[str, int]:
        text = user_prompt(replace(ctx, history_len=history, script_lines=script_lines))
        return text, fixed + count(text)

    def largest(low: int, high: int, fits) -> int | None:
        """The largest n in [low, high] with fits(n) (fits is monotonic), or None."""
        best = None
        while low <= high:
            mid = (low + high) // 2
            if fits(mid):
                best, low = mid, mid + 1
            else:
                high = mid - 1
        return best

    def within(limit: int):
        return lambda tokens: tokens <= limit and (cap is None or tokens <= cap)

    ok = within(usable - max_tokens)
    history, script_lines = groups, lines
    if not ok(build(history, script_lines)[1]):
        history = largest(0, groups, lambda h: ok(build(h, lines)[1]))
        if history is None:
            history = 0
            if lines is not None:
                floor = min(MIN_SCRIPT_LINES, lines)
                script_lines = largest(floor, lines, lambda n: ok(build(0, n)[1])) or floor
    text, tokens = build(history, script_lines)
    answer = max_tokens
    if tokens > usable - max_tokens:  # the smallest view: what is left of the window is the answer's
        answer = usable - tokens
        if answer < MIN_ANSWER_TOKENS:
            raise ContextTooSmall(f"the smallest prompt is about {tokens:,} tokens and an answer needs "
                                  f"{MIN_ANSWER_TOKENS:,} more, which the {window:,}-token context cannot hold")
    trimmed = []
    if history < groups:
        trimmed.append(f"history {groups} -> {history} experiments")
    if script_lines is not None and lines is not None and script_lines < lines:
        trimmed.append(f"{ctx.script_name} shown up to line {script_lines} of {lines}")
    if answer < max_tokens:
        trimmed.append(f"max_tokens {max_tokens} -> {answer}")
    messages = [{"role": "user", "content": text}, *tail]
    return Request(system, messages, answer, tokens, "; ".join(trimmed))
