"""Session runners: what turns a task into COMMAND rounds for a stock UFO device (README: D3).

A runner gets the session and a CommandChannel to its device and returns an Outcome. ccm ships
one runner, ToolPlanRunner, for requests that are a JSON tool plan. A runner for natural language
(an LLM agent) plugs in through `create_app(runners=...)` or the `server.agent_runner` setting;
without one, a natural-language task fails at once with an error that says so.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol

from ccm.errors import ConfigError
from ccm.sessions import LiveSession
from ccm.toolplan import PlanError, parse_tool_plan

NO_RUNNER_ERROR = (
    "no runner is configured for natural-language tasks: send a JSON tool plan "
    '([{"tool_name": ..., "parameters": {...}, "tool_type": "action"}]) or configure '
    "server.agent_runner"
)

DEFAULT_AGENT_BY_PLATFORM = {"windows": "HostAgent", "linux": "LinuxAgent", "mobile": "MobileAgent"}


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
        answer_within: float | None = None,
    ) -> list[dict[str, Any]]:
        """`answer_within`: seconds to wait for the answer (at most server.command_timeout)."""
        ...


@dataclass(frozen=True, slots=True)
class Outcome:
    completed: bool
    result: Any = None
    error: str | None = None


class SessionRunner(Protocol):
    def accepts(self, request: str | None) -> bool: ...

    async def run(self, session: LiveSession, channel: CommandChannel) -> Outcome: ...


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
                    answer_within=plan.command_timeout,
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
