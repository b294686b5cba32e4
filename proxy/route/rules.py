"""Command-class routing: named classes, ordered rules, and the pure routing decision.

Rules are tried in order; the first whose ``match`` fits (every key given must fit; a
key never fits a value the command does not have) names the class, else ``default``.
Writes always go to the primary (``deny`` and ``max_time_ms`` still apply); transaction
statements are pinned by the caller (``pinned="transaction"``); cursor continuations
skip the rules (``pinned="cursor"``). The user-facing reference, with the name-pattern
syntax and every class option, is docs/routing.md and config/routing.yaml.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from pymongo.read_preferences import _ServerMode

from proxy.classify import Classification
from proxy.commands import NEVER_DENIED, WRITE_COMMANDS
from proxy.configbase import Strict
from proxy.errors import UNAUTHORIZED, ProxyError
from proxy.route.readpref import PRIMARY, ReadPreferenceError, read_preference

__all__ = [
    "CURSOR_CLASS",
    "DEFAULT_CLASS",
    "MIN_MAX_STALENESS_S",
    "NEVER_DENIED",
    "UNAUTHORIZED",
    "ClassConfig",
    "MatchConfig",
    "Matcher",
    "NamePattern",
    "RouteDecision",
    "RoutingConfig",
    "RuleConfig",
    "config_errors",
    "decide",
    "duplicate_names",
    "rule_label",
]

MIN_MAX_STALENESS_S = 90
DEFAULT_CLASS = "default"
CURSOR_CLASS = "(cursor)"
ReadMode = Literal["primary", "primaryPreferred", "secondary", "secondaryPreferred", "nearest"]
_CLASS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")
_GLOB_CHARS = frozenset("*?[")


def _invalid(title: str, errors: list[tuple[tuple[str | int, ...], str, Any]]) -> ValidationError:
    """A ValidationError whose errors name key paths below the model being validated."""
    return ValidationError.from_exception_data(title, [
        InitErrorDetails(type=PydanticCustomError("routing", message), loc=loc, input=value)
        for loc, message, value in errors
    ])


# For other sections' validators (the cache rules) that report errors the same way.
config_errors = _invalid


# --- name patterns -------------------------------------------------------------------

class NamePattern:
    """A compiled name pattern (see the module docstring for the syntax)."""

    __slots__ = ("exact", "only_exact", "searches", "source")

    def __init__(self, source: str | list[str] | tuple[str, ...]) -> None:
        items = [source] if isinstance(source, str) else list(source)
        if not items:
            raise ValueError("an empty list matches nothing; leave the key out instead")
        exact: set[str] = set()
        globs: list[str] = []
        searches: list[Callable[[str], object]] = []
        for item in items:
            if len(item) >= 2 and item[0] == "/" and item[-1] == "/":
                try:
                    searches.append(re.compile(item[1:-1]).search)
                except re.error as exc:
                    raise ValueError(f"invalid regular expression {item}: {exc}") from None
                continue
            for alt in item.split("|"):
                if not alt:
                    raise ValueError(f"empty alternative in {item!r}")
                if _GLOB_CHARS.intersection(alt):
                    globs.append(fnmatch.translate(alt))
                else:
                    exact.add(alt)
        if globs:
            searches.append(re.compile("|".join(f"(?:{g})" for g in globs)).match)
        self.exact = frozenset(exact)
        self.searches = tuple(searches)
        self.only_exact = not searches
        self.source = source

    def __call__(self, value: str | None) -> bool:
        if value is None:
            return False
        if value in self.exact:
            return True
        for search in self.searches:  # noqa: SIM110 - a plain loop: no generator per call
            if search(value) is not None:
                return True
        return False

    def any_of(self, values: frozenset[str]) -> bool:
        if self.only_exact:
            return not self.exact.isdisjoint(values)
        return any(self(v) for v in values)

    def __repr__(self) -> str:
        return f"NamePattern({self.source!r})"


# --- configuration models ------------------------------------------------------------

NameField = str | list[str] | None


class MatchConfig(Strict):
    """What a rule matches; every key given must fit (name patterns: docs/routing.md)."""

    command: NameField = None  # command name (an explain is matched as what it explains)
    database: NameField = None  # the command's database ($db)
    collection: NameField = None  # the collection the command names
    has_stage: NameField = None  # a top-level stage of an aggregate pipeline, e.g. $group
    text_search: bool | None = None  # the command uses $text or $search
    app_name: NameField = None  # the appName the client sent in its handshake
    # A string equal to the command's comment, or a document whose every key must be
    # in the command's comment document.
    comment: str | dict[str, Any] | None = None
    user: NameField = None  # the proxy user the connection authenticated as
    tenant: NameField = None  # the tenant the connection is bound to

    @field_validator(
        "command", "database", "collection", "has_stage", "app_name", "user", "tenant"
    )
    @classmethod
    def _valid_pattern(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value is not None:
            NamePattern(value)  # ValueError names the problem
        return value


class RuleConfig(Strict):
    match: MatchConfig
    class_: str = Field(alias="class")  # a name under routing.classes
    # Optional label for /rules and mongoproxy_rule_hits_total (else the rule's index).
    name: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$",
                             max_length=64)

    def text(self) -> str:
        """The rule as compact YAML, for logs and explain-route."""
        doc: dict[str, Any] = {
            "match": self.match.model_dump(exclude_none=True),
            "class": self.class_,
        }
        if self.name is not None:
            doc["name"] = self.name
        return str(yaml.safe_dump(
            doc, default_flow_style=True, sort_keys=False, width=1 << 30
        )).strip()


class ClassConfig(Strict):
    # Where reads of the class go (writes always go to the primary).
    read_preference: ReadMode | None = None
    tags: list[dict[str, str]] | None = None  # tag sets, tried in order
    max_staleness_s: int | None = None  # at least 90 (MongoDB's minimum)
    # Sets maxTimeMS when the command has none, 0 or a larger one.
    max_time_ms: int | None = Field(default=None, gt=0)
    # override: ignore the driver's $readPreference; honor: use it when sent. Default:
    # override when the class names a read_preference, honor otherwise.
    client_read_preference: Literal["honor", "override"] | None = None
    # Refuse the class's commands with this message (code 13); takes no other option.
    deny: str | None = Field(default=None, min_length=1)

    @field_validator("max_staleness_s")
    @classmethod
    def _staleness_minimum(cls, value: int | None) -> int | None:
        if value is not None and value < MIN_MAX_STALENESS_S:
            raise PydanticCustomError(
                "max_staleness",
                f"maxStalenessSeconds must be at least {MIN_MAX_STALENESS_S} "
                f"(MongoDB's minimum), got {value}",
            )
        return value

    @model_validator(mode="wrap")
    @classmethod
    def _consistent(cls, data: Any, handler: Callable[[Any], ClassConfig]) -> ClassConfig:
        self = handler(data)
        errors: list[tuple[tuple[str | int, ...], str, Any]] = []
        if self.deny is not None:
            extra = [
                k for k in type(self).model_fields if k != "deny" and getattr(self, k) is not None
            ]
            if extra:
                errors.append(((), f"a deny class takes no other option (remove: "
                                   f"{', '.join(sorted(extra))})", data))
        elif self.read_preference is None:
            for key in ("tags", "max_staleness_s"):
                if getattr(self, key) is not None:
                    errors.append(((key,), "needs read_preference", getattr(self, key)))
            if self.client_read_preference == "override":
                errors.append((("client_read_preference",),
                               "override needs read_preference", "override"))
        else:
            try:
                self.selector()
            except ReadPreferenceError as exc:
                errors.append(((), f"invalid read preference: {exc}", data))
        if errors:
            raise _invalid(cls.__name__, errors)
        return self

    @property
    def honors_client(self) -> bool:
        if self.client_read_preference is not None:
            return self.client_read_preference == "honor"
        return self.read_preference is None

    def selector(self) -> _ServerMode:
        """The class's own read preference (primary when it names none)."""
        if self.read_preference is None:
            return PRIMARY
        return read_preference(
            self.read_preference,
            [dict(t) for t in self.tags] if self.tags is not None else None,
            self.max_staleness_s if self.max_staleness_s is not None else -1,
        )


class RoutingConfig(Strict):
    """Command classes and the ordered rules that pick them (reloaded live)."""

    default: ClassConfig = ClassConfig()  # the class of a command no rule matches
    classes: dict[str, ClassConfig] = {}  # named classes
    rules: tuple[RuleConfig, ...] = ()  # tried in order; the first that fits names the class

    # Built once by validation; kept in the instance __dict__ (not a pydantic private
    # attribute, whose access costs ~2 us through BaseModel.__getattr__).
    _compiled: ClassVar[_Compiled]

    @model_validator(mode="wrap")
    @classmethod
    def _cross_check(cls, data: Any, handler: Callable[[Any], RoutingConfig]) -> RoutingConfig:
        self = handler(data)
        errors: list[tuple[tuple[str | int, ...], str, Any]] = []
        for name in self.classes:
            if name == DEFAULT_CLASS or not _CLASS_NAME.match(name):
                errors.append(((("classes", name)), (
                    f"invalid class name {name!r}: use letters, digits, '_' and '-' "
                    f"(not starting with a digit or '-'), and not {DEFAULT_CLASS!r} "
                    f"(that is the routing.default class)"), name))
        errors.extend(duplicate_names(self.rules))
        for index, rule in enumerate(self.rules):
            target = self.classes.get(rule.class_)
            if target is None:
                known = ", ".join(self.classes) or "none defined"
                errors.append((("rules", index, "class"),
                               f"unknown class {rule.class_!r} (classes: {known})", rule.class_))
                continue
            writes = _write_only(rule.match)
            if (
                writes
                and target.deny is None
                and target.read_preference not in (None, "primary")
            ):
                errors.append((("rules", index, "class"), (
                    f"this rule matches only writes ({', '.join(writes)}) but class "
                    f"{rule.class_!r} reads from {target.read_preference}: writes always "
                    f"go to the primary; send them to a primary class"), rule.class_))
        if errors:
            raise _invalid(cls.__name__, errors)
        object.__setattr__(self, "_compiled", _Compiled(self))
        return self

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RoutingConfig):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]


def duplicate_names(rules: tuple[Any, ...]) -> list[tuple[tuple[str | int, ...], str, Any]]:
    """Errors for rule ``name`` values used twice (a name is a metric label)."""
    seen: dict[str, int] = {}
    errors: list[tuple[tuple[str | int, ...], str, Any]] = []
    for index, rule in enumerate(rules):
        if rule.name is None:
            continue
        if rule.name in seen:
            errors.append((("rules", index, "name"),
                           f"name {rule.name!r} is already used by rule {seen[rule.name]}",
                           rule.name))
        seen.setdefault(rule.name, index)
    return errors


def rule_label(index: int, name: str | None) -> str:
    """A rule's label in /rules and metrics: its name, else its index."""
    return name if name is not None else str(index)


def _write_only(match: MatchConfig) -> list[str]:
    """The command names of a rule that can only match writes, else []."""
    if match.command is None:
        return []
    pattern = NamePattern(match.command)
    if not pattern.only_exact or not pattern.exact <= WRITE_COMMANDS:
        return []
    return sorted(pattern.exact)


# --- decisions -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where and how one command goes.

    ``read_preference`` is what to select a server with (primary for writes, for a
    transaction's first statement, and for a cursor continuation whose cursor is
    unknown); ``pinned`` is ``"cursor"`` or ``"transaction"`` when the caller's pinning
    decides the server instead. ``deny`` (a message) means refuse the command: see
    :meth:`error`. ``max_time_ms``, when not None, is the value the command's
    ``maxTimeMS`` must be set to before forwarding.
    """

    class_name: str
    rule_index: int | None
    rule_text: str | None
    read_preference: _ServerMode
    pinned: Literal["cursor", "transaction"] | None = None
    deny: str | None = None
    max_time_ms: int | None = None

    def error(self) -> ProxyError:
        """The error reply for a denied command (code 13 Unauthorized)."""
        where = (
            f"rule {self.rule_index}" if self.rule_index is not None else "the default class"
        )
        return ProxyError(
            UNAUTHORIZED,
            f"mongoproxy refused this command (routing class {self.class_name!r}, "
            f"{where}): {self.deny}",
        )


class Matcher:
    """A compiled ``match``: called with a :class:`Classification`, True when every key
    the match gives fits. Shared by routing rules and result-cache rules."""

    __slots__ = (
        "app_name", "collection", "command", "comment_doc", "comment_str", "database",
        "has_stage", "tenant", "text_search", "user",
    )

    def __init__(self, match: MatchConfig) -> None:
        def pattern(value: str | list[str] | None) -> NamePattern | None:
            return None if value is None else NamePattern(value)

        self.command = pattern(match.command)
        self.database = pattern(match.database)
        self.collection = pattern(match.collection)
        self.has_stage = pattern(match.has_stage)
        self.text_search = match.text_search
        self.app_name = pattern(match.app_name)
        self.user = pattern(match.user)
        self.tenant = pattern(match.tenant)
        self.comment_str = match.comment if isinstance(match.comment, str) else None
        self.comment_doc = (
            tuple(match.comment.items()) if isinstance(match.comment, dict) else None
        )

    def __call__(self, c: Classification) -> bool:
        if self.command is not None and not self.command(c.command):
            return False
        if self.collection is not None and not self.collection(c.collection):
            return False
        if self.database is not None and not self.database(c.database):
            return False
        if self.has_stage is not None and not self.has_stage.any_of(c.stages):
            return False
        if self.text_search is not None and self.text_search is not c.text_search:
            return False
        if self.app_name is not None and not self.app_name(c.app_name):
            return False
        if self.user is not None and not self.user(c.user):
            return False
        if self.tenant is not None and not self.tenant(c.tenant):
            return False
        if self.comment_str is not None and c.comment != self.comment_str:
            return False
        if self.comment_doc is not None:
            comment = c.comment
            if comment is None or isinstance(comment, str) or not isinstance(comment, dict):
                return False
            for key, value in self.comment_doc:
                if key not in comment or comment[key] != value:
                    return False
        return True


class _Target:
    """A class as reached by one rule (or as the default), with decisions prebuilt."""

    __slots__ = (
        "cap", "denied", "honor", "primary", "primary_capped", "read", "read_capped",
        "transaction", "transaction_capped",
    )

    def __init__(
        self, name: str, spec: ClassConfig, index: int | None, text: str | None
    ) -> None:
        self.cap = spec.max_time_ms
        self.honor = spec.honors_client
        self.denied = (
            None if spec.deny is None
            else RouteDecision(name, index, text, PRIMARY, deny=spec.deny)
        )
        self.read = RouteDecision(name, index, text, spec.selector())
        self.primary = RouteDecision(name, index, text, PRIMARY)
        self.transaction = RouteDecision(name, index, text, PRIMARY, pinned="transaction")
        self.read_capped = replace(self.read, max_time_ms=self.cap)
        self.primary_capped = replace(self.primary, max_time_ms=self.cap)
        self.transaction_capped = replace(self.transaction, max_time_ms=self.cap)

    def decide(self, c: Classification, client: _ServerMode | None) -> RouteDecision:
        if self.denied is not None and c.command not in NEVER_DENIED:
            return self.denied
        cap = self.cap
        capped = cap is not None and (
            c.max_time_ms is None or c.max_time_ms == 0 or c.max_time_ms > cap
        )
        if c.in_transaction:
            return self.transaction_capped if capped else self.transaction
        if not c.is_read:
            return self.primary_capped if capped else self.primary
        if self.honor and client is not None:
            return replace(self.read, read_preference=client,
                           max_time_ms=cap if capped else None)
        return self.read_capped if capped else self.read


_CompiledRule = tuple[Matcher, _Target, int]


class _Compiled:
    """Rules compiled once per config. Rules whose ``command`` lists exact names are
    indexed by name, so a command is only tried against the rules it could match
    (order preserved).

    ``hits[i]`` counts the commands rule ``i`` decided, ``hits[-1]`` those no rule
    matched (the default class); cursor continuations are not counted. A plain list of
    ints (one increment per decision), read at scrape time by
    :mod:`proxy.route.rulehits`; a reload compiles new rules, with new counters."""

    __slots__ = ("by_command", "cursor", "default", "hits", "other_commands")

    def __init__(self, routing: RoutingConfig) -> None:
        self.default = _Target(DEFAULT_CLASS, routing.default, None, None)
        rules: list[tuple[NamePattern | None, _CompiledRule]] = []
        for index, rule in enumerate(routing.rules):
            matcher = Matcher(rule.match)
            target = _Target(rule.class_, routing.classes[rule.class_], index, rule.text())
            command = matcher.command
            rules.append((command if command is not None and command.only_exact else None,
                          (matcher, target, index)))
        names = {name for pattern, _ in rules if pattern is not None for name in pattern.exact}
        self.by_command: dict[str, tuple[_CompiledRule, ...]] = {
            name: tuple(r for pattern, r in rules if pattern is None or name in pattern.exact)
            for name in names
        }
        self.other_commands = tuple(r for pattern, r in rules if pattern is None)
        self.cursor = RouteDecision(CURSOR_CLASS, None, None, PRIMARY, pinned="cursor")
        self.hits = [0] * (len(routing.rules) + 1)


def decide(
    classification: Classification,
    routing: RoutingConfig,
    client_read_preference: _ServerMode | None,
) -> RouteDecision:
    """Route one classified command: first matching rule wins, the default otherwise.

    ``client_read_preference`` is the driver's ``$readPreference`` as parsed by
    ``proxy.route.readpref.from_command``, or None when the command carried none.
    """
    compiled = routing._compiled
    if classification.is_cursor_continuation:
        return compiled.cursor
    rules = compiled.by_command.get(classification.command, compiled.other_commands)
    for matches, target, index in rules:
        if matches(classification):
            compiled.hits[index] += 1
            return target.decide(classification, client_read_preference)
    compiled.hits[-1] += 1
    return compiled.default.decide(classification, client_read_preference)
