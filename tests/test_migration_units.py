"""The pure parts of stream migration: what a transcript reads, the continuation it builds,
the cases it refuses, and how a continuation's events are rewritten (lb/migration.py,
lb/stream/resume.py). The end-to-end behaviour is tests/test_migration.py's."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from lb.connectors.base import PrefillResult
from lb.migration import Transcript, continuation, refusal
from lb.stream.resume import RecordingRelay, ResumeRelay


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def chat_chunk(content: str | None = None, role: bool = False, finish: str | None = None,
               ids: list[int] | None = None, **top: Any) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                              "finish_reason": finish}
    if ids is not None:
        choice["token_ids"] = ids
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7,
            "model": "m", "choices": [choice], **top}


def text_chunk(text: str, ids: list[int] | None = None, prompt_ids: list[int] | None = None,
               finish: str | None = None) -> dict[str, Any]:
    return {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m",
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                         "prompt_token_ids": prompt_ids, "token_ids": ids}]}


def recorded(t: Transcript, *events: bytes, split: int = 7) -> None:
    """Feed ``events`` through a recording relay in awkward pieces, then parse them."""
    relay = RecordingRelay(None, t)
    data = b"".join(events)
    for i in range(0, len(data), split):
        relay.feed(data[i:i + split])
    relay.flush()
    t.settle()


def test_transcript_reads_text_ids_and_the_prompt_ids_from_recorded_pieces():
    """Pieces split mid-event are joined; text, token ids and prompt ids are all kept."""
    t = Transcript({"prompt": "p", "max_tokens": 10}, chat=False)
    recorded(t, event(text_chunk("He", [1], prompt_ids=[9, 8])), event(text_chunk("llo", [2])),
             event(text_chunk("", [3])))
    assert (t.text, t.token_ids, t.prompt_token_ids, t.generated) == ("Hello", [1, 2, 3],
                                                                      [9, 8], 3)
    assert (t.id, t.created, t.model, t.finish) == ("cmpl-1", 7, "m", None)


def test_completions_continuation_uses_ids_when_the_stream_had_them():
    t = Transcript({"prompt": "p", "max_tokens": 10, "min_tokens": 2, "seed": 3}, chat=False)
    recorded(t, event(text_chunk("a", [1], prompt_ids=[9, 8])), event(text_chunk("b", [2])))
    body = continuation("completions", t)
    assert body == {"prompt": [9, 8, 1, 2], "max_tokens": 8, "min_tokens": 0, "seed": 3}


def test_completions_continuation_falls_back_to_text_and_the_default_max_tokens():
    t = Transcript({"prompt": "Once"}, chat=False)
    recorded(t, event(text_chunk(" upon")), event(text_chunk(" a")))
    assert continuation("completions", t) == {"prompt": "Once upon a", "max_tokens": 14}


def test_a_token_id_prompt_without_generated_ids_is_not_continued():
    t = Transcript({"prompt": [1, 2, 3], "max_tokens": 9}, chat=False)
    recorded(t, event(text_chunk(" x")))
    assert isinstance(continuation("completions", t), str)


def test_chat_continuation_appends_the_partial_assistant_message():
    messages = [{"role": "user", "content": "hi"}]
    t = Transcript({"messages": messages, "max_completion_tokens": 6}, chat=True)
    recorded(t, event(chat_chunk("", role=True)), event(chat_chunk("Hel")),
             event(chat_chunk("lo")))
    body = continuation("chat", t)
    assert body == {"messages": [*messages, {"role": "assistant", "content": "Hello"}],
                    "max_completion_tokens": 4, "continue_final_message": True,
                    "add_generation_prompt": False}
    assert t.role_sent and t.generated == 2


def test_chat_that_already_continues_a_message_extends_it():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure:"}]
    t = Transcript({"messages": messages, "continue_final_message": True,
                    "add_generation_prompt": False, "max_tokens": 5}, chat=True)
    recorded(t, event(chat_chunk(" one")))
    body = continuation("chat", t)
    assert isinstance(body, dict)
    assert body["messages"][-1] == {"role": "assistant", "content": "Sure: one"}
    assert body["max_tokens"] == 4


def test_no_tokens_left_is_not_continued():
    t = Transcript({"prompt": "p", "max_tokens": 2}, chat=False)
    recorded(t, event(text_chunk("a")), event(text_chunk("b")))
    assert continuation("completions", t) == "no tokens left to generate"


@pytest.mark.parametrize(("endpoint", "extra"), [
    ("completions", {"n": 2}), ("completions", {"best_of": 3}), ("completions", {"echo": True}),
    ("completions", {"logprobs": 1}), ("completions", {"prompt_logprobs": 1}),
    ("completions", {"prompt": ["a", "b"]}), ("chat", {"tool_choice": "required"}),
    ("chat", {"response_format": {"type": "json_object"}}),
    ("chat", {"structured_outputs": {"regex": "a+"}}), ("chat", {"guided_json": {}}),
    ("completions", {"use_beam_search": True}),
])
def test_refused_cases(endpoint, extra):
    """The table of docs/migration.md: each of these ends with the SSE error instead."""
    assert refusal(endpoint, {"prompt": "p", "messages": [], **extra}) is not None


@pytest.mark.parametrize(("endpoint", "extra"), [
    ("completions", {}), ("completions", {"prompt": ["one"]}), ("chat", {"logprobs": True}),
    ("chat", {"tools": [{"type": "function"}], "tool_choice": "auto"}),
    ("chat", {"response_format": {"type": "text"}}), ("completions", {"seed": 1}),
])
def test_continued_cases(endpoint, extra):
    assert refusal(endpoint, {"prompt": "p", "messages": [], **extra}) is None


def test_tool_calls_or_reasoning_in_flight_stop_a_continuation():
    t = Transcript({"messages": [{"role": "user", "content": "x"}]}, chat=True)
    tool = chat_chunk()
    tool["choices"][0]["delta"]["tool_calls"] = [{"index": 0, "function": {"name": "f"}}]
    recorded(t, event(tool))
    assert t.why_not() == "a tool call was being streamed"
    t = Transcript({"messages": [{"role": "user", "content": "x"}]}, chat=True)
    think = chat_chunk()
    think["choices"][0]["delta"]["reasoning_content"] = "hmm"
    recorded(t, event(think))
    assert t.why_not() == "reasoning content was being streamed"


def resumed(t: Transcript, *events: bytes) -> list[Any]:
    relay = ResumeRelay(t)
    out = relay.feed(b"".join(events)) + relay.flush()
    return [e[6:] if e[6:] == b"[DONE]" else orjson.loads(e[6:])
            for e in out.split(b"\n\n") if e]


def test_a_continuations_events_continue_the_first_legs_stream():
    """Same id/created/model, no second role chunk, one usage counting everything once."""
    t = Transcript({"messages": []}, chat=True)
    recorded(t, event(chat_chunk("", role=True)), event(chat_chunk("a")),
             event(chat_chunk("b")))
    t.prompt_tokens = 10
    t.prefill = PrefillResult(handoff={}, prompt_tokens=10, cached_tokens=4,
                              usage={"prompt_tokens": 10})
    second = {"id": "chatcmpl-2", "created": 99, "model": "other"}
    usage = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15,
             "prompt_tokens_details": {"cached_tokens": 12}}
    out = resumed(t, event(chat_chunk("", role=True, prompt_token_ids=[1, 2], **second)),
                  event(chat_chunk("c", **second)),
                  event(chat_chunk("d", finish="length", **second)),
                  event({**second, "object": "chat.completion.chunk", "choices": [],
                         "usage": usage}), b"data: [DONE]\n\n")
    assert len(out) == 4 and out[-1] == b"[DONE]"
    for chunk in out[:3]:
        assert (chunk["id"], chunk["created"], chunk["model"]) == ("chatcmpl-1", 7, "m")
        assert "prompt_token_ids" not in chunk
        for choice in chunk["choices"]:
            assert "role" not in choice["delta"]
    assert out[2]["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                               "prompt_tokens_details": {"cached_tokens": 4}}
    assert t.text == "abcd" and t.finish == "length"


def test_a_continuation_without_a_known_prefill_drops_its_own_cached_figure():
    t = Transcript({"prompt": "p"}, chat=False)
    recorded(t, event(text_chunk("a", [5], prompt_ids=[1, 2, 3])))
    t.prompt_tokens = 3
    usage = {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6,
             "prompt_tokens_details": {"cached_tokens": 4}}
    out = resumed(t, event(text_chunk("b", [6], prompt_ids=[1, 2, 3, 5])),
                  event({"id": "x", "object": "text_completion", "created": 1, "model": "m",
                         "choices": [], "usage": usage}))
    assert out[0]["choices"][0]["prompt_token_ids"] is None
    assert out[1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
                               "prompt_tokens_details": None}


def test_an_in_band_error_event_is_held_back_and_breaks_the_stream():
    """vLLM's error-after-200 (error event, then [DONE]) is not relayed: no [DONE] seen, so
    the stream breaks and may migrate; the message is kept for the log and a final error."""
    t = Transcript({"prompt": "p", "max_tokens": 9}, chat=False)
    relay = RecordingRelay(None, t)
    error = {"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}
    out = relay.feed(event(text_chunk("a")) + event(text_chunk("b")) + event(error)[:20])
    out += relay.feed(event(error)[20:] + b"data: [DONE]\n\n")
    out += relay.feed(event(text_chunk("late"))) + relay.flush()
    assert out == event(text_chunk("a")) + event(text_chunk("b"))
    assert not relay.saw_done and t.backend_error == "engine died"
    t.settle()
    assert t.text == "ab"


def test_a_word_error_in_the_text_is_not_an_error_event():
    t = Transcript({"prompt": "p"}, chat=False)
    relay = RecordingRelay(None, t)
    data = event(text_chunk("error")) + b"data: [DONE]\n\n"
    assert relay.feed(data) == data and relay.saw_done and t.backend_error is None


def test_a_continuations_error_event_is_held_back_too():
    t = Transcript({"prompt": "p"}, chat=False)
    recorded(t, event(text_chunk("a")))
    relay = ResumeRelay(t)
    out = relay.feed(event(text_chunk("b")) + event({"error": {"message": "again"}})
                     + b"data: [DONE]\n\n") + relay.flush()
    assert out.count(b"data: ") == 1 and not relay.saw_done and t.backend_error == "again"


def test_the_emulator_continues_a_final_message_like_the_generation_prompt_plus_text():
    """continue_final_message renders the prompt an uninterrupted run had, then the text."""
    from emulator.tokens import Tokenizer

    tok = Tokenizer()
    messages = [{"role": "user", "content": "hi there"}]
    first = tok.render_chat(messages)
    partial = tok.render_chat([*messages, {"role": "assistant", "content": "Hello world"}],
                              add_generation_prompt=False, continue_final_message=True)
    assert partial == first + tok.encode("Hello world")


def test_nothing_generated_yet_sends_the_request_as_it_was():
    """A break right after the role chunk: the original body, not an empty assistant turn."""
    origin = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 5}
    t = Transcript(origin, chat=True)
    recorded(t, event(chat_chunk("", role=True)))
    assert continuation("chat", t) == origin and t.role_sent


def test_a_continuations_last_event_without_its_blank_line_is_rewritten_too():
    t = Transcript({"prompt": "p"}, chat=False)
    recorded(t, event(text_chunk("a")))
    relay = ResumeRelay(t)
    tail = b"data: " + orjson.dumps({**text_chunk("b", finish="length"), "id": "other"})
    out = relay.feed(tail) + relay.flush()
    assert orjson.loads(out.split(b"\n\n")[0][6:])["id"] == "cmpl-1"
