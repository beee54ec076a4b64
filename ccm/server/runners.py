"""Session runners: what turns a task into COMMAND rounds for a stock UFO device (decision D3).

A runner gets the session and a CommandChannel to its device and returns an Outcome. ccm ships
one runner, ToolPlanRunner, for requests that are a JSON tool plan. A runner for natural language
(an LLM agent) plugs in through `create_app(runners=...)` or the `server.agent_runner` setting;
without one, a natural-language task fails at once with an error that says so.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from typing import Any, Protocol

from ccm.errors import ConfigError
from ccm.sessions import LiveSession

NO_RUNNER_ERROR = (
    "no runner is configured for natural-language tasks: send a JSON tool plan "
    '([{"tool_name": ..., "parameters": {...}, "tool_type": "action"}]) or configure '
    "server.agent_runner"
)

DEFAULT_AGENT_BY_PLATFORM = {"windows": "HostAgent", "linux": "LinuxAgent", "mobile": "MobileAgent"}
TOOL_TYPES = {"data_collection", "action"}


class CommandTimeout(Exception):
    """The device did not answer a COMMAND in time (stock devices may never answer)."""


class CommandChannel(Protocol):
    """Sends one COMMAND to the session's device and waits for its COMMAND_RESULTS."""

    platform: str

    async def run_command(
        self,
        actions: list[dict[str, Any]],
        *,
        agent_name: str,
        process_name: str | None = None,
        root_name: str | None = None,
    ) -> list[dict[str, Any]]: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    completed: bool
    result: Any = None
    error: str | None = None


class SessionRunner(Protocol):
    def accepts(self, request: str | None) -> bool: ...

    async def run(self, session: LiveSession, channel: CommandChannel) -> Outcome: ...


@dataclass(frozen=True, slots=True)
class ToolPlan:
    rounds: list[list[dict[str, Any]]]
    agent_name: str | None
    process_name: str | None
    root_name: str | None


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


def parse_tool_plan(request: str | None) -> ToolPlan | None:
    """A plan, or None if the request is not a JSON plan at all (natural language).

    Forms: a list of steps, or `{"agent_name": ..., "process_name": ..., "root_name": ...,
    "tools": [steps]}`. A step is one tool call (its own COMMAND round) or a list of tool calls
    sent together in one COMMAND.
    """
    if not request or request.lstrip()[:1] not in {"[", "{"}:
        return None
    try:
        data = json.loads(request)
    except json.JSONDecodeError:
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
    return ToolPlan(
        rounds, options.get("agent_name"), options.get("process_name"), options.get("root_name")
    )


class ToolPlanRunner:
    """Runs a JSON tool plan: one COMMAND per round, stopping at the first failed call."""

    def accepts(self, request: str | None) -> bool:
        try:
            return parse_tool_plan(request) is not None
        except PlanError:
            return True  # it is meant as a plan: run() reports what is wrong with it

    async def run(self, session: LiveSession, channel: CommandChannel) -> Outcome:
        try:
            plan = parse_tool_plan(session.request)
        except PlanError as exc:
            return Outcome(False, error=f"invalid tool plan: {exc}")
        assert plan is not None
        agent = plan.agent_name or DEFAULT_AGENT_BY_PLATFORM.get(channel.platform, "HostAgent")
        results: list[dict[str, Any]] = []
        for actions in plan.rounds:
            try:
                answers = await channel.run_command(
                    actions,
                    agent_name=agent,
                    process_name=plan.process_name,
                    root_name=plan.root_name,
                )
            except CommandTimeout as exc:
                return Outcome(False, result=results, error=str(exc))
            for action, answer in zip(actions, answers, strict=False):
                results.append({"tool_name": action["tool_name"], **answer})
            failed = next((a for a in answers if a.get("status") != "success"), None)
            if failed is not None or len(answers) != len(actions):
                reason = (failed or {}).get("error") or "the device did not run every tool call"
                return Outcome(False, result=results, error=f"tool call failed: {reason}")
        return Outcome(True, result=results)


def load_runner(spec: str) -> SessionRunner:
    """Import `package.module:factory` and call it to build a runner (the agent plug-in point)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(
            f"server.agent_runner must look like 'package.module:factory', got {spec!r}"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"server.agent_runner {spec!r} cannot be imported: {exc}") from None
    runner: SessionRunner = factory()
    return runner
