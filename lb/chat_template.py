"""A chat request's prompt text, rendered through the model's chat template as vLLM renders it.

vLLM turns a chat body into text with the model's jinja2 chat template (through transformers'
``apply_chat_template``) before it tokenizes it; ``kv_aware`` routing needs that exact text,
since one character off shifts every token after it and misses every KV block the engines
report. transformers and vLLM are far too heavy to import into pdlb, so this module
reproduces the part of them that renders text-only chats — and says so, by raising
:class:`NotExact`, whenever it cannot be sure its text is the engine's.
:class:`lb.prompt_ids.HFPromptIds` tokenizes what :meth:`ChatTemplate.render` returns
(tests/test_prompt_ids.py runs vLLM's own code on the same bodies).

What vLLM 0.32 does, and what is reproduced here:

* the templates: vLLM's ``--chat-template`` (``[tokenizer] chat_template``) wins; else, as
  transformers loads them, ``chat_template.jinja`` and ``additional_chat_templates/*.jinja``
  over tokenizer_config.json's ``chat_template`` (a string, or a list of named ones); a
  request with tools gets the "tool_use" template when there is one, else "default". They
  are compiled once, in transformers' sandboxed environment (``tojson``,
  ``raise_exception``, ``strftime_now``, ``{% generation %}``, loop controls).
* the messages: vLLM rebuilds each message before the template sees it
  (``parse_chat_messages``): only role, content, name, and per role tool_calls / reasoning /
  tool_call_id / tools are kept; text parts (``text``, ``input_text``, ``output_text``,
  ``refusal``, ``thinking``) are joined with "\\n" into one string for a template of the
  "string" content format, or kept as ``{"type": "text", "text": ...}`` parts for an "openai"
  one (a template that loops over a message's content; detected from the template's syntax
  tree once, as vLLM does); a string content becomes a one-part list for an "openai"
  template; assistant tool-call arguments are JSON-decoded into objects; "developer" messages
  become "system" when the template does not know that role.
* the variables: the tokenizer's special tokens (every ``*_token`` of tokenizer_config.json),
  ``tools`` (as vLLM's pydantic model dumps them), ``documents``,
  ``reasoning_effort``/``enable_thinking``, ``chat_template_kwargs`` and
  ``add_generation_prompt``; ``continue_final_message`` is cut as transformers cuts it.
* not reproduced, so :class:`NotExact`: image/audio/video, tool-reference and other non-text
  parts (their placeholders need the model's processor), a part with a ``uuid``, a
  per-request ``chat_template``, a body whose flags are not plain booleans, a template that
  raises; and silently not known: the server's ``--default-chat-template-kwargs`` and its
  processor's chat template (a multimodal model's ``chat_template.json``), which vLLM prefers
  to the tokenizer's when a request has no tools.

Rendering costs tens of microseconds (the template is compiled at construction); a
:class:`ChatTemplate` is safe to share between threads.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


class NotExact(ValueError):
    """A body that cannot be turned into exactly the text (or ids) vLLM would; the message
    names the field or the reason."""


def flag(body: Mapping[str, Any], name: str, default: bool) -> bool:
    """A boolean field of a body as vLLM's pydantic model accepts it (None: the default)."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    raise NotExact(name)


@dataclass(frozen=True, slots=True)
class _Template:
    template: jinja2.Template
    source: str
    openai_format: bool
    """Whether the template loops over a message's content (vLLM's "openai" format)."""
    knows_developer: bool


class ChatTemplate:
    """A model's chat templates, compiled, and the special tokens they are rendered with."""

    def __init__(
        self, templates: Mapping[str, _Template], special_tokens: Mapping[str, str]
    ) -> None:
        self._templates = dict(templates)
        self.special_tokens = dict(special_tokens)
        """The template variables transformers adds: bos_token, eos_token... as strings."""

    @classmethod
    def from_model(cls, path: str | Path, override: str | None = None) -> ChatTemplate:
        """The templates of the model at ``path`` (its directory, or a file in it such as its
        tokenizer.json), or only the template file ``override`` (vLLM's --chat-template);
        :class:`~lb.errors.ConfigError` naming the file when one cannot be read or compiled.
        A model without a template loads: :meth:`render` then raises :class:`NotExact`."""
        try:
            import jinja2  # noqa: F401
        except ImportError:
            raise ConfigError(
                "tokenizer.kind = \"hf\" needs the 'jinja2' package for chat templates "
                "(pip install pdlb[hf])"
            ) from None
        where = Path(path)
        model_dir = where if where.is_dir() else where.parent
        config = _read_json(model_dir / "tokenizer_config.json")
        env = _environment()
        sources = _template_sources(model_dir, config, override)
        templates = {
            name: _compile(env, source, origin) for name, (source, origin) in sources.items()
        }
        return cls(templates, _special_tokens(config))

    @property
    def names(self) -> list[str]:
        """The templates' names ("default", "tool_use"...); empty when the model has none."""
        return list(self._templates)

    def render(self, body: Mapping[str, Any]) -> str:
        """The prompt text vLLM renders for a validated chat body (not yet tokenized; the
        body is not changed). :class:`NotExact` when it cannot be exact, the template's own
        errors included."""
        if body.get("chat_template") is not None:
            raise NotExact("chat_template")
        kwargs = _template_kwargs(body)
        chat = self._select(kwargs.get("tools"))
        messages = _conversation(body.get("messages"), chat.openai_format)
        if not chat.knows_developer and any(m["role"] == "developer" for m in messages):
            messages = _developer_as_system(messages)
        _decode_tool_arguments(messages)
        return _render(chat, messages, kwargs, self.special_tokens)

    def _select(self, tools: Any) -> _Template:
        """transformers' get_chat_template: "tool_use" when there are tools, else "default"."""
        if tools is not None and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" in self._templates:
            return self._templates["default"]
        raise NotExact("no chat template")


# --- loading: the files, the environment, compiling -----------------------------------------


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


def _compile(env: jinja2.Environment, source: str, origin: str) -> _Template:
    import jinja2

    try:
        template = env.from_string(source)
        tree = env.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"chat template {origin}: line {exc.lineno}: {exc.message}") from None
    return _Template(
        template=template,
        source=source,
        openai_format=_loops_over_content(tree),
        knows_developer='"developer"' in source or "'developer'" in source,
    )


# --- the body: vLLM's template arguments and its rebuilt messages -------------------------


def _template_kwargs(body: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments vLLM gives apply_chat_template, merged in vLLM's order: the tools,
    under the request's chat_template_kwargs, under its explicit fields; None and "auto" unset.
    """
    user = body.get("chat_template_kwargs") or {}
    if not isinstance(user, dict) or {"chat_template", "tokenize", "messages"} & user.keys():
        raise NotExact("chat_template_kwargs")
    add_generation_prompt = flag(body, "add_generation_prompt", True)
    continue_final = flag(body, "continue_final_message", False)
    if add_generation_prompt and continue_final:
        raise NotExact("continue_final_message")  # vLLM answers 400
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
        raise NotExact("tools")
    out = []
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise NotExact("tools")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise NotExact("tools")
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
        raise NotExact("messages")
    out: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise NotExact("messages")
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
        raise NotExact("content")
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
            raise NotExact("content part")
        if not isinstance(text, str):
            raise NotExact("content part")
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
        raise NotExact("tool_calls")
    out: list[Any] = []
    for call in calls:
        if not isinstance(call, dict):
            raise NotExact("tool_calls")
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
                raise NotExact("tool_calls")
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
    chat: _Template,
    messages: list[dict[str, Any]],
    kwargs: Mapping[str, Any],
    special_tokens: Mapping[str, str],
) -> str:
    """transformers' render_jinja_template for one conversation, with its
    continue_final_message cut."""
    documents = kwargs.get("documents")
    if documents is not None and not all(isinstance(d, dict) for d in documents):
        raise NotExact("documents")
    tools = kwargs.get("tools")
    if tools is not None and not all(isinstance(t, dict) for t in tools):
        raise NotExact("tools")
    variables = {**special_tokens,
                 **{k: v for k, v in kwargs.items() if k not in _HF_APPLY_PARAMS}}
    final_text = ""
    continue_final = bool(kwargs.get("continue_final_message"))
    if continue_final:
        if "content" not in chat.source:
            raise NotExact("continue_final_message")
        last = messages[-1]
        content = last.get("content")
        if isinstance(content, list):
            for part in reversed(content):
                if "text" in part:
                    final_text = part["text"]
                    part["text"] = final_text + _CONTINUE_TAG
                    break
            else:
                raise NotExact("continue_final_message")
        elif isinstance(content, str):
            final_text = content
            last["content"] = content + _CONTINUE_TAG
        else:
            raise NotExact("continue_final_message")
    try:
        rendered: str = chat.template.render(
            messages=messages, tools=tools, documents=documents,
            add_generation_prompt=bool(kwargs.get("add_generation_prompt")), **variables,
        )
    except Exception as exc:  # raise_exception(), a sandbox refusal, a template's type error
        raise NotExact(f"the chat template raised {type(exc).__name__}: {exc}") from exc
    if continue_final:
        tag = _CONTINUE_TAG.strip()
        if final_text.strip() not in rendered or tag not in rendered:
            raise NotExact("continue_final_message")
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
                    raise NotExact("unusual assignment")
                yield assign.target.name
                if assign.target.name != current:
                    pending.append(assign.target.name)


def _message_loop_vars(root: Any) -> Iterator[str]:
    import jinja2.nodes as n

    sources = list(_names_bound_to(root, "messages"))
    for loop in root.find_all(n.For):
        if any(_is_var_or_elems(loop.iter, s) for s in sources):
            if not isinstance(loop.target, n.Name):
                raise NotExact("unusual loop")
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
                raise NotExact("unusual loop")
            yield loop.target.name
