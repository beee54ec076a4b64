"""The JSON tool plan a task request may carry: a list of tool calls, each one COMMAND round.

Both sides read it: the server's ToolPlanRunner turns a plan into COMMAND frames for a stock UFO
device, and a relay device (the demo device) may run one itself. No I/O here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

TOOL_TYPES = {"data_collection", "action"}


@dataclass(frozen=True, slots=True)
class ToolPlan:
    rounds: list[list[dict[str, Any]]]
    agent_name: str | None
    process_name: str | None
    root_name: str | None
    command_timeout: float | None = None
    """Seconds each COMMAND of this plan may wait (at most the server's command_timeout)."""


class PlanError(ValueError):
    """The request is JSON that looks like a plan but is not a valid one."""


def _tool_call(raw: object, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise PlanError(f"{where}: a tool call must be an object")
    name = raw.get("tool_name")
    if not isinstance(name, str) or not name:
        raise PlanError(f"{where}: tool_name must be a non-empty string")
    tool_type = raw.get("tool_type", "action")
    if tool_type not in TOOL_TYPES:
        raise PlanError(f"{where}: tool_type must be 'data_collection' or 'action'")
    parameters = raw.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise PlanError(f"{where}: parameters must be an object")
    return {"tool_name": name, "parameters": parameters, "tool_type": tool_type}


MAX_EMBEDDED_CANDIDATES = 64
"""Positions tried when a plan is looked for inside prose (each costs one JSON parse)."""

_DECODER = json.JSONDecoder()


def _looks_like_plan(data: object) -> bool:
    """A JSON value meant as a plan: `{"tools": ...}`, or a list whose first step is a tool call
    (an object with `tool_name`) or a round of them."""
    if isinstance(data, dict):
        return "tools" in data
    if isinstance(data, list) and data:
        first = data[0]
        if isinstance(first, list) and first:
            first = first[0]
        return isinstance(first, dict) and "tool_name" in first
    return False


def _find_plan(request: str) -> object | None:
    """The plan in `request`: the whole text as JSON, or else the first JSON value embedded in
    it that looks like a plan (Galaxy sends prose, `Task Description: ...\nTips for Completion:
    ...`, and the description may carry a plan, in a code fence or not)."""
    text = request.strip()
    if text[:1] in {"[", "{"}:
        try:
            whole: object = json.loads(text)
        except json.JSONDecodeError:
            pass
        else:
            return whole
    tried = 0
    for index, char in enumerate(request):
        if char not in "[{":
            continue
        tried += 1
        if tried > MAX_EMBEDDED_CANDIDATES:
            break
        try:
            data: object = _DECODER.raw_decode(request, index)[0]
        except json.JSONDecodeError:
            continue
        if _looks_like_plan(data):
            return data
    return None


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise PlanError("command_timeout must be a positive number of seconds")
    return float(value)


def parse_tool_plan(request: str | None) -> ToolPlan | None:
    """A plan, or None if the request holds no JSON plan at all (natural language).

    Forms: a list of steps, or `{"agent_name": ..., "process_name": ..., "root_name": ...,
    "command_timeout": seconds, "tools": [steps]}`, as the whole request or embedded in prose.
    A step is one tool call (its own COMMAND round) or a list of tool calls sent together in one
    COMMAND.
    """
    if not request:
        return None
    data = _find_plan(request)
    if data is None:
        return None
    options: dict[str, Any] = {}
    if isinstance(data, dict):
        if "tools" not in data:
            return None
        options, data = data, data["tools"]
    if not isinstance(data, list) or not data:
        raise PlanError("a tool plan must be a non-empty list of tool calls")
    rounds: list[list[dict[str, Any]]] = []
    for i, step in enumerate(data):
        if isinstance(step, list):
            if not step:
                raise PlanError(f"step {i}: an empty round")
            rounds.append([_tool_call(call, f"step {i}.{j}") for j, call in enumerate(step)])
        else:
            rounds.append([_tool_call(step, f"step {i}")])
    for key in ("agent_name", "process_name", "root_name"):
        if options.get(key) is not None and not isinstance(options[key], str):
            raise PlanError(f"{key} must be a string")
    timeout = options.get("command_timeout")
    return ToolPlan(
        rounds,
        options.get("agent_name"),
        options.get("process_name"),
        options.get("root_name"),
        _seconds(timeout) if timeout is not None else None,
    )
