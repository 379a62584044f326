"""The emulator's configuration: one frozen dataclass, every field documented.

Every field is also a command-line flag (``--time-scale``, ``--fail-rate`` ...): the CLI
builds its parser from :func:`dataclasses.fields` of :class:`EmulatorConfig`, reading each
field's ``help`` metadata, so a field added here is a flag with no other change.

Times in the performance model are *model* seconds (what an H100 would take); the emulator
sleeps ``model_time / time_scale`` of wall time. Fault-knob times (``extra_latency_ms``)
are wall-clock, so resilience tests can reason about their own timeouts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

ROLES = ("prefill", "decode", "both")
KV_LOAD_FAILURE_POLICIES = ("fail", "recompute")
KV_CONNECTORS = ("nixl", "nixl_push", "mooncake", "p2p_nccl", "sglang", "shared_storage")


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class EmulatorConfig:
    """Everything an emulated vLLM 0.32 server needs; see docs/emulator.md for the reasoning
    behind each default (H100-class GPU, Llama-3-8B in bf16)."""

    # --- identity and protocol -------------------------------------------------------
    role: str = _f(
        "both",
        "prefill | decode | both. prefill and decode emulate NixlConnector (pull mode): "
        "a request with kv_transfer_params.do_remote_decode has its KV held for a decode "
        "to pull; one with do_remote_prefill pulls it. both is a plain colocated server "
        "with no KV connector (kv_transfer_params are ignored).",
        ROLES,
    )
    model: str = _f("emulated-model", "Served model name (/v1/models, `model` checks).")
    lora_modules: str = _f(
        "",
        "LoRA adapters served beside the model, like vLLM's --lora-modules: comma-separated "
        "name or name=path. Listed in /v1/models with parent = the model; more can be loaded "
        "and unloaded at run time (POST /v1/load_lora_adapter, /v1/unload_lora_adapter).",
    )
    seed: int = _f(0, "Seed of the deterministic output text and of the fault dice.")
    time_scale: float = _f(
        1.0, "Speed-up over real time: 10 runs the performance model ten times faster."
    )
    max_model_len: int = _f(8192, "Context length (prompt + output) in tokens.")
    enable_prompt_tokens_details: bool = _f(
        True,
        "Like vLLM's --enable-prompt-tokens-details: usage.prompt_tokens_details."
        "cached_tokens is reported.",
    )
    enable_request_id_headers: bool = _f(
        False, "Like vLLM's --enable-request-id-headers: echo X-Request-Id in responses."
    )
    api_key: str | None = _f(
        None, "Like vLLM's --api-key: /v1/* then needs 'Authorization: Bearer KEY'."
    )
    add_bos: bool = _f(
        True, "Prepend a BOS token to string prompts of /v1/completions (Llama-3 style)."
    )
    eos_probability: float = _f(
        0.0,
        "Chance (deterministic per seed/prompt/position) that a generated token is EOS. "
        "0 means every request runs to max_tokens unless a stop condition hits.",
    )
    # --- KV transfer (connector emulation; docs/emulator.md, docs/connectors.md) -------
    kv_connector: str = _f(
        "nixl",
        "Which KV-transfer connector prefill/decode roles emulate: nixl (NixlConnector pull), "
        "nixl_push (NixlPushConnector: transfer_id, decode waits for the push), mooncake "
        "(transfer_id, bootstrap GET /query on this server), p2p_nccl (addresses in "
        "X-Request-Id), sglang (bootstrap_host/port/room in the body; this server is the "
        "bootstrap server), shared_storage (ExampleConnector/LMCache: KV files in "
        "shared_storage_path keyed by the prompt).",
        KV_CONNECTORS,
    )
    kv_wait_timeout_s: float = _f(
        60.0,
        "nixl_push, mooncake, p2p_nccl, sglang: how long (model seconds) a decode waits for "
        "the prefill's KV to arrive before kv_load_failure_policy applies.",
    )
    data_parallel_size: int = _f(
        1,
        "Data-parallel ranks this server pretends to have: X-data-parallel-rank must be "
        "below it, and each rank has its own engine id (<engine_id>_dp<rank> when > 1), "
        "listed by mooncake's GET /query.",
    )
    shared_storage_path: str | None = _f(
        None, "shared_storage: the folder both engines share (required in that mode)."
    )
    request_id_randomization: bool = _f(
        False,
        "p2p_nccl: key the KV by the engine's internal request id, which vLLM >= #27987 "
        "suffixes randomly per engine (so prefill and decode never match) — unless "
        "VLLM_DISABLE_REQUEST_ID_RANDOMIZATION=1, which False stands for.",
    )
    side_channel_host: str = _f(
        "localhost",
        "Advertised as remote_host in kv_transfer_params (VLLM_NIXL_SIDE_CHANNEL_HOST).",
    )
    side_channel_port: int | None = _f(
        None,
        "Advertised as remote_port; None advertises the emulator's own HTTP port, where "
        "the emulated side channel (/_emulator/kv/pull) lives.",
    )
    engine_id: str | None = _f(None, "remote_engine_id to advertise; None = a random UUID.")
    kv_lease_s: float = _f(
        30.0,
        "How long a prefill holds KV blocks for a decode to pull (NixlConnector "
        "kv_lease_duration), in model seconds: the wall-clock lease is kv_lease_s / time_scale.",
    )
    kv_pull_timeout_s: float = _f(
        11.0,
        "When the prefill named in the params cannot be reached, the decode gives up after "
        "this many model seconds (vLLM 0.32 on CPU answered 500 after 11.1 s).",
    )
    kv_load_failure_policy: str = _f(
        "fail",
        "What a decode does when the prefill cannot be reached: fail (vLLM 0.32 default: "
        "the request errors, 500 / an error event) or recompute (prefill locally).",
        KV_LOAD_FAILURE_POLICIES,
    )
    decode_reports_transferred_as_cached: bool = _f(
        False,
        "False = vLLM 0.32: a decode reports the prefill's count "
        "(kv_transfer_params.remote_prefill_cached_tokens) as cached_tokens. True = older "
        "vLLM (bugs #47136, #44607): it reports the transferred tokens as cached.",
    )
    # --- KV-cache events (vLLM --kv-events-config; emulator/kv_events.py) -----------------
    kv_events_endpoint: str | None = _f(
        None,
        "Publish vLLM's KV-cache events (ZMQ PUB, msgpack EventBatch) on this endpoint, "
        "e.g. tcp://*:5557 (vLLM's endpoint); None = off (GET /kv_event_sources answers {}).",
    )
    kv_events_replay_endpoint: str | None = _f(
        None, "ZMQ ROUTER endpoint answering replay requests, as vLLM's replay_endpoint."
    )
    kv_events_topic: str = _f("kv", "ZMQ topic of the events (vLLM's kv-events topic).")
    # --- performance model ------------------------------------------------------------
    block_size: int = _f(16, "KV-cache block size in tokens (prefix-cache granularity).")
    kv_capacity_tokens: int = _f(
        400_000,
        "KV-cache capacity in tokens (H100 80 GB, 8B bf16 weights, 0.9 memory utilisation, "
        "128 KiB/token: ~400k). Requests wait when it is full; running ones get preempted.",
    )
    max_num_seqs: int = _f(1024, "Most sequences in one batch (vLLM default on H100).")
    max_num_batched_tokens: int = _f(
        8192, "Token budget of one engine step (chunked prefill; vLLM default on H100)."
    )
    step_base_ms: float = _f(
        10.0,
        "Fixed cost of every engine step (weights read, kernel launches, sampling, scheduling).",
    )
    decode_per_seq_ms: float = _f(0.05, "Extra step time per decoding sequence in the batch.")
    decode_per_kv_token_us: float = _f(
        0.04,
        "Extra step time per context token a decoding sequence attends to (128 KiB read at "
        "~3.3 TB/s).",
    )
    prefill_tokens_per_s: float = _f(
        12_000.0, "Prefill throughput: uncached prompt tokens computed per model second."
    )
    kv_bytes_per_token: int = _f(131_072, "KV bytes per token (Llama-3-8B bf16: 128 KiB).")
    kv_transfer_latency_ms: float = _f(1.5, "Fixed latency of one KV transfer (RDMA setup).")
    kv_transfer_bandwidth_gb_s: float = _f(
        25.0, "KV transfer bandwidth in GB/s (a 200-400 Gb/s NIC)."
    )
    recent_requests_max: int = _f(100, "How many received requests /_emulator/state keeps.")
    # --- fault knobs (initial values; POST /_emulator/faults changes them at run time) --
    fail_rate: float = _f(0.0, "Fraction (0..1) of completion requests answered 500.")
    drop_after_chunks: int | None = _f(
        None,
        "Close the TCP connection after N streamed data events (no [DONE]); a non-streamed "
        "request is closed before its body. None = off.",
    )
    omit_kv_params: bool = _f(
        False, "A prefill answers without kv_transfer_params (and frees the blocks)."
    )
    extra_latency_ms: float = _f(
        0.0, "Wall-clock milliseconds added before the first byte of every completion."
    )
    unhealthy: bool = _f(False, "/health answers 503.")
    stop_after_first_token: bool = _f(
        False,
        "The prefill's one token is EOS: finish_reason 'stop' and no kv_transfer_params "
        "(the pitfall seen with older NixlConnector and other connectors).",
    )

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"EmulatorConfig.{name}={getattr(self, name)!r}: {why}")

        if self.role not in ROLES:
            raise bad("role", f"must be one of {', '.join(ROLES)}")
        if self.kv_connector not in KV_CONNECTORS:
            raise bad("kv_connector", f"must be one of {', '.join(KV_CONNECTORS)}")
        if self.kv_connector == "shared_storage" and not self.shared_storage_path:
            raise bad("shared_storage_path", "kv_connector shared_storage needs a folder")
        if self.data_parallel_size < 1:
            raise bad("data_parallel_size", "must be at least 1")
        if self.kv_load_failure_policy not in KV_LOAD_FAILURE_POLICIES:
            raise bad("kv_load_failure_policy", "must be fail or recompute")
        if not (math.isfinite(self.time_scale) and self.time_scale > 0):
            raise bad("time_scale", "must be a positive number")
        for name in ("max_model_len", "block_size", "kv_capacity_tokens", "max_num_seqs",
                     "max_num_batched_tokens", "kv_bytes_per_token", "recent_requests_max"):
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        for name in ("prefill_tokens_per_s", "kv_transfer_bandwidth_gb_s"):
            if not getattr(self, name) > 0:
                raise bad(name, "must be positive")
        for name in ("step_base_ms", "decode_per_seq_ms", "decode_per_kv_token_us",
                     "kv_transfer_latency_ms", "kv_lease_s", "kv_pull_timeout_s",
                     "kv_wait_timeout_s", "extra_latency_ms"):
            if not getattr(self, name) >= 0:
                raise bad(name, "must be >= 0")
        for name in ("fail_rate", "eos_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, "must be within 0..1")
        if self.drop_after_chunks is not None and self.drop_after_chunks < 0:
            raise bad("drop_after_chunks", "must be >= 0 or None")
        if self.side_channel_port is not None and not 0 < self.side_channel_port < 65536:
            raise bad("side_channel_port", "must be a TCP port or None")
        if self.kv_capacity_tokens < self.max_model_len:
            # vLLM refuses to start when one max_model_len sequence does not fit in KV.
            raise bad("kv_capacity_tokens", f"must hold max_model_len={self.max_model_len} tokens")

    def replace(self, **changes: Any) -> EmulatorConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def kv_total_blocks(self) -> int:
        return self.kv_capacity_tokens // self.block_size


FAULT_FIELDS = (
    "fail_rate",
    "drop_after_chunks",
    "omit_kv_params",
    "extra_latency_ms",
    "unhealthy",
    "stop_after_first_token",
)
