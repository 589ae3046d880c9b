"""Structured answers (Anthropic tool, OpenAI response_format, Ollama format) through the real SDK clients against the
local protocol servers, the fallback to free text, and answers validated for what they mean: placeholders, names a
change drops, unknown names and wrong types, replies cut at the output cap."""

import difflib
import json
import re
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

import dashboard
from fakes.agent import Recorder, file_answer, hp_answer, hp_block, make_config
from fakes.llm_servers import FakeLLMServer
from fakes.repo import FAKE_TRAIN, agent_repo
from tui.answers import answer_spec, proposal_from_data
from tui.config import ConfigError
from tui.controls import FatalError, SkipExperiment
from tui.llm import Usage, make_provider
from tui.llm_base import AnswerSpec, LLMError
from tui.orchestrator import Orchestrator
from tui.prompt import (FIELD_HELP, TOOL_NAME, AnswerError, PromptContext, Proposal, apply_proposal, find_hparams,
                        parse_answer)

MODELS = {"anthropic": "claude-sonnet-4-6", "openai": "gpt-4.1", "ollama": "qwen2.5-coder:7b"}
KEY = "sk-test-key-123456789"
REAL_TRAIN = (Path(__file__).resolve().parent.parent / "train.py").read_text()
FAKE_SOURCE = FAKE_TRAIN.read_text()
LR = {"description": "lr 0.02", "reasoning": "A higher rate learns faster in a short budget.",
      "hparams": [{"name": "LEARNING_RATE", "value": "0.02"}]}


@pytest.fixture(params=["anthropic", "openai", "ollama"])
def server(request):
    s = FakeLLMServer(request.param).start()
    yield s
    s.stop()


def agent(server, tmp_path, answer_format="auto", scope="hparams"):
    """The proposer of a real orchestrator on a real temporary repo, talking to `server` through the real SDK."""
    repo = agent_repo(tmp_path / "repo")
    rec = Recorder()
    provider = make_provider(server.kind, MODELS[server.kind], None if server.kind == "ollama" else KEY,
                             server.base_url, timeout=5.0, max_tokens=512)
    orch = Orchestrator(make_config(repo, server, provider=server.kind, answer_format=answer_format, scope=scope),
                        [rec], provider=provider)
    orch.proposer.learn_window()  # what connect() ends with
    return orch.proposer, rec, repo


def propose(proposer, repo, exp=1, scope="hparams"):
    ctx = PromptContext(exp=exp, scope=scope, script_name="train.py", source=(repo / "train.py").read_text(),
                        history=[])
    return proposer.propose(ctx, Usage())


def schema_of(kind, body):
    """The answer schema a chat request carries, or None."""
    if kind == "anthropic":
        tools = body.get("tools") or []
        assert not tools or body["tool_choice"] == {"type": "tool", "name": TOOL_NAME}
        return tools[0]["input_schema"] if tools else None
    if kind == "openai":
        fmt = body.get("response_format")
        assert not fmt or (fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True)
        return fmt["json_schema"]["schema"] if fmt else None
    return body.get("format")


def changed_lines(old, new):
    return [ln for ln in difflib.unified_diff(old.splitlines(), new.splitlines(), lineterm="", n=0)
            if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]


# ---------------------------------------------------------------------------
# Both answer shapes, every provider
# ---------------------------------------------------------------------------


def test_a_structured_hparams_answer_rewrites_just_that_assignment(server, tmp_path):
    proposer, rec, repo = agent(server, tmp_path)
    server.push(server.structured(LR))
    proposal, new = propose(proposer, repo)
    assert proposal.description == "lr 0.02" and proposal.reasoning.startswith("A higher rate")
    assert changed_lines(FAKE_SOURCE, new) == ["-LEARNING_RATE = 0.01", "+LEARNING_RATE = 0.02"]
    body = server.chat_requests()[0].body
    schema = schema_of(server.kind, body)
    hparams = schema["properties"]["hparams"]
    assert list(hparams["properties"]) == hparams["required"] == ["LEARNING_RATE", "DEPTH", "MODE", "STEPS",
                                                                   "STEP_SLEEP"]
    system = body["system"] if server.kind == "anthropic" else body["messages"][0]["content"]
    assert "one JSON object" in system and "CODE:" not in system
    assert rec.logs("warning") == []


def test_a_structured_file_answer_applies_its_edits(server, tmp_path):
    proposer, rec, repo = agent(server, tmp_path, scope="file")
    server.push(server.structured({"description": "deeper", "reasoning": "More capacity.",
                                   "edits": [{"search": "DEPTH = 4", "replace": "DEPTH = 5"}]}))
    proposal, new = propose(proposer, repo, scope="file")
    assert changed_lines(FAKE_SOURCE, new) == ["-DEPTH = 4", "+DEPTH = 5"]
    assert "edits" in schema_of(server.kind, server.chat_requests()[0].body)["properties"]


def test_free_text_answers_send_no_schema(server, tmp_path):
    proposer, rec, repo = agent(server, tmp_path, answer_format="text")
    server.push(server.text(hp_answer("lr 0.02", lr=0.02)))
    proposal, new = propose(proposer, repo)
    assert "LEARNING_RATE = 0.02" in new and proposal.values is None
    assert schema_of(server.kind, server.chat_requests()[0].body) is None


def test_providers_report_the_structured_data_and_why_the_reply_ended(server):
    p = make_provider(server.kind, MODELS[server.kind], KEY, server.base_url, timeout=5.0, max_tokens=512)
    spec = answer_spec("hparams", FAKE_SOURCE)
    server.push(server.structured(LR), server.text("DESCRIPTION: cut", stop="max_tokens"),
                server.text("DESCRIPTION: whole"))
    reply = p.complete("s", [{"role": "user", "content": "go"}], spec)
    assert reply.data == LR and json.loads(reply.text) == LR
    assert reply.stop_reason == ("tool" if server.kind == "anthropic" else "end")
    cut = p.complete("s", [{"role": "user", "content": "go"}])
    assert (cut.text, cut.data, cut.stop_reason) == ("DESCRIPTION: cut", None, "max_tokens")
    assert p.complete("s", [{"role": "user", "content": "go"}]).stop_reason == "end"


# ---------------------------------------------------------------------------
# A server without structured output
# ---------------------------------------------------------------------------


def test_a_server_that_rejects_the_schema_gets_free_text_once_for_the_session(server, tmp_path):
    proposer, rec, repo = agent(server, tmp_path)
    server.reject_schema = True
    server.push(server.text(hp_answer("lr 0.02", lr=0.02)), server.text(hp_answer("depth 5", depth=5)))
    assert "LEARNING_RATE = 0.02" in propose(proposer, repo, exp=1)[1]  # the experiment is asked again, not lost
    assert "DEPTH = 5" in propose(proposer, repo, exp=2)[1]
    schemas = [schema_of(server.kind, r.body) is not None for r in server.chat_requests()]
    assert schemas == [True, False, False]  # one rejected call, then text for the rest of the session
    warnings = rec.logs("warning")
    assert len(warnings) == 1 and warnings[0].startswith("exp1: the LLM server rejected the answer schema")
    assert "using the free-text answer format for the rest of the session" in warnings[0]


def test_a_server_that_ignores_the_schema_is_read_as_free_text(server, tmp_path):
    proposer, rec, repo = agent(server, tmp_path)
    server.push(server.text(hp_answer("lr 0.02", lr=0.02)), server.text(hp_answer("depth 5", depth=5)))
    assert "LEARNING_RATE = 0.02" in propose(proposer, repo, exp=1)[1]
    assert "DEPTH = 5" in propose(proposer, repo, exp=2)[1]
    assert [schema_of(server.kind, r.body) is not None for r in server.chat_requests()] == [True, False]
    assert [w.split(":")[:2] for w in rec.logs("warning")] == \
        [["exp1", " the LLM server ignored the answer schema and answered in free text"]]


def test_answer_format_json_does_not_fall_back(tmp_path):
    s = FakeLLMServer("openai").start()
    try:
        proposer, rec, repo = agent(s, tmp_path, answer_format="json")
        s.reject_schema = True
        with pytest.raises(FatalError, match=r"rejected the answer schema that --answer-format json asks for .*"
                                             r"use --answer-format auto or text"):
            propose(proposer, repo)
    finally:
        s.stop()


# ---------------------------------------------------------------------------
# Answers validated for what they mean
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("answer, where", [
    (file_answer([("DEPTH = 4", "DEPTH = 5  # <the lines that replace them>")]), "REPLACE text of block 1"),
    (file_answer([("<lines copied exactly from the current script>", "DEPTH = 5")]), "SEARCH text of block 1"),
])
def test_placeholders_copied_from_the_format_are_refused(answer, where):
    with pytest.raises(AnswerError, match=rf"the {where} is the placeholder \"<.*>\" copied from the answer format"):
        apply_proposal(FAKE_SOURCE, parse_answer(answer, "file"), "file")
    code = hp_answer(lr=0.02, extra="# <the complete new hyperparameter block: every line between the banners>")
    with pytest.raises(AnswerError, match=r"the CODE section is the placeholder \"<the complete new"):
        apply_proposal(FAKE_SOURCE, parse_answer(code, "hparams"), "hparams")
    with pytest.raises(AnswerError, match="the value of DEPTH is the placeholder \"<the lines that replace them>"):
        apply_proposal(FAKE_SOURCE, Proposal("d", "r", values={"DEPTH": "'<the lines that replace them>'"}),
                       "hparams")


@pytest.mark.parametrize("proposal", [
    parse_answer(hp_answer(description="<one line, under 80 characters, …>", lr=0.02), "hparams"),
    parse_answer(hp_answer(description="<your description here>", lr=0.02), "hparams"),
    Proposal(FIELD_HELP["description"], FIELD_HELP["reasoning"], values={"LEARNING_RATE": "0.02"}),
])
def test_a_copied_label_of_a_usable_hparams_change_is_written_from_the_change(proposal):
    # the values say the whole change: the copied text is dropped and the engine describes it, no round trip
    new = apply_proposal(FAKE_SOURCE, proposal, "hparams")
    assert changed_lines(FAKE_SOURCE, new)[1].startswith("+LEARNING_RATE = 0.02")
    assert proposal.description == "LEARNING_RATE = 0.02" and "description" in proposal.labelled_by_engine
    assert "<" not in proposal.reasoning and FIELD_HELP["reasoning"] not in proposal.reasoning


@pytest.mark.parametrize("edits, description", [
    ([("DEPTH = 4", "DEPTH = 5")], "edit: DEPTH = 5"),
    ([("DEPTH = 4", "DEPTH   =   5\nWIDTH = 2"), ("LEARNING_RATE = 0.01", "LEARNING_RATE = 0.02")],
     "edit: LEARNING_RATE = 0.02 (+2 more lines)"),  # in the order of the script
])
def test_a_copied_label_of_a_file_edit_is_written_from_the_edit(edits, description):
    for copied in ({"description": "<one line, under 80 characters, …>"},
                   {"reasoning": "<2-3 sentences: why you expect this to lower val_bpb>"}):
        proposal = parse_answer(file_answer(edits, **copied), "file")
        apply_proposal(FAKE_SOURCE, proposal, "file")
        assert proposal.labelled_by_engine == list(copied)
        assert proposal.description == (description if "description" in copied else "edit the script")
        assert "<" not in proposal.reasoning


def test_a_copied_label_is_logged_and_a_refused_change_keeps_its_own(server, tmp_path):
    proposer, rec, repo = agent(server, tmp_path)
    server.push(server.structured({**LR, "description": FIELD_HELP["description"]}))
    proposal, new = propose(proposer, repo)
    assert proposal.description == "LEARNING_RATE = 0.02" and len(server.chat_requests()) == 1
    assert any("exp1: the answer's description copied the answer format; described from the change instead: "
               "LEARNING_RATE = 0.02" in m for m in rec.logs("warning"))
    unchanged = Proposal(FIELD_HELP["description"], "r", values={"LEARNING_RATE": "0.01"})
    with pytest.raises(AnswerError, match="changes nothing"):
        apply_proposal(FAKE_SOURCE, unchanged, "hparams")
    assert unchanged.description == FIELD_HELP["description"] and not unchanged.labelled_by_engine


def test_a_copied_prompt_is_refused_with_what_was_wrong(server, tmp_path):
    proposer, rec, repo = agent(server, tmp_path, answer_format="text")
    # the model sends the system prompt back, format and all (what the small base model of issue 14 did)
    server.default_chat = lambda body: server.text(
        body["system"] if server.kind == "anthropic" else body["messages"][0]["content"])
    with pytest.raises(SkipExperiment, match="unusable answer after a corrective retry: the CODE section is the "
                                             "placeholder"):
        propose(proposer, repo)
    assert "copied from the answer format" in server.prompts()[1] and len(server.chat_requests()) == 2


def test_a_block_that_drops_names_the_script_uses_is_refused():
    body = find_hparams(REAL_TRAIN).body
    kept = "".join(ln for ln in body.splitlines(keepends=True) if not ln.startswith(("TOTAL_BATCH_SIZE", "DEPTH")))
    answer = f"DESCRIPTION: shorter block\nREASONING: r\nCODE:\n```python\n{kept.replace('0.04', '0.03')}```\n"
    with pytest.raises(AnswerError, match=r"^the block no longer defines TOTAL_BATCH_SIZE, DEPTH, which the script "
                                          r"still uses"):
        apply_proposal(REAL_TRAIN, parse_answer(answer, "hparams"), "hparams")
    edit = file_answer([("DEPTH = 4\n", "")])
    with pytest.raises(AnswerError, match=r"^the edit removes DEPTH, which the script still uses"):
        apply_proposal(FAKE_SOURCE, parse_answer(edit, "file"), "file")
    moved = file_answer([("DEPTH = 4\n", ""), ("LEARNING_RATE = 0.01", "LEARNING_RATE = 0.01\nDEPTH = 5")])
    assert "DEPTH = 5" in apply_proposal(FAKE_SOURCE, parse_answer(moved, "file"), "file")  # defined elsewhere: fine


def test_the_model_is_told_which_names_its_block_dropped(tmp_path):
    s = FakeLLMServer("anthropic").start()
    try:
        proposer, rec, repo = agent(s, tmp_path, answer_format="text")
        short = hp_block(lr=0.02).replace("DEPTH = 4\n", "")
        s.push(s.text(f"DESCRIPTION: lr\nREASONING: r\nCODE:\n```python\n{short}```\n"),
               s.text(hp_answer("lr 0.02", lr=0.02)))
        proposal, new = propose(proposer, repo)
        assert "DEPTH = 4" in new and "LEARNING_RATE = 0.02" in new
        assert "the block no longer defines DEPTH, which the script still uses" in s.prompts()[1]
    finally:
        s.stop()


@pytest.mark.parametrize("values, message", [
    ({"WARP_DRIVE": "9"}, "the block has no constant named WARP_DRIVE: set only names it defines"),
    ({"_hp": "{}"}, "the block has no constant named _hp"),  # a helper, not a value
    ({"TIME_BUDGET": "24"}, "the block has no constant named TIME_BUDGET"),  # imported from prepare: never rebound
    ({"evaluate_bpb": "0"}, "the block has no constant named evaluate_bpb"),
    ({"MATRIX_LR": "'fast'"}, "MATRIX_LR is a number in the block, but the answer sets it to a string"),
    ({"MATRIX_LR": "True"}, "MATRIX_LR is a number in the block, but the answer sets it to a boolean"),
    ({"WINDOW_PATTERN": "4"}, "WINDOW_PATTERN is a string in the block, but the answer sets it to an integer"),
    ({"HEAD_DIM": "64.0"}, "HEAD_DIM is an integer in the block, but the answer sets it to a number"),  # range(64.0)
    ({"ASPECT_RATIO": "128 / 2"}, "ASPECT_RATIO is an integer in the block, but the answer sets it to a number"),
    ({"MATRIX_LR": "get_lr()"}, "the value of MATRIX_LR .* is not a Python literal"),
    ({"ADAM_BETAS": "0.9"}, "ADAM_BETAS is a tuple or list in the block"),
    ({}, "the answer sets no hyperparameter"),
])
def test_structured_values_must_name_the_blocks_constants_and_keep_their_types(values, message):
    script = "from prepare import TIME_BUDGET, evaluate_bpb\n" + REAL_TRAIN
    with pytest.raises(AnswerError, match=message):
        apply_proposal(script, Proposal("change", "why", values=values), "hparams")


def test_structured_values_keep_every_other_line_of_the_block():
    values = {"MATRIX_LR": "0.03", "ADAM_BETAS": "[0.9, 0.95]", "DEPTH": "6", "WINDOW_PATTERN": "'SSLL'"}
    new = apply_proposal(REAL_TRAIN, Proposal("change", "why", values=values), "hparams")
    assert changed_lines(REAL_TRAIN, new) == [
        '-WINDOW_PATTERN = "L" if _hp["tier"] == "cpu" else "SSSL"  # L=full, S=half context (CPU: '
        'benchmarks/cpu_sweep.md)',
        "+WINDOW_PATTERN = 'SSLL'  # L=full, S=half context (CPU: benchmarks/cpu_sweep.md)",
        "-MATRIX_LR = 0.04        # learning rate for matrix parameters (Muon)",
        "+MATRIX_LR = 0.03        # learning rate for matrix parameters (Muon)",
        "-ADAM_BETAS = (0.8, 0.95)", "+ADAM_BETAS = [0.9, 0.95]",
        '-DEPTH = _hp["depth"]                          # number of transformer layers',
        "+DEPTH = 6                          # number of transformer layers"]


def test_each_hyperparameter_gets_a_value_pattern_of_the_kind_it_has():
    # a grammar-constrained server (llama.cpp) decodes only what the pattern allows: a weak model's "," or copied
    # field description can no longer become MATRIX_LR; every value the block could take still can
    names = answer_spec("hparams", REAL_TRAIN).schema["properties"]["hparams"]["properties"]
    assert all(spec["anyOf"][1] == {"type": "null"} for spec in names.values())  # null: unchanged
    pattern = {name: spec["anyOf"][0]["pattern"] for name, spec in names.items()}
    assert sorted(pattern) == sorted(["ASPECT_RATIO", "HEAD_DIM", "WINDOW_PATTERN", "TOTAL_BATCH_SIZE", "EMBEDDING_LR",
                                      "UNEMBEDDING_LR", "MATRIX_LR", "SCALAR_LR", "WEIGHT_DECAY", "ADAM_BETAS",
                                      "WARMUP_RATIO", "WARMDOWN_RATIO", "FINAL_LR_FRAC", "DEPTH", "DEVICE_BATCH_SIZE"])
    good = {"MATRIX_LR": ["0.03", "3e-4", "-1", "0.5 * 0.1"], "TOTAL_BATCH_SIZE": ["2 ** 18", "65536"],
            "WINDOW_PATTERN": ["'SSSL'", "'L'"], "ADAM_BETAS": ["(0.9, 0.95)", "[0.8, 0.99]"], "DEPTH": ["6"],
            "HEAD_DIM": ["64", "2 ** 6"], "WEIGHT_DECAY": ["0", "1"]}  # an integer is a number too
    bad = {"MATRIX_LR": [",", "", "the new value as a Python literal", "'fast'", "0.03\n", "./../.03/03.03.03",
                         "0." + "3" * 40],
           "WINDOW_PATTERN": ["4", '"SSSL"', "SSSL"], "ADAM_BETAS": ["0.9"], "DEPTH": [",", "deep"],
           "HEAD_DIM": ["64.0", "128 / 2", "2 ** -1"]}
    for name, values in good.items():
        for value in values:
            assert re.fullmatch(pattern[name], value), (name, value)
            apply_proposal(REAL_TRAIN, Proposal("change", "why", values={name: value}), "hparams")
    for name, values in bad.items():
        for value in values:
            assert not re.fullmatch(pattern[name], value), (name, value)
    # llama.cpp puts a pattern's text into the JSON string unescaped: a quote or backslash would end it early
    for p in pattern.values():
        assert not any(re.search(p, s) for s in ("'a\"b'", "(1, \"2\")", "1\\"))


def test_structured_answers_from_a_server_that_does_not_constrain_decoding():
    # Anthropic's tool input follows the schema only as well as the model does: bare JSON values and a name -> value
    # object are as clear as the list of pairs, anything else is refused with the field it concerns
    for hparams in ([{"name": "DEPTH", "value": 6}], {"DEPTH": "6"}, {"LEARNING_RATE": None, "DEPTH": "6"}):
        data = {"description": "deeper", "reasoning": "r", "hparams": hparams}
        assert "DEPTH = 6\n" in apply_proposal(FAKE_SOURCE, proposal_from_data(data, "hparams"), "hparams")
    for data, message in [({"description": "d", "reasoning": "r"}, "the answer has no 'hparams' field"),
                          ({"description": "d", "reasoning": "r", "hparams": "DEPTH=6"}, "'hparams' field must be a "
                                                                                          "list of objects"),
                          ({"description": 5, "reasoning": "r", "hparams": []}, "'description' field must be a string"),
                          ({**LR, "hparams": LR["hparams"] * 2}, "LEARNING_RATE is set twice")]:
        with pytest.raises(AnswerError, match=message):
            proposal_from_data(data, "hparams")
    with pytest.raises(AnswerError, match="the answer sets no hyperparameter"):  # every name null: nothing changes
        apply_proposal(FAKE_SOURCE, proposal_from_data({**LR, "hparams": {"LEARNING_RATE": None}}, "hparams"),
                       "hparams")
    with pytest.raises(AnswerError, match="the answer has no edit"):
        proposal_from_data({"description": "d", "reasoning": "r", "edits": []}, "file")


def test_unknown_names_in_a_structured_answer_get_a_corrective_retry(tmp_path):
    s = FakeLLMServer("anthropic").start()  # tool input is not grammar-constrained: any name can come back
    try:
        proposer, rec, repo = agent(s, tmp_path)
        s.push(s.structured({**LR, "hparams": [{"name": "WARP_DRIVE", "value": "9"}]}), s.structured(LR))
        assert "LEARNING_RATE = 0.02" in propose(proposer, repo)[1]
        retry = s.chat_requests()[1].body
        assert "the block has no constant named WARP_DRIVE" in retry["messages"][-1]["content"]
        assert retry["tool_choice"]["name"] == TOOL_NAME and "one JSON object" in retry["messages"][-1]["content"]
    finally:
        s.stop()


@pytest.mark.parametrize("answer_format", ["text", "auto"])
def test_a_reply_cut_at_the_output_cap_is_called_truncated(server, tmp_path, answer_format):
    proposer, rec, repo = agent(server, tmp_path, answer_format=answer_format)
    # a cut block can still parse ("DEPTH = 1" of "DEPTH = 12"): it is refused, not read as something never meant
    cut = server.text(hp_answer(lr=0.02), stop="max_tokens") if answer_format == "text" else \
        server.structured(LR, stop="max_tokens")
    server.push(cut, server.text(hp_answer("lr 0.02", lr=0.02)) if answer_format == "text" else server.structured(LR))
    assert "LEARNING_RATE = 0.02" in propose(proposer, repo)[1]
    assert "the answer was truncated: it was cut off at the output limit (max_tokens)" in server.prompts()[1]
    # a structured reply cut short is not a server that ignores the schema: the retry asks for JSON again
    assert not [w for w in rec.logs("warning") if "answer schema" in w]
    assert (schema_of(server.kind, server.chat_requests()[1].body) is not None) == (answer_format == "auto")


# ---------------------------------------------------------------------------
# The protocol servers check requests as the real services do
# ---------------------------------------------------------------------------


def test_the_servers_refuse_malformed_schema_requests(server):
    good = answer_spec("file", FAKE_SOURCE)
    loose = dict(good.schema, additionalProperties=True)
    p = make_provider(server.kind, MODELS[server.kind], KEY, server.base_url, timeout=5.0)
    msg = [{"role": "user", "content": "go"}]
    if server.kind == "anthropic":
        client = anthropic.Anthropic(api_key=KEY, base_url=server.base_url, max_retries=0)
        with pytest.raises(anthropic.BadRequestError, match="Tool 'other' not found in tools"):
            client.messages.create(model="m", max_tokens=10, messages=msg,
                                   tools=[{"name": TOOL_NAME, "input_schema": good.schema}],
                                   tool_choice={"type": "tool", "name": "other"})
        bad = AnswerSpec(TOOL_NAME, "d", {"type": "array"})
        with pytest.raises(LLMError, match=r"input_schema.type: Input should be 'object'"):
            p.complete("s", msg, bad)
    elif server.kind == "openai":
        with pytest.raises(LLMError, match=r"'additionalProperties' is required to be supplied and to be false"):
            p.complete("s", msg, AnswerSpec(TOOL_NAME, "d", loose))
        partial = dict(good.schema, required=["description"])
        with pytest.raises(LLMError, match=r"Missing 'reasoning'"):
            p.complete("s", msg, AnswerSpec(TOOL_NAME, "d", partial))
        client = openai.OpenAI(api_key=KEY, base_url=server.base_url, max_retries=0)
        with pytest.raises(openai.BadRequestError, match="json_schema.name"):
            client.chat.completions.create(model="m", messages=msg, response_format={
                "type": "json_schema", "json_schema": {"schema": good.schema}})
    else:
        r = httpx.post(server.url + "/api/chat", json={"model": "m", "messages": msg, "format": "yaml"})
        assert r.status_code == 400 and "invalid format" in r.json()["error"]
    server.push(server.structured({"description": "d", "reasoning": "r", "edits": []}))
    assert p.complete("s", msg, good).data is not None  # our own schemas pass every check


# ---------------------------------------------------------------------------
# The option
# ---------------------------------------------------------------------------


def test_answer_format_option(capsys, tmp_path):
    args = dashboard.build_parser().parse_args(["--agent", "--answer-format", "json"])
    assert dashboard.agent_config(args).answer_format == "json"
    assert dashboard.build_parser().parse_args(["--agent"]).answer_format == "auto"
    with pytest.raises(SystemExit) as e:
        dashboard.build_parser().parse_args(["--agent", "--answer-format", "xml"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "error: argument --answer-format: invalid choice: 'xml' (choose from" in err
    with pytest.raises(ConfigError, match="unknown answer format 'xml': choose one of auto, json, text"):
        make_config(tmp_path, answer_format="xml").resolved()
