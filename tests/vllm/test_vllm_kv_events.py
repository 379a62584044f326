"""pdlb routing by REAL vLLM's KV-cache events (CPU build, tiny model, NixlConnector).

One prefill + decode pair started with ``launch-vllm --kv-events`` (``KV_EVENTS = True``
below: prefix caching on, a ZMQ publisher per engine on a free port) and one pdlb subprocess
in front of it with the configuration ``launch-vllm --kv-events --write-config`` writes:
``[kv_events]`` on (endpoints discovered from each server's ``GET /kv_event_sources``),
``kv_aware`` prefill routing, ``[tokenizer] kind = "hf"`` on the model directory (its
tokenizer.json and chat template: exact token ids), plus ``[admin]`` for
``POST /admin/kv/lookup``. Every request goes through pdlb with the official ``openai``
client. What is checked:

1. events fill pdlb's index: after a prompt of several of vLLM's blocks (the block size is
   read from ``/admin/state`` once the first event arrived, not assumed), the lookup shows the
   prefill holding its full blocks;
2. predictions are exact: for a repeat and an extension of a prompt, the lookup's cached
   tokens for the prefill equal the ``cached_tokens`` the client gets (pdlb stitches the
   prefill's count into the final usage; the prefill's own ``vllm:prefix_cache_hits_total``
   grows by the same number), for ``/v1/completions`` with a string prompt and for
   ``/v1/chat/completions`` (pdlb's tokenizer and chat template give vLLM's exact ids);
   ``pdlb_kv_predictions_total{outcome="exact"}`` counts up, ``over``/``under`` stay 0;
3. a restarted prefill clears its entries: null or 0 in the lookup right after, live and
   exact again after the next request.

After every test pdlb's in-flight counters (``/admin/state``) are back to zero. No timing
asserts; every wait is bounded. The restart (~30 s on 2 cores) is the expensive part; its
time goes to the ``vllm_timings`` summary.
"""

from __future__ import annotations

import json
import math
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer

from lb.tools.launch_vllm import VllmPool, backends_toml
from tests.vllm.pdlb_process import running_pdlb

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

KV_EVENTS = True  # conftest's vllm_pair: launch the pair with --kv-events
MODEL_NAME = "tiny"
ADMIN_TOKEN = "t"
IGNORE_EOS = {"ignore_eos": True}
REPO = Path(__file__).resolve().parents[2]
SENTENCE = "Line {i}: the engine keeps every block of the prompt in its cache. "


# ----------------------------------------------------------------- helpers
def wait_for(check: Callable[[], Any], limit_s: float, what: str) -> Any:
    """Poll ``check`` until it returns something truthy (returned), at most ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {limit_s} s")
        time.sleep(0.1)


def _json(url: str, body: Any = None, token: str | None = None, timeout: float = 30) -> Any:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.load(resp)


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``, scraped now."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    want = set(labels.items())
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples if s.name == name and want <= set(s.labels.items()))


class Pdlb:
    """The pdlb subprocess's admin and metrics answers."""

    def __init__(self, url: str, prefill: str, decode: str) -> None:
        self.url, self.prefill, self.decode = url, prefill, decode

    def state(self) -> dict[str, Any]:
        answer: dict[str, Any] = _json(f"{self.url}/admin/state", token=ADMIN_TOKEN)
        return answer

    def backend(self, pool: str, url: str) -> dict[str, Any]:
        found: dict[str, Any] = next(
            b for b in self.state()["pools"][pool]["backends"] if b["url"] == url)
        return found

    def events(self, pool: str = "prefill") -> dict[str, Any]:
        """The kv_events health of the pool's (only) backend."""
        events: dict[str, Any] = self.backend(pool, self.prefill if pool == "prefill"
                                              else self.decode)["kv_events"]
        return events

    def lookup(self, body: dict[str, Any]) -> dict[str, Any]:
        answer: dict[str, Any] = _json(f"{self.url}/admin/kv/lookup",
                                       {"model": MODEL_NAME, **body}, token=ADMIN_TOKEN)
        return answer

    def predicted(self, body: dict[str, Any]) -> int | None:
        """The prefill's cached tokens for this body, as pdlb's index says (None: unknown)."""
        cached: int | None = self.lookup(body)["pools"]["prefill"][self.prefill]
        return cached

    def predictions(self) -> dict[str, float]:
        return {o: metric(self.url, "pdlb_kv_predictions_total", pool="prefill", outcome=o)
                for o in ("exact", "over", "under")}

    def inflight(self) -> dict[str, int]:
        """Every in-flight counter /admin/state shows (pools and backends)."""
        out = {}
        for name, pool in self.state()["pools"].items():
            out[f"{name}.requests"] = pool["inflight_requests"]
            out[f"{name}.tokens"] = pool["inflight_tokens"]
            for b in pool["backends"]:
                out[f"{name}.{b['url']}.requests"] = b["inflight_requests"]
                out[f"{name}.{b['url']}.tokens"] = b["inflight_tokens"]
        return out


def full_blocks(prompt_tokens: int, block: int) -> int:
    """What vLLM can report cached for a prompt whose every full block is held: whole
    blocks of the prompt without its last token (vLLM always computes that one)."""
    return (prompt_tokens - 1) // block * block


def cached_tokens(usage: Any) -> int:
    details = usage.prompt_tokens_details
    return 0 if details is None or details.cached_tokens is None else int(details.cached_tokens)


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def _module_clock(vllm_timings: list[str]) -> Iterator[None]:
    started = time.monotonic()
    yield
    vllm_timings.append(f"test_vllm_kv_events.py: {time.monotonic() - started:.1f} s in all "
                        "(pair start-up and one prefill restart included)")


@pytest.fixture(scope="module")
def pdlb(vllm_pair: VllmPool, tiny_model: Path, tmp_path_factory,
         vllm_timings: list[str]) -> Iterator[Pdlb]:
    """pdlb (a real subprocess on a free port) with the config launch-vllm --kv-events
    writes, admin on, fast health checks; returned once it subscribed to both servers."""
    folder = tmp_path_factory.mktemp("pdlb-kv")
    config = folder / "backends.toml"
    config.write_text(
        backends_toml(vllm_pair.prefill_urls, vllm_pair.decode_urls, lb_port=0,
                      kv_events=True, model_dir=tiny_model)
        + f'\n[admin]\nenabled = true\ntoken = "{ADMIN_TOKEN}"\n'
        + "\n[health]\ninterval_s = 0.5\n"
    )
    log_path = folder / "pdlb.log"
    started = time.monotonic()
    with running_pdlb(config, log_path, "--log-level", "info") as url:
        p = Pdlb(url, vllm_pair.prefill_urls[0], vllm_pair.decode_urls[0])
        # Subscribed (state unknown: no event yet) to both, not still discovering.
        for pool in ("prefill", "decode"):
            wait_for(lambda pool=pool: p.events(pool)["state"] in ("unknown", "live"), 30,
                     f"pdlb subscribed to the {pool}'s KV events")
        vllm_timings.append(f"pdlb up and subscribed in {time.monotonic() - started:.1f} s "
                            f"(log {log_path})")
        yield p


@pytest.fixture
def client(pdlb: Pdlb) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{pdlb.url}/v1", api_key="unused", max_retries=0,
                       timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_model / "tokenizer.json"))


@pytest.fixture(autouse=True)
def _pdlb_idle_after(pdlb: Pdlb) -> Iterator[None]:
    """After every test all of pdlb's in-flight counters (/admin/state) are back to 0."""
    yield
    try:
        wait_for(lambda: not any(pdlb.inflight().values()), 10, "pdlb in-flight at zero")
    except AssertionError:
        pytest.fail(f"pdlb in-flight counters not zero: {pdlb.inflight()}")


@pytest.fixture(scope="module")
def block_size(pdlb: Pdlb, vllm_timings: list[str]) -> int:
    """vLLM's block size, from the first event pdlb received (a warm-up prompt of ~1000
    tokens, through pdlb: at least one full block on any block size up to that)."""
    started = time.monotonic()
    body = {"prompt": f"Warm-up {uuid.uuid4().hex}. " + "".join(
        SENTENCE.format(i=i) for i in range(70)), "max_tokens": 1, **IGNORE_EOS}
    _json(f"{pdlb.url}/v1/completions", {"model": MODEL_NAME, **body}, timeout=60)
    events = wait_for(lambda: (e := pdlb.events())["blocks"] > 0 and e, 20,
                      "the prefill's first BlockStored in pdlb's index")
    size = int(events["block_size"])
    vllm_timings.append(f"first KV event in pdlb's index {time.monotonic() - started:.1f} s "
                        f"after the warm-up request was sent; vLLM block size {size}")
    assert events["state"] == "live" and events["fresh"], events
    assert size > 0
    return size


def prompt_of(tokenizer: Tokenizer, tag: str, at_least: int, first: int = 0) -> str:
    """A unique text of at least ``at_least`` tokens (BOS included), built of SENTENCEs
    numbered from ``first``."""
    head = f"{tag} {uuid.uuid4().hex}. " if tag else ""
    per = len(tokenizer.encode(SENTENCE.format(i=10)).ids)
    n = max(1, math.ceil(at_least / per))
    while True:
        text = head + "".join(SENTENCE.format(i=first + i) for i in range(n))
        if len(tokenizer.encode(text).ids) >= at_least:
            return text
        n += 1


def _off_block(tokens: int, block: int) -> bool:
    return tokens % block not in (0, 1)


# ----------------------------------------------------------------- tests
def test_events_fill_the_index(client, pdlb, block_size, tokenizer):
    """A prompt of several blocks served through pdlb: its full blocks are in pdlb's index
    for the prefill (and the lookup's token count is what vLLM counted)."""
    before = pdlb.events()["blocks"]
    prompt = prompt_of(tokenizer, "Index", 4 * block_size + block_size // 2)
    assert pdlb.predicted({"prompt": prompt}) == 0  # live, and none of it held yet
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2,
                                  extra_body=IGNORE_EOS)
    assert r.usage is not None and cached_tokens(r.usage) == 0
    n = r.usage.prompt_tokens
    assert n >= 4 * block_size and _off_block(n, block_size)
    assert pdlb.lookup({"prompt": prompt})["prompt_tokens"] == n  # pdlb's ids: vLLM's count
    want = full_blocks(n, block_size)
    got = wait_for(lambda: pdlb.predicted({"prompt": prompt}) == want, 15,
                   f"lookup: the prefill holds {want} tokens of the prompt")
    assert got and want >= 4 * block_size
    events = pdlb.events()
    assert events["state"] == "live" and events["fresh"]
    assert events["blocks"] >= before + n // block_size
    assert metric(pdlb.url, "pdlb_kv_index_blocks", pool="prefill",
                  backend=pdlb.prefill) == events["blocks"]
    print(f"lookup after one {n}-token prompt: {pdlb.lookup({'prompt': prompt})}; "
          f"decode events: {pdlb.events('decode')}")


def test_completion_predictions_are_exact(client, pdlb, block_size, tokenizer, vllm_pair):
    """Repeat and extension of a completion prompt: predicted == reported cached tokens."""
    prompt = prompt_of(tokenizer, "Predict", 3 * block_size + block_size // 3)
    first = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2,
                                      extra_body=IGNORE_EOS)
    assert first.usage is not None
    n = first.usage.prompt_tokens
    assert _off_block(n, block_size)
    want = full_blocks(n, block_size)
    wait_for(lambda: pdlb.predicted({"prompt": prompt}) == want, 15, "the prompt's blocks")
    before = pdlb.predictions()
    hits_before = metric(vllm_pair.prefill_urls[0], "vllm:prefix_cache_hits_total")

    # The same prompt again, not streamed.
    predicted = pdlb.predicted({"prompt": prompt})
    again = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2,
                                      extra_body=IGNORE_EOS)
    assert again.usage is not None
    assert predicted == cached_tokens(again.usage) == want > 0

    # An extension: everything but the partial last block is cached; streamed this time.
    longer = prompt + prompt_of(tokenizer, "", 2 * block_size, first=100)
    predicted_longer = pdlb.predicted({"prompt": longer})
    stream = client.completions.create(model=MODEL_NAME, prompt=longer, max_tokens=2,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body=IGNORE_EOS)
    usages = [c.usage for c in stream if c.usage is not None]
    assert len(usages) == 1
    assert predicted_longer == cached_tokens(usages[0]) == want
    assert usages[0].prompt_tokens > n + block_size

    # What the client saw is what the prefill itself counted as hits.
    prefill = vllm_pair.prefill_urls[0]
    wait_for(lambda: metric(prefill, "vllm:prefix_cache_hits_total") - hits_before >= 2 * want,
             5, "the prefill's prefix-cache hits counted")
    assert metric(prefill, "vllm:prefix_cache_hits_total") - hits_before == 2 * want
    after = pdlb.predictions()
    assert after["exact"] - before["exact"] == 2, (before, after)
    assert after["over"] == after["under"] == 0, after
    assert metric(pdlb.url, "pdlb_kv_route_picks_total", pool="prefill", source="events") > 0


def test_chat_predictions_are_exact(client, pdlb, block_size, tokenizer, vllm_pair):
    """Chat: pdlb's tokenizer and chat template give vLLM's exact ids, so the prediction for
    a repeat and for a continued conversation equals the cached tokens vLLM reports."""
    prefill = vllm_pair.prefill_urls[0]
    system = prompt_of(tokenizer, "Chat", 3 * block_size + block_size // 2)
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": "Name a river, please."}]
    vllm_count = _json(f"{prefill}/tokenize", {"model": MODEL_NAME, "messages": messages,
                                                "add_generation_prompt": True})["count"]
    assert pdlb.lookup({"messages": messages})["prompt_tokens"] == vllm_count
    before = pdlb.predictions()

    first = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=2,
                                           extra_body=IGNORE_EOS)
    assert first.usage is not None and first.usage.prompt_tokens == vllm_count
    assert cached_tokens(first.usage) == 0
    want = full_blocks(vllm_count, block_size)
    wait_for(lambda: pdlb.predicted({"messages": messages}) == want, 15,
             "lookup: the conversation's blocks (pdlb's chat ids = vLLM's)")

    predicted = pdlb.predicted({"messages": messages})
    again = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=2,
                                           extra_body=IGNORE_EOS)
    assert again.usage is not None
    assert predicted == cached_tokens(again.usage) == want > 0

    # The conversation goes on: the first turn's rendering is its prefix.
    turn = [*messages, {"role": "assistant", "content": "The Rhine."},
            {"role": "user", "content": "And another one?"}]
    predicted_turn = pdlb.predicted({"messages": turn})
    stream = client.chat.completions.create(model=MODEL_NAME, messages=turn, max_tokens=2,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body=IGNORE_EOS)
    usages = [c.usage for c in stream if c.usage is not None]
    assert len(usages) == 1
    # (== want unless the tokens at the end of the first rendering, around the generation
    # prompt, tokenize differently once the answer follows them: a block less then)
    assert predicted_turn == cached_tokens(usages[0]) > 0
    assert predicted_turn in (want, want - block_size)

    after = pdlb.predictions()
    # first (predicted 0, reported 0), repeat, next turn: all three exact
    assert after["exact"] - before["exact"] == 3, (before, after)
    assert after["over"] == after["under"] == 0, after


def test_restarted_prefill_clears_its_entries(client, pdlb, block_size, tokenizer, vllm_pair,
                                              vllm_timings):
    """A restarted prefill starts empty: its entries leave pdlb's index (null or 0), and
    after the next request its events are live again and predictions exact."""
    prompt = prompt_of(tokenizer, "Restart", 3 * block_size + block_size // 2)
    first = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2,
                                      extra_body=IGNORE_EOS)
    assert first.usage is not None
    want = full_blocks(first.usage.prompt_tokens, block_size)
    wait_for(lambda: pdlb.predicted({"prompt": prompt}) == want, 15, "the prompt's blocks")
    health_before = pdlb.events()

    started = time.monotonic()
    took = vllm_pair.restart("prefill", 0)
    vllm_timings.append(f"prefill restart: {time.monotonic() - started:.1f} s "
                        f"(healthy {took:.1f} s after spawn)")

    # Old blocks gone the moment pdlb saw the engine go (publisher disconnect, ejection).
    wait_for(lambda: pdlb.predicted({"prompt": prompt}) in (None, 0), 10,
             "lookup no longer shows the old engine's blocks")
    events = pdlb.events()
    assert events["blocks"] == 0 and not events["fresh"], events
    noticed = {k: events[k] - health_before[k] for k in ("disconnects", "restarts")}
    vllm_timings.append(f"pdlb noticed the restart by: {noticed} (state {events['state']})")
    wait_for(lambda: pdlb.backend("prefill", pdlb.prefill)["healthy"], 30,
             "pdlb sees the restarted prefill healthy")

    before = pdlb.predictions()
    fresh = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2,
                                      extra_body=IGNORE_EOS)
    assert fresh.usage is not None and cached_tokens(fresh.usage) == 0  # a new, empty engine
    wait_for(lambda: pdlb.predicted({"prompt": prompt}) == want, 15,
             "the restarted prefill's events live in pdlb's index")
    events = pdlb.events()
    assert events["state"] == "live" and events["fresh"], events

    again = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2,
                                      extra_body=IGNORE_EOS)
    assert again.usage is not None and cached_tokens(again.usage) == want
    after = pdlb.predictions()
    # the first request after the restart found the backend unknown (no prediction); the
    # repeat was predicted from the new engine's events
    assert after["exact"] - before["exact"] == 1, (before, after)
    assert after["over"] == after["under"] == 0, after


def test_pdlb_idle_at_the_end(pdlb):
    """Nothing in flight anywhere in pdlb once the module's requests are done."""
    wait_for(lambda: not any(pdlb.inflight().values()), 10, "pdlb in-flight at zero")
    state = pdlb.state()
    assert state["admission"] == {"prefill": 0, "decode": 0}, state["admission"]
