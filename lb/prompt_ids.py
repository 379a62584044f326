"""A request's prompt as the exact token ids the vLLM engine will see, for KV-aware routing.

``kv_aware`` routing matches a prompt's token ids against the blocks the engines report
holding, so an id that differs from the engine's by one token misses every block after it.
:class:`PromptIds` turns a validated client body into those ids, or ``None`` when it cannot
be exact — the caller then routes approximately. ``ids`` never raises for client input.

* :class:`HFPromptIds` (``[tokenizer] kind = "hf"``): the served model's ``tokenizer.json``
  (the ``tokenizers`` package) and its chat template (``jinja2``), rendered as vLLM 0.32 does
  through transformers' ``apply_chat_template`` (tests/test_prompt_ids.py runs vLLM's own
  code on the same bodies);
* :class:`EmulatorPromptIds` (``kind = "emulator"``): pdlb's emulator's own tokenizer;
* :func:`tokenize_on_backend` (``token_ids = "backend"``): POST /tokenize on a backend, one
  round trip per request, for models whose template pdlb cannot render
  (:func:`tokenize_request` builds its body).

What vLLM does, and what is reproduced here:

* completions: a string prompt (or a batch of one) is ``encode(prompt, add_special_tokens=
  body.add_special_tokens, default true)`` — the tokenizer's post-processor adds BOS; token ids
  are used as they are. A batch of several prompts, ``prompt_embeds`` or
  ``truncate_prompt_tokens`` give ``None``.
* chat: vLLM rebuilds each message before the template sees it (``parse_chat_messages``):
  only role, content, name, and per role tool_calls / reasoning / tool_call_id / tools are
  kept; text parts (``text``, ``input_text``, ``output_text``, ``refusal``, ``thinking``) are
  joined with "\\n" into one string for a template of the "string" content format, or kept as
  ``{"type": "text", "text": ...}`` parts for an "openai" one (a template that loops over a
  message's content; detected from the template's syntax tree once, as vLLM does); a string
  content becomes a one-part list for an "openai" template; assistant tool-call arguments are
  JSON-decoded into objects; "developer" messages become "system" when the template does not
  know that role. The template gets the tokenizer's special tokens, ``tools`` (as vLLM's
  pydantic model dumps them), ``documents``, ``reasoning_effort``/``enable_thinking``,
  ``chat_template_kwargs`` and ``add_generation_prompt``; ``continue_final_message`` is cut as
  transformers cuts it. The text is then encoded with ``add_special_tokens`` (default false).
* not reproduced, so ``None``: image/audio/video, tool-reference and other non-text parts
  (their placeholders need the model's processor), a part with a ``uuid``, a per-request
  ``chat_template``, a body whose flags are not plain booleans; and silently not known:
  the server's ``--default-chat-template-kwargs`` and its processor's chat template (a
  multimodal model's ``chat_template.json``), which vLLM prefers to the tokenizer's when a
  request has no tools. The emulator's ids assume its default ``--add-bos``.

Cost per call, median of 200 warm calls, on the tiny Llama tokenizer (scripts/make_tiny_model.py,
byte-level BPE) and the development machine (2 shared cores: ±20%); "2k" prompts are ~2,000
tokens, the chat one in 8 messages:

=====================  ==============  ===================  ======================
                       completion 2k   chat 2k (template)   one short message
=====================  ==============  ===================  ======================
``HFPromptIds``        1,500 µs        1,630 µs (26 µs)     10 µs / chat 33 µs
``EmulatorPromptIds``  420 µs          445 µs               4 µs / chat 5 µs
=====================  ==============  ===================  ======================

Tokenizing is nearly all of it (~0.75 µs a token for ``tokenizers``, ~0.2 for tiktoken); the
template is compiled once, at construction. ``encode_batch_fast`` is used for one text: it
skips the offsets (a quarter faster than ``encode``) and releases the GIL, which ``encode``
does not — so a long prompt is worth ``asyncio.to_thread``. Instances are safe to share
between threads.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from lb.config import TokenizerConfig
from lb.errors import ConfigError

if TYPE_CHECKING:
    import jinja2
    import jinja2.nodes

# Content part types vLLM reads as text, and the field each keeps its text in.
_TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text",
               "refusal": "refusal", "thinking": "thinking"}
# Every field of vLLM's content part types: any other key of a text part is passed on to an
# "openai"-format template (vllm/renderers/chat_utils.py _KNOWN_CONTENT_PART_FIELDS).
_KNOWN_PART_FIELDS = frozenset({
    "audio_embeds", "audio_url", "closed", "data", "file", "image_embeds", "image_pil",
    "image_url", "input_audio", "name", "prompt_cache_breakpoint", "refusal", "text",
    "thinking", "type", "uuid", "video_embeds", "video_url",
})
# apply_chat_template's own parameters: consumed by transformers, never template variables.
_HF_APPLY_PARAMS = frozenset({
    "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
})
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
_BILLING_HEADER = "x-anthropic-billing-header"


class PromptIds(Protocol):
    """Turns a validated completion or chat body into the engine's exact prompt token ids."""

    def ids(self, endpoint: str, body: Mapping[str, Any]) -> list[int] | None:
        """``endpoint`` is "completions" or "chat"; ``None`` when the ids cannot be exact."""
        ...


class _NotExact(Exception):
    """The body cannot be turned into one exact token sequence."""


# --- the body's fields, shared by every PromptIds ------------------------------------------


def _flag(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    raise _NotExact(name)


def _token_ids(value: Any) -> list[int] | None:
    if isinstance(value, list) and value and all(type(t) is int and t >= 0 for t in value):
        return list(value)
    return None


def _one_prompt(body: Mapping[str, Any]) -> str | list[int]:
    """The one prompt of a completions body: a string or token ids (a batch of one too)."""
    if body.get("prompt_embeds") is not None:
        raise _NotExact("prompt_embeds")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    ids = _token_ids(prompt)
    if ids is None:
        raise _NotExact("prompt")
    return ids


def _guarded(fn: Callable[[], list[int]]) -> list[int] | None:
    try:
        return fn()
    except Exception:  # client input: any failure means "route approximately"
        return None


# --- HF: tokenizer.json + the chat template -------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ChatTemplate:
    template: jinja2.Template
    source: str
    openai_format: bool
    """Whether the template loops over a message's content (vLLM's "openai" format)."""
    knows_developer: bool


class HFPromptIds:
    """Exact ids for a HuggingFace model: ``path`` is its directory or its tokenizer.json."""

    def __init__(self, path: str, chat_template: str | None = None) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError(
                "tokenizer.kind = \"hf\" needs the 'tokenizers' package (pip install pdlb[hf])"
            ) from None
        try:
            import jinja2  # noqa: F401
        except ImportError:
            raise ConfigError(
                "tokenizer.kind = \"hf\" needs the 'jinja2' package for chat templates "
                "(pip install pdlb[hf])"
            ) from None
        if not path:
            raise ConfigError("tokenizer.path: required for kind = \"hf\" (the model directory "
                              "or its tokenizer.json)")
        where = Path(path)
        model_dir = where if where.is_dir() else where.parent
        tokenizer_file = model_dir / "tokenizer.json" if where.is_dir() else where
        try:
            self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise ConfigError(
                f"tokenizer.path = {path!r}: cannot load {str(tokenizer_file)!r} ({exc})"
            ) from None
        self._batch_fast = getattr(self._tokenizer, "encode_batch_fast", None)
        config = _read_json(model_dir / "tokenizer_config.json")
        self.special_tokens = _special_tokens(config)
        """The template variables transformers adds: bos_token, eos_token... as strings."""
        env = _environment()
        sources = _template_sources(model_dir, config, chat_template)
        self._templates = {
            name: _compile(env, source, origin) for name, (source, origin) in sources.items()
        }

    @property
    def has_chat_template(self) -> bool:
        return bool(self._templates)

    def ids(self, endpoint: str, body: Mapping[str, Any]) -> list[int] | None:
        if endpoint == "chat":
            return _guarded(lambda: self._chat(body))
        if endpoint == "completions":
            return _guarded(lambda: self._completion(body))
        return None

    def _completion(self, body: Mapping[str, Any]) -> list[int]:
        if body.get("truncate_prompt_tokens") is not None:
            raise _NotExact("truncate_prompt_tokens")
        prompt = _one_prompt(body)
        if isinstance(prompt, list):
            return prompt
        return self._encode(prompt, _flag(body, "add_special_tokens", True))

    def _chat(self, body: Mapping[str, Any]) -> list[int]:
        if body.get("chat_template") is not None or body.get("truncate_prompt_tokens") is not None:
            raise _NotExact("chat_template")
        kwargs = _template_kwargs(body)
        chat = self._select(kwargs.get("tools"))
        messages = _conversation(body.get("messages"), chat.openai_format)
        if not chat.knows_developer and any(m["role"] == "developer" for m in messages):
            messages = _developer_as_system(messages)
        _decode_tool_arguments(messages)
        text = _render(chat, messages, kwargs, self.special_tokens)
        return self._encode(text, _flag(body, "add_special_tokens", False))

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        # encode_batch_fast (tokenizers >= 0.21) skips the offsets — a quarter faster — and,
        # unlike encode, lets other threads run meanwhile.
        if self._batch_fast is not None:
            encodings = self._batch_fast([text], add_special_tokens=add_special_tokens)
            ids: list[int] = encodings[0].ids
        else:
            ids = self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    def _select(self, tools: Any) -> _ChatTemplate:
        """transformers' get_chat_template: "tool_use" when there are tools, else "default"."""
        if tools is not None and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" in self._templates:
            return self._templates["default"]
        raise _NotExact("no chat template")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"tokenizer.path: cannot read {str(path)!r} ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"tokenizer.path: {str(path)!r} is not a JSON object")
    return data


def _special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    """Every ``*_token`` of tokenizer_config.json (a string or an AddedToken's content), and a
    named ``extra_special_tokens``, as transformers v5's special_tokens_map gives them."""
    out: dict[str, str] = {}
    named = config.get("extra_special_tokens")
    items = [*config.items(), *(named.items() if isinstance(named, dict) else ())]
    for key, value in items:
        if not key.endswith("_token"):
            continue
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def _template_sources(
    model_dir: Path, config: Mapping[str, Any], override: str | None
) -> dict[str, tuple[str, str]]:
    """The chat templates by name, each with where it came from (for error messages).

    vLLM's --chat-template wins; then, as transformers loads them, chat_template.jinja and
    additional_chat_templates/*.jinja over tokenizer_config.json's ``chat_template``."""
    if override is not None:
        try:
            return {"default": (Path(override).read_text(encoding="utf-8"), override)}
        except OSError as exc:
            raise ConfigError(f"tokenizer.chat_template = {override!r}: cannot read ({exc})") \
                from None
    found: dict[str, tuple[str, str]] = {}
    files = [("default", model_dir / "chat_template.jinja")]
    extra = model_dir / "additional_chat_templates"
    if extra.is_dir():
        files += [(p.stem, p) for p in sorted(extra.glob("*.jinja"))]
    for name, file in files:
        if file.is_file():
            try:
                found[name] = (file.read_text(encoding="utf-8"), str(file))
            except OSError as exc:
                raise ConfigError(f"tokenizer.path: cannot read {str(file)!r} ({exc})") from None
    if found:
        return found
    origin = str(model_dir / "tokenizer_config.json") + " chat_template"
    value = config.get("chat_template")
    if isinstance(value, str):
        return {"default": (value, origin)}
    if isinstance(value, list):
        for entry in value:
            if isinstance(entry, dict) and isinstance(entry.get("name"), str) \
                    and isinstance(entry.get("template"), str):
                found[entry["name"]] = (entry["template"], f"{origin} {entry['name']!r}")
    return found


def _environment() -> jinja2.Environment:
    """transformers' _compile_jinja_template environment (chat_template_utils.py)."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_generation_tag(), jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def _generation_tag() -> type[jinja2.ext.Extension]:
    """``{% generation %}...{% endgeneration %}`` (transformers' AssistantTracker) renders its
    body unchanged when no assistant mask is asked for, which is always the case here."""
    import jinja2.ext
    import jinja2.nodes

    class GenerationTag(jinja2.ext.Extension):
        tags = {"generation"}  # noqa: RUF012 (jinja2 declares it so)

        def parse(self, parser: Any) -> jinja2.nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_generation_support")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _generation_support(self, caller: Callable[[], str]) -> str:
            return caller()

    return GenerationTag


def _compile(env: jinja2.Environment, source: str, origin: str) -> _ChatTemplate:
    import jinja2

    try:
        template = env.from_string(source)
        tree = env.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"chat template {origin}: line {exc.lineno}: {exc.message}") from None
    return _ChatTemplate(
        template=template,
        source=source,
        openai_format=_loops_over_content(tree),
        knows_developer='"developer"' in source or "'developer'" in source,
    )


def _template_kwargs(body: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments vLLM gives apply_chat_template, merged in vLLM's order: the tools,
    under the request's chat_template_kwargs, under its explicit fields; None and "auto" unset.
    """
    user = body.get("chat_template_kwargs") or {}
    if not isinstance(user, dict) or {"chat_template", "tokenize", "messages"} & user.keys():
        raise _NotExact("chat_template_kwargs")
    add_generation_prompt = _flag(body, "add_generation_prompt", True)
    continue_final = _flag(body, "continue_final_message", False)
    if add_generation_prompt and continue_final:
        raise _NotExact("continue_final_message")  # vLLM answers 400
    effort = body.get("reasoning_effort")
    explicit: dict[str, Any] = {
        "add_generation_prompt": add_generation_prompt,
        "continue_final_message": continue_final,
        "documents": body.get("documents"),
        "reasoning_effort": effort,
    }
    if effort is not None and "enable_thinking" not in user:
        explicit["enable_thinking"] = effort != "none"
    tools = body.get("tools")
    defaults = {} if tools is None else {"tools": _tool_dicts(tools)}
    return _merge(defaults, _merge(user, explicit))


def _merge(defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """vLLM's merge_kwargs: an override of None or "auto" leaves the default."""
    out = dict(defaults)
    for key, value in overrides.items():
        if value is None or (isinstance(value, str) and value == "auto"):
            continue
        out[key] = value
    return out


def _tool_dicts(tools: Any) -> list[dict[str, Any]]:
    """The tools as vLLM's ChatCompletionToolsParam.model_dump() gives them to the template."""
    if not isinstance(tools, list):
        raise _NotExact("tools")
    out = []
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise _NotExact("tools")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _NotExact("tools")
        defer = tool.get("defer_loading")
        function = {"name": fn["name"], "description": fn.get("description"),
                    "parameters": fn.get("parameters")}
        if fn.get("strict") is not None:
            function["strict"] = fn["strict"]
        fn_defer = fn.get("defer_loading")
        if fn_defer is None:
            fn_defer = defer  # vLLM copies the tool's defer_loading into its function
        if fn_defer is not None:
            function["defer_loading"] = fn_defer
        dumped: dict[str, Any] = {"type": "function", "function": function}
        if defer is not None:
            dumped["defer_loading"] = defer
        out.append(dumped)
    return out


def _conversation(messages: Any, openai_format: bool) -> list[dict[str, Any]]:
    """vLLM's parse_chat_messages for text-only content (new dicts; the body is not touched)."""
    if not isinstance(messages, list) or not messages:
        raise _NotExact("messages")
    out: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _NotExact("messages")
        role: str = message["role"]
        texts, extras = _text_parts(message.get("content"), role == "system")
        content: Any
        if openai_format and role != "tool":
            content = [{"type": "text", "text": t, **e} for t, e in zip(texts, extras, strict=True)]
        else:
            content = "\n".join(texts)
        parsed: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant":
            if message.get("tool_calls") is not None:
                parsed["tool_calls"] = _tool_calls(message["tool_calls"])
            if message.get("reasoning") is not None:
                parsed["reasoning"] = parsed["reasoning_content"] = message["reasoning"]
        elif role == "tool" and "tool_call_id" in message:
            parsed["tool_call_id"] = message["tool_call_id"]
        for key in ("name", "task"):
            if isinstance(message.get(key), str):
                parsed[key] = message[key]
        if role == "developer":
            parsed["tools"] = message.get("tools")
        out.append(parsed)
    return out


def _text_parts(content: Any, system: bool) -> tuple[list[str], list[dict[str, Any]]]:
    """The texts of a message's content and each text part's extra fields; a non-text part
    (an image, audio, a tool reference) cannot be rendered without the model's processor."""
    if content is None:
        return [], []
    if isinstance(content, str):
        parts: Sequence[Any] = [content]
    elif isinstance(content, list):
        parts = content
    else:
        raise _NotExact("content")
    texts: list[str] = []
    extras: list[dict[str, Any]] = []
    for part in parts:
        text: Any
        extra: dict[str, Any]
        if isinstance(part, str):
            text, extra = part, {}
        elif isinstance(part, dict) and part.get("uuid") is None \
                and part.get("type") in _TEXT_PARTS:
            text = part.get(_TEXT_PARTS[part["type"]])
            if text is None and part["type"] in ("text", "refusal"):
                continue  # vLLM skips an empty text part
            extra = {k: v for k, v in part.items() if k not in _KNOWN_PART_FIELDS}
        else:
            raise _NotExact("content part")
        if not isinstance(text, str):
            raise _NotExact("content part")
        if system and text.startswith(_BILLING_HEADER):
            # vLLM drops Claude Code's per-request attribution line from system prompts.
            text = text.partition("\n")[2]
            if not text:
                continue
        texts.append(text)
        extras.append(extra)
    return texts, extras


def _tool_calls(calls: Any) -> list[Any]:
    """Copies of an assistant's tool calls, their fields in the order pydantic gives them."""
    if not isinstance(calls, list):
        raise _NotExact("tool_calls")
    out: list[Any] = []
    for call in calls:
        if not isinstance(call, dict):
            raise _NotExact("tool_calls")
        function = call.get("function")
        if isinstance(function, dict):
            function = _ordered(function, ("arguments", "name"))
        out.append(_ordered({**call, "function": function} if "function" in call else call,
                            ("id", "function", "type")))
    return out


def _ordered(d: Mapping[str, Any], first: tuple[str, ...]) -> dict[str, Any]:
    out = {k: d[k] for k in first if k in d}
    out.update((k, v) for k, v in d.items() if k not in out)
    return out


def _decode_tool_arguments(messages: list[dict[str, Any]]) -> None:
    """vLLM's _postprocess_messages: tool-call arguments become objects (malformed: {})."""
    for message in messages:
        calls = message.get("tool_calls")
        if message["role"] != "assistant" or not isinstance(calls, list):
            continue
        if not calls:
            del message["tool_calls"]
            continue
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or call.get("type", "function") != "function":
                raise _NotExact("tool_calls")
            arguments = function.get("arguments")
            if not arguments:
                function["arguments"] = {}
            elif not isinstance(arguments, dict):
                try:
                    parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
                except ValueError:
                    parsed = None
                function["arguments"] = parsed if isinstance(parsed, dict) else {}


def _developer_as_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """vLLM's developer → system conversion, then all system messages merged at the front."""
    converted = []
    for m in messages:
        if m["role"] == "developer":
            m = {k: v for k, v in m.items() if k != "tools"}
            m["role"] = "system"
        converted.append(m)
    systems: list[str] = []
    rest = []
    merge = False
    for i, m in enumerate(converted):
        if m["role"] != "system":
            rest.append(m)
            continue
        merge = merge or i > 0 or bool(systems)
        content = m.get("content", "")
        if isinstance(content, list):
            content = "\n".join(
                p["text"] if isinstance(p, dict) else p for p in content
                if (isinstance(p, dict) and "text" in p) or isinstance(p, str)
            )
        if content:
            systems.append(content)
    if not merge:
        return converted
    return [{"role": "system", "content": "\n\n".join(systems)}, *rest]


def _render(
    chat: _ChatTemplate,
    messages: list[dict[str, Any]],
    kwargs: Mapping[str, Any],
    special_tokens: Mapping[str, str],
) -> str:
    """transformers' render_jinja_template for one conversation, with its
    continue_final_message cut."""
    documents = kwargs.get("documents")
    if documents is not None and not all(isinstance(d, dict) for d in documents):
        raise _NotExact("documents")
    tools = kwargs.get("tools")
    if tools is not None and not all(isinstance(t, dict) for t in tools):
        raise _NotExact("tools")
    variables = {**special_tokens,
                 **{k: v for k, v in kwargs.items() if k not in _HF_APPLY_PARAMS}}
    final_text = ""
    continue_final = bool(kwargs.get("continue_final_message"))
    if continue_final:
        if "content" not in chat.source:
            raise _NotExact("continue_final_message")
        last = messages[-1]
        content = last.get("content")
        if isinstance(content, list):
            for part in reversed(content):
                if "text" in part:
                    final_text = part["text"]
                    part["text"] = final_text + _CONTINUE_TAG
                    break
            else:
                raise _NotExact("continue_final_message")
        elif isinstance(content, str):
            final_text = content
            last["content"] = content + _CONTINUE_TAG
        else:
            raise _NotExact("continue_final_message")
    rendered: str = chat.template.render(
        messages=messages, tools=tools, documents=documents,
        add_generation_prompt=bool(kwargs.get("add_generation_prompt")), **variables,
    )
    if continue_final:
        tag = _CONTINUE_TAG.strip()
        if final_text.strip() not in rendered or tag not in rendered:
            raise _NotExact("continue_final_message")
        at = rendered.rindex(tag)
        if rendered[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            rendered = rendered[:at]
        else:
            rendered = rendered[:at].rstrip()
    return rendered


# --- the template's content format, from its syntax tree (vLLM's _detect_content_format) ----


def _loops_over_content(tree: jinja2.nodes.Template) -> bool:
    """Whether a template iterates over a message's content ("openai" format) or not
    ("string"), by vllm/renderers/hf.py's walk of the syntax tree; an unusual tree that
    walk cannot follow counts as "string", as vLLM's default."""
    try:
        next(_content_loops(tree))
    except StopIteration:
        return False
    except Exception:
        return False
    return True


def _is_var(node: Any, name: str) -> bool:
    import jinja2.nodes as n

    return isinstance(node, n.Name) and node.ctx == "load" and node.name == name


def _is_attr(node: Any, name: str, key: str) -> bool:
    import jinja2.nodes as n

    if isinstance(node, n.Getitem):
        return _is_var(node.node, name) and isinstance(node.arg, n.Const) \
            and node.arg.value == key
    if isinstance(node, n.Getattr):
        return _is_var(node.node, name) and node.attr == key
    return False


def _is_var_or_elems(node: Any, name: str, key: str | None = None) -> bool:
    import jinja2.nodes as n

    if isinstance(node, n.Filter):
        return node.node is not None and _is_var_or_elems(node.node, name, key)
    if isinstance(node, n.Test):
        return _is_var_or_elems(node.node, name, key)
    if isinstance(node, n.Getitem) and isinstance(node.arg, n.Slice):
        return _is_var_or_elems(node.node, name, key)
    return _is_attr(node, name, key) if key else _is_var(node, name)


def _names_bound_to(root: Any, name: str) -> Iterator[str]:
    """``name`` and every variable assigned from it (or a filtered/sliced view of it)."""
    import jinja2.nodes as n

    yield name
    pending = deque([name])
    while pending:
        current = pending.popleft()
        for assign in root.find_all(n.Assign):
            if _is_var_or_elems(assign.node, current):
                if not isinstance(assign.target, n.Name):
                    raise _NotExact("unusual assignment")
                yield assign.target.name
                if assign.target.name != current:
                    pending.append(assign.target.name)


def _message_loop_vars(root: Any) -> Iterator[str]:
    import jinja2.nodes as n

    sources = list(_names_bound_to(root, "messages"))
    for loop in root.find_all(n.For):
        if any(_is_var_or_elems(loop.iter, s) for s in sources):
            if not isinstance(loop.target, n.Name):
                raise _NotExact("unusual loop")
            yield loop.target.name


def _content_loops(root: Any) -> Iterator[str]:
    """Loops over ``message.content``, over a macro parameter given it, or over ``content``."""
    import jinja2.nodes as n

    message_vars = list(_message_loop_vars(root))

    def is_content(node: Any) -> bool:
        return any(_is_var_or_elems(node, v, "content") for v in message_vars)

    params_by_loop: dict[int, set[str]] = {}
    in_macros: set[int] = set()
    for macro in root.find_all(n.Macro):
        names = {a.name for a in macro.args}
        params: set[str] = set()
        for call in root.find_all(n.Call):
            if isinstance(call.node, n.Name) and call.node.name == macro.name:
                params.update(macro.args[i].name for i, arg in enumerate(call.args)
                              if i < len(macro.args) and is_content(arg))
                params.update(kw.key for kw in call.kwargs
                              if isinstance(kw, n.Keyword) and kw.key in names
                              and is_content(kw.value))
        for loop in macro.find_all(n.For):
            in_macros.add(id(loop))
            if params:
                params_by_loop[id(loop)] = params
    for loop in root.find_all(n.For):
        bound = params_by_loop.get(id(loop))
        if is_content(loop.iter) or (
            isinstance(loop.iter, n.Name)
            and ((bound is not None and loop.iter.name in bound)
                 or (id(loop) not in in_macros and loop.iter.name == "content"))
        ):
            if not isinstance(loop.target, n.Name):
                raise _NotExact("unusual loop")
            yield loop.target.name


# --- the emulator ----------------------------------------------------------------------------


class EmulatorPromptIds:
    """Exact ids for pdlb's emulator (emulator/tokens.py), with its default ``--add-bos``."""

    def __init__(self) -> None:
        from emulator.tokens import Tokenizer

        self._tokenizer = Tokenizer()

    def ids(self, endpoint: str, body: Mapping[str, Any]) -> list[int] | None:
        if endpoint == "chat":
            return _guarded(lambda: self._tokenizer.render_chat(
                body.get("messages"), _flag(body, "add_generation_prompt", True)))
        if endpoint == "completions":
            return _guarded(lambda: self._completion(body))
        return None

    def _completion(self, body: Mapping[str, Any]) -> list[int]:
        prompt = _one_prompt(body)
        if isinstance(prompt, list):
            return prompt
        return self._tokenizer.encode_prompt(prompt, _flag(body, "add_special_tokens", True))


def make_prompt_ids(config: TokenizerConfig) -> PromptIds | None:
    """The local source of exact ids that ``[tokenizer]`` names, or None.

    ``token_ids = "off"`` and ``"backend"`` give None: with "backend" the caller asks a
    prefill backend itself (:func:`tokenize_on_backend`). ``"auto"`` gives one only for the
    exact kinds (hf, emulator); ``"local"`` is the same, and the config already refuses it
    with an inexact kind."""
    if config.token_ids in ("off", "backend"):
        return None
    if config.kind == "hf":
        return HFPromptIds(config.path or "", config.chat_template)
    if config.kind == "emulator":
        return EmulatorPromptIds()
    if config.token_ids == "local":
        raise ConfigError(f"tokenizer.token_ids = \"local\" needs an exact tokenizer "
                          f"(kind = \"hf\" or \"emulator\"), not {config.kind!r}")
    return None


# --- the backend's POST /tokenize ----------------------------------------------------------


def tokenize_request(endpoint: str, body: Mapping[str, Any]) -> dict[str, Any] | list[int] | None:
    """vLLM's /tokenize body for a client body (TokenizeCompletionRequest or
    TokenizeChatRequest), the ids themselves when the prompt already is token ids, or None
    when /tokenize cannot say (a batch, prompt_embeds, truncation)."""
    try:
        if body.get("truncate_prompt_tokens") is not None:
            return None
        if endpoint == "completions":
            prompt = _one_prompt(body)
            if isinstance(prompt, list):
                return prompt
            return {"model": body.get("model"), "prompt": prompt,
                    "add_special_tokens": _flag(body, "add_special_tokens", True)}
        if endpoint != "chat":
            return None
        kwargs = dict(body.get("chat_template_kwargs") or {})
        # /tokenize has no documents or reasoning_effort: the chat endpoint passes them to the
        # template as chat_template_kwargs, so they travel there.
        effort = body.get("reasoning_effort")
        if body.get("documents") is not None:
            kwargs["documents"] = body["documents"]
        if effort is not None:
            kwargs["reasoning_effort"] = effort
            kwargs.setdefault("enable_thinking", effort != "none")
        out: dict[str, Any] = {
            "model": body.get("model"),
            "messages": body.get("messages"),
            "add_generation_prompt": _flag(body, "add_generation_prompt", True),
            "continue_final_message": _flag(body, "continue_final_message", False),
            "add_special_tokens": _flag(body, "add_special_tokens", False),
        }
        if kwargs:
            out["chat_template_kwargs"] = kwargs
        for key in ("tools", "chat_template", "media_io_kwargs", "mm_processor_kwargs"):
            if body.get(key) is not None:
                out[key] = body[key]
        return out
    except Exception:  # client input: no /tokenize body
        return None


async def tokenize_on_backend(
    post_json: Callable[[str, bytes], Awaitable[Any]],
    base_url: str,
    endpoint: str,
    body: Mapping[str, Any],
) -> list[int] | None:
    """The prompt's ids from ``base_url``'s POST /tokenize; None on any failure.

    ``post_json(url, body_bytes)`` is the caller's HTTP client: it returns the decoded JSON
    answer (or raises). A prompt given as token ids costs no round trip."""
    request = tokenize_request(endpoint, body)
    if request is None or isinstance(request, list):
        return request
    try:
        answer = await post_json(base_url.rstrip("/") + "/tokenize", orjson.dumps(request))
    except Exception:  # the backend's trouble: route approximately
        return None
    return _token_ids(answer.get("tokens")) if isinstance(answer, dict) else None
