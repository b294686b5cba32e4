"""``mongoproxy advise --admin URL [--format text|json|js] [--limit N] [--window S]``:
the advice of a running proxy, as a report, as JSON, or as ready-to-paste mongosh
commands."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import IO, Any

from proxy.advice.render import render_js, render_text

__all__ = ["annotate_digest", "fetch_advice", "main"]


def fetch_advice(admin: str, limit: int = 50, timeout: float = 5.0,
                 window_s: float | None = None) -> dict[str, Any]:
    url = f"{admin.rstrip('/')}/advice?limit={limit}"
    if window_s is not None:
        url += f"&window={window_s:g}"
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        document: dict[str, Any] = json.loads(reply.read())
    return document


def annotate_digest(document: dict[str, Any], admin: str) -> None:
    """Add each digest row's index status (``served``, ``MISSING``, ``no-index``...) as
    ``index_advice``, for ``mongoproxy top``; "-" when the advice cannot be read."""
    try:
        advice = fetch_advice(admin, limit=0)
        status = {s["shape_hash"]: s["status"] for s in advice.get("shapes", [])}
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
        status = {}
    labels = {"missing": "MISSING", "unindexable": "no-index", "no-filter": "scan"}
    for row in document.get("top", []):
        found = status.get(row.get("shape_hash"))
        row["index_advice"] = "-" if found is None else labels.get(found, found)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mongoproxy advise",
        description="Index advice from the query shapes a running proxy has seen.")
    parser.add_argument("--admin", default="http://127.0.0.1:9216",
                        help="admin endpoint base URL (default %(default)s)")
    parser.add_argument("--format", choices=("text", "json", "js"), default="text")
    parser.add_argument("--limit", type=int, default=50, help="missing indexes shown")
    parser.add_argument("--window", type=float, default=None, metavar="SECONDS",
                        help="rank by the time spent in the last SECONDS "
                             "(default: since the digest started)")
    return parser


def main(argv: Sequence[str] | None = None, out: IO[str] | None = None) -> int:
    """Exit status 0, or 1 when the admin endpoint cannot be read."""
    args = _parser().parse_args(argv)
    stream = out if out is not None else sys.stdout
    admin = args.admin if "://" in args.admin else f"http://{args.admin}"
    try:
        advice = fetch_advice(admin, max(0, args.limit), window_s=args.window)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"mongoproxy advise: cannot read {admin}/advice: {exc}", file=sys.stderr)
        return 1
    if args.format == "json":
        stream.write(json.dumps(advice, indent=2) + "\n")
    elif args.format == "js":
        stream.write(render_js(advice))
    else:
        stream.write(render_text(advice))
    stream.flush()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
