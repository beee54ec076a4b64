"""What a task request is, who may ask (a Requester), how a device runs it (its execution mode),
and how an ACK and a refusal look on the wire (decisions D1 and D4 in README)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ccm.domain import ClientType, Mode, Origin
from ccm.protocol import RELAY_METADATA_KEY, error_frame, ok_frame, task_end_frame
from ccm.registry import ClientConnectionManager


def execution_mode(registry: ClientConnectionManager, device_id: str) -> Mode:
    """Relay if the device declared it at registration (metadata `ccm_execution: relay`) or
    the operator's device config says `execution: relay`; agent-driven otherwise."""
    info = registry.get_client_info(device_id)
    if info is None or info.client_type is not ClientType.DEVICE:
        return Mode.AGENT
    if info.metadata.get(RELAY_METADATA_KEY) == "relay":
        return Mode.RELAY
    config = registry.device_configs.get(device_id) or {}
    return Mode.RELAY if config.get("execution") == "relay" else Mode.AGENT


class Requester(Protocol):
    """Who asked for a session and is told about it: a Peer of this node, or (in a cluster) a
    constellation of another node (ccm.server.cluster_link.RemoteRequester)."""

    @property
    def client_id(self) -> str: ...

    @property
    def is_constellation(self) -> bool: ...

    def send(self, frame: str) -> bool: ...


def ack_frame(session_id: str, queue_position: int) -> str:
    """A task's ACK; a queued session's carries its place (existing clients ignore it)."""
    if queue_position:
        return ok_frame(session_id, metadata={"queue_position": queue_position})
    return ok_frame(session_id)


def refuse_task(peer: Requester, session_id: str | None, message: str) -> None:
    """ERROR plus (decision D4, README) a TASK_END `failed`, so the requester need not time out."""
    peer.send(error_frame(message))
    if session_id:
        peer.send(task_end_frame(session_id, completed=False, error=message))


@dataclass(frozen=True, slots=True)
class TaskRequest:
    """What a session is asked to do, from whichever edge it came."""

    device_id: str
    origin: Origin
    request: str | None
    task_name: str | None = None
    session_id: str | None = None
    """The requester's id for the session; None: ccm makes one."""
    requester: Requester | None = None
    """Who is told about the session (ACK, TASK_END); None for HTTP dispatch."""
    requester_node: str | None = None
    """The node the requester is connected to, when it is not this one."""
    force_agent: bool = False
    """Run it through the runners even on a relay device (a device's own task)."""
