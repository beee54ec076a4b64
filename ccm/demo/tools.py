"""The demo device's tools: what its COMMANDs can call, and a relayed task run round by round."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ccm.demo.link import MAX_SLEEP_SECONDS, NAMESPACE, Frame
from ccm.ids import new_id
from ccm.protocol import ResultStatus
from ccm.toolplan import PlanError, parse_tool_plan


@dataclass(frozen=True, slots=True)
class TaskOutcome:
    """How the demo device's own run of a relayed task ended."""

    completed: bool
    result: Any = None
    error: str | None = None


class ToolFailure(Exception):
    """A demo tool could not do what it was asked: its Result is `failure` with this text."""


@dataclass(frozen=True, slots=True)
class DemoTool:
    run: Callable[[Frame], Awaitable[Any]]
    description: str
    parameters: dict[str, str]


def _number(params: Frame, key: str) -> float:
    value = params.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ToolFailure(f"parameter {key!r} must be a number, got {value!r}")
    return value


async def _list_tools(params: Frame) -> list[Frame]:
    return [
        {
            "tool_name": name,
            "namespace": NAMESPACE,
            "description": tool.description,
            "parameters": tool.parameters,
        }
        for name, tool in TOOLS.items()
    ]


async def _echo(params: Frame) -> Frame:
    return params


async def _add(params: Frame) -> float:
    return _number(params, "a") + _number(params, "b")


async def _sleep(params: Frame) -> Frame:
    seconds = _number(params, "seconds") if "seconds" in params else 1.0
    if seconds < 0:
        raise ToolFailure("parameter 'seconds' must not be negative")
    slept = min(float(seconds), MAX_SLEEP_SECONDS)
    await asyncio.sleep(slept)
    return {"slept": slept}


async def _fail(params: Frame) -> None:
    raise ToolFailure(str(params.get("message") or "the fail tool always fails"))


TOOLS: dict[str, DemoTool] = {
    "list_tools": DemoTool(_list_tools, "List the tools of this demo device.", {}),
    "echo": DemoTool(_echo, "Return the parameters unchanged.", {"*": "any"}),
    "add": DemoTool(_add, "Return a + b.", {"a": "number", "b": "number"}),
    "sleep": DemoTool(
        _sleep, f"Wait, at most {MAX_SLEEP_SECONDS:g} s, then return.", {"seconds": "number"}
    ),
    "fail": DemoTool(_fail, "Always fail, to show how failures look.", {"message": "string"}),
}


def _result(
    status: ResultStatus, call_id: Any, *, result: Any = None, error: str | None = None
) -> Frame:
    return {
        "status": status.value,
        "error": error,
        "result": result,
        "namespace": NAMESPACE,
        "call_id": call_id,
    }


async def run_tool(action: Frame) -> Frame:
    """One Result for one Command; a demo tool never raises, it reports `failure`."""
    name, call_id = action.get("tool_name"), action.get("call_id")
    if not name:
        return _result(ResultStatus.SUCCESS, call_id, result="No action taken.")  # as UFO does
    tool = TOOLS.get(str(name))
    if tool is None:
        known = ", ".join(TOOLS)
        return _result(
            ResultStatus.FAILURE,
            call_id,
            error=f"unknown tool {name!r} (this demo device has: {known})",
        )
    params = action.get("parameters") or {}
    if not isinstance(params, dict):
        return _result(ResultStatus.FAILURE, call_id, error="parameters must be an object")
    try:
        value = await tool.run(params)
    except ToolFailure as exc:
        return _result(ResultStatus.FAILURE, call_id, error=str(exc))
    return _result(ResultStatus.SUCCESS, call_id, result=value)


async def run_actions(actions: Sequence[Frame]) -> list[Frame]:
    """One Result per Command, in order, like a UFO device: after a failure the rest are skipped."""
    results: list[Frame] = []
    for action in actions:
        if results and results[-1]["status"] != ResultStatus.SUCCESS.value:
            error = "skipped because an earlier command failed"
            results.append(_result(ResultStatus.SKIPPED, action.get("call_id"), error=error))
        else:
            results.append(await run_tool(action))
    return results


async def run_task(request: str | None, client_id: str) -> TaskOutcome:
    """Relay mode: a JSON tool plan runs here, round by round; anything else is echoed back."""
    try:
        plan = parse_tool_plan(request)
    except PlanError as exc:
        return TaskOutcome(False, error=f"invalid tool plan: {exc}")
    if plan is None:
        return TaskOutcome(True, result={"echo": request, "handled_by": client_id})
    done: list[Frame] = []
    for actions in plan.rounds:
        answers = await run_actions([{**a, "call_id": new_id()} for a in actions])
        done.extend(
            {"tool_name": a["tool_name"], **r} for a, r in zip(actions, answers, strict=True)
        )
        failed = next((r for r in answers if r["status"] != ResultStatus.SUCCESS.value), None)
        if failed is not None:
            return TaskOutcome(False, result=done, error=f"tool call failed: {failed['error']}")
    return TaskOutcome(True, result=done)
