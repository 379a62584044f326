"""Token counting and the NIXL connector's handshake details."""

from __future__ import annotations

import asyncio
import time

import pytest

from lb.config import TokenizerConfig
from lb.connectors.base import BackendRef, Dispatch
from lb.connectors.nixl import NixlConnector
from lb.errors import PrefillFailed
from lb.request import parse_request
from lb.tokens import EstimateCounter, PromptTokenizer, make_counter

TIKTOKEN = PromptTokenizer(make_counter(TokenizerConfig()), offload_chars=16_384)


async def test_tiktoken_counts_completions_forms():
    assert await TIKTOKEN.count("completions", {"prompt": "hello world"}) == 2
    assert await TIKTOKEN.count("completions", {"prompt": [1, 2, 3]}) == 3
    assert await TIKTOKEN.count("completions", {"prompt": [[1, 2], [3]]}) == 3
    assert await TIKTOKEN.count("completions", {"prompt": ["hello", "world"]}) == 2


async def test_chat_counts_text_plus_template_allowance():
    body = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "hello world"}]}]}
    n = await TIKTOKEN.count("chat", body)
    assert 10 < n < 25


async def test_long_prompt_is_counted_off_the_loop():
    """A 2 MB prompt is counted in a thread: the loop keeps ticking meanwhile."""
    prompt = "lorem ipsum dolor sit amet " * 80_000
    ticks = 0
    stop = False

    async def ticker() -> None:
        nonlocal ticks
        while not stop:
            ticks += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ticker())
    started = time.perf_counter()
    n = await TIKTOKEN.count("completions", {"prompt": prompt})
    elapsed = time.perf_counter() - started
    stop = True
    await task
    assert n > 300_000
    if elapsed > 0.05:  # only meaningful when counting took a while
        assert ticks > 3


def test_estimate_counter():
    assert EstimateCounter().count("abcd" * 10) == 10


PARAMS = {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [[1]],
          "remote_engine_id": "e", "remote_request_id": "r", "remote_host": "localhost",
          "remote_port": 5600, "tp_size": 1, "remote_prefill_cached_tokens": 32}


@pytest.mark.parametrize(
    "mode,backend_url,advertised,expected",
    [
        ("auto", "http://10.1.2.3:8100", "localhost", "10.1.2.3"),
        ("auto", "http://10.1.2.3:8100", "0.0.0.0", "10.1.2.3"),
        ("auto", "http://10.1.2.3:8100", "10.9.9.9", "10.9.9.9"),
        ("auto", "http://127.0.0.1:8100", "localhost", "localhost"),
        ("never", "http://10.1.2.3:8100", "localhost", "localhost"),
        ("always", "http://10.1.2.3:8100", "10.9.9.9", "10.1.2.3"),
    ],
)
def test_remote_host_rewrite(mode, backend_url, advertised, expected):
    connector = NixlConnector({"rewrite_remote_host": mode})
    backend = BackendRef.of(backend_url)
    dispatch = Dispatch(request_id="r", prefill=backend, decode=None)
    result = connector.accept_prefill({"kv_transfer_params": {**PARAMS, "remote_host": advertised}},
                                      dispatch)
    assert result.handoff is not None and result.handoff["remote_host"] == expected
    assert result.cached_tokens == 32  # from remote_prefill_cached_tokens


def test_incomplete_params_are_a_prefill_failure():
    connector = NixlConnector({})
    dispatch = Dispatch(request_id="r", prefill=BackendRef.of("http://127.0.0.1:1"),
                        decode=None)
    with pytest.raises(PrefillFailed) as info:
        connector.accept_prefill({"kv_transfer_params": {"remote_host": "x"}}, dispatch)
    assert info.value.reason == "incomplete_kv_transfer_params"
    with pytest.raises(PrefillFailed):
        connector.accept_prefill({"kv_transfer_params": {}}, dispatch)


def test_chat_prefill_body_caps_max_completion_tokens():
    import orjson

    req = parse_request(orjson.dumps({"messages": [{"role": "user", "content": "x"}],
                                      "max_completion_tokens": 50, "stream": True,
                                      "stream_options": {"include_usage": True}}), "chat", {})
    dispatch = Dispatch(request_id="r", prefill=BackendRef.of("http://h:1"),
                        decode=None)
    body = NixlConnector({}).prefill_body(req, dispatch)
    assert body["max_tokens"] == 1 and body["max_completion_tokens"] == 1
    assert body["stream"] is False and "stream_options" not in body
    assert req.body["max_completion_tokens"] == 50  # the client's body is untouched


def test_hf_tokenizer_file_counts_exactly(tmp_path):
    """kind = "hf": a tokenizer.json (here a tiny word-level one built on the spot)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    counter = make_counter(TokenizerConfig(kind="hf", path=str(path)))
    assert counter.count("hello world hello unknown") == 4


def _byte_level_bpe(path):
    """A small byte-level BPE tokenizer.json (Llama-3's kind), trained on the spot."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog", "lorem ipsum dolor sit amet",
              "héllo wörld, 你好 🦙", "def f(x):\n    return x + 1"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|bos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return Tokenizer.from_file(str(path))


HF_TEXTS = ["", "hello", "the quick brown fox", "héllo wörld 🦙 你好 — unseen wörds",
            "<|bos|>x<|bos|>", "  spaces\n\ttabs  ", "lorem ipsum " * 500]


def test_hf_counter_counts_what_encode_gives(tmp_path):
    """HFCounter (encode_batch_fast, which releases the GIL) counts as Tokenizer.encode does."""
    tok = _byte_level_bpe(tmp_path / "tokenizer.json")
    counter = make_counter(TokenizerConfig(kind="hf", path=str(tmp_path)))
    for text in HF_TEXTS:
        assert counter.count(text) == len(tok.encode(text, add_special_tokens=False).ids), text


async def test_hf_long_prompt_is_counted_off_the_loop(tmp_path):
    """kind = "hf": a long prompt counted in a thread lets the loop tick (encode would not)."""
    _byte_level_bpe(tmp_path / "tokenizer.json")
    tokenizer = PromptTokenizer(make_counter(TokenizerConfig(kind="hf", path=str(tmp_path))),
                                offload_chars=16_384)
    prompt = "lorem ipsum dolor sit amet " * 40_000
    ticks = 0
    stop = False

    async def ticker() -> None:
        nonlocal ticks
        while not stop:
            ticks += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ticker())
    started = time.perf_counter()
    n = await tokenizer.count("completions", {"prompt": prompt})
    elapsed = time.perf_counter() - started
    stop = True
    await task
    assert n > 40_000
    if elapsed > 0.1:  # only meaningful when counting took a while; encode: 2 or 3 ticks
        assert ticks > 10, (elapsed, ticks)


def test_hf_tokenizer_bad_path_is_a_config_error(tmp_path):
    from lb.errors import ConfigError

    with pytest.raises(ConfigError, match=r"tokenizer\.path"):
        make_counter(TokenizerConfig(kind="hf", path=str(tmp_path / "missing.json")))
