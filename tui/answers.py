"""Structured answers: the JSON schema a proposal follows for each scope, and a reply (structured or free text) read
into a Proposal.

The schema keeps to the subset OpenAI's strict mode accepts (every property required, additionalProperties false,
no string length limits; an array's minItems, anyOf, enum and a string's pattern are accepted), which Anthropic's
tool input schemas and Ollama's format take as well. Hyperparameter values are strings holding Python literals: a JSON
type per name could not say "a tuple of floats" or tell 4 from 4.0. The hparams field is an object with every name of
the block, null for "unchanged", each value's pattern following the kind of value the block has today (a number, a
quoted string, a tuple, ...) with bounded lengths: a server that constrains decoding cannot let a weak model answer ","
or a field description as a learning rate, repeat a name, or write digits until the output cap. The block's own types
are still checked when the values are applied (tui.prompt.set_hparams); a list of name/value pairs, which an
unconstrained model may send instead, is read as well.
The patterns never allow a double quote or a backslash: llama.cpp turns a pattern into a grammar for the raw string
content without JSON escaping, so either would end the JSON string early. Strings are written in single quotes.
"""

from tui.llm_base import AnswerSpec, LLMReply
from tui.prompt import DESCRIPTION_MAX, FIELD_HELP, TOOL_NAME, AnswerError, Proposal, hparam_kinds, parse_answer

FIELDS = {"hparams": ("description", "reasoning", "hparams"), "file": ("description", "reasoning", "edits")}
TRUNCATED = ("the answer was truncated: it was cut off at the output limit (max_tokens) before it was complete; send a "
             "shorter answer, only the fields of the format, no preamble and no repeated prompt")


# what each kind of value may look like (tui.prompt._kind); None: a name whose kind the block does not show
# bounded: a grammar-constrained weak model otherwise writes "0.03.03.03..." until the output cap
_NUM = r"-?([0-9]{1,12}([.][0-9]{0,12})?|[.][0-9]{1,12})([eE][-+]?[0-9]{1,3})?"
_EXPR = rf"{_NUM}( ?(\*\*|\*|/|//|\+|-) ?{_NUM})?"  # 0.03, 3e-4, 2 ** 18, -1
_INT = r"-?[0-9]{1,12}( ?(\*\*|\*|//|\+|-) ?[0-9]{1,12})?"  # 6, 2 ** 18: no 4.0 (nor 2 ** -1) for a depth
_STR = r"""'[^'"\\\n]{0,64}'"""  # 'SSSL'
_ITEMS = rf"({_EXPR}|{_STR})(, ?({_EXPR}|{_STR})){{0,7}},?"
DESCRIPTION_PATTERN = rf"""^[^"\\\n]{{1,{DESCRIPTION_MAX}}}$"""
REASONING_PATTERN = r"""^[^"\\]{0,1500}$"""
VALUE_PATTERNS = {
    "an integer": rf"^{_INT}$",
    "a number": rf"^{_EXPR}$",
    "a string": rf"^{_STR}$",
    "a boolean": r"^(True|False)$",
    "a tuple or list": rf"^([(]{_ITEMS}[)]|\[{_ITEMS}\])$",  # (0.9, 0.95)
    None: rf"^({_EXPR}|{_STR}|True|False|None|[(]{_ITEMS}[)]|\[{_ITEMS}\])$",  # any of them
}


def _object(properties: dict) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def _string(help_text: str) -> dict:
    return {"type": "string", "description": help_text}


def answer_spec(scope: str, source: str, script_name: str = "train.py") -> AnswerSpec:
    """What the model is asked to return for one experiment; for hparams the names are those of the current block."""
    # bounded too, for the same reason as the values (a weak model's description otherwise runs to the output cap)
    properties = {"description": {**_string(FIELD_HELP["description"]), "pattern": DESCRIPTION_PATTERN},
                  "reasoning": {**_string(FIELD_HELP["reasoning"]), "pattern": REASONING_PATTERN}}
    if scope == "hparams":
        # an object of every name, null keeping today's value: each name at most once, and its value's pattern
        # bounds what a grammar-constrained server can decode (a list of pairs let a weak model repeat a name)
        properties["hparams"] = _object({
            name: {"anyOf": [{"type": "string", "pattern": VALUE_PATTERNS.get(kind, VALUE_PATTERNS[None])},
                             {"type": "null"}]}
            for name, kind in hparam_kinds(source).items()})
        properties["hparams"]["description"] = FIELD_HELP["hparams"]
    else:
        edit = _object({"search": _string(FIELD_HELP["search"]), "replace": _string(FIELD_HELP["replace"])})
        properties["edits"] = {"type": "array", "items": edit, "minItems": 1,
                               "description": "one or more search/replace edits"}
    return AnswerSpec(TOOL_NAME, f"Propose the next experiment: one change to {script_name}", _object(properties))


def _text(data: dict, key: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise AnswerError(f"the '{key}' field must be a string")
    return value.strip()


def _items(data: dict, key: str, fields: tuple) -> list:
    """The list field `key` as tuples of `fields`; a server that does not constrain decoding may send anything."""
    value = data[key]
    if isinstance(value, dict) and key == "hparams":  # the schema's {"NAME": "value" or null (unchanged)}
        value = [{"name": k, "value": v} for k, v in value.items() if v is not None]
    if not isinstance(value, list) or not all(isinstance(x, dict) and all(f in x for f in fields) for x in value):
        raise AnswerError(f"the '{key}' field must be a list of objects with {' and '.join(fields)}")
    return [tuple(x[f] for f in fields) for x in value]


def proposal_from_data(data: dict, scope: str) -> Proposal:
    """A structured answer -> Proposal; raises AnswerError naming the field that is missing or malformed."""
    missing = [k for k in FIELDS[scope] if k not in data]
    if missing:
        raise AnswerError(f"the answer has no {', '.join(repr(k) for k in missing)} field")
    description = " ".join(_text(data, "description").split())[:DESCRIPTION_MAX]
    if not description:
        raise AnswerError("the description is empty")
    reasoning = _text(data, "reasoning")
    if scope == "file":
        edits = _items(data, "edits", ("search", "replace"))
        if not edits:
            raise AnswerError("the answer has no edit: give at least one search/replace pair")
        if not all(isinstance(s, str) and isinstance(r, str) for s, r in edits):
            raise AnswerError("each edit's search and replace must be strings")
        return Proposal(description, reasoning, edits=edits)
    values = {}
    for name, value in _items(data, "hparams", ("name", "value")):
        if not isinstance(name, str):
            raise AnswerError("each hyperparameter's name must be a string")
        if name in values:
            raise AnswerError(f"{name} is set twice: give each name once")
        values[name] = value
    return Proposal(description, reasoning, values=values)


def read_reply(reply: LLMReply, scope: str, structured: bool) -> Proposal:
    """The reply as a Proposal: its structured data when it was asked for, else its text in the free-text format."""
    if reply.stop_reason == "max_tokens":  # whatever was cut off may still parse, as something the model never meant
        raise AnswerError(TRUNCATED)
    if not structured:
        return parse_answer(reply.text, scope)
    if reply.data is None:
        raise AnswerError("the answer is not a JSON object: answer with the JSON object of the format, nothing else")
    return proposal_from_data(reply.data, scope)
