"""``python -m emulator`` (and ``pdlb emulate``): run one emulated vLLM server.

Every :class:`~emulator.config.EmulatorConfig` field is a flag (``time_scale`` →
``--time-scale``; booleans also have ``--no-...``; ``none`` sets an optional field to None),
plus ``--host``, ``--port`` and ``--log-level``. Once the socket is bound the process prints
exactly one line, ``emulator listening on http://HOST:PORT``, to stdout and flushes it, so a
parent started with ``--port 0`` can read the port. SIGTERM and SIGINT stop it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import gc
import logging
import signal
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

from emulator.config import EmulatorConfig
from emulator.server import EmulatorServer

DEFAULT_PORT = 8100
"""Not ``pdlb serve``'s 8000: an emulator and pdlb started with their defaults coexist."""


def _optional(inner: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null", "") else inner(text)

    parse.__name__ = getattr(inner, "__name__", "value")
    return parse


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdlb emulate",
        description="A vLLM 0.32 emulator (prefill/decode/colocated) with a performance model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind.")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="Port to bind (0 = any free); not pdlb serve's 8000.")
    parser.add_argument("--log-level", default="warning", help="Python logging level.")
    hints = typing.get_type_hints(EmulatorConfig)
    for f in dataclasses.fields(EmulatorConfig):
        hint = hints[f.name]
        help_text = f.metadata.get("help", "")
        if hint is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction,
                                default=f.default, help=help_text)
            continue
        args = typing.get_args(hint)
        optional = isinstance(hint, types.UnionType) and type(None) in args
        base = next(a for a in args if a is not type(None)) if optional else hint
        parse: Callable[[str], Any] = base
        parser.add_argument(_flag(f.name), type=_optional(parse) if optional else parse,
                            default=f.default, help=help_text,
                            choices=f.metadata.get("choices"))
    return parser


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    names = [f.name for f in dataclasses.fields(EmulatorConfig)]
    return EmulatorConfig(**{name: getattr(args, name) for name in names})


def config_to_argv(config: EmulatorConfig) -> list[str]:
    """The flags that reproduce ``config`` (only fields that differ from the defaults)."""
    argv: list[str] = []
    for f in dataclasses.fields(EmulatorConfig):
        value = getattr(config, f.name)
        if value == f.default:
            continue
        flag = _flag(f.name)
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, "none" if value is None else str(value)]
    return argv


async def serve(config: EmulatorConfig, host: str, port: int) -> None:
    """Run until SIGTERM/SIGINT; print the listening line once bound."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with EmulatorServer(config, host, port) as server:
            # Everything loaded so far (tiktoken's tables above all) lives as long as the
            # process: keep it out of the cyclic GC, whose full passes over it otherwise
            # stall the event loop for tens of milliseconds.
            gc.collect()
            gc.freeze()
            sys.stdout.write(f"emulator listening on {server.url}\n")
            sys.stdout.flush()
            await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    if not 0 <= args.port <= 65535:
        parser.error(f"argument --port: {args.port} is not a port from 0 to 65535")
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve(config, args.host, args.port))
    except OSError as exc:
        reason = ("the address is already in use (another server on that port?)"
                  if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc))
        print(f"pdlb emulate: cannot listen on {args.host}:{args.port}: {reason}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
