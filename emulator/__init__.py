"""A faithful vLLM 0.32 emulator: prefill / decode (NixlConnector) / colocated servers with
a performance model, for tests, demos and benchmarks without a GPU. See docs/emulator.md.

Public API::

    EmulatorConfig            the configuration (every field documented, every field a flag)
    create_app(config)        the aiohttp application
    EmulatorServer(config, host="127.0.0.1", port=0)
                              async context manager; .url .port .app .engine .state()
    EmulatorCluster(prefill=, decode=, both=, mode="inprocess"|"subprocess", **overrides)
                              several servers at once; .prefill_urls .decode_urls .both_urls
"""

from emulator.app import create_app
from emulator.cluster import EmulatorCluster
from emulator.config import EmulatorConfig
from emulator.server import EmulatorServer

__all__ = ["EmulatorCluster", "EmulatorConfig", "EmulatorServer", "create_app"]
