"""Run ``pdlb serve`` with SO_REUSEPORT on its listening socket (a benchmark-only shim).

pdlb has no ``--workers`` flag yet. To measure what several worker processes would give,
bench/compare.py starts N of these with the same ``--port``: the kernel spreads incoming
connections over the N sockets. Everything else is stock pdlb; the only change is
``reuse_port=True`` on aiohttp's TCPSite.

    python bench/pdlb_reuseport.py serve --prefill URL --decode URL --port 8000
"""

from __future__ import annotations

import sys
from typing import Any

from aiohttp import web

_init = web.TCPSite.__init__


def _init_reuse_port(self: web.TCPSite, *args: Any, **kwargs: Any) -> None:
    kwargs.setdefault("reuse_port", True)
    _init(self, *args, **kwargs)


web.TCPSite.__init__ = _init_reuse_port  # type: ignore[method-assign]

if __name__ == "__main__":
    from lb.cli import main

    sys.exit(main(sys.argv[1:]))
