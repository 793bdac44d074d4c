"""`cronmesh doctor`: check a node and its cluster, and say what to fix.

Each check ends ok, warn, fail or skip (not applicable here), with a fix
for anything not ok. The checks, in order: the agent answers; its data dir
(exists, writable, who holds its lock, LMDB readable); its ports; the clock
skew between the servers given with --address; the gossip key; and whether
every Raft peer accepts connections on its RPC address. Exit 0 when nothing
failed (warnings allowed), 1 otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import struct
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import lmdb
import typer
from rich.markup import escape

from cronmesh.agent import parse_addr
from cronmesh.cli.client import (
    DEFAULT_ADDRESS,
    CaCertOpt,
    Client,
    JsonOpt,
    TokenOpt,
    check_address,
    fail,
    out,
    print_json,
)
from cronmesh.errors import ValidationError
from cronmesh.gossip.keyring import KEYRING_FILE

__all__ = ["Check", "doctor"]

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
COLOURS = {OK: "green", WARN: "yellow", FAIL: "red", SKIP: "dim"}

# Clock skew between servers: fire instants move by the skew at a failover,
# and the scheduler treats a 2 s jump of its own clock as a clock change.
SKEW_WARN = 0.5
SKEW_FAIL = 2.0
CONNECT_TIMEOUT = 3.0


@dataclass
class Check:
    """The outcome of one check."""

    name: str
    status: str  # ok, warn, fail or skip
    message: str
    fix: str = ""


@dataclass
class AgentReply:
    """What one --address answered, and when (for the clock check)."""

    address: str
    info: dict[str, Any] | None = None
    error: str = ""
    sent: float = 0.0  # this machine's wall clock, seconds
    received: float = 0.0
    http: httpx.Client | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return str((self.info or {}).get("agent", {}).get("name", self.address))

    @property
    def tags(self) -> dict[str, str]:
        return dict((self.info or {}).get("tags") or {})

    @property
    def is_server(self) -> bool:
        return self.tags.get("server") == "true"


def _url(address: str) -> str:
    return (address if "://" in address else f"http://{address}").rstrip("/")


def _host_port(url: str) -> tuple[str, int]:
    parsed = httpx.URL(url)
    return parsed.host or "127.0.0.1", parsed.port or (
        443 if parsed.scheme == "https" else 80
    )


def _ask(address: str, token: str, ca_cert: str) -> AgentReply:
    found = AgentReply(_url(address))
    # The CLI's client: the same token and CA handling as every command.
    found.http = Client(found.address, token, ca_cert).http
    try:
        found.sent = time.time()
        response = found.http.get("/v1/", timeout=5.0)
        found.received = time.time()
        response.raise_for_status()
        info = response.json()
        if not isinstance(info, dict) or "agent" not in info:
            raise ValueError("GET /v1/ did not answer as a cronmesh agent")
        found.info = info
    except httpx.HTTPStatusError as exc:
        code = exc.response.status_code
        hint = " (pass --token or set CRONMESH_TOKEN)" if code in (401, 403) else ""
        found.error = f"HTTP {code} on GET /v1/{hint}"
    except (httpx.HTTPError, ValueError) as exc:
        found.error = str(exc) or type(exc).__name__
    return found


def _error_text(response: httpx.Response) -> str:
    """The `error` an API answer carries, or its status line."""
    try:
        return str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"


def _get(agent: AgentReply, path: str) -> Any:
    assert agent.http is not None
    response = agent.http.get(path, timeout=5.0)
    response.raise_for_status()
    return response.json()


def check_agent(agent: AgentReply) -> Check:
    if agent.info is None:
        return Check(
            "agent",
            FAIL,
            f"no usable answer from {agent.address}: {agent.error}",
            "start it (cronmesh agent ...) or pass --address of a running agent",
        )
    role = "server" if agent.is_server else "agent"
    raft = (agent.info or {}).get("raft") or {}
    leader = f", leader {raft['leader']}" if raft.get("leader") else ""
    version = agent.info.get("agent", {}).get("version", "?")
    return Check(
        "agent", OK, f"{agent.name} ({role}{leader}) {version} at {agent.address}"
    )


# -- data dir


def check_data_dir(path: Path, explicit: bool, agent: AgentReply) -> list[Check]:
    if not path.exists():
        return [
            Check(
                "data dir",
                FAIL if explicit else WARN,
                f"{path} does not exist",
                "pass --data-dir with the agent's --data-dir"
                if not explicit
                else "check the path; the agent creates it on first start",
            )
        ]
    if not path.is_dir():
        return [Check("data dir", FAIL, f"{path} is not a directory", "fix the path")]
    checks = [_check_writable(path), _check_lock(path, agent)]
    checks.append(_check_lmdb(path))
    return checks


def _check_writable(path: Path) -> Check:
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".doctor-"):
            pass
    except OSError as exc:
        return Check(
            "data dir",
            FAIL,
            f"{path} is not writable by uid {os.getuid()}: {exc.strerror}",
            f"chown the directory to the user the agent runs as, "
            f"or free disk space (df -h {path})",
        )
    return Check("data dir", OK, f"{path} exists and is writable")


def lock_holder(path: Path) -> str | None:
    """The pid written in the data dir's LOCK while an agent holds it
    ("?" when unreadable), or None when no process holds the lock."""
    lock = path / "LOCK"
    if not lock.exists():
        return None
    fd = os.open(lock, os.O_RDONLY)
    try:
        try:
            # Limitation: this shared lock is dropped at once, but an agent
            # starting in that very instant is refused (and says so).
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            return os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _check_lock(path: Path, agent: AgentReply) -> Check:
    try:
        holder = lock_holder(path)
    except OSError as exc:
        return Check(
            "data dir lock",
            FAIL,
            f"cannot read {path / 'LOCK'}: {exc.strerror}",
            "make the LOCK file readable by this user",
        )
    if holder is None:
        return Check("data dir lock", OK, "not locked: no agent runs on it")
    if agent.info is None:
        return Check(
            "data dir lock",
            WARN,
            f"held by pid {holder}, but no agent answers at {agent.address}",
            f"pass the --address of that agent (ps -p {holder} -o args), "
            "or stop it if it hangs",
        )
    return Check("data dir lock", OK, f"held by a running agent (pid {holder})")


def _check_lmdb(path: Path) -> Check:
    state = path / "state"
    if not state.exists():
        return Check(
            "data dir lmdb", WARN, f"no LMDB in {state} yet", "start the agent once"
        )
    try:
        env = lmdb.open(
            str(state), readonly=True, max_dbs=16, subdir=True, create=False
        )
    except lmdb.Error as exc:
        return _lmdb_broken(state, exc)
    try:
        with env.begin() as txn:
            meta = env.open_db(b"meta", txn=txn, create=False)
            jobs = env.open_db(b"jobs", txn=txn, create=False)
            raw = txn.get(b"applied_index", db=meta)
            applied = struct.unpack(">Q", raw)[0] if raw else 0
            count = txn.stat(jobs)["entries"]
    except lmdb.NotFoundError:
        return Check("data dir lmdb", OK, f"{state} opens; no state written yet")
    except (lmdb.Error, struct.error) as exc:
        return _lmdb_broken(state, exc)
    finally:
        env.close()
    return Check(
        "data dir lmdb",
        OK,
        f"{state} readable: {count} jobs, applied index {applied}",
    )


def _lmdb_broken(state: Path, exc: Exception) -> Check:
    return Check(
        "data dir lmdb",
        FAIL,
        f"LMDB in {state} cannot be read: {exc}",
        "stop the agent and move the data dir aside; a server started empty "
        "catches up from the others (remove-peer first if it left the "
        "configuration), a lone node needs its jobs restored (POST /v1/restore)",
    )


# -- ports


def _connects(host: str, port: int) -> bool:
    with contextlib.suppress(OSError):
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            return True
    return False


def _dial_host(host: str, fallback: str) -> str:
    return fallback if host in ("0.0.0.0", "::", "") else host


def check_ports_in_use(agent: AgentReply, members: list[dict[str, Any]]) -> Check:
    """The running agent's ports: each one must accept connections."""
    host, port = _host_port(agent.address)
    targets = {"http": (host, port)}
    if agent.tags.get("rpc_addr"):  # every agent serves gRPC (runs, Raft)
        rpc_host, rpc_port = parse_addr(agent.tags["rpc_addr"], 6868, "rpc_addr")
        targets["rpc"] = (_dial_host(rpc_host, host), rpc_port)
    me = next((m for m in members if m.get("Name") == agent.name), None)
    if me is not None:
        targets["gossip"] = (_dial_host(str(me["Addr"]), host), int(me["Port"]))
    shown = ", ".join(f"{k} {h}:{p}" for k, (h, p) in targets.items())
    dead = [f"{k} {h}:{p}" for k, (h, p) in targets.items() if not _connects(h, p)]
    if dead:
        return Check(
            "ports",
            FAIL,
            f"agent {agent.name} does not accept connections on {', '.join(dead)}",
            "check the firewall and the agent's --bind-addr/--advertise-addr",
        )
    return Check("ports", OK, f"in use by agent {agent.name}: {shown}")


def _bind_error(host: str, port: int, kind: int) -> str:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return ""


def check_ports_free(http_addr: str, bind_addr: str, rpc_port: int) -> Check:
    """No agent answers: the ports it would use must be free."""
    http = parse_addr(http_addr, 8080, "http-addr")
    gossip = parse_addr(bind_addr, 8946, "bind-addr")
    wanted = [
        ("http", "--http-addr", http, socket.SOCK_STREAM),
        ("rpc", "--rpc-port", (gossip[0], rpc_port), socket.SOCK_STREAM),
        ("gossip", "--bind-addr", gossip, socket.SOCK_STREAM),
        ("gossip", "--bind-addr", gossip, socket.SOCK_DGRAM),
    ]
    taken = []
    for name, flag, (host, port), kind in wanted:
        error = _bind_error(host, port, kind)
        if error:
            proto = "udp" if kind == socket.SOCK_DGRAM else "tcp"
            taken.append((f"{name} {host}:{port}/{proto} ({error})", flag, port))
    if taken:
        flags = ", ".join(sorted({t[1] for t in taken}))
        return Check(
            "ports",
            FAIL,
            "in use by another program: " + "; ".join(t[0] for t in taken),
            f"find it with `ss -ltnup 'sport = :{taken[0][2]}'` and stop it, "
            f"or start the agent with another {flags}",
        )
    return Check(
        "ports",
        OK,
        f"free: http {http[0]}:{http[1]}, rpc {gossip[0]}:{rpc_port}, "
        f"gossip {gossip[0]}:{gossip[1]}",
    )


# -- clocks


def clock_offset(agent: AgentReply) -> tuple[float, float] | None:
    """(server clock - this machine's clock, uncertainty), in seconds."""
    text = (agent.info or {}).get("agent", {}).get("time")
    if not text:
        return None
    try:
        server = datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        return None
    middle = (agent.sent + agent.received) / 2
    return server - middle, (agent.received - agent.sent) / 2


# Limitation: servers' HTTP addresses are not gossiped, so only the servers
# given with --address are compared; the others are counted, not asked.
def check_clocks(agents: list[AgentReply], servers_known: int) -> Check:
    answered = [a for a in agents if a.info is not None]
    offsets = {a.name: clock_offset(a) for a in answered}
    silent = sorted(name for name, off in offsets.items() if off is None)
    measured = {name: off for name, off in offsets.items() if off is not None}
    if not measured:
        return Check(
            "clock skew",
            WARN if answered else SKIP,
            "no server reported its time" if answered else "no agent answered",
            "upgrade the agents" if answered else "",
        )
    low = min(measured, key=lambda n: measured[n][0])
    high = max(measured, key=lambda n: measured[n][0])
    spread = measured[high][0] - measured[low][0]
    # Only what the round trips cannot explain counts against the clocks.
    certain = max(spread - measured[high][1] - measured[low][1], 0.0)
    if len(measured) == 1:
        offset, _ = measured[low]
        what = f"{low} is {offset * 1000:+.0f} ms from this machine's clock"
        certain = max(abs(offset) - measured[low][1], 0.0)
    else:
        what = f"{spread * 1000:.0f} ms between {low} and {high}"
    asked = len(measured)
    if servers_known > asked:
        what += f" ({asked} of {servers_known} servers asked: give each --address)"
    if silent:
        what += f"; no time from {', '.join(silent)}"
    if certain >= SKEW_FAIL:
        status = FAIL
    elif certain >= SKEW_WARN:
        status = WARN
    else:
        status = OK
    fix = "" if status == OK else "run NTP (chronyd or systemd-timesyncd) everywhere"
    return Check("clock skew", status, what, fix)


# -- gossip key, peers


def check_gossip_key(agent: AgentReply, data_dir: Path | None) -> Check:
    fix = (
        "make a key with `cronmesh keygen` and start every agent with "
        "--encrypt KEY (rotate it later with `cronmesh keyring`)"
    )
    if agent.info is not None:
        encrypted = (agent.info.get("serf") or {}).get("encrypted")
        if encrypted == "true":
            return Check("gossip key", OK, f"{agent.name} encrypts gossip")
        if encrypted == "false":
            return Check("gossip key", WARN, "gossip is not encrypted", fix)
    if data_dir is not None and (data_dir / KEYRING_FILE).exists():
        return Check("gossip key", OK, f"keyring present in {data_dir}")
    if data_dir is not None and data_dir.is_dir():
        return Check("gossip key", WARN, f"no {KEYRING_FILE} in {data_dir}", fix)
    return Check("gossip key", SKIP, "no agent and no data dir to look at")


# Limitation: a peer "answers" when its RPC port accepts a TCP connection
# from this machine; whether it speaks gRPC, and whether the servers reach
# each other, is not checked.
def check_peers(agent: AgentReply, members: list[dict[str, Any]]) -> Check:
    if agent.info is None:
        return Check("raft peers", SKIP, "no agent answered")
    if not agent.is_server:
        return Check(
            "raft peers",
            SKIP,
            f"{agent.name} is not a server",
            "pass the --address of a server to check the Raft peers",
        )
    try:
        rows = _get(agent, "/v1/raft/peers")
    except httpx.HTTPStatusError as exc:
        return Check(
            "raft peers",
            FAIL,
            f"cannot list the Raft peers: {_error_text(exc.response)}",
            "start the other servers (--bootstrap-expect counts them) and "
            "let them join one another",
        )
    except (httpx.HTTPError, ValueError) as exc:
        return Check("raft peers", FAIL, f"cannot list the Raft peers: {exc}")
    mesh = {str(m.get("Name")): m for m in members}
    fallback = _host_port(agent.address)[0]
    problems, fixes, doubts = [], [], []
    for row in rows:
        node, address = str(row.get("ID")), str(row.get("Address") or "")
        member = mesh.get(node) or {}
        state = str(member.get("statusText") or "unknown")
        gone = (
            f"if {node} is gone for good: cronmesh raft remove-peer "
            f"--peer-id {node} (ask the leader)"
        )
        # The table lists addresses of alive servers only; a suspect one
        # still has its RPC address in its gossip tags.
        address = address or str((member.get("Tags") or {}).get("rpc_addr") or "")
        if not address:
            problems.append(f"{node} is {state} in the mesh (no known address)")
            fixes.append(f"start {node}; {gone}")
            continue
        host, port = parse_addr(address, 6868, "peer")
        if not _connects(_dial_host(host, fallback), port):
            problems.append(f"{node} ({state}) does not answer on {address}")
            fixes.append(f"start {node} or open the firewall towards it; {gone}")
        elif state != "alive" and node != agent.name:
            doubts.append(f"{node} answers on {address} but is {state} in the mesh")
    leaders = [r["ID"] for r in rows if r.get("State") == "leader"]
    if not leaders:
        problems.append("no leader")
        fixes.append("a majority of the servers must run and reach each other")
    if problems:
        return Check("raft peers", FAIL, "; ".join(problems), "; ".join(fixes))
    names = ", ".join(str(r["ID"]) for r in rows)
    message = f"{len(rows)} peers answer on their RPC address: {names}"
    if doubts:
        return Check(
            "raft peers",
            WARN,
            f"{message}; {'; '.join(doubts)}",
            "check the load and the network (gossip UDP) of those servers",
        )
    return Check("raft peers", OK, message)


# -- the command


def run_checks(
    addresses: list[str],
    data_dir: Path | None,
    http_addr: str,
    bind_addr: str,
    rpc_port: int,
    token: str = "",
    ca_cert: str = "",
) -> list[Check]:
    agents = [_ask(a, token, ca_cert) for a in addresses]
    main = agents[0]
    checks = [check_agent(main)]
    checks += [check_agent(a) for a in agents[1:]]
    explicit = data_dir is not None
    path = data_dir or Path("cronmesh.data")
    checks += check_data_dir(path, explicit, main)
    members: list[dict[str, Any]] = []
    if main.info is not None:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            members = list(_get(main, "/v1/members"))
        checks.append(check_ports_in_use(main, members))
    else:
        checks.append(check_ports_free(http_addr, bind_addr, rpc_port))
    servers = sum(
        1
        for m in members
        if (m.get("Tags") or {}).get("server") == "true"
        and m.get("statusText") == "alive"
    )
    checks.append(check_clocks(agents, servers))
    checks.append(check_gossip_key(main, path if path.is_dir() else None))
    checks.append(check_peers(main, members))
    return checks


def _print(checks: list[Check]) -> None:
    width = max(len(c.name) for c in checks)
    for check in checks:
        colour = COLOURS[check.status]
        out.print(
            f"[{colour}]{check.status:<4}[/{colour}]  {check.name:<{width}}  "
            f"{escape(check.message)}",
            highlight=False,
            soft_wrap=True,
        )
        if check.fix:
            fix = f"      {'':<{width}}  fix: {escape(check.fix)}"
            out.print(fix, highlight=False, soft_wrap=True)


def doctor(
    address: Annotated[
        list[str] | None,
        typer.Option(
            "--address",
            envvar="CRONMESH_ADDRESS",
            help="HTTP address of an agent; repeat it for each server to compare "
            "their clocks (env CRONMESH_ADDRESS).",
        ),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir", help="The agent's data dir (default: cronmesh.data)."
        ),
    ] = None,
    http_addr: Annotated[
        str,
        typer.Option("--http-addr", help="When no agent answers: HTTP port to check."),
    ] = "127.0.0.1:8080",
    bind_addr: Annotated[
        str,
        typer.Option(
            "--bind-addr", help="When no agent answers: gossip port to check."
        ),
    ] = "0.0.0.0:8946",
    rpc_port: Annotated[
        int,
        typer.Option(
            "--rpc-port", min=1, max=65535, help="When no agent answers: RPC port."
        ),
    ] = 6868,
    token: TokenOpt = "",
    ca_cert: CaCertOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Check a node and its cluster, and say what to fix (exit 1 if any fails)."""
    try:
        parse_addr(http_addr, 8080, "--http-addr")
        parse_addr(bind_addr, 8946, "--bind-addr")
    except ValidationError as exc:
        fail(str(exc), 2)
    for item in address or []:
        check_address(item)
    checks = run_checks(
        list(address or [DEFAULT_ADDRESS]),
        data_dir,
        http_addr,
        bind_addr,
        rpc_port,
        token,
        ca_cert,
    )
    failed = any(c.status == FAIL for c in checks)
    if as_json:
        print_json({"ok": not failed, "checks": [asdict(c) for c in checks]})
    else:
        _print(checks)
    if failed:
        raise typer.Exit(1)
