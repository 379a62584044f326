"""pdlb's ``shared_storage`` connector in front of REAL vLLM (CPU build, ExampleConnector).

One prefill + decode pair sharing a folder (vLLM's ExampleConnector, ``kv_producer`` /
``kv_consumer``) and one pdlb subprocess with ``[kv_transfer] connector = "shared_storage"``
serve the module. The proxy adds no handshake: prefill with ``max_tokens = 1``, then decode
with the client's body; what proves the KV moved is the decode's own counters:

* ExampleConnector loads the prompt's first ``align(len - 1, block)`` tokens from the folder
  (the CPU backend's blocks are 128 tokens), so ``vllm:prompt_tokens_by_source_total
  {source="external_kv_transfer"}`` grows by exactly that and ``local_compute`` by the rest
  (less than one block) — on a decode that never saw the prompt;
* the prefill wrote the prompt's KV files into the shared folder.

Uses the fixtures of tests/vllm/conftest.py (``vllm_env``, ``tiny_model``, ``vllm_timings``);
the pair is its own (the conftest's ``vllm_pair`` is NIXL).
"""

from __future__ import annotations

import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer

from lb.tools.launch_vllm import LaunchConfig, VllmLaunchError, VllmPool, backends_toml
from tests.vllm.pdlb_process import running_pdlb

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(420)]

MODEL_NAME = "tiny"
CPU_BLOCK = 128
KV_SOURCE = "vllm:prompt_tokens_by_source_total"
REPO = Path(__file__).resolve().parents[2]


def metric(url: str, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    want = set(labels.items())
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples if s.name == name and want <= set(s.labels.items()))


def sources(url: str) -> dict[str, float]:
    return {src: metric(url, KV_SOURCE, source=src)
            for src in ("external_kv_transfer", "local_compute", "local_cache_hit")}


def wait_for(check, limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {limit_s} s")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kv-store")


@pytest.fixture(scope="module")
def storage_pair(vllm_env: Path, tiny_model: Path, store: Path,
                 tmp_path_factory: pytest.TempPathFactory,
                 vllm_timings: list[str]) -> Iterator[VllmPool]:
    config = LaunchConfig(
        model=str(tiny_model), vllm=(str(vllm_env / "bin" / "vllm"),), base_port=0,
        side_channel_port=0, served_model_name=MODEL_NAME, max_model_len=2048,
        connector="shared_storage", shared_storage_path=str(store),
        run_dir=tmp_path_factory.mktemp("vllm-shared-storage"), startup_timeout_s=300.0,
        stop_timeout_s=20.0,
    )
    started = time.monotonic()
    pool = VllmPool(config)
    try:
        pool.start()
    except VllmLaunchError as exc:
        pytest.fail(f"the shared-storage vLLM pair did not start: {exc}", pytrace=False)
    vllm_timings.append(f"shared-storage pair healthy after {time.monotonic() - started:.1f} s")
    try:
        yield pool
    finally:
        pool.stop()
        vllm_timings.append(f"shared-storage pair logs in {pool.run_dir / 'logs'}")


@pytest.fixture(scope="module")
def pdlb_url(storage_pair: VllmPool, tiny_model: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("pdlb-shared-storage")
    config = folder / "backends.toml"
    config.write_text(
        backends_toml(storage_pair.prefill_urls, storage_pair.decode_urls,
                      connector="shared_storage", lb_port=0)
        + f'\n[tokenizer]\nkind = "hf"\npath = "{tiny_model / "tokenizer.json"}"\n'
        + "\n[health]\ninterval_s = 0.5\n"
    )
    with running_pdlb(config, folder / "pdlb.log") as url:
        yield url


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_model / "tokenizer.json"))


@pytest.fixture
def client(pdlb_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{pdlb_url}/v1", api_key="unused", max_retries=0,
                       timeout=120) as c:
        yield c


def long_prompt(tokenizer: Tokenizer, tag: str, at_least: int = 300) -> tuple[str, int]:
    """A prompt no server has seen, of at least ``at_least`` tokens (two CPU blocks)."""
    words = f"{tag} {uuid.uuid4().hex}:"
    while len(tokenizer.encode(words).ids) < at_least:
        words += " the river runs under the old stone bridge"
    return words, len(tokenizer.encode(words).ids)


def expect_loaded(prompt_tokens: int) -> int:
    """What ExampleConnector loads: the prompt minus its last token, in whole blocks."""
    return (prompt_tokens - 1) // CPU_BLOCK * CPU_BLOCK


def test_completion_loads_the_prompt_from_the_shared_store(client, storage_pair, store,
                                                           tokenizer):
    """The decode loads the prefill's KV from the folder: external_kv_transfer grows by the
    block-aligned prompt, local_compute only by the tail."""
    decode = storage_pair.decode_urls[0]
    prompt, n = long_prompt(tokenizer, "completion")
    before = sources(decode)
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=8,
                                  extra_body={"ignore_eos": True})
    assert r.usage is not None and r.usage.prompt_tokens == n
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    loaded = expect_loaded(n)
    wait_for(lambda: sources(decode)["external_kv_transfer"] - before["external_kv_transfer"]
             >= loaded, 10, "the decode's external_kv_transfer counter")
    after = sources(decode)
    delta = {k: after[k] - before[k] for k in after}
    assert delta == {"external_kv_transfer": loaded, "local_compute": n - loaded,
                     "local_cache_hit": 0}, delta
    assert any(store.rglob("*.safetensors")), "the prefill wrote no KV into the shared folder"


def test_stream_through_shared_storage(client, storage_pair, tokenizer, pdlb_url):
    """A streamed completion with usage: tokens arrive, usage is the prompt's, KV loaded;
    pdlb's in-flight gauges are back at zero afterwards."""
    decode = storage_pair.decode_urls[0]
    prompt, n = long_prompt(tokenizer, "stream")
    before = sources(decode)
    stream = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    usages = [c.usage for c in stream if c.usage is not None]
    assert len(usages) == 1 and usages[0].prompt_tokens == n
    assert usages[0].completion_tokens == 6
    wait_for(lambda: sources(decode)["external_kv_transfer"] - before["external_kv_transfer"]
             >= expect_loaded(n), 10, "the decode's external_kv_transfer counter")
    wait_for(lambda: not any(metric(pdlb_url, name, pool=pool)
                             for name in ("pdlb_pool_inflight_tokens",
                                          "pdlb_pool_inflight_requests")
                             for pool in ("prefill", "decode")), 10,
             "pdlb in-flight gauges at zero")
