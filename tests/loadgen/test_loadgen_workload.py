"""Workloads: exact prompt lengths in real tokens, groups, sessions, datasets, seeds."""

from __future__ import annotations

import random
from pathlib import Path

import orjson
import pytest

from loadgen.config import LoadConfig
from loadgen.runner import build_workload
from loadgen.tokenizer import load_tokenizer
from loadgen.workload import (
    MIXES,
    LengthDist,
    RandomWorkload,
    TextMaker,
    detect_format,
    load_jsonl,
    load_sharegpt,
)


@pytest.fixture(scope="module")
def maker() -> TextMaker:
    return TextMaker(load_tokenizer())


def test_prompts_have_exact_token_lengths(maker: TextMaker) -> None:
    """A prompt of N stable words is exactly N tokens of the client tokenizer."""
    rng = random.Random(0)
    for n in (1, 7, 128, 1000):
        assert maker.tokenizer.count(maker.make(rng, n)) == n


def test_length_distribution_stats() -> None:
    """Truncated normal: mean near the target, all within [min, max]."""
    d = LengthDist(mean=200, std=50, min=100, max=300)
    rng = random.Random(1)
    xs = [d.sample(rng) for _ in range(5000)]
    assert min(xs) >= 100 and max(xs) <= 300
    assert sum(xs) / len(xs) == pytest.approx(200, rel=0.03)
    ln = LengthDist(mean=200, std=100, dist="lognormal")
    ys = [ln.sample(rng) for _ in range(20000)]
    assert sum(ys) / len(ys) == pytest.approx(200, rel=0.05)
    assert LengthDist(mean=64).sample(rng) == 64
    with pytest.raises(ValueError, match="max"):
        LengthDist(mean=10, min=20, max=5)


def test_random_workload_is_deterministic_per_index(maker: TextMaker) -> None:
    """Item i is the same whoever builds it and in whatever order (workers rely on it)."""
    w1 = RandomWorkload(text=maker, input_len=LengthDist(50, 10), output_len=LengthDist(8),
                        seed=5)
    w2 = RandomWorkload(text=maker, input_len=LengthDist(50, 10), output_len=LengthDist(8),
                        seed=5)
    assert w1.item(17) == w2.item(17)
    assert w1.item(3) != w1.item(4)
    it = w1.item(17)
    assert maker.tokenizer.count(it.turns[0].text or "") == it.turns[0].input_len


def test_shared_prefix_groups(maker: TextMaker) -> None:
    """N system prompts each shared by M questions: N*M items per epoch, M per group."""
    w = RandomWorkload(text=maker, input_len=LengthDist(20), output_len=LengthDist(4),
                       seed=1, prefix_groups=3, prefix_len=40, questions_per_group=5)
    items = [w.item(i) for i in range(15)]
    groups = [it.group for it in items]
    assert sorted(groups) == sorted([0, 1, 2] * 5)
    by_group: dict[int, set[str]] = {}
    for it in items:
        assert it.group is not None and it.system is not None
        by_group.setdefault(it.group, set()).add(it.system)
    assert all(len(s) == 1 for s in by_group.values())
    assert len({next(iter(s)) for s in by_group.values()}) == 3
    assert maker.tokenizer.count(items[0].system or "") == 40


def test_multi_turn_items(maker: TextMaker) -> None:
    """turns=3 gives three user turns per item, each with its own lengths."""
    w = RandomWorkload(text=maker, input_len=LengthDist(10), output_len=LengthDist(4),
                       turns=3)
    assert len(w.item(0).turns) == 3


def test_jsonl_dataset(tmp_path: Path) -> None:
    """prompt or messages, max_tokens, timestamp; errors name file and line."""
    p = tmp_path / "reqs.jsonl"
    p.write_text(
        '{"prompt": "hello there", "max_tokens": 5, "timestamp": 0.0}\n'
        '\n'
        '{"messages": [{"role": "user", "content": "hi"}], "timestamp": 1.5}\n'
    )
    w = load_jsonl(p, LengthDist(7))
    assert w.size == 2
    assert w.item(0).turns[0].text == "hello there"
    assert w.item(0).turns[0].max_tokens == 5
    assert w.item(1).turns[0].messages == ({"role": "user", "content": "hi"},)
    assert w.item(1).turns[0].max_tokens == 7
    assert w.timestamps() == [0.0, 1.5]
    assert w.item(2).turns == w.item(0).turns  # cycled
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n{"max_tokens": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_jsonl(bad, LengthDist(7))


def test_sharegpt_dataset(tmp_path: Path) -> None:
    """Human turns are prompts; the gpt answer's token length is max_tokens; short
    conversations are filtered as vLLM does."""
    tok = load_tokenizer()
    convs = [
        {"conversations": [{"from": "human", "value": "tell me a long story about a cat"},
                           {"from": "gpt", "value": "once upon a time there was a cat"},
                           {"from": "human", "value": "and then what happened to the cat"},
                           {"from": "gpt", "value": "the cat slept all day in the sun"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
    ]
    p = tmp_path / "sg.json"
    p.write_bytes(orjson.dumps(convs))
    assert detect_format(p) == "sharegpt"
    w = load_sharegpt(p, tok.count, turns=2)
    assert w.size == 1
    turns = w.item(0).turns
    assert len(turns) == 2
    assert turns[0].max_tokens == tok.count("once upon a time there was a cat")


def test_mixes_resolve_through_config() -> None:
    """A named mix sets lengths (and endpoint/turns for chat); explicit values win."""
    cfg = LoadConfig(url="http://x", rate=1, duration_s=1, mix="input-heavy")
    assert cfg.resolved_input_len == MIXES["input-heavy"].input_len
    assert cfg.resolved_input_len.mean > cfg.resolved_output_len.mean * 4
    chat = LoadConfig(url="http://x", rate=1, duration_s=1, mix="chat")
    assert chat.resolved_endpoint == "chat" and chat.resolved_turns == 3
    own = LoadConfig(url="http://x", rate=1, duration_s=1, mix="output-heavy",
                     input_len=LengthDist(5))
    assert own.resolved_input_len == LengthDist(5)
    w = build_workload(cfg)
    assert w.item(0).turns[0].input_len is not None


def test_config_errors_name_the_setting() -> None:
    """Bad settings fail at construction, naming the setting."""
    with pytest.raises(ValueError, match="concurrency"):
        LoadConfig(url="http://x", rate=1, concurrency=2, duration_s=1)
    with pytest.raises(ValueError, match="duration"):
        LoadConfig(url="http://x", rate=1)
    with pytest.raises(ValueError, match="url"):
        LoadConfig(url="x", rate=1, duration_s=1)
    with pytest.raises(ValueError, match="mix"):
        LoadConfig(url="http://x", rate=1, duration_s=1, mix="nope")


def test_hf_tokenizer_json(tmp_path: Path) -> None:
    """A HuggingFace tokenizer.json is loaded with `tokenizers`; prompts are built from it."""
    tokenizers = pytest.importorskip("tokenizers")
    words = [f"w{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(200)]
    vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    hf = load_tokenizer(str(path))
    assert hf.name == str(path)
    made = TextMaker(hf).make(random.Random(0), 50)
    assert hf.count(made) == 50
