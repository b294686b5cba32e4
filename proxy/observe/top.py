"""``mongoproxy top``: the admin ``/digest`` as a refreshing terminal table.

Plain ANSI (clear screen + home) and ``urllib``: no curses, no extra dependency::

    mongoproxy top --admin http://127.0.0.1:9216 --interval 2 --limit 20
    mongoproxy top --reset          # POST /digest/reset: statistics start over
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import IO, Any

from proxy.advice.cli import annotate_digest
from proxy.observe.digest import ORDERS

__all__ = ["fetch_digest", "main", "render_table", "reset_digest"]

CLEAR = "\x1b[H\x1b[2J"

_COLUMNS: list[tuple[str, str, int]] = [
    # (header, key, width); numbers right-aligned
    ("HASH", "shape_hash", 16),
    ("CMD", "command", 13),
    ("NAMESPACE", "namespace", 24),
    ("COUNT", "count", 8),
    ("ERR", "errors", 6),
    ("TOTAL ms", "total_ms", 11),
    ("AVG ms", "avg_ms", 9),
    ("P95 ms", "p95_ms", 9),
    ("MAX ms", "max_ms", 9),
    ("DOCS", "docs_returned", 9),
    ("HIT%", "cache_hit_ratio", 5),
    ("INDEX", "index_advice", 8),  # from /advice: served, MISSING, no-index, scan
]


def fetch_digest(admin: str, limit: int, order: str, timeout: float = 5.0) -> dict[str, Any]:
    url = f"{admin.rstrip('/')}/digest?limit={limit}&order={order}"
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        document: dict[str, Any] = json.loads(reply.read())
    return document


def reset_digest(admin: str, timeout: float = 5.0) -> dict[str, Any]:
    """``POST /digest/reset``; the proxy's answer (the summary before the reset)."""
    request = urllib.request.Request(f"{admin.rstrip('/')}/digest/reset", data=b"",
                                     method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        document: dict[str, Any] = json.loads(reply.read())
    return document


def _shape(value: Any) -> str:
    """A shape as compact one-line JSON (/digest gives it as an object)."""
    if value is None or isinstance(value, str):
        return value or ""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _cell(value: Any, key: str, width: int) -> str:
    if value is None:
        text = "-"
    elif key == "cache_hit_ratio":
        text = f"{100 * value:.0f}"
    elif isinstance(value, float):
        text = f"{value:.1f}" if value >= 100 else f"{value:.2f}"
    else:
        text = str(value)
    if len(text) > width:
        text = text[: width - 1] + "…"
    return text.rjust(width) if isinstance(value, (int, float)) else text.ljust(width)


def render_table(document: dict[str, Any], width: int = 160, source: str = "") -> str:
    """The digest document as a text table, one line per shape, fitted to ``width``."""
    lines = [
        f"mongoproxy top  {source}  shapes {document.get('shapes', 0)}/"
        f"{document.get('max_shapes', '?')}  ops {document.get('operations', 0)}  "
        f"evicted {document.get('evicted', 0)}  order {document.get('order', '')}  "
        f"{time.strftime('%H:%M:%S')}",
        "",
    ]
    header = " ".join(h.rjust(w) if i > 2 else h.ljust(w)
                      for i, (h, _k, w) in enumerate(_COLUMNS))
    lines.append((header + " SHAPE")[:width])
    for row in document.get("top", []):
        cells = " ".join(_cell(row.get(k), k, w) for _h, k, w in _COLUMNS)
        lines.append(f"{cells} {_shape(row.get('shape'))}"[:width])
    if not document.get("top"):
        lines.append("(no operations recorded yet)")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mongoproxy top",
                                     description="Show the query digest, refreshing.")
    parser.add_argument("--admin", default="http://127.0.0.1:9216",
                        help="admin endpoint base URL (default %(default)s)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    parser.add_argument("--limit", type=int, default=20, help="shapes shown")
    parser.add_argument("--order", default="total_time", choices=list(ORDERS))
    parser.add_argument("--once", action="store_true", help="print once and exit")
    parser.add_argument("--reset", action="store_true",
                        help="reset the digest (POST /digest/reset) and exit")
    return parser


def main(
    argv: Sequence[str] | None = None,
    out: IO[str] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Exit status: 0, or 1 when ``--once`` cannot reach the admin endpoint."""
    args = _parser().parse_args(argv)
    stream = out if out is not None else sys.stdout
    admin = args.admin if "://" in args.admin else f"http://{args.admin}"
    if args.reset:
        try:
            before = reset_digest(admin)["before"]
        except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
            print(f"mongoproxy top: cannot reset {admin}/digest: {exc}", file=sys.stderr)
            return 1
        stream.write(f"digest reset: {before['shapes']} shapes, {before['operations']} "
                     f"operations forgotten\n")
        return 0
    try:
        while True:
            width = shutil.get_terminal_size((160, 40)).columns
            try:
                document = fetch_digest(admin, args.limit, args.order)
                annotate_digest(document, admin)
                text = render_table(document, width, admin)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                if args.once:
                    print(f"mongoproxy top: cannot read {admin}/digest: {exc}", file=sys.stderr)
                    return 1
                text = f"mongoproxy top: cannot read {admin}/digest: {exc} (retrying)\n"
            if args.once:
                stream.write(text)
                stream.flush()
                return 0
            stream.write(CLEAR + text)
            stream.flush()
            sleep(args.interval)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
