"""The multi-tenant project-management workload of `python -m bench seed|run|storm`.

A data set modelled on the project/portfolio platforms the proxy targets, and the named
operations an application runs against it, with their real command shapes.

Data set (``Dataset(scale, seed)``)
-----------------------------------
Nine collections, every document carrying ``tenant_id``.  Counts at ``--scale 1``
are ``BASE_COUNTS`` (tenants grow with the square root of the scale, at least 3); each
tenant's share of every other collection follows a Zipf-like skew (tenant *i* gets
weight ``1 / (i + 1) ** TENANT_SKEW``), so one tenant is much bigger than the last,
as on real platforms.  Every ``_id`` is a string built from the tenant and a counter
(``t0003-u00017``): the workload can name any seeded document without reading the
data set back, and FerretDB's SQLite handler uses its ``_id`` index only for string
and ObjectId ids.  Document sizes (BSON) are padded with filler text to about
``DOC_BYTES``.  Everything random comes from ``random.Random(seed)``: the same
``--scale`` and ``--seed`` give the same documents, byte for byte.

Operations (``OPERATIONS``; default weights ``DEFAULT_WEIGHTS``)
-----------------------------------------------------------------
* ``permission_check``: ``users.find_one({tenant_id, username})`` with a projection.
* ``task_board``: ``tasks.find({tenant_id, assignee_id, status}).sort(priority: -1)
  .limit(50)``.
* ``project_dashboard``: ``projects.aggregate([$match {tenant_id, portfolio_id},
  $group by status: $sum of 1, budget, spent])``.
* ``timesheet_entry``: ``timesheets.insert_one`` (~1.5 KB).
* ``timesheet_approval``: ``timesheets.update_one({_id, tenant_id}, $set status
  approved)`` on a seeded entry.
* ``notification_fanout``: ``notifications.insert_many`` (5 recipients) then the
  unread ``find({tenant_id, user_id, read: false}).sort(created_at: -1).limit(20)``:
  two commands, timed as one operation.
* ``report``: a month of a tenant: ``timesheets.aggregate($match tenant + date
  range, $group by project: hours)`` and ``costs.aggregate($match tenant + month,
  $group by category: amount)``: two commands, timed as one operation.

FerretDB v1.24 implements ``$sum``/``$count`` in ``$group`` but not ``$avg``, ``$max``
or ``$push``, and has no ``$lookup``/``$facet``: the shapes keep to what it runs.
Tenants are drawn with the same skew as their sizes (big tenants are busier).
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bson import encode

Doc = dict[str, Any]

COLLECTIONS = (
    "tenants",
    "users",
    "portfolios",
    "projects",
    "tasks",
    "timesheets",
    "costs",
    "audit_logs",
    "notifications",
)

BASE_COUNTS: dict[str, int] = {
    "tenants": 20,
    "users": 1000,
    "portfolios": 60,
    "projects": 400,
    "tasks": 8000,
    "timesheets": 16000,
    "costs": 4000,
    "audit_logs": 10000,
    "notifications": 5000,
}
# Per-tenant minimum (every tenant has at least this many).
MIN_PER_TENANT: dict[str, int] = {
    "users": 2,
    "portfolios": 1,
    "projects": 1,
    "tasks": 1,
    "timesheets": 1,
    "costs": 1,
    "audit_logs": 1,
    "notifications": 1,
}
# Target BSON size per document, bytes.
DOC_BYTES: dict[str, int] = {
    "tenants": 2000,
    "users": 3000,
    "portfolios": 2000,
    "projects": 8000,
    "tasks": 4000,
    "timesheets": 1500,
    "costs": 600,
    "audit_logs": 1000,
    "notifications": 500,
}

# Tenant-first compound indexes, as the platforms declare them.
INDEXES: dict[str, list[tuple[list[tuple[str, int]], dict[str, Any]]]] = {
    "tenants": [([("slug", 1)], {"unique": True})],
    "users": [
        ([("tenant_id", 1), ("username", 1)], {"unique": True}),
        ([("tenant_id", 1), ("email", 1)], {}),
    ],
    "portfolios": [([("tenant_id", 1), ("name", 1)], {})],
    "projects": [([("tenant_id", 1), ("portfolio_id", 1), ("status", 1)], {})],
    "tasks": [
        ([("tenant_id", 1), ("assignee_id", 1), ("status", 1)], {}),
        ([("tenant_id", 1), ("project_id", 1), ("status", 1)], {}),
    ],
    "timesheets": [
        ([("tenant_id", 1), ("user_id", 1), ("date", -1)], {}),
        ([("tenant_id", 1), ("status", 1), ("date", -1)], {}),
    ],
    "costs": [([("tenant_id", 1), ("project_id", 1), ("month", 1)], {})],
    "audit_logs": [
        ([("tenant_id", 1), ("at", -1)], {}),
        ([("tenant_id", 1), ("entity_id", 1)], {}),
    ],
    "notifications": [([("tenant_id", 1), ("user_id", 1), ("read", 1), ("created_at", -1)], {})],
}

TENANT_SKEW = 1.1
# Timesheets, audit logs and notifications fall in the MONTHS months before this date.
EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
MONTHS = 3
META_ID = "_bench_meta"  # a document in `tenants` describing the seeded data set

TASK_STATUSES = ("todo", "in_progress", "review", "done")
TASK_STATUS_WEIGHTS = (4, 3, 1, 2)
PROJECT_STATUSES = ("planned", "active", "on_hold", "closed")
COST_CATEGORIES = ("labour", "licences", "hardware", "travel", "services")
ROLES = ("viewer", "member", "manager", "admin")
PERMISSIONS = (
    "task.read", "task.write", "task.assign", "project.read", "project.write",
    "timesheet.submit", "timesheet.approve", "cost.read", "cost.write", "report.read",
    "portfolio.read", "portfolio.write", "user.invite", "audit.read",
)  # fmt: skip
WORDS = (
    "plan", "budget", "review", "deliver", "sprint", "milestone", "risk", "scope",
    "client", "design", "build", "test", "release", "invoice", "meeting", "update",
    "backlog", "estimate", "resource", "quality", "schedule", "stakeholder", "change",
    "request", "approval", "report", "analysis", "migration", "rollout", "training",
)  # fmt: skip

FANOUT_RECIPIENTS = 5
TASK_BOARD_LIMIT = 50
UNREAD_LIMIT = 20

# Default weights: the stated load profile in operations per second (permission checks
# 1000/s, task queries 500/s, notifications 300/s, dashboards 200/s); the profile does
# not name the last three, these small shares are ours.
DEFAULT_WEIGHTS: dict[str, float] = {
    "permission_check": 1000,
    "task_board": 500,
    "notification_fanout": 300,
    "project_dashboard": 200,
    "timesheet_entry": 50,
    "timesheet_approval": 25,
    "report": 5,
}


# ---------------------------------------------------------------- the data set


def _apportion(total: int, weights: list[float], minimum: int) -> list[int]:
    """Split ``total`` by ``weights`` (largest remainder), each share >= ``minimum``."""
    n = len(weights)
    total = max(total, minimum * n)
    spare = total - minimum * n
    wsum = sum(weights)
    raw = [spare * w / wsum for w in weights]
    shares = [int(r) for r in raw]
    order = sorted(range(n), key=lambda i: raw[i] - shares[i], reverse=True)
    for i in order[: spare - sum(shares)]:
        shares[i] += 1
    return [minimum + s for s in shares]


def tenant_id(i: int) -> str:
    return f"t{i:04d}"


@dataclass(frozen=True)
class Dataset:
    """Sizes and ids of the data set for one (scale, seed): no documents held."""

    scale: float
    seed: int
    tenants: int = field(init=False)
    counts: dict[str, list[int]] = field(init=False)  # collection -> count per tenant
    tenant_weights: list[float] = field(init=False)

    def __post_init__(self) -> None:
        if self.scale <= 0:
            raise ValueError("scale must be > 0")
        n = max(3, round(BASE_COUNTS["tenants"] * self.scale**0.5))
        weights = [1.0 / (i + 1) ** TENANT_SKEW for i in range(n)]
        counts = {
            coll: _apportion(round(BASE_COUNTS[coll] * self.scale), weights, MIN_PER_TENANT[coll])
            for coll in COLLECTIONS
            if coll != "tenants"
        }
        object.__setattr__(self, "tenants", n)
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "tenant_weights", weights)

    def total(self, collection: str) -> int:
        return self.tenants if collection == "tenants" else sum(self.counts[collection])

    def totals(self) -> dict[str, int]:
        return {c: self.total(c) for c in COLLECTIONS}

    def meta(self) -> Doc:
        return {
            "_id": META_ID,
            "kind": "bench_meta",
            "scale": self.scale,
            "seed": self.seed,
            "counts": self.totals(),
        }


# ids (tenant t, index j)
def user_id(t: str, j: int) -> str:
    return f"{t}-u{j:05d}"


def username(j: int) -> str:
    return f"user{j:05d}"


def portfolio_id(t: str, j: int) -> str:
    return f"{t}-pf{j:03d}"


def project_id(t: str, j: int) -> str:
    return f"{t}-p{j:05d}"


def task_id(t: str, j: int) -> str:
    return f"{t}-k{j:06d}"


def timesheet_id(t: str, j: int) -> str:
    return f"{t}-ts{j:06d}"


def month_start(k: int) -> dt.datetime:
    """The first instant of the k-th month before EPOCH (k = 1 .. MONTHS)."""
    year, month = EPOCH.year, EPOCH.month - k
    while month < 1:
        month += 12
        year -= 1
    return dt.datetime(year, month, 1, tzinfo=dt.UTC)


class Filler:
    """Deterministic filler text: slices of one long word salad."""

    def __init__(self, rng: random.Random, length: int = 1 << 17) -> None:
        words: list[str] = []
        size = 0
        while size < length:
            w = rng.choice(WORDS)
            words.append(w)
            size += len(w) + 1
        self.text = " ".join(words)
        self.rng = rng

    def take(self, n: int) -> str:
        n = max(0, min(n, len(self.text) - 1))
        start = self.rng.randrange(len(self.text) - n)
        return self.text[start : start + n]


def pad_to(doc: Doc, size: int, filler: Filler, key: str = "notes") -> Doc:
    """Set ``doc[key]`` to filler text so the document's BSON size is about ``size``."""
    doc[key] = ""
    missing = size - len(encode(doc))
    if missing > 0:
        doc[key] = filler.take(missing)
    return doc


def _tenant_docs(ds: Dataset, rng: random.Random, filler: Filler) -> dict[str, list[Doc]]:
    out: dict[str, list[Doc]] = {c: [] for c in COLLECTIONS}
    for i in range(ds.tenants):
        t = tenant_id(i)
        c = {coll: ds.counts[coll][i] for coll in ds.counts}
        out["tenants"].append(pad_to({
            "_id": t, "kind": "tenant", "tenant_id": t, "slug": f"tenant-{i:04d}",
            "name": f"Tenant {i}", "plan": rng.choice(("team", "business", "enterprise")),
            "created_at": EPOCH - dt.timedelta(days=rng.randrange(200, 2000)),
            "settings": {"timezone": "UTC", "week_start": 1, "currency": "EUR"},
        }, DOC_BYTES["tenants"], filler, "description"))  # fmt: skip
        for j in range(c["users"]):
            roles = rng.sample(ROLES, rng.randint(1, 2))
            out["users"].append(pad_to({
                "_id": user_id(t, j), "tenant_id": t, "username": username(j),
                "email": f"{username(j)}@{t}.example", "name": f"User {j} of {t}",
                "status": "active" if rng.random() < 0.95 else "disabled", "roles": roles,
                "permissions": rng.sample(PERMISSIONS, rng.randint(3, len(PERMISSIONS))),
                "last_login": EPOCH - dt.timedelta(minutes=rng.randrange(60 * 24 * 30)),
                "preferences": {"locale": "en", "theme": rng.choice(("light", "dark"))},
            }, DOC_BYTES["users"], filler, "profile"))  # fmt: skip
        for j in range(c["portfolios"]):
            out["portfolios"].append(pad_to({
                "_id": portfolio_id(t, j), "tenant_id": t, "name": f"Portfolio {j}",
                "owner_id": user_id(t, rng.randrange(c["users"])),
            }, DOC_BYTES["portfolios"], filler, "description"))  # fmt: skip
        for j in range(c["projects"]):
            budget = rng.randrange(10_000, 2_000_000)
            out["projects"].append(pad_to({
                "_id": project_id(t, j), "tenant_id": t,
                "portfolio_id": portfolio_id(t, j % c["portfolios"]),
                "name": f"Project {j}", "status": rng.choice(PROJECT_STATUSES),
                "budget": budget, "spent": int(budget * rng.random()),
                "progress": rng.randrange(101),
                "members": [user_id(t, rng.randrange(c["users"])) for _ in range(5)],
                "milestones": [
                    {"name": f"M{k}", "due": EPOCH + dt.timedelta(days=30 * k)} for k in range(4)
                ],
            }, DOC_BYTES["projects"], filler, "description"))  # fmt: skip
        for j in range(c["tasks"]):
            out["tasks"].append(pad_to({
                "_id": task_id(t, j), "tenant_id": t,
                "project_id": project_id(t, rng.randrange(c["projects"])),
                "assignee_id": user_id(t, rng.randrange(c["users"])),
                "status": rng.choices(TASK_STATUSES, TASK_STATUS_WEIGHTS)[0],
                "priority": rng.randint(1, 5), "title": f"Task {j}",
                "due": EPOCH + dt.timedelta(days=rng.randrange(-30, 60)),
                "estimate_h": rng.randint(1, 40),
            }, DOC_BYTES["tasks"], filler, "description"))  # fmt: skip
        for j in range(c["timesheets"]):
            out["timesheets"].append(pad_to({
                "_id": timesheet_id(t, j), "tenant_id": t,
                "user_id": user_id(t, rng.randrange(c["users"])),
                "project_id": project_id(t, rng.randrange(c["projects"])),
                "task_id": task_id(t, rng.randrange(c["tasks"])),
                "date": EPOCH - dt.timedelta(days=1 + rng.randrange(30 * MONTHS)),
                "hours": rng.randint(1, 16) / 2,
                "status": "submitted" if rng.random() < 0.6 else "approved",
            }, DOC_BYTES["timesheets"], filler))  # fmt: skip
        for j in range(c["costs"]):
            out["costs"].append(pad_to({
                "_id": f"{t}-c{j:05d}", "tenant_id": t,
                "project_id": project_id(t, rng.randrange(c["projects"])),
                "month": month_start(1 + rng.randrange(MONTHS)),
                "category": rng.choice(COST_CATEGORIES), "amount": rng.randrange(100, 50_000),
            }, DOC_BYTES["costs"], filler, "memo"))  # fmt: skip
        for j in range(c["audit_logs"]):
            out["audit_logs"].append(pad_to({
                "_id": f"{t}-a{j:06d}", "tenant_id": t,
                "actor_id": user_id(t, rng.randrange(c["users"])),
                "action": rng.choice(("create", "update", "delete", "approve", "login")),
                "entity_id": task_id(t, rng.randrange(c["tasks"])),
                "at": EPOCH - dt.timedelta(seconds=rng.randrange(86400 * 30 * MONTHS)),
            }, DOC_BYTES["audit_logs"], filler, "details"))  # fmt: skip
        for j in range(c["notifications"]):
            out["notifications"].append(pad_to({
                "_id": f"{t}-n{j:06d}", "tenant_id": t,
                "user_id": user_id(t, rng.randrange(c["users"])),
                "read": rng.random() < 0.7, "kind": rng.choice(("mention", "assign", "due")),
                "created_at": EPOCH - dt.timedelta(seconds=rng.randrange(86400 * 30)),
            }, DOC_BYTES["notifications"], filler, "message"))  # fmt: skip
    return out


def generate(ds: Dataset) -> dict[str, list[Doc]]:
    """Every document of the data set, per collection (deterministic)."""
    rng = random.Random(ds.seed)
    return _tenant_docs(ds, rng, Filler(rng))


# ---------------------------------------------------------------- operations


class UnexpectedResult(Exception):
    """An operation's reply was not what the data set implies (counted as an error)."""


@dataclass
class OpContext:
    """What an operation needs: the database, the data set, a private random stream and
    a tag that keeps this worker's inserted ``_id`` values unique."""

    db: Any  # pymongo AsyncDatabase
    ds: Dataset
    rng: random.Random
    tag: str
    filler: Filler
    seq: int = 0

    def tenant(self) -> tuple[int, str]:
        i = self.rng.choices(range(self.ds.tenants), self.ds.tenant_weights)[0]
        return i, tenant_id(i)

    def pick(self, collection: str, i: int) -> int:
        return self.rng.randrange(self.ds.counts[collection][i])

    def next_id(self, t: str, kind: str) -> str:
        self.seq += 1
        return f"{t}-{kind}-{self.tag}-{self.seq}"


async def permission_check(ctx: OpContext) -> None:
    i, t = ctx.tenant()
    name = username(ctx.pick("users", i))
    doc = await ctx.db.users.find_one(
        {"tenant_id": t, "username": name},
        projection={"roles": 1, "permissions": 1, "status": 1},
    )
    if doc is None:
        raise UnexpectedResult(f"user {name} of {t} not found")


async def task_board(ctx: OpContext) -> None:
    i, t = ctx.tenant()
    cursor = (
        ctx.db.tasks.find(
            {
                "tenant_id": t,
                "assignee_id": user_id(t, ctx.pick("users", i)),
                "status": ctx.rng.choices(TASK_STATUSES, TASK_STATUS_WEIGHTS)[0],
            }
        )
        .sort("priority", -1)
        .limit(TASK_BOARD_LIMIT)
    )
    await cursor.to_list()


async def project_dashboard(ctx: OpContext) -> None:
    i, t = ctx.tenant()
    pf = portfolio_id(t, ctx.pick("portfolios", i))
    cursor = await ctx.db.projects.aggregate(
        [
            {"$match": {"tenant_id": t, "portfolio_id": pf}},
            {
                "$group": {
                    "_id": "$status",
                    "projects": {"$sum": 1},
                    "budget": {"$sum": "$budget"},
                    "spent": {"$sum": "$spent"},
                }
            },
        ]
    )
    rows = await cursor.to_list()
    if not rows:
        raise UnexpectedResult(f"portfolio {pf} has no projects")


def _timesheet(ctx: OpContext, i: int, t: str) -> Doc:
    doc: Doc = {
        "_id": ctx.next_id(t, "ts"),
        "tenant_id": t,
        "user_id": user_id(t, ctx.pick("users", i)),
        "project_id": project_id(t, ctx.pick("projects", i)),
        "task_id": task_id(t, ctx.pick("tasks", i)),
        "date": EPOCH - dt.timedelta(days=1 + ctx.rng.randrange(7)),
        "hours": ctx.rng.randint(1, 16) / 2,
        "status": "submitted",
    }
    return pad_to(doc, DOC_BYTES["timesheets"], ctx.filler)


async def timesheet_entry(ctx: OpContext) -> None:
    i, t = ctx.tenant()
    await ctx.db.timesheets.insert_one(_timesheet(ctx, i, t))


async def timesheet_approval(ctx: OpContext) -> None:
    i, t = ctx.tenant()
    ts = timesheet_id(t, ctx.pick("timesheets", i))
    result = await ctx.db.timesheets.update_one(
        {"_id": ts, "tenant_id": t},
        {
            "$set": {
                "status": "approved",
                "approved_by": user_id(t, ctx.pick("users", i)),
                "approved_at": EPOCH,
            }
        },
    )
    if result.matched_count != 1:
        raise UnexpectedResult(f"timesheet {ts} not found")


async def notification_fanout(ctx: OpContext) -> None:
    i, t = ctx.tenant()
    recipients = [user_id(t, ctx.pick("users", i)) for _ in range(FANOUT_RECIPIENTS)]
    docs = [
        pad_to(
            {
                "_id": ctx.next_id(t, "n"),
                "tenant_id": t,
                "user_id": u,
                "read": False,
                "kind": "mention",
                "created_at": EPOCH,
            },
            DOC_BYTES["notifications"],
            ctx.filler,
            "message",
        )
        for u in recipients
    ]
    await ctx.db.notifications.insert_many(docs)
    cursor = (
        ctx.db.notifications.find({"tenant_id": t, "user_id": recipients[0], "read": False})
        .sort("created_at", -1)
        .limit(UNREAD_LIMIT)
    )
    if not await cursor.to_list():
        raise UnexpectedResult(f"no unread notification for {recipients[0]} right after insert")


async def report(ctx: OpContext) -> None:
    _, t = ctx.tenant()
    k = 1 + ctx.rng.randrange(MONTHS)
    start, end = month_start(k), month_start(k - 1) if k > 1 else EPOCH
    hours = await ctx.db.timesheets.aggregate(
        [
            {"$match": {"tenant_id": t, "date": {"$gte": start, "$lt": end}}},
            {"$group": {"_id": "$project_id", "hours": {"$sum": "$hours"}, "entries": {"$sum": 1}}},
        ]
    )
    await hours.to_list()
    costs = await ctx.db.costs.aggregate(
        [
            {"$match": {"tenant_id": t, "month": start}},
            {"$group": {"_id": "$category", "total": {"$sum": "$amount"}}},
        ]
    )
    await costs.to_list()


OPERATIONS: dict[str, Callable[[OpContext], Awaitable[None]]] = {
    "permission_check": permission_check,
    "task_board": task_board,
    "notification_fanout": notification_fanout,
    "project_dashboard": project_dashboard,
    "timesheet_entry": timesheet_entry,
    "timesheet_approval": timesheet_approval,
    "report": report,
}

# Cache rules for the proxy-cache target: the permission check, the task board and the
# dashboard reads (the proxy's `cache.rules` format).
CACHE_RULES: list[Doc] = [
    {"match": {"collection": "users", "command": "find"}, "ttl_s": 600},
    {"match": {"collection": "tasks", "command": "find"}, "ttl_s": 60},
    {"match": {"collection": "projects", "command": "aggregate"}, "ttl_s": 60},
]


def parse_weights(text: str) -> dict[str, float]:
    """``name=weight,name=weight``: replaces the defaults for the names given; weight 0
    drops an operation."""
    weights = dict(DEFAULT_WEIGHTS)
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in OPERATIONS:
            raise ValueError(f"expected name=weight with a name from {', '.join(OPERATIONS)}")
        w = float(value)
        if w < 0:
            raise ValueError(f"weight of {name} must be >= 0")
        weights[name] = w
    weights = {k: v for k, v in weights.items() if v > 0}
    if not weights:
        raise ValueError("every weight is 0")
    return weights
