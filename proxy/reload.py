"""Live reload of the routing rules: on SIGHUP and when the config file changes.

The new file is validated in full; if it is invalid the error (with its key path) is
logged, counted, and the old configuration keeps serving. If it is valid, the routing
section (and the result cache's ``rules``) is swapped in atomically: requests read
``proxy.config`` once per request, so each sees either the old rules or the new ones,
never a mix. Sections that need new
sockets, pools, monitors or identities (listen, admin, upstream, observability, shutdown,
tenancy, and the cache's Redis settings, or adding/removing the cache) take effect
at the next restart; a change to them is reported in the log. Tenant placement's
directory (``placement.tenants`` and ``placement.hash``) is live too, as long as it
names only the clusters that are running.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from proxy.config import Config, ConfigError, load_config
from proxy.observe.hub import Observer

log = logging.getLogger("mongoproxy.reload")

# How often the file's modification time and size are checked.
POLL_INTERVAL_S = 1.0
_RESTART_SECTIONS = ("listen", "admin", "upstream", "observability", "shutdown", "tenancy")


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class Reloadable(Protocol):
    """What a reload swaps (``config``) and reports to (``observer.metrics``)."""

    config: Config
    observer: Observer


class ConfigReloader:
    def __init__(self, proxy: Reloadable, path: Path,
                 adapt: Callable[[Config], Config] | None = None) -> None:
        self.proxy = proxy
        self.path = path
        # A worker of listen.workers compares the file as it would run it (its share).
        self.adapt = adapt
        self._seen = _stamp(path)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="config watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def reload(self) -> bool:
        """Validate the file and swap in its routing rules; False if it was refused."""
        self._seen = _stamp(self.path)
        metrics = self.proxy.observer.metrics
        try:
            new = load_config(self.path)
            if self.adapt is not None:
                new = self.adapt(new)
        except ConfigError as exc:
            log.error("config reload refused, keeping the running configuration: %s", exc)
            metrics.config_reloaded(False)
            return False
        current = self.proxy.config
        pending = [s for s in _RESTART_SECTIONS if getattr(new, s) != getattr(current, s)]
        cache = current.cache
        if new.cache is None or cache is None:
            if new.cache != cache:
                pending.append("cache")
        else:
            if new.cache.restart_part() != cache.restart_part():
                pending.append("cache (except rules)")
            # Only the rules are live; the running Redis settings stay.
            rules = new.cache.model_dump(by_alias=True)["rules"]
            cache = type(cache).model_validate({**cache.model_dump(by_alias=True),
                                                "rules": rules})
        placement = current.placement
        if new.placement != placement:
            if new.placement.restart_part() != placement.restart_part():
                pending.append("placement (except tenants and hash)")
            if not placement.enabled and new.placement.enabled:
                pending.append("placement (turned on)")
            else:
                # The directory is live; it may only name the clusters that are running.
                placement = placement.model_copy(update={"tenants": new.placement.tenants,
                                                         "hash": new.placement.hash})
                unknown = {*placement.tenants.values(), *placement.hash} - set(
                    placement.cluster_names())
                if unknown:
                    log.error("config reload: placement names clusters that are not "
                              "running (%s); keeping the running directory",
                              ", ".join(sorted(unknown)))
                    placement = current.placement
        if pending:
            log.warning("config reload: %s changed; these take effect at the next restart",
                        ", ".join(pending))
        self.proxy.config = current.model_copy(update={"routing": new.routing, "cache": cache,
                                                       "placement": placement})
        metrics.config_reloaded(True)
        log.info("config reloaded from %s: %d routing rules, %d classes", self.path,
                 len(new.routing.rules), len(new.routing.classes))
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL_S)
            stamp = _stamp(self.path)
            if stamp is not None and stamp != self._seen:
                self.reload()
