"""Pools that follow the fleet: backends found by DNS (every A/AAAA record of a headless
Service) or by the Kubernetes API (the Ready pods a label selector picks, watched), beside a
pool's static ``backends``. source.py: the interface and the loop every kind shares (last
good set, error counting, backoff); dns.py and kubernetes.py (+ kubeauth.py): the kinds;
fleet.py: the merge with the static backends, applied through the reload path. Enabled by a
pool's ``[pools.<pool>.discovery]`` table; see docs/architecture.md."""

from lb.backends.discovery.fleet import Discovery, build_source
from lb.backends.discovery.source import DiscoveryError, Runner, Source

__all__ = ["Discovery", "DiscoveryError", "Runner", "Source", "build_source"]
