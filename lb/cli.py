"""``pdlb`` — one command, several jobs (:data:`HELP`).

Subcommands other than ``serve`` are imported lazily so ``pdlb serve`` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from lb.errors import ConfigError

if TYPE_CHECKING:
    from lb.config import Config

HELP = """\
pdlb: one OpenAI-compatible server in front of vLLM prefill and decode pools.

  pdlb serve --config backends.toml        the load balancer
  pdlb serve --prefill URL --decode URL    the same, configured by flags
  pdlb demo                                PD through pdlb vs colocated, on the emulator
  pdlb emulate --role prefill|decode|both  a vLLM emulator
  pdlb loadgen ...                         the load generator
  pdlb launch-vllm ...                     start local vLLM prefill/decode pools
  pdlb plan ...                            how many prefill and decode servers to run
  pdlb --version                           the installed version

pdlb COMMAND --help for a command's options.
"""

SERVE_EXAMPLES = """\
examples:
  pdlb serve --prefill http://10.0.0.1:8100 --decode http://10.0.0.2:8200
  pdlb serve --config backends.toml --host 0.0.0.0 --port 8000
  pdlb serve -c backends.toml --workers 4 --log-level warning

Probes: GET /health/live (liveness), GET /health/ready (readiness); metrics: GET /metrics.
SIGTERM drains in-flight requests; SIGHUP reloads the config file.
"""

DELEGATED = {
    "demo": "lb.tools.demo",
    "emulate": "emulator.cli",
    "loadgen": "loadgen.cli",
    "launch-vllm": "lb.tools.launch_vllm",
    "plan": "lb.planner.cli",
}


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pdlb serve",
        description="Serve an OpenAI-compatible API in front of vLLM prefill and decode pools.",
        epilog=SERVE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", "-c", help="backends.toml (flags below override it)")
    p.add_argument("--prefill", action="append", metavar="URL",
                   help="a prefill backend base URL (repeat for several)")
    p.add_argument("--decode", action="append", metavar="URL",
                   help="a decode backend base URL (repeat for several)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to bind (default 8000; 0 = any free port)")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"],
                   help="least important log lines shown (default info: start-up, reloads,"
                        " health changes, one access line per request)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes sharing the port (SO_REUSEPORT); budgets are split"
                        " between them (default 1)")
    p.add_argument("--worker-share", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    return p


def serve_main(argv: Sequence[str]) -> int:
    from lb.config import config_from_flags, load_config, override

    args = _serve_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.config:
            config = load_config(args.config)
        elif args.prefill and args.decode:
            config = config_from_flags(args.prefill, args.decode)
        else:
            raise ConfigError(
                "give --config backends.toml, or at least one --prefill URL and one --decode URL"
            )
        config = override(config, prefill=args.prefill, decode=args.decode,
                          host=args.host, port=args.port)
        from lb.serve.app import create_app

        create_app(config)  # validate policies and connector before binding anything
    except ConfigError as exc:
        print(f"pdlb: config error: {exc}", file=sys.stderr)
        return 2
    for url in _in_both_pools(config):
        logging.getLogger("pdlb.config").warning(
            "%s is in both the prefill and the decode pool: a server started for one role"
            " (kv_producer / kv_consumer) fails the other's requests, and a colocated one"
            " (kv_both) gains nothing from being its own prefill; list it in one pool", url)
    if config.log.format == "json":
        from lb.accesslog import JsonFormatter

        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    if args.workers < 1:
        print("pdlb: --workers must be >= 1", file=sys.stderr)
        return 2
    if args.workers > 1:
        from lb.serve.workers import run_workers

        rest = _without_workers_flag(list(argv))
        return run_workers(rest, config, args.workers)
    from lb.serve.server import run
    from lb.serve.workers import share

    def reloader() -> Config:
        fresh = override(load_config(args.config), prefill=args.prefill, decode=args.decode,
                         host=args.host, port=args.port)
        return share(fresh, args.worker_share)

    return run(share(config, args.worker_share), reloader if args.config else None,
               reuse_port=args.reuse_port)


def _in_both_pools(config: Config) -> list[str]:
    both = []
    for name, pool in config.pools.items():
        group, _, leg = name.rpartition("/")
        if leg == "prefill":
            partner = config.pools[f"{group}/decode" if group else "decode"]
            decode = {b.url for b in partner.backends}
            both += [b.url for b in pool.backends if b.url in decode]
    return both


def _without_workers_flag(argv: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(HELP, end="")
        return 0 if args else 2
    if args[0] in ("--version", "-V"):
        from lb.metrics import pdlb_version

        print(f"pdlb {pdlb_version()}")
        return 0
    command, rest = args[0], args[1:]
    if command == "serve":
        return serve_main(rest)
    if command in DELEGATED:
        module = importlib.import_module(DELEGATED[command])
        result: int = module.main(rest)
        return result
    print(f"pdlb: unknown command {command!r}; try: serve, {', '.join(DELEGATED)}",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
