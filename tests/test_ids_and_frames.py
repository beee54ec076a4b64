"""Ids and frame helpers that the hot path relies on (ccm.ids, ccm.protocol)."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta

from ccm.ids import new_id
from ccm.protocol import ServerMessageType, TaskStatus, server_frame, timestamp

UUID_TEXT = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def test_new_id_is_a_random_version_4_uuid_in_canonical_text() -> None:
    """new_id gives distinct random (version 4, RFC 4122) UUIDs in canonical lower-case text."""
    ids = [new_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        assert UUID_TEXT.match(text), text
        parsed = uuid.UUID(text)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == text
    # Every variant digit shows up: the two random bits below the variant are not stuck.
    assert {text[19] for text in ids} == set("89ab")


def test_server_frame_carries_a_fresh_response_id_unless_given() -> None:
    """Each server frame gets a new UUID response_id; a given response_id is kept."""
    first = json.loads(server_frame(ServerMessageType.HEARTBEAT, TaskStatus.OK))
    second = json.loads(server_frame(ServerMessageType.HEARTBEAT, TaskStatus.OK))
    assert UUID_TEXT.match(first["response_id"])
    assert first["response_id"] != second["response_id"]
    given = json.loads(server_frame(ServerMessageType.ERROR, TaskStatus.ERROR, response_id="r-1"))
    assert given["response_id"] == "r-1"


def test_timestamp_is_utc_isoformat_of_now() -> None:
    """timestamp() is the current UTC time in isoformat, with a `+00:00` offset."""
    before = datetime.now(UTC)
    text = timestamp()
    after = datetime.now(UTC)
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?\+00:00$", text), text
    parsed = datetime.fromisoformat(text)
    assert parsed.utcoffset() == timedelta(0)
    assert before - timedelta(milliseconds=1) <= parsed <= after + timedelta(milliseconds=1)
    assert parsed.isoformat() == text  # exactly what datetime would write for that instant
