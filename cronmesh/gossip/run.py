"""A tiny runner for one gossip member, for tests and manual use.

    python -m cronmesh.gossip.run --name n1 --bind 127.0.0.2:7946 \\
        [--join 127.0.0.1:7946 ...] [--tag k=v ...] [--tags-file PATH] \\
        [--encrypt BASE64KEY] [--profile local] [--status-file PATH]

It runs a :class:`~cronmesh.gossip.driver.GossipDriver` until SIGTERM or
SIGINT, then leaves gracefully and exits 0. The status (our name, every
member and the driver's counters) is written as JSON to ``--status-file``
(atomically, on every member event and at least every
``--status-interval`` seconds when something changed), or printed as one
JSON line on stdout whenever the member list changes. SIGHUP re-reads
``--tags-file`` (a JSON object of strings, merged over ``--tag``) and
gossips the new tags. With ``--join`` it retry-joins in the background;
after ``--retry-max`` failed attempts it prints the error naming the
addresses on stderr and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from cronmesh.errors import CronmeshError, TransportError, ValidationError
from cronmesh.gossip.driver import GossipDriver, MemberInfo, parse_address
from cronmesh.gossip.keyring import Keyring

__all__ = ["main"]

logger = logging.getLogger("cronmesh.gossip")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cronmesh.gossip.run", description="Run one gossip member."
    )
    parser.add_argument("--name", required=True)
    parser.add_argument("--bind", required=True, help="host:port (port 0: any)")
    parser.add_argument("--advertise", help="host:port peers should use")
    parser.add_argument("--join", action="append", default=[], help="host[:port]")
    parser.add_argument("--retry-interval", type=float, default=1.0, help="seconds")
    parser.add_argument("--retry-max", type=int, default=0, help="0: forever")
    parser.add_argument("--tag", action="append", default=[], help="key=value")
    parser.add_argument("--tags-file", help="JSON object, re-read on SIGHUP")
    parser.add_argument("--encrypt", help="base64 AES key (16, 24 or 32 bytes)")
    parser.add_argument("--profile", default="lan", help="lan, wan or local")
    parser.add_argument("--status-file", help="JSON status (default: stdout)")
    parser.add_argument("--status-interval", type=float, default=0.5)
    parser.add_argument("--leave-timeout", type=float, default=3.0, help="seconds")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def _cli_tags(pairs: list[str]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValidationError(f"--tag wants key=value, got {pair!r}", "tag")
        tags[key] = value
    return tags


def _file_tags(path: str | None) -> dict[str, str]:
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValidationError(f"cannot read tags file {path}: {exc}", "tags") from exc
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise ValidationError(f"tags file {path} must hold a JSON object", "tags")
    return data


class _Status:
    """Writes the member list whenever it changes (see module docstring)."""

    def __init__(self, driver: GossipDriver, path: str | None, interval: float):
        self._driver = driver
        self._path = Path(path) if path else None
        self._interval = interval
        self._dirty = asyncio.Event()
        self._last: str | None = None
        self._last_members: Any = None

    def changed(self, *_: object) -> None:
        self._dirty.set()

    def snapshot(self) -> dict[str, Any]:
        driver = self._driver
        members: list[MemberInfo] = driver.members()
        return {
            "name": driver.name,
            "time": time.time(),
            "members": [m.as_dict() for m in members],
            "stats": driver.stats.as_dict(),
        }

    def write(self) -> None:
        status = self.snapshot()
        if self._path is None:
            if status["members"] != self._last_members:
                self._last_members = status["members"]
                print(json.dumps(status, sort_keys=True), flush=True)
            return
        body = {k: v for k, v in status.items() if k != "time"}
        text = json.dumps(body, sort_keys=True)
        if text == self._last:
            return
        self._last = text
        tmp = self._path.with_name(f".{self._path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(status, sort_keys=True, indent=1))
        os.replace(tmp, self._path)

    async def run(self) -> None:
        while True:
            self._dirty.clear()
            try:
                self.write()
            except OSError as exc:
                logger.error("cannot write status file: %s", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._dirty.wait()


async def _run(args: argparse.Namespace) -> int:
    cli_tags = _cli_tags(args.tag)
    tags = {**cli_tags, **_file_tags(args.tags_file)}
    keyring = Keyring([args.encrypt]) if args.encrypt else None
    host, port = parse_address(args.bind, 7946, allow_zero=True)
    advertise = None
    if args.advertise:
        advertise = parse_address(args.advertise, port, allow_zero=True)
    driver = GossipDriver(
        args.name, (host, port), advertise, tags, profile=args.profile, keyring=keyring
    )
    status = _Status(driver, args.status_file, args.status_interval)
    driver.add_event_handler(status.changed)
    await driver.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def reload_tags() -> None:
        try:
            driver.set_tags({**cli_tags, **_file_tags(args.tags_file)})
        except CronmeshError as exc:
            logger.error("tags not reloaded: %s", exc)
            return
        logger.info("tags reloaded node=%s tags=%s", driver.name, driver.tags)
        status.changed()

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_tags)
    status_task = asyncio.create_task(status.run())
    waiters: list[asyncio.Task[Any]] = [asyncio.create_task(stop.wait())]
    join_task: asyncio.Task[int] | None = None
    if args.join:
        join_task = asyncio.create_task(
            driver.retry_join(args.join, args.retry_interval, args.retry_max)
        )
        waiters.append(join_task)
    code = 0
    pending: set[asyncio.Task[Any]] = set(waiters)
    while pending:
        done, pending = await asyncio.wait(pending, return_when="FIRST_COMPLETED")
        if join_task is not None and join_task in done:
            try:
                join_task.result()
            except TransportError as exc:
                print(f"error: {exc}", file=sys.stderr, flush=True)
                code = 1
                break
            status.changed()
        if stop.is_set():
            break
    for task in pending:
        task.cancel()
    if code == 0:
        await driver.leave(args.leave_timeout)
    status.write()
    status_task.cancel()
    await driver.stop()
    return code


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return asyncio.run(_run(args))
    except CronmeshError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
