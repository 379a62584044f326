"""vLLM's KV-cache events: the wire (wire.py), one block index per pool (index.py), one
subscriber per backend (subscriber.py), and the fleet that keeps them in step with the pools
(fleet.py). Enabled by backends.toml's ``[kv_events]`` table; see docs/architecture.md."""

from lb.backends.kvevents.fleet import KVEvents, parse_sources
from lb.backends.kvevents.index import BlockIndex, chain_keys
from lb.backends.kvevents.subscriber import Endpoint, Health, Subscriber

__all__ = ["BlockIndex", "Endpoint", "Health", "KVEvents", "Subscriber", "chain_keys",
           "parse_sources"]
