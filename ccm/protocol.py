"""AIP on the wire: typed client messages, server frames, decoding and limits. No I/O here.

Parsing is lenient the way UFO's is (only `type` and `status` are required, `client_type`
defaults to `device`, unknown keys are ignored). Every server frame carries every ServerMessage
field, `null` when empty, in UFO's declaration order, as compact JSON.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ccm.domain import ClientType
from ccm.ids import new_id

if TYPE_CHECKING:
    from ccm.config import LimitsSettings

JSONValue = Any

RELAY_METADATA_KEY = "ccm_execution"
"""A device declares relay mode by registering with metadata `{"ccm_execution": "relay"}`."""


class ClientMessageType(StrEnum):
    TASK = "task"
    HEARTBEAT = "heartbeat"
    COMMAND_RESULTS = "command_results"
    ERROR = "error"
    REGISTER = "register"
    TASK_END = "task_end"
    DEVICE_INFO_REQUEST = "device_info_request"
    DEVICE_INFO_RESPONSE = "device_info_response"


class ServerMessageType(StrEnum):
    TASK = "task"
    HEARTBEAT = "heartbeat"
    TASK_END = "task_end"
    COMMAND = "command"
    ERROR = "error"
    DEVICE_INFO_REQUEST = "device_info_request"
    DEVICE_INFO_RESPONSE = "device_info_response"


class TaskStatus(StrEnum):
    CONTINUE = "continue"
    COMPLETED = "completed"
    FAILED = "failed"
    OK = "ok"
    ERROR = "error"


class ResultStatus(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"
    SKIPPED = "skipped"
    NONE = "none"


class Result(BaseModel):
    """One tool call's outcome inside COMMAND_RESULTS."""

    model_config = ConfigDict(extra="ignore")

    status: ResultStatus
    error: str | None = None
    result: JSONValue = None
    namespace: str | None = None
    call_id: str | None = None


class ClientMessage(BaseModel):
    """A frame from a device or constellation."""

    model_config = ConfigDict(extra="ignore")

    type: ClientMessageType
    status: TaskStatus
    client_type: ClientType = ClientType.DEVICE
    session_id: str | None = None
    task_name: str | None = None
    client_id: str | None = None
    target_id: str | None = None
    request: str | None = None
    action_results: list[Result] | None = None
    timestamp: str | None = None
    request_id: str | None = None
    prev_response_id: str | None = None
    error: str | None = None
    metadata: dict[str, JSONValue] | None = None


class FrameError(Exception):
    """A frame could not be read. `close_code` is the WebSocket code to use if we must close."""

    def __init__(self, reason: str, close_code: int, kind: str = "invalid_message") -> None:
        super().__init__(reason)
        self.reason = reason
        self.close_code = close_code
        self.kind = kind
        """Short label for metrics: malformed_json, invalid_message, binary_frame, too_large."""


CLOSE_GOING_AWAY = 1001
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_SERVICE_RESTART = 1012


class _OutOfRange(ValueError):
    """A number JSON can write but no database column (or JSON reader) takes back."""


def _reject_constant(name: str) -> Any:
    raise _OutOfRange(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 and the like
        raise _OutOfRange(f"{text} is out of range")
    return value


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
# Only an escape in the raw text can produce NUL or a lone surrogate, so most frames never need
# the walk below (a substring test first: the regex alone costs more than the JSON parse).
_ESCAPE = "\\u"
_SUSPECT = re.compile(r"\\u0000|\\u[dD][89a-fA-F]")
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_UNSTORABLE_REASON = (
    "frame contains a NUL character, an unpaired surrogate (\\u0000, \\ud800-\\udfff) "
    "or a number out of range: such values cannot be stored or sent back"
)


def has_unstorable_value(data: Any) -> bool:
    """True if a string (key or value) holds NUL or a lone surrogate, or a number is not finite:
    PostgreSQL refuses NUL and non-finite numbers in text and JSON, and no database driver (nor
    a WebSocket send) can encode a lone surrogate. Iterative: nesting depth is the client's."""
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if _UNSTORABLE.search(value):
                return True
        elif isinstance(value, float):
            if not math.isfinite(value):
                return True
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return False


DEFAULT_MAX_JSON_DEPTH = 256
"""`limits.max_json_depth`: UFO's clients serialise frames with pydantic, which stops at 255."""


def exceeds_depth(data: Any, max_depth: int) -> bool:
    """True if objects and arrays nest deeper than `max_depth` (`{}` is depth 1). Iterative, and
    only containers are visited: it is the client's nesting that is in question."""
    if not isinstance(data, dict | list):
        return False
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > max_depth:
            return True
        for child in value.values() if isinstance(value, dict) else value:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


def _depth_error(max_depth: int) -> FrameError:
    return FrameError(
        f"frame nests objects and arrays deeper than {max_depth} levels (limits.max_json_depth): "
        "send flatter JSON",
        CLOSE_INVALID_PAYLOAD,
        "too_deep",
    )


def decode_client_message(text: str, *, max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> ClientMessage:
    """Parse one text frame; FrameError (1007) if it is not a JSON object of the right shape,
    nests deeper than `max_depth`, or holds a value ccm could not store or send back (NUL, lone
    surrogate, NaN, infinity). Every later copy, encoder and HTTP route relies on that bound."""
    try:
        data = _DECODER.decode(text)
    except _OutOfRange:
        raise FrameError(_UNSTORABLE_REASON, CLOSE_INVALID_PAYLOAD, "invalid_text") from None
    except RecursionError:  # deeper than Python's parser goes, so far deeper than any limit
        raise _depth_error(max_depth) from None
    except ValueError as exc:
        raise FrameError(
            f"frame is not valid JSON: {exc}", CLOSE_INVALID_PAYLOAD, "malformed_json"
        ) from None
    if not isinstance(data, dict):
        raise FrameError("frame must be one JSON object", CLOSE_INVALID_PAYLOAD)
    # A frame cannot nest deeper than it has brackets: most frames skip the walk.
    if text.count("{") + text.count("[") > max_depth and exceeds_depth(data, max_depth):
        raise _depth_error(max_depth)
    if _ESCAPE in text and _SUSPECT.search(text) and has_unstorable_value(data):
        raise FrameError(_UNSTORABLE_REASON, CLOSE_INVALID_PAYLOAD, "invalid_text")
    try:
        return ClientMessage.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'frame'}: {err['msg']}"
            for err in exc.errors()[:5]
        )
        raise FrameError(f"invalid message: {problems}", CLOSE_INVALID_PAYLOAD) from None


def _json_bytes(value: JSONValue) -> int:
    return len(_FRAME_ENCODER.encode(value).encode("utf-8"))


def register_refusal(msg: ClientMessage, limits: LimitsSettings) -> str | None:
    """The ERROR text for a REGISTER whose metadata or system info is larger than ccm keeps per
    connection (`limits.max_metadata_bytes`, `limits.max_system_info_bytes`), or None. Sizes are
    of the compact JSON; `metadata` is measured without its `system_info`."""
    metadata = msg.metadata or {}
    system_info = metadata.get("system_info")
    rest = {k: v for k, v in metadata.items() if k != "system_info"}
    for what, value, limit, key in (
        (
            "metadata.system_info",
            system_info,
            limits.max_system_info_bytes,
            "max_system_info_bytes",
        ),
        ("metadata (without system_info)", rest, limits.max_metadata_bytes, "max_metadata_bytes"),
    ):
        if value is None:
            continue
        size = _json_bytes(value)
        if size > limit:
            return (
                f"REGISTER {what} is {size} bytes as JSON, over the limit of {limit} "
                f"(limits.{key}): send less"
            )
    return None


def timestamp() -> str:
    """UFO's form: datetime.now(UTC).isoformat(), `+00:00` offset. Built from a per-second
    prefix: every frame carries one, and datetime's way showed in the heartbeat profile."""
    now = time.time()
    second = int(now)
    micro = int((now - second) * 1_000_000)
    if micro:
        return f"{_second_text(second)}.{micro:06d}+00:00"
    return f"{_second_text(second)}+00:00"  # as isoformat() writes a whole second


@functools.lru_cache(maxsize=4)
def _second_text(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


# One encoder for every frame: json.dumps with options builds a new encoder per call.
_FRAME_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)


def server_frame(
    type: ServerMessageType,
    status: TaskStatus,
    *,
    user_request: str | None = None,
    agent_name: str | None = None,
    process_name: str | None = None,
    root_name: str | None = None,
    actions: list[dict[str, Any]] | None = None,
    messages: list[str] | None = None,
    error: str | None = None,
    session_id: str | None = None,
    task_name: str | None = None,
    response_id: str | None = None,
    result: JSONValue = None,
    metadata: dict[str, JSONValue] | None = None,
) -> str:
    """Encode one ServerMessage with every field present, in UFO's field order; `metadata`
    (ccm's additions, which UFO's clients ignore) only when given."""
    frame = {
        "type": type.value,
        "status": status.value,
        "user_request": user_request,
        "agent_name": agent_name,
        "process_name": process_name,
        "root_name": root_name,
        "actions": actions,
        "messages": messages,
        "error": error,
        "session_id": session_id,
        "task_name": task_name,
        "timestamp": timestamp(),
        "response_id": response_id or new_id(),
        "result": result,
    }
    if metadata is not None:
        frame["metadata"] = metadata
    return _FRAME_ENCODER.encode(frame)


def ok_frame(session_id: str | None = None, *, metadata: dict[str, JSONValue] | None = None) -> str:
    """Registration confirmation, heartbeat ack and task ACK: all `heartbeat`/`ok` (decision D1)."""
    return server_frame(
        ServerMessageType.HEARTBEAT, TaskStatus.OK, session_id=session_id, metadata=metadata
    )


def error_frame(message: str) -> str:
    return server_frame(ServerMessageType.ERROR, TaskStatus.ERROR, error=message)


def task_end_frame(
    session_id: str,
    *,
    completed: bool,
    result: JSONValue = None,
    error: str | None = None,
    response_id: str | None = None,
) -> str:
    return server_frame(
        ServerMessageType.TASK_END,
        TaskStatus.COMPLETED if completed else TaskStatus.FAILED,
        session_id=session_id,
        result=result,
        error=error,
        response_id=response_id,
    )


_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


def sanitize_task_name(name: str | None) -> str:
    """WebSocket path (6.8): unsafe characters become `_`, leading dots go, empty -> a UUID."""
    cleaned = _UNSAFE_NAME.sub("_", name or "").lstrip(".")
    return cleaned or new_id()  # too long a name is refused by the session manager


def is_valid_task_name(name: object) -> bool:
    """HTTP path (6.8): the name must already be safe, or it is refused."""
    return isinstance(name, str) and len(name) <= 255 and bool(_SAFE_NAME.match(name))
