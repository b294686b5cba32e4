"""Tenant placement's part in the request path (docs/placement.md).

:class:`Placement` asks the router (``proxy.placement.route``) where a command goes,
answers what does not go to one cluster (a fan-out read, an index command run on every
cluster, a refusal), and brackets a write of a tenant whose move is under way with the
move agent's bookkeeping (``proxy.placement.agent``): the ids it touches recorded
before and after, a write held during a move's final catch-up, then sent to the cluster
the tenant is on by then.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from proxy.config import Config
from proxy.errors import UNAUTHORIZED, ProxyError
from proxy.pipeline.reply import Reply, error_message, message_for
from proxy.pipeline.session import Session
from proxy.placement.clusters import Clusters
from proxy.placement.directory import EMPTY_STATE, HOME, PlacementState, tenant_values
from proxy.placement.route import TRANSACTION_ENDS, Placed, PlacementRouter
from proxy.request import Request
from proxy.tenancy.gate import Admission
from proxy.upstream.roundtrip import Roundtrip
from proxy.wire import DocumentSequence, reply_error_code

if TYPE_CHECKING:
    from proxy.placement.agent import PlacementAgent
    from proxy.placement.fanout import FanOut

__all__ = ["Forward", "Placement"]

log = logging.getLogger("mongoproxy.placement")


class Forward(Protocol):
    """The pipeline's forwarding step (``Pipeline._forward``)."""

    async def __call__(self, request: Request, message: bytes, roundtrip: Roundtrip,
                       session: Session, reply: Reply, snapshot: Config) -> Reply: ...


class Placement:
    def __init__(self, clusters: Clusters, fanout: FanOut | None = None,
                 agent: PlacementAgent | None = None) -> None:
        self.clusters = clusters
        self.router = PlacementRouter(clusters, clusters.home.cursors)
        self.fanout = fanout
        self.agent = agent
        if fanout is not None:
            self.router.fanout_owns = fanout.owns

    @property
    def state(self) -> PlacementState:
        agent = self.agent
        return EMPTY_STATE if agent is None else agent.state

    def place(self, request: Request, admission: Admission, bound_tenant: str | None,
              snapshot: Config) -> Placed:
        return self.router.place(request, admission, bound_tenant, snapshot.placement,
                                 self.state)

    def owns_cursor(self, cursor_id: int) -> bool:
        """A merged cursor of a fan-out read of this process (not a sibling's)."""
        return self.fanout is not None and self.fanout.owns(cursor_id)

    def roundtrip_of(self, cluster: str | None) -> Roundtrip:
        if cluster is None or cluster == HOME:
            return self.clusters.home
        return self.clusters.by_name.get(cluster, self.clusters.home)

    # -- what does not go to one cluster ----------------------------------------------------

    async def elsewhere(self, placed: Placed, request: Request, command: dict[str, Any],
                        message: bytes, session: Session, reply: Reply, snapshot: Config
                        ) -> Reply:
        """The one reply to a fan-out read, an index command on every cluster, or a
        refusal."""
        try:
            if placed.fanout:
                document = await self._fan_out(placed, request, command, session, reply,
                                               snapshot)
                reply.parts = (message_for(request.request_id, document),)
                return reply
            if placed.broadcast:
                reply.parts = await self._broadcast(request, message, session, reply)
                return reply
            raise placed.error()
        except ProxyError as exc:
            reply.error_code = exc.code
            reply.parts = (error_message(request.request_id, exc),)
            return reply

    async def _fan_out(self, placed: Placed, request: Request, command: dict[str, Any],
                       session: Session, reply: Reply, snapshot: Config) -> dict[str, Any]:
        fanout = self.fanout
        owner = session.connection_id
        name = request.name
        document: dict[str, Any]
        if fanout is not None and name == "getMore":
            document = await fanout.get_more(command, owner)
            return document
        if fanout is not None and name == "killCursors":
            document = await fanout.kill(command, owner)
            return document
        why_not = "fan-out reads are off" if fanout is None else fanout.refusal(name, command)
        if why_not is not None:
            # placed.refused: why the command is not confined to one tenant.
            raise ProxyError(UNAUTHORIZED, (
                f"{name} on {request.namespace} spans tenants on several clusters and "
                f"cannot be fanned out: {why_not}; name one tenant ({placed.refused})"))
        reply.cluster = "*"
        decision = reply.decision
        assert fanout is not None and decision is not None
        document = await fanout.run(name, command, list(self.clusters), decision, owner,
                                    self._moving_elsewhere(snapshot))
        return document

    def _moving_elsewhere(self, snapshot: Config) -> dict[str, list[Any]] | None:
        """Per cluster, the tenants being moved whose copy there does not serve them:
        a fan-out read skips those documents, so a moving tenant is counted once."""
        state = self.state
        if not state.moves:
            return None
        excluded: dict[str, list[Any]] = {}
        for key in state.moves:
            serving = self.router.cluster_for(key, snapshot.placement, state)
            for cluster in self.clusters.by_name:
                if cluster != serving:
                    excluded.setdefault(cluster, []).extend(tenant_values(key))
        return excluded

    async def _broadcast(self, request: Request, message: bytes, session: Session,
                         reply: Reply) -> tuple[bytes, ...]:
        """An index command of a "*" identity on a scoped collection: run on every
        cluster in turn; the first failure is the reply, else home's."""
        decision = reply.decision
        assert decision is not None and reply.timer is not None
        answer: tuple[bytes, ...] = ()
        for roundtrip in self.clusters:
            done = await roundtrip.exchange(request, message, decision, reply.timer,
                                            session.connection_id)
            if reply_error_code(done.body) is not None:
                log.warning("%s on %s failed on cluster %s", request.name,
                            request.namespace, roundtrip.cluster)
                return done.header, done.body
            if not answer:
                answer = (done.header, done.body)
        reply.cluster = "*"
        return answer

    # -- writes of a tenant that is moving ---------------------------------------------------

    async def write(self, placed: Placed, request: Request, command: dict[str, Any],
                    sequences: Sequence[DocumentSequence], message: bytes,
                    roundtrip: Roundtrip, forward: Forward, session: Session, reply: Reply,
                    snapshot: Config) -> Reply:
        agent = self.agent
        key = placed.key
        if agent is None or key is None or not (
                agent.gated(key) or request.name in TRANSACTION_ENDS):
            return await forward(request, message, roundtrip, session, reply, snapshot)
        try:
            ticket = await agent.before_write(key, request, command, sequences, roundtrip)
        except ProxyError as exc:
            if reply.access is not None:
                reply.access.abandon()
            reply.error_code = exc.code
            if not request.more_to_come:
                reply.parts = (error_message(request.request_id, exc),)
            return reply
        # A write held through a move's switch goes where the tenant is now.
        cluster = self.router.cluster_for(key, snapshot.placement, agent.state)
        if cluster != placed.cluster:
            roundtrip = self.clusters.get(cluster)
            reply.cluster = cluster
        body: bytes | None = None
        try:
            reply = await forward(request, message, roundtrip, session, reply, snapshot)
            body = reply.body
        finally:
            if ticket is not None:
                await agent.after_write(ticket, body)
        return reply

    # -- connections and cursors --------------------------------------------------------------

    def departed(self, owner: int) -> None:
        """A client connection closed: its cursors are killed, each on its cluster."""
        cursors = self.clusters.home.cursors
        for (cluster, server, namespace), ids in cursors.release_owner_by_cluster(
                owner).items():
            self.roundtrip_of(cluster).kill_cursors(server, namespace, ids)
        if self.fanout is not None:
            self.fanout.release(owner)
