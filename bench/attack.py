"""`python -m bench attack`: a well-behaved client's latency while an attacker runs.

One proxy (with a proxy user, so that login matters) in front of FerretDB. Each round
runs every scenario for ``--seconds``: the good client (pymongo, authenticated,
``find_one`` by ``_id`` in a loop on this process) alone, then with each attacker in
its own process. Reported per scenario: the good client's p50, its ratio to the
no-attacker p50 of the same round (median and spread over rounds), its operation
count and errors. The goal (issue 15) is a ratio within 2x.

Attackers (the findings of issue 15):
  bomb-preauth   2 connections sending 47 KB zlib messages that inflate to 40 MB,
                 without login
  bomb-auth      the same after logging in and negotiating zlib
  minkey         logged in, ``{ping: 1, x: MinKey()}`` (FerretDB drops the connection)
  partial        8 connections each sending most of a 46 MB message, then stalling
  nonreader      10 logged-in connections asking for an 8 MB reply, never reading it
  bruteforce     4 connections trying wrong passwords as fast as they are answered
  connections    1,000 idle connections opened and held

Each attacker says when it is established (for ``nonreader``: once every reply has
started to arrive, so that FerretDB's work to produce the 8 MB replies, the same
without the proxy, is not what is measured); the good client starts 0.5 s later.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import select
import socket
import statistics
import struct
import threading
import time
import zlib
from collections.abc import Callable
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import bson
from bson.min_key import MinKey
from pymongo import MongoClient

from bench.stack import HOST, start_stack
from proxy.identity.credentials import hash_password
from proxy.pool.auth import Credentials, authenticate
from proxy.wire import HEADER_SIZE, OpCode, decode_body, encode_op_msg, pack_header, parse_op_msg

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "attack.json"
USER, PASSWORD, DB = "bench", "bench-password", "attack"
Doc = dict[str, Any]


# --------------------------------------------------------------------------- raw client


class Raw:
    """A blocking raw-socket client: one request, one reply."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rid = 0

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, doc: Doc) -> Doc:
        self.rid += 1
        self.send(encode_op_msg(self.rid, 0, bson.encode(doc)))
        return self.reply()

    def reply(self) -> Doc:
        header = self._exact(HEADER_SIZE)
        length = struct.unpack_from("<i", header)[0]
        message = header + self._exact(length - HEADER_SIZE)
        if struct.unpack_from("<i", message, 12)[0] != OpCode.OP_MSG:
            return {"ok": 0.0}
        return decode_body(parse_op_msg(message))

    def _exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return bytes(buf)

    def login(self, password: str = PASSWORD) -> None:
        async def run(doc: Doc) -> Doc:
            return self.command(doc)

        asyncio.run(authenticate(run, Credentials(USER, password)))

    def close(self) -> None:
        self.sock.close()


def _bomb(rid: int) -> bytes:
    payload = zlib.compress(b"\x00" * 40_000_000, 9)
    rest = struct.pack("<iiB", OpCode.OP_MSG, 40_000_000, 2) + payload
    return pack_header(HEADER_SIZE + len(rest), rid, 0, OpCode.OP_COMPRESSED) + rest


# --------------------------------------------------------------------------- attackers


def _loop(stop: Event, body: Callable[[], None], ready: Event | None = None) -> None:
    if ready is not None:
        ready.set()
    while not stop.is_set():
        try:
            body()
        except (OSError, ConnectionError):
            time.sleep(0.05)  # the proxy closed us: that is its right


def _bombs(port: int, stop: Event, login: bool) -> None:
    bomb = _bomb(1)
    raw = Raw(port)

    def once() -> None:
        nonlocal raw
        if raw.sock.fileno() < 0:
            raw = Raw(port)
        if login and raw.rid == 0:
            raw.command({"hello": 1, "compression": ["zlib"], "client": {}, "$db": "admin"})
            raw.login()
        raw.send(bomb)
        try:
            raw.reply()
        except ConnectionError:
            raw.close()
            raise

    _loop(stop, once)


def attack_bomb_preauth(port: int, stop: Event, ready: Event) -> None:
    ready.set()
    threads = [threading.Thread(target=_bombs, args=(port, stop, False)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def attack_bomb_auth(port: int, stop: Event, ready: Event) -> None:
    ready.set()
    threads = [threading.Thread(target=_bombs, args=(port, stop, True)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def attack_minkey(port: int, stop: Event, ready: Event) -> None:
    client: MongoClient[Doc] = MongoClient(f"mongodb://{USER}:{PASSWORD}@{HOST}:{port}/")

    def once() -> None:
        with contextlib.suppress(Exception):
            client.admin.command({"ping": 1, "x": MinKey()})
        time.sleep(0.05)

    _loop(stop, once, ready)
    client.close()


def attack_partial(port: int, stop: Event, ready: Event) -> None:
    held = []
    for _ in range(8):
        raw = Raw(port)
        with contextlib.suppress(OSError):
            raw.send(pack_header(46_000_000, 1, 0, OpCode.OP_MSG) + b"\x00" * 45_000_000)
        held.append(raw)
    ready.set()
    stop.wait()
    for raw in held:
        raw.close()


def attack_nonreader(port: int, stop: Event, ready: Event) -> None:
    held = []
    for _ in range(10):
        raw = Raw(port)
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.login()
        raw.rid += 1
        raw.send(encode_op_msg(raw.rid, 0, bson.encode(
            {"find": "big", "batchSize": 100, "$db": DB})))
        held.append(raw)
    # Measured once every reply has started to arrive: the attack is the memory the
    # unread replies pin, not FerretDB's work to produce them (the same direct).
    waiting = [raw.sock for raw in held]
    deadline = time.monotonic() + 60
    while waiting and time.monotonic() < deadline:
        readable, _, _ = select.select(waiting, [], [], 1)
        waiting = [sock for sock in waiting if sock not in readable]
    ready.set()
    stop.wait()
    for raw in held:
        raw.close()


def attack_bruteforce(port: int, stop: Event, ready: Event) -> None:
    def worker() -> None:
        raw = Raw(port)

        def once() -> None:
            nonlocal raw
            try:
                raw.login("wrong-password")
            except Exception as exc:
                if isinstance(exc, OSError):
                    raw = Raw(port)

        _loop(stop, once)

    ready.set()
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def attack_connections(port: int, stop: Event, ready: Event) -> None:
    held = []
    for _ in range(1000):
        try:
            held.append(socket.create_connection((HOST, port), timeout=5))
        except OSError:
            break
    ready.set()
    stop.wait()
    for sock in held:
        sock.close()


ATTACKS: dict[str, Callable[[int, Event, Event], None]] = {
    "bomb-preauth": attack_bomb_preauth,
    "bomb-auth": attack_bomb_auth,
    "minkey": attack_minkey,
    "partial": attack_partial,
    "nonreader": attack_nonreader,
    "bruteforce": attack_bruteforce,
    "connections": attack_connections,
}


# --------------------------------------------------------------------------- measuring


def _good_client(uri: str, seconds: float) -> dict[str, Any]:
    client: MongoClient[Doc] = MongoClient(uri, retryReads=False)
    coll = client[DB].good
    coll.find_one({"_id": 1})  # login and connect before the clock starts
    latencies: list[float] = []
    errors = 0
    end = time.perf_counter() + seconds
    while (now := time.perf_counter()) < end:
        try:
            coll.find_one({"_id": 1})
            latencies.append(time.perf_counter() - now)
        except Exception:
            errors += 1
    client.close()
    return {
        "ops": len(latencies),
        "errors": errors,
        "p50_us": round(statistics.median(latencies) * 1e6, 1) if latencies else None,
    }


def _scenario(name: str, port: int, uri: str, seconds: float) -> dict[str, Any]:
    if name == "none":
        return _good_client(uri, seconds)
    stop, ready = multiprocessing.Event(), multiprocessing.Event()
    proc = multiprocessing.Process(target=ATTACKS[name], args=(port, stop, ready), daemon=True)
    proc.start()
    ready.wait(90)
    time.sleep(0.5)  # let the attack get going
    try:
        return _good_client(uri, seconds)
    finally:
        stop.set()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        time.sleep(0.3)


def main(args: argparse.Namespace) -> int:
    scenarios = ["none", *(args.only or ATTACKS)]
    users = [{"username": USER, "password_sha256": hash_password(PASSWORD, iterations=4096),
              "tenant": "*"}]
    extra = {"tenancy": {"users": users},
             # the brute force must not lock the good client's user out for the run
             "auth_throttle": {"lockout_failures": 1_000_000}}
    with start_stack(proxy_extra=extra) as stack:
        direct: MongoClient[Doc] = MongoClient(stack.direct_uri)
        direct[DB].good.replace_one({"_id": 1}, {"_id": 1, "v": "x"}, upsert=True)
        if not direct[DB].big.estimated_document_count():
            direct[DB].big.insert_many([{"_id": i, "pad": "x" * 100_000} for i in range(80)])
        direct.close()
        port = int(stack.proxy_uri.rsplit(":", 1)[1].strip("/"))
        uri = f"mongodb://{USER}:{PASSWORD}@{HOST}:{port}/"
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            row = {name: _scenario(name, port, uri, args.seconds) for name in scenarios}
            rounds.append(row)
            if not args.quiet:
                print(f"round {r + 1}: " + ", ".join(
                    f"{n} p50 {v['p50_us']} us ({v['ops']} ops, {v['errors']} err)"
                    for n, v in row.items()))
    summary = _summarize(rounds, scenarios)
    result = {"seconds": args.seconds, "rounds": rounds, "summary": summary}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'scenario':14} {'p50 ratio':>10} {'spread':>14} {'ops':>7} {'errors':>6}")
    for name, s in summary.items():
        print(f"{name:14} {s['ratio_median']:>10} {s['ratio_min']:>6}-{s['ratio_max']:<7} "
              f"{s['ops']:>7} {s['errors']:>6}")
    return 0


def _summarize(rounds: list[dict[str, Any]], scenarios: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name in scenarios:
        ratios = [row[name]["p50_us"] / row["none"]["p50_us"] for row in rounds
                  if row[name]["p50_us"] and row["none"]["p50_us"]]
        summary[name] = {
            "ratio_median": round(statistics.median(ratios), 2) if ratios else None,
            "ratio_min": round(min(ratios), 2) if ratios else None,
            "ratio_max": round(max(ratios), 2) if ratios else None,
            "ops": sum(row[name]["ops"] for row in rounds),
            "errors": sum(row[name]["errors"] for row in rounds),
        }
    return summary


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "attack", help="a well-behaved client's p50 with and without each attacker")
    p.add_argument("--seconds", type=float, default=3.0, help="per scenario and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", nargs="+", choices=sorted(ATTACKS), help="these attackers")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON,
                   help="default: bench/results/attack.json")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=main)  # fmt: skip
