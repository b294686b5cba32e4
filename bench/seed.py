"""`python -m bench seed`: load the multi-tenant data set (bench/workload.py) into a database.

Drops the nine collections of the target database (``--db``, default ``bench``), inserts
the documents for ``--scale``/``--seed`` in batches, creates the tenant-first indexes, and
writes a description of the data set (``_id: "_bench_meta"`` in ``tenants``) that
``python -m bench run`` reads to generate its operations.  Prints, per collection, the
documents, their average BSON size and the indexes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bson import encode
from pymongo import MongoClient

from bench.workload import COLLECTIONS, INDEXES, META_ID, Dataset, generate

DEFAULT_DB = "bench"
BATCH_BYTES = 4_000_000

Doc = dict[str, Any]


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text}")
    return value


def add_dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scale",
        type=positive_float,
        default=0.05,
        help="data set size; 1 = 20 tenants, 1,000 users, 8,000 tasks, 16,000 timesheets, "
        "... (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    p.add_argument("--db", default=DEFAULT_DB, help="database name (default: %(default)s)")


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "seed",
        help="load the multi-tenant project-management data set",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--uri", required=True, help="where to load it (FerretDB, MongoDB or proxy)")
    add_dataset_args(p)
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the summary here")
    p.set_defaults(func=main)


def _batches(docs: list[Doc]) -> list[list[Doc]]:
    out: list[list[Doc]] = [[]]
    size = 0
    for d in docs:
        n = len(encode(d))
        if out[-1] and size + n > BATCH_BYTES:
            out.append([])
            size = 0
        out[-1].append(d)
        size += n
    return out


def seed_database(db: Any, ds: Dataset, log: bool = True) -> dict[str, Any]:
    """Drop, load and index the data set in ``db`` (a pymongo sync Database)."""
    t0 = time.perf_counter()
    docs = generate(ds)
    gen_s = time.perf_counter() - t0
    summary: dict[str, Any] = {
        "scale": ds.scale,
        "seed": ds.seed,
        "database": db.name,
        "tenants": ds.tenants,
        "generate_s": gen_s,
        "collections": {},
    }
    for coll in COLLECTIONS:
        t1 = time.perf_counter()
        db.drop_collection(coll)
        for batch in _batches(docs[coll]):
            db[coll].insert_many(batch, ordered=False)
        for keys, opts in INDEXES[coll]:
            db[coll].create_index(keys, **opts)
        sizes = [len(encode(d)) for d in docs[coll]]
        summary["collections"][coll] = {
            "documents": len(sizes),
            "avg_bytes": round(sum(sizes) / len(sizes)) if sizes else 0,
            "total_bytes": sum(sizes),
            "indexes": [dict(keys) for keys, _ in INDEXES[coll]],
            "load_s": round(time.perf_counter() - t1, 3),
        }
        if log:
            c = summary["collections"][coll]
            print(
                f"  {coll:<14} {c['documents']:>7} docs  avg {c['avg_bytes']:>5} B  "
                f"{c['total_bytes'] / 1e6:>7.2f} MB  {len(c['indexes'])} index(es)  "
                f"{c['load_s']:.2f} s",
                file=sys.stderr,
                flush=True,
            )
    db.tenants.replace_one({"_id": META_ID}, ds.meta(), upsert=True)
    summary["total_s"] = round(time.perf_counter() - t0, 3)
    return summary


def read_dataset(db: Any) -> Dataset:
    """The data set a database was seeded with (from its ``_bench_meta`` document)."""
    meta = db.tenants.find_one({"_id": META_ID})
    if meta is None:
        raise SystemExit(
            f"database {db.name!r} was not seeded: run `python -m bench seed --uri ... "
            f"--db {db.name}` first"
        )
    ds = Dataset(float(meta["scale"]), int(meta["seed"]))
    if meta.get("counts") != ds.totals():
        raise SystemExit(f"database {db.name!r}: seeded by another version of bench/workload.py")
    return ds


def main(args: argparse.Namespace) -> int:
    ds = Dataset(args.scale, args.seed)
    print(
        f"bench seed: scale {ds.scale}, seed {ds.seed}, {ds.tenants} tenants -> "
        f"{args.uri} db {args.db}",
        file=sys.stderr,
    )
    client: MongoClient[Doc] = MongoClient(
        args.uri, directConnection=True, appname="mongoproxy-bench-seed"
    )
    with client:
        summary = seed_database(client[args.db], ds)
    total = sum(c["total_bytes"] for c in summary["collections"].values())
    print(f"seeded {total / 1e6:.1f} MB in {summary['total_s']:.1f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0
