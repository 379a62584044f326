"""Load scraping (vLLM /metrics lines) and prefix hashes."""

from __future__ import annotations

import asyncio

from lb.backends.scrape import parse_vllm_load
from lb.prefix import BLOCK_BYTES, prefix_hashes

METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
vllm:num_requests_running{engine="1",model_name="tiny"} 2.0
vllm:num_requests_waiting{engine="0",model_name="tiny"} 4.0
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="tiny"} 0.25
vllm:prompt_tokens_total{engine="0",model_name="tiny"} 99.0
"""


def test_parse_vllm_load_sums_engines_and_averages_kv():
    load = parse_vllm_load(METRICS)
    assert load.running == 5 and load.waiting == 4 and load.kv_usage == 0.375


def test_parse_vllm_load_old_kv_name_and_garbage():
    load = parse_vllm_load("vllm:gpu_cache_usage_perc 0.9\nvllm:num_requests_running x\n")
    assert load.kv_usage == 0.9 and load.running == 0


def test_prefix_hashes_share_leading_blocks():
    system = "You are a helpful assistant. " * 20
    a = prefix_hashes("completions", {"prompt": system + "What is 2+2?"})
    b = prefix_hashes("completions", {"prompt": system + "Name a colour, please, now."})
    shared = len(system) // BLOCK_BYTES
    assert a[:shared] == b[:shared]
    assert prefix_hashes("completions", {"prompt": "x" * 10}) == ()


def test_chat_prefix_covers_all_messages():
    base = [{"role": "system", "content": "s" * 200}]
    a = prefix_hashes("chat", {"messages": [*base, {"role": "user", "content": "a" * 200}]})
    b = prefix_hashes("chat", {"messages": [*base, {"role": "user", "content": "b" * 200}]})
    assert a[0] == b[0] and a[-1] != b[-1]


def test_parse_cache_config_capacity():
    text = ('vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="1000"} 1.0\n'
            'vllm:cache_config_info{engine="1",kv_cache_size_tokens="5000"} 1.0\n')
    assert parse_vllm_load(text).kv_capacity_tokens == 21000
    assert parse_vllm_load("vllm:num_requests_running 1\n").kv_capacity_tokens is None


async def test_auto_budget_follows_scraped_capacity(start_pdlb):
    """max_inflight_tokens = "auto": the decode budget is what the backends report."""
    import aiohttp

    from lb.serve.app import PROXY
    from tests.conftest import make_config
    from tests.fake_vllm import FakeBehaviour, make_fake, run_app

    metrics = 'vllm:cache_config_info{block_size="16",num_gpu_blocks="10"} 1.0\n'
    p, d = FakeBehaviour(), FakeBehaviour(metrics_text=metrics)
    async with run_app(make_fake("prefill", p)) as pu, run_app(make_fake("decode", d)) as du:
        cfg = make_config([pu], [du], pools={"decode": {"max_inflight_tokens": "auto"}},
                          scrape={"interval_s": 0.05})
        url, app = await start_pdlb(cfg)
        stage = app[PROXY].admission._stages["decode"]
        for _ in range(100):
            if stage.limit is not None:
                break
            await asyncio.sleep(0.02)
        assert stage.limit == 160
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/v1/completions",
                                 json={"prompt": "x", "max_tokens": 500}) as r:
                assert r.status == 413
            async with http.post(url + "/v1/completions",
                                 json={"prompt": "x", "max_tokens": 10}) as r:
                assert r.status == 200
