"""Bad input: a fuzzer over /ws while well-behaved clients work next to it.

Several fuzzing connections send thousands of hostile frames (malformed JSON, wrong types,
missing and extra fields, binary, invalid UTF-8, oversized, unknown types, frames before
REGISTER, forged ids, replays, values no database can store, broken WebSocket framing) and
other connections flap (register one id and drop, over and over). Each bad frame must get an
ERROR (the connection stays) or a clean close with the right code (1007, 1008, 1009; 1002 for
broken framing); the server log shows no unhandled error; the well-behaved clients see no
ERROR and no drop; afterwards the registry, `clients.online` and the open connection rows agree
and the closes are recorded with the right reason.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import string
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from ccm.store.models import connections
from tests.reliability.support import (
    API_KEY,
    OP_BINARY,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    Closed,
    LoadGen,
    RawPool,
    RawWs,
    ServeProcess,
    check_sessions,
    latency_figures,
    record,
    registry_matches_sql,
    scale,
)

FRAMES = scale(1_600, 10_400)
FUZZERS = 4
FLAPPERS = 2
FLAPS = scale(60, 400)
MAX_FRAME = 65_536
REPLY_TIMEOUT = 10.0
ENV = {"CCM_SERVER_MAX_FRAME_BYTES": str(MAX_FRAME), "CCM_SERVER_HEARTBEAT_INTERVAL": "30s"}


@dataclass
class Case:
    """One hostile frame (or a few) and what the server must answer."""

    kind: str
    frames: list[tuple[int, bytes, dict[str, Any]]]
    expect: str  # error | ok | silent | no_error | close
    codes: frozenset[int] = frozenset()
    acks: int = 0  # plain heartbeat acks the case itself earns


def _text(data: Any) -> bytes:
    return (data if isinstance(data, str) else json.dumps(data)).encode()


def _heartbeat(client_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "heartbeat",
        "status": "ok",
        "client_type": "device",
        "client_id": client_id,
        **extra,
    }


def _one(kind: str, payload: Any, expect: str, *, opcode: int = OP_TEXT, **kw: Any) -> Case:
    raw = payload if isinstance(payload, bytes) else _text(payload)
    return Case(kind, [(opcode, raw, {})], expect, **kw)


UNSTORABLE = ["a\\u0000b", "\\ud800", "x\\udfffy", "\\u0000"]


class Fuzz:
    """Builds cases for a registered device `me`; `others` are live ids it may try to forge."""

    def __init__(self, rng: random.Random, me: str, others: list[str]) -> None:
        self.rng = rng
        self.me = me
        self.others = others

    def garbage(self) -> str:
        return "".join(self.rng.choice(string.printable) for _ in range(self.rng.randint(1, 60)))

    def after_register(self) -> Case:
        r, me = self.rng, self.me
        valid = json.dumps(_heartbeat(me))
        choice = r.randrange(100)
        if choice < 12:
            cut = r.randint(1, len(valid) - 1)
            payload = r.choice(
                [
                    valid[:cut],
                    self.garbage(),
                    "{",
                    "}",
                    valid[:-1] + ",}",
                    "{'type': 'heartbeat'}",
                    valid + valid,
                    "[" * r.randint(1000, 5000),
                    '{"type":"heartbeat","status":"ok","metadata":{"x":NaN}}',
                    '{"type":"heartbeat","status":"ok","metadata":{"x":-Infinity}}',
                    "1" * 5000,
                    "",
                ]
            )
            return _one("malformed_json", payload, "error")
        if choice < 18:
            payload = r.choice(["[]", '"x"', "1", "null", "true", json.dumps([_heartbeat(me)])])
            return _one("not_an_object", payload, "error")
        if choice < 32:
            field_, value = r.choice(
                [
                    ("type", 5),
                    ("type", None),
                    ("type", ["heartbeat"]),
                    ("status", "OK"),
                    ("status", 7),
                    ("client_type", "admin"),
                    ("client_id", 5),
                    ("client_id", {"id": me}),
                    ("session_id", 1),
                    ("target_id", []),
                    ("metadata", "x"),
                    ("metadata", [1, 2]),
                    ("action_results", "x"),
                    ("action_results", [{"status": "bogus"}]),
                    ("action_results", [1]),
                    ("request", {"a": 1}),
                    ("timestamp", 12.5),
                ]
            )
            frame = {**_heartbeat(me), field_: value}
            if field_ in {"session_id", "action_results", "request"}:
                frame["type"] = r.choice(["task", "command_results", "heartbeat"])
            return _one("wrong_type", frame, "error")
        if choice < 38:
            frame = r.choice([{}, {"status": "ok"}, {"type": "heartbeat"}, {"client_id": me}])
            return _one("missing_field", frame, "error")
        if choice < 46:
            extra = {f"x_{self.garbage()[:8]}": self.garbage() for _ in range(r.randint(1, 5))}
            return _one("extra_fields", _heartbeat(me, **extra), "ok", acks=1)
        if choice < 52:
            payload = r.choice([_text(_heartbeat(me)), bytes(r.randrange(256) for _ in range(40))])
            return _one("binary", payload, "error", opcode=OP_BINARY)
        if choice < 58:
            kind = r.choice(["foo", "REGISTER", "Heartbeat", "task_end ", "", "command", "ping"])
            return _one("unknown_type", {**_heartbeat(me), "type": kind}, "error")
        if choice < 64 and self.others:
            other = r.choice(self.others)
            frame = r.choice(
                [
                    _heartbeat(other),
                    {
                        **_heartbeat(other),
                        "type": "task",
                        "status": "continue",
                        "target_id": other,
                        "session_id": f"forged-{r.randrange(10**6)}",
                        "request": "x",
                    },
                    {
                        **_heartbeat(me),
                        "client_type": "constellation",
                        "type": "task",
                        "status": "continue",
                        "target_id": other,
                        "request": "x",
                    },
                    {
                        **_heartbeat(me),
                        "type": "device_info_request",
                        "target_id": other,
                        "request_id": "r",
                    },
                ]
            )
            return _one("forged_identity", frame, "error")
        if choice < 72:
            frame = r.choice(
                [
                    {**_heartbeat(me), "type": "register"},
                    {
                        **_heartbeat(me),
                        "type": "command_results",
                        "status": "continue",
                        "session_id": f"s-{r.randrange(100)}",
                        "prev_response_id": "c0c57bf3",
                        "action_results": [{"status": "success", "result": "forged"}],
                    },
                    {
                        **_heartbeat(me),
                        "type": "task_end",
                        "status": "completed",
                        "session_id": f"s-{r.randrange(100)}",
                        "metadata": {"result": "forged"},
                    },
                    {
                        **_heartbeat(me),
                        "type": "device_info_request",
                        "target_id": me,
                        "request_id": "r",
                    },
                ]
            )
            return _one("replayed_or_out_of_place", frame, "error")
        if choice < 78:
            frame = r.choice(
                [
                    {**_heartbeat(me), "type": "error", "status": "error", "error": self.garbage()},
                    # Log forging: a client's text must not become a log line of its own.
                    {
                        **_heartbeat(me),
                        "type": "error",
                        "status": "error",
                        "error": "x\n2026-01-01 00:00:00,000 ERROR   forged.by.client: line",
                    },
                    {**_heartbeat(me), "type": "device_info_response", "result": {"x": 1}},
                ]
            )
            return _one("ignored_by_design", frame, "silent")
        if choice < 86:
            bad = r.choice(UNSTORABLE)
            template = r.choice(
                [
                    '{"type":"heartbeat","status":"ok","client_id":"%s"}',
                    '{"type":"heartbeat","status":"ok","metadata":{"k":"%s"}}',
                    '{"type":"heartbeat","status":"ok","metadata":{"%s":1}}',
                    '{"type":"task","status":"continue","request":"%s"}',
                    '{"type":"task","status":"continue","session_id":"%s","request":"x"}',
                ]
            )
            payload = template % bad if r.random() < 0.8 else template.replace('"%s"', "1e999")
            return _one("unstorable_value", payload, "error")
        if choice < 90:
            session = f"own-{r.randrange(10**9)}"
            frame = {
                **_heartbeat(me),
                "type": "task",
                "status": "continue",
                "session_id": session,
                "request": "natural language, no runner",
            }
            return _one("valid_own_task", frame, "no_error")
        if choice < 93:
            return _one("ping", b"fuzz", "silent", opcode=OP_PING)
        if choice < 96:
            data = _text(_heartbeat(me))
            cut = r.randint(1, len(data) - 1)
            return Case(
                "fragmented",
                [(OP_TEXT, data[:cut], {"fin": False}), (OP_CONT, data[cut:], {})],
                "ok",
                acks=1,
            )
        return self.closing()

    def closing(self) -> Case:
        """Cases after which the server closes the connection."""
        r = self.rng
        choice = r.randrange(7)
        if choice == 0:
            return _one(
                "invalid_utf8",
                b'{"type": "heartbeat", "x": "\xff\xfe"}',
                "close",
                codes=frozenset({1007}),
            )
        if choice == 1:
            return _one(
                "oversized",
                b"x" * (MAX_FRAME + r.randint(1, 5000)),
                "close",
                codes=frozenset({1009}),
            )
        if choice == 2:
            return _one(
                "reserved_opcode",
                b"abc",
                "close",
                opcode=r.choice([3, 4, 7, 0xB, 0xF]),
                codes=frozenset({1002}),
            )
        if choice == 3:
            return Case(
                "rsv_bits",
                [(OP_TEXT, _text(_heartbeat(self.me)), {"rsv": 2})],
                "close",
                frozenset({1002}),
            )
        if choice == 4:
            return Case("orphan_continuation", [(OP_CONT, b"abc", {})], "close", frozenset({1002}))
        if choice == 5:
            return _one(
                "oversized_ping", b"p" * 200, "close", opcode=OP_PING, codes=frozenset({1002})
            )
        return Case("bad_frame_burst", [(OP_TEXT, b"{", {})] * 20, "close", frozenset({1007}))

    def first_frame(self) -> Case:
        """A bad first frame on a fresh connection: ERROR then close, or a protocol close."""
        r, me = self.rng, self.me
        choice = r.randrange(11)
        if choice == 0:
            return _one("pre_malformed", self.garbage(), "error_close", codes=frozenset({1007}))
        if choice == 1:
            return _one(
                "pre_binary",
                _text({"type": "register", "status": "ok", "client_id": me}),
                "error_close",
                opcode=OP_BINARY,
                codes=frozenset({1007}),
            )
        if choice == 2:
            frame = {
                "type": "task",
                "status": "continue",
                "client_id": me,
                "target_id": me,
                "request": "x",
            }
            return _one("task_before_register", frame, "error_close", codes=frozenset({1008}))
        if choice == 3:
            return _one(
                "heartbeat_before_register", _heartbeat(me), "error_close", codes=frozenset({1008})
            )
        if choice == 4:
            frame = {"type": "register", "status": "ok", "client_id": r.choice(["", "   ", None])}
            return _one("register_without_id", frame, "error_close", codes=frozenset({1008}))
        if choice == 5:
            frame = {"type": "register", "status": "ok", "client_id": "x" * 600}
            return _one("register_long_id", frame, "error_close", codes=frozenset({1008}))
        if choice == 6:
            frame = {"type": "register", "status": "ok", "client_id": me, "metadata": "x"}
            return _one("register_wrong_types", frame, "error_close", codes=frozenset({1007}))
        if choice == 7:
            frame = {
                "type": "register",
                "status": "ok",
                "client_type": "constellation",
                "client_id": f"{me}@nowhere",
                "target_id": "no-such-device",
            }
            return _one("register_unknown_target", frame, "error_close", codes=frozenset({1008}))
        if choice == 8 and self.others:
            frame = {"type": "register", "status": "ok", "client_id": r.choice(self.others)}
            return _one("register_live_id", frame, "error_close", codes=frozenset({1008}))
        if choice == 9:
            payload = f'{{"type":"register","status":"ok","client_id":"{r.choice(UNSTORABLE)}"}}'
            return _one("register_unstorable_id", payload, "error_close", codes=frozenset({1007}))
        return _one(
            "pre_invalid_utf8",
            b'{"type": "register", "client_id": "\xc3\x28"}',
            "close",
            codes=frozenset({1007}),
        )


@dataclass
class Tally:
    frames: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    server_closes: dict[str, int] = field(default_factory=dict)  # client_id -> close code
    registrations: Counter[str] = field(default_factory=Counter)
    flap_refusals: int = 0

    def violate(self, case: Case, text: str) -> None:
        if len(self.violations) < 50:
            self.violations.append(f"{case.kind}: {text}")


async def _send_case(ws: RawWs, case: Case) -> None:
    for opcode, payload, kw in case.frames:
        ws.send_frame(opcode, payload, **kw)
    await ws.writer.drain()


async def _until_closed(ws: RawWs) -> tuple[list[dict[str, Any]], int | None]:
    frames = []
    try:
        async with asyncio.timeout(REPLY_TIMEOUT):
            while True:
                _opcode, payload = await ws.recv(REPLY_TIMEOUT)
                frames.append(json.loads(payload))
    except Closed as closed:
        return frames, closed.code
    except TimeoutError:
        return frames, -1


async def _fuzzer(port: int, index: int, budget: int, others: list[str], tally: Tally) -> None:
    rng = random.Random(1000 + index)
    generation = 0
    async with RawPool(port) as pool:
        while tally.frames < FRAMES and budget > 0:
            generation += 1
            me = f"fuzz-{index}-{generation}"
            fuzz = Fuzz(rng, me, others)
            ws = await pool.connect()
            if rng.random() < 0.25:  # a bad first frame
                case = fuzz.first_frame()
                await _send_case(ws, case)
                tally.frames += len(case.frames)
                budget -= len(case.frames)
                tally.by_kind[case.kind] += 1
                frames, code = await _until_closed(ws)
                errors = [f for f in frames if f.get("type") == "error"]
                if case.expect == "error_close" and len(errors) != 1:
                    tally.violate(case, f"expected one ERROR before the close, got {frames}")
                if code not in case.codes:
                    tally.violate(case, f"close code {code}, expected {sorted(case.codes)}")
                ws.abort()
                continue
            reply = await ws.register(me, metadata={"platform": "linux"})
            if reply.get("status") != "ok":
                tally.violate(Case("register", [], "ok"), f"registration refused: {reply}")
                continue
            tally.registrations[me] += 1
            cases_left = rng.randint(5, 60)  # then a new connection (and maybe a bad first frame)
            while tally.frames < FRAMES and budget > 0 and cases_left > 0:
                cases_left -= 1
                case = fuzz.after_register()
                await _send_case(ws, case)
                tally.frames += len(case.frames)
                budget -= len(case.frames)
                tally.by_kind[case.kind] += 1
                if case.expect == "close":
                    frames, code = await _until_closed(ws)
                    if code not in case.codes:
                        tally.violate(case, f"close code {code}, expected {sorted(case.codes)}")
                    tally.server_closes[me] = code or 0
                    ws.abort()
                    break
                await ws.send_json(type="heartbeat", client_id=me)  # the probe: in-order reply
                replies = await _replies_until_probe(ws, 1 + case.acks, case, tally)
                if replies is None:
                    break
                errors = [f for f in replies if f.get("type") == "error"]
                if case.expect == "error" and not errors:
                    tally.violate(case, f"no ERROR for a bad frame; got {replies}")
                if case.expect in {"ok", "silent", "no_error"} and errors:
                    tally.violate(case, f"unexpected ERROR {errors[0].get('error')}")
            else:
                await ws.close()


async def _replies_until_probe(
    ws: RawWs, acks: int, case: Case, tally: Tally
) -> list[dict[str, Any]] | None:
    replies: list[dict[str, Any]] = []
    seen = 0
    try:
        while seen < acks:
            opcode, payload = await ws.recv(REPLY_TIMEOUT)
            if opcode != OP_TEXT:
                tally.violate(case, f"server sent opcode {opcode}")
                continue
            frame = json.loads(payload)
            if frame.get("type") == "heartbeat" and frame.get("session_id") is None:
                seen += 1
            else:
                replies.append(frame)
    except Closed as closed:
        tally.violate(case, f"connection closed ({closed.code} {closed.reason}) instead of a reply")
        return None
    except TimeoutError:
        tally.violate(case, "no reply within the timeout")
        return None
    return replies


async def _flapper(port: int, index: int, tally: Tally) -> None:
    """One id, registered and dropped over and over: abort, clean close, or immediate return."""
    rng = random.Random(2000 + index)
    client_id = f"flap-{index}"
    async with RawPool(port) as pool:
        for _ in range(FLAPS):
            ws = await pool.connect()
            reply = await ws.register(client_id)
            if reply.get("status") == "ok":
                tally.registrations[client_id] += 1
                if rng.random() < 0.25:  # come back while the old connection is still live
                    # The old one reads meanwhile, so it answers the server's ping: provably
                    # alive, it keeps the id (a silent one would be closed as stale).
                    reading = asyncio.create_task(ws.recv(timeout=5))
                    again = await pool.connect()
                    refused = await again.register(client_id)
                    reading.cancel()
                    await asyncio.gather(reading, return_exceptions=True)
                    assert refused.get("type") == "error", refused
                    tally.flap_refusals += 1
                    frames, code = await _until_closed(again)
                    assert code == 1008, (frames, code)
                if rng.random() < 0.5:
                    ws.abort()  # drop without a close frame
                else:
                    await ws.close()
            else:
                # Refused while its last connection lives on, or banned for flapping (more than
                # flapping.max_connects registrations in the window).
                error = str(reply.get("error"))
                assert "already registered" in error or "(flapping)" in error, reply
                tally.flap_refusals += 1
                frames, code = await _until_closed(ws)
                assert code == 1008, (frames, code)
            await asyncio.sleep(rng.uniform(0, 0.02))


async def _fuzz_all(port: int, others: list[str]) -> Tally:
    tally = Tally()
    per_fuzzer = FRAMES // FUZZERS + 50
    await asyncio.gather(
        *(_fuzzer(port, i, per_fuzzer, others, tally) for i in range(FUZZERS)),
        *(_flapper(port, i, tally) for i in range(FLAPPERS)),
    )
    return tally


def test_websocket_fuzzer_next_to_well_behaved_clients(
    serve: Callable[..., ServeProcess],
    loadgen: Callable[..., LoadGen],
    db: Engine,
    backend: str,
) -> None:
    """Every bad frame gets an ERROR or the right close code; no unhandled error in the log;
    the well-behaved clients see nothing; registry and SQL agree afterwards."""
    server = serve(env=ENV, log_level="INFO")
    devices, constellations = scale(30, 100), scale(6, 20)
    load = loadgen(
        server.ws_url, "calm", devices=devices, constellations=constellations, duration=900
    )
    progress = load.wait(
        lambda p: p["online"] >= devices + constellations and p["acks"] >= 30, 60, "load"
    )
    others = [f"calm-dev-{i:05d}" for i in range(devices)]
    began = time.time()
    tally = asyncio.run(_fuzz_all(server.port, others))
    fuzzed_for = time.time() - began
    during = load.progress()
    result = load.stop()
    server.wait_drained()
    consistency = registry_matches_sql(server, db)
    stats = server.get("/api/stats")
    assert server.terminate() == 0, server.log()

    assert tally.frames >= FRAMES
    assert tally.violations == [], "\n".join(tally.violations)
    assert server.problems() == []
    assert result["error_frames"] == [], result["error_frames"][:5]
    assert result["drops"] == 0
    assert during["acks"] > progress["acks"]
    loss = check_sessions(db, result)
    assert (loss.missing, loss.completed_lost, loss.not_finished, loss.duplicates) == (0, 0, 0, 0)
    failed = [s for s in result["sessions"].values() if s["status"] not in (None, "completed")]
    assert failed == [], failed[:3]
    assert consistency["registry_equals_sql"], consistency
    assert consistency["live"] == 0, consistency
    assert stats["active_sessions"] == 0, stats
    # Every registration has its row; the server's closes are recorded with the right reason.
    with db.connect() as conn:
        rows = conn.execute(select(connections.c.client_id, connections.c.disconnect_reason)).all()
    per_client = Counter(client_id for client_id, _ in rows)
    for client_id, n in tally.registrations.items():
        assert per_client[client_id] == n, (client_id, n, per_client[client_id])
    reasons = {client_id: reason for client_id, reason in rows if client_id in tally.server_closes}
    expected = {1007: "protocol_error", 1002: "protocol_error", 1009: "frame_too_large"}
    wrong = {
        c: (code, reasons.get(c))
        for c, code in tally.server_closes.items()
        if reasons.get(c) != expected[code]
    }
    assert wrong == {}, wrong
    record(
        "fuzz",
        backend,
        frames=tally.frames,
        fuzzers=FUZZERS,
        seconds=round(fuzzed_for, 1),
        by_kind=dict(tally.by_kind),
        violations=len(tally.violations),
        flaps=FLAPS * FLAPPERS,
        flap_registrations=sum(n for c, n in tally.registrations.items() if c.startswith("flap-")),
        flap_refusals=tally.flap_refusals,
        calm_clients=devices + constellations,
        calm_sessions=len(result["sessions"]),
        calm_error_frames=len(result["error_frames"]),
        **latency_figures(result, began, began + fuzzed_for),
    )


SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


def test_http_api_fuzzed_by_schemathesis(
    serve: Callable[..., ServeProcess], tmp_path: Path, backend: str
) -> None:
    """schemathesis against /openapi.json (NUL bytes allowed in generated strings): no 5xx
    answer and no unhandled error in the server log."""
    server = serve(log_level="INFO")
    examples = scale(3, 100)
    phases = scale("fuzzing", "coverage,fuzzing,stateful")
    report = tmp_path / "schemathesis.ndjson"
    began = time.monotonic()
    run = subprocess.run(
        [
            str(SCHEMATHESIS),
            "run",
            f"{server.http_url}/openapi.json",
            "--header",
            f"X-API-Key: {API_KEY}",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            str(examples),
            "--phases",
            phases,
            "--seed",
            "4",
            "--workers",
            "1",
            "--generation-allow-x00",
            "true",
            "--generation-database",
            "none",
            "--request-timeout",
            "30",
            "--no-color",
            "--report",
            "ndjson",
            "--report-ndjson-path",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        check=False,
    )
    seconds = time.monotonic() - began
    summary = re.search(r"(\d+) generated", run.stdout)
    assert run.returncode == 0, run.stdout[-5000:]
    assert server.problems() == []
    record(
        "schemathesis",
        backend,
        operations=len(server.get("/openapi.json", timeout=10)["paths"]),
        cases=int(summary.group(1)) if summary else None,
        max_examples=examples,
        phases=phases,
        seconds=round(seconds, 1),
    )
