"""TLS for the bench: throw-away certificates, and the handshake-rate measurement of
`python -m bench core`.

Certificates: one CA and a server certificate for 127.0.0.1 made by ``trustme`` (a dev
dependency) into the stack's temporary directory; without trustme the TLS targets are
reported unavailable instead of failing the run.

Handshake rate: per target, new connections opened one after another, each doing the
whole of what a driver does before its first command (TCP connect, the TLS handshake
when the target is TLS, a ``hello`` with client metadata and its reply) and then closed.
Rounds alternate the target order (ABBA) like the core cells; the figure per target is
the connections per second of each round (median, min..max over rounds), and the CPU
seconds the serving process used per connection.
"""

from __future__ import annotations

import socket
import ssl
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import bson

from proxy.wire import encode_op_msg

__all__ = ["BenchCerts", "HandshakeRow", "make_certs", "measure_handshakes"]

_HELLO_MESSAGE = encode_op_msg(1, 0, bson.encode({
    "hello": 1, "helloOk": True, "$db": "admin",
    "client": {"driver": {"name": "bench", "version": "0"}, "os": {"type": "Linux"}},
}))


@dataclass(frozen=True)
class BenchCerts:
    ca: Path
    cert: Path
    key: Path


def make_certs(directory: Path) -> BenchCerts:
    """A CA and a 127.0.0.1 server certificate; ImportError without trustme."""
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    certs = BenchCerts(directory / "bench-ca.pem", directory / "bench-server.crt",
                       directory / "bench-server.key")
    ca.cert_pem.write_to_path(str(certs.ca))
    leaf.cert_chain_pems[0].write_to_path(str(certs.cert))
    leaf.private_key_pem.write_to_path(str(certs.key))
    return certs


@dataclass(frozen=True)
class HandshakeRow:
    target: str
    connections: int
    per_s_median: float
    per_s_min: float
    per_s_max: float
    server_cpu_us_per_connection: float | None


def _endpoint(uri: str) -> tuple[str, int, ssl.SSLContext | None]:
    parts = urlsplit(uri)
    query = parse_qs(parts.query)
    context = None
    if query.get("tls") == ["true"]:
        context = ssl.create_default_context(cafile=query["tlsCAFile"][0])
    return parts.hostname or "127.0.0.1", parts.port or 27017, context


def _one_connection(host: str, port: int, context: ssl.SSLContext | None) -> None:
    raw = socket.create_connection((host, port), timeout=10)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock = raw if context is None else context.wrap_socket(raw, server_hostname=host)
    with sock:
        sock.sendall(_HELLO_MESSAGE)
        data = b""
        while len(data) < 4 or len(data) < int.from_bytes(data[:4], "little"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"{host}:{port} closed the connection during hello")
            data += chunk


def measure_handshakes(
    uris: dict[str, str], connections: int, rounds: int,
    cpu_of: Callable[[str], float | None],
) -> list[HandshakeRow]:
    """``connections`` new connections per target, over ``rounds`` ABBA rounds.

    ``cpu_of(target)``: CPU seconds so far of the process serving ``target`` (None when
    unknown)."""
    targets = list(uris)
    endpoints = {t: _endpoint(u) for t, u in uris.items()}
    per_round = max(1, connections // rounds)
    rates: dict[str, list[float]] = {t: [] for t in targets}
    cpu: dict[str, list[float]] = {t: [] for t in targets}
    for t in targets:  # warm-up: imports, first TLS session setup
        for _ in range(5):
            _one_connection(*endpoints[t])
    for rnd in range(rounds):
        order = targets if rnd % 2 == 0 else list(reversed(targets))
        for t in order:
            before = cpu_of(t)
            start = time.perf_counter()
            for _ in range(per_round):
                _one_connection(*endpoints[t])
            wall = time.perf_counter() - start
            after = cpu_of(t)
            rates[t].append(per_round / wall)
            if before is not None and after is not None:
                cpu[t].append((after - before) / per_round)
    return [
        HandshakeRow(
            target=t, connections=per_round * rounds,
            per_s_median=statistics.median(rates[t]), per_s_min=min(rates[t]),
            per_s_max=max(rates[t]),
            server_cpu_us_per_connection=(
                statistics.median(cpu[t]) * 1e6 if cpu[t] else None),
        )
        for t in targets
    ]


def format_handshakes(rows: list[HandshakeRow]) -> str:
    lines = [f"{'target':<12} {'conns':>6} {'conn/s':>8} {'min..max':>15} {'cpu us/conn':>12}"]
    for r in rows:
        cpu = "-" if r.server_cpu_us_per_connection is None else \
            f"{r.server_cpu_us_per_connection:.0f}"
        lines.append(f"{r.target:<12} {r.connections:>6} {r.per_s_median:>8.0f} "
                     f"{f'{r.per_s_min:.0f}..{r.per_s_max:.0f}':>15} {cpu:>12}")
    return "\n".join(lines)


def as_json(rows: list[HandshakeRow]) -> list[dict[str, Any]]:
    return [dict(r.__dict__) for r in rows]


# ---------------------------------------------------------------- phases of bench core

HANDSHAKE_TARGETS = ("direct", "direct-tls", "proxy", "proxy-tls")
_SERVED_BY = {"direct": "ferretdb", "direct-tls": "ferretdb", "proxy": "proxy",
              "proxy-tls": "proxy-tls"}


def add_arguments(p: Any) -> None:
    p.add_argument("--handshakes", type=int, default=300, metavar="N",
                   help="new connections (connect [+ TLS] + hello) per target for the "
                   "handshake rate, over the rounds; 0 skips it (default: %(default)s)")
    p.add_argument("--idle-tls-clients", type=int, default=0, metavar="N",
                   help="also measure the proxies' RSS with N idle clients each, plain "
                   "(proxy) vs TLS (proxy-tls) (default: 0, skipped)")


def run_phases(stack: Any, args: Any, rounds: int, log: Callable[[str], None]) -> dict[str, Any]:
    """The handshake-rate and idle-RSS phases, on the targets the stack has."""
    from bench.stack import process_cpu_seconds

    pids: dict[str, int] = stack.pids
    uris = {t: stack.targets[t] for t in HANDSHAKE_TARGETS if t in stack.targets}
    out: dict[str, Any] = {"handshakes": [], "idle": []}
    if args.handshakes > 0 and uris:
        log(f"bench core: handshake rate, {args.handshakes} connections per target")

        def cpu_of(target: str) -> float | None:
            pid = pids.get(_SERVED_BY[target])
            return None if pid is None else process_cpu_seconds(pid)

        out["handshakes"] = as_json(measure_handshakes(uris, args.handshakes, rounds, cpu_of))
    if args.idle_tls_clients > 0:
        import asyncio

        for target in ("proxy", "proxy-tls"):
            pid = pids.get(target)
            if target in stack.targets and pid is not None:
                log(f"bench core: RSS of {target} with {args.idle_tls_clients} idle clients")
                out["idle"].append(asyncio.run(
                    idle_rss(target, stack.targets[target], pid, args.idle_tls_clients)))
    return out


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def idle_rss(target: str, uri: str, pid: int, clients: int,
                   batch: int = 100, settle_s: float = 2.0) -> dict[str, Any]:
    """The serving process's RSS at rest and with ``clients`` connections open and idle
    (each connected, TLS-handshaken when the uri says so, and past its hello)."""
    import asyncio

    host, port, context = _endpoint(uri)

    async def one() -> asyncio.StreamWriter:
        reader, writer = await asyncio.open_connection(
            host, port, ssl=context, server_hostname=host if context else None)
        writer.write(_HELLO_MESSAGE)
        header = await reader.readexactly(4)
        await reader.readexactly(int.from_bytes(header, "little") - 4)
        return writer

    await asyncio.sleep(settle_s)
    rest = _rss_kb(pid)
    writers: list[asyncio.StreamWriter] = []
    errors = 0
    start = time.perf_counter()
    try:
        for first in range(0, clients, batch):
            results = await asyncio.gather(
                *(one() for _ in range(min(batch, clients - first))), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    errors += 1
                else:
                    writers.append(result)
        open_s = time.perf_counter() - start
        await asyncio.sleep(settle_s)
        loaded = _rss_kb(pid)
    finally:
        for writer in writers:
            writer.close()
    return {
        "target": target, "clients": len(writers), "errors": errors,
        "rss_rest_mb": rest / 1024, "rss_open_mb": loaded / 1024,
        "kb_per_client": (loaded - rest) / max(1, len(writers)),
        "open_s": open_s,
    }


def format_phases(data: dict[str, Any]) -> str:
    parts = []
    if data["handshakes"]:
        parts.append("\nnew connections (connect [+ TLS handshake] + hello), sequential:\n"
                     + format_handshakes([HandshakeRow(**r) for r in data["handshakes"]]))
    for row in data["idle"]:
        parts.append(
            f"{row['target']}: {row['clients']} idle clients ({row['errors']} errors): RSS "
            f"{row['rss_rest_mb']:.0f} MB at rest, {row['rss_open_mb']:.0f} MB open, "
            f"{row['kb_per_client']:.1f} kB per client")
    return "\n".join(parts)
