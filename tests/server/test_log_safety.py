"""Logs are safe to read: every control and format character in client text is escaped in both
formats, and no query string (where a WebSocket key travels, in any spelling) reaches a line.
The end-to-end check against a real server at DEBUG is tests/reliability/test_log_safety.py."""

from __future__ import annotations

import json
import logging
import sys
import unicodedata

import pytest

from ccm.logs import JsonFormatter, RedactTokens, TextFormatter, escape_unsafe, redact

UNSAFE = {"Cc", "Cf", "Zl", "Zp", "Cs"}


def record(msg: str, *args: object, name: str = "ccm.test") -> logging.LogRecord:
    return logging.LogRecord(name, logging.INFO, __file__, 1, msg, args, None)


class TestEscaping:
    def test_every_control_and_format_character_is_escaped(self) -> None:
        """Each code point of the categories Cc, Cf, Zl, Zp and Cs, anywhere in Unicode,
        comes out of escape_unsafe as printable ASCII escapes."""
        unsafe = [
            chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) in UNSAFE
        ]
        out = escape_unsafe("".join(unsafe))
        assert [c for c in out if unicodedata.category(c) in UNSAFE] == []
        assert out.isascii()

    @pytest.mark.parametrize(
        ("raw", "shown"),
        [
            ("\x1b[1A\x1b[2K", "\\x1b[1A\\x1b[2K"),
            ("\x0b\x0c\x08\x7f", "\\x0b\\x0c\\x08\\x7f"),
            ("\x85", "\\x85"),
            ("\u2028\u2029", "\\u2028\\u2029"),
            ("\u202e\u2066\u2069", "\\u202e\\u2066\\u2069"),
            ("\u200b\ufeff", "\\u200b\\ufeff"),
            ("\U000e0041", "\\U000e0041"),
            ("\r\n\t", "\\r\\n\\t"),
        ],
        ids=["esc", "vt-ff-bs-del", "nel", "separators", "bidi", "zero-width", "tag", "newlines"],
    )
    def test_known_troublemakers(self, raw: str, shown: str) -> None:
        """The characters the attack run used, each shown as an escape."""
        assert escape_unsafe(f"id={raw}!") == f"id={shown}!"

    def test_ordinary_text_is_untouched(self) -> None:
        """Letters, accents, CJK, emoji and spaces are shown as they are."""
        text = "dev-ünï 日本 🤖 a b"
        assert escape_unsafe(text) == text

    def test_text_lines_escape_arguments_and_bound_fields(self) -> None:
        """A text line escapes the message's arguments and the bound context values."""
        rec = record("client registered client_id=%s", "a\x1b[2Kb\u2028c")
        rec.ctx = {"session_id": "s\x85\u202e"}
        line = TextFormatter().format(rec)
        assert "a\\x1b[2Kb\\u2028c" in line
        assert "session_id=s\\x85\\u202e" in line
        assert [c for c in line if unicodedata.category(c) in UNSAFE] == []

    def test_json_lines_escape_and_parse_back(self) -> None:
        """A JSON line holds no raw control or format character and parses back to the text."""
        text = "x\x1b\x85\u2028\u202e\U000e0041y"
        line = JsonFormatter().format(record("error=%s", text))
        assert [c for c in line if unicodedata.category(c) in UNSAFE] == []
        assert json.loads(line)["message"] == f"error={text}"


class TestNoQueryStrings:
    @pytest.mark.parametrize(
        "text",
        [
            '"WebSocket /ws?Token=KEY" 403',
            "GET /api/health?tok%65n=KEY HTTP/1.1",
            "GET /ws?x=1&TOKEN=KEY HTTP/1.1",
            "< GET /ws?%74oken=KEY HTTP/1.1",
            "ws://127.0.0.1:5000/ws?token=KEY",
            "/healthz?KEY",
        ],
    )
    def test_a_query_string_never_survives(self, text: str) -> None:
        """Whatever the parameter's case or encoding, the query is replaced."""
        assert "KEY" not in redact(text)
        assert "?[query hidden]" in redact(text)

    def test_prose_and_paths_stay(self) -> None:
        """A question mark in prose, and a path without a query, are left alone."""
        assert redact("is it up? yes /api/health") == "is it up? yes /api/health"

    def test_hiding_twice_is_hiding_once(self) -> None:
        """A line filtered by the logger and again by the handler reads the same."""
        once = redact('"WebSocket /ws?token=KEY" 403')
        assert redact(once) == once == '"WebSocket /ws?[query hidden]" 403'

    def test_json_lines_hide_queries_and_stay_json(self) -> None:
        """A message or bound field that ends in a URL with its query is still valid JSON."""
        rec = record("connecting to %s", "ws://h:5000/ws?token=KEY")
        rec.ctx = {"url": "/ws?Token=KEY", "attempt": 3}
        line = JsonFormatter().format(rec)
        assert "KEY" not in line
        entry = json.loads(line)
        assert entry["message"] == "connecting to ws://h:5000/ws?[query hidden]"
        assert (entry["url"], entry["attempt"]) == ("/ws?[query hidden]", 3)

    def test_the_filter_hides_queries_in_arguments_and_key_headers(self) -> None:
        """uvicorn's access line (path as an argument) and the handshake's header lines at
        DEBUG lose the key; other headers stay."""
        access = record('%s - "%s %s HTTP/%s" %d', "1.2.3.4:5", "GET", "/x?tok%65n=KEY", "1.1", 200)
        header = record("< %s: %s", "x-api-key", "KEY", name="uvicorn.error")
        other = record("< %s: %s", "upgrade", "websocket", name="uvicorn.error")
        for rec in (access, header, other):
            RedactTokens().filter(rec)
        assert "KEY" not in access.getMessage()
        assert access.getMessage() == '1.2.3.4:5 - "GET /x?[query hidden] HTTP/1.1" 200'
        assert header.getMessage() == "< x-api-key: [hidden]"
        assert other.getMessage() == "< upgrade: websocket"
