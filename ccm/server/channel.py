"""The command channel of an agent-driven session: COMMAND frames out to the session's device,
COMMAND_RESULTS back, matched by the COMMAND's response id (`prev_response_id` in the answer).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from ccm.ids import new_id
from ccm.protocol import ServerMessageType, TaskStatus, server_frame
from ccm.server.router import Router
from ccm.server.runners import CommandTimeout
from ccm.sessions import LiveSession

CommandAnswer = list[dict[str, Any]]


@dataclass(eq=False)
class SessionChannel:
    """CommandChannel (ccm.server.runners) of one session: one COMMAND at a time per call."""

    session: LiveSession
    platform: str
    router: Router
    timeout: float
    """Seconds a COMMAND may wait for its COMMAND_RESULTS (server.command_timeout); a plan may
    ask for less."""

    async def run_command(
        self,
        actions: list[dict[str, Any]],
        *,
        agent_name: str,
        process_name: str | None = None,
        root_name: str | None = None,
        answer_within: float | None = None,
    ) -> CommandAnswer:
        session = self.session
        limit = min(answer_within, self.timeout) if answer_within is not None else self.timeout
        response_id = new_id()
        frame = server_frame(
            ServerMessageType.COMMAND,
            TaskStatus.CONTINUE,
            agent_name=agent_name,
            process_name=process_name,
            root_name=root_name,
            actions=[{**action, "call_id": new_id()} for action in actions],
            session_id=session.session_id,
            task_name=session.task_name,
            response_id=response_id,
        )
        answer: asyncio.Future[CommandAnswer] = asyncio.get_running_loop().create_future()
        pending = session.run.commands
        pending[response_id] = answer
        try:
            if not self.router.send(session.device_id, frame):
                raise CommandTimeout("the device is not connected")
            try:
                return await asyncio.wait_for(answer, limit)
            except TimeoutError:
                raise CommandTimeout(
                    f"device did not answer the command within {limit:g} s"
                ) from None
        finally:
            pending.pop(response_id, None)


def accept_command_results(
    session: LiveSession, response_id: str | None, results: CommandAnswer
) -> bool:
    """Hand `results` to the COMMAND of `session` they answer. False if no COMMAND waits for
    them (unknown response id, already answered, or timed out)."""
    answer = session.run.commands.get(response_id) if response_id else None
    if answer is None or answer.done():
        return False
    answer.set_result(results)
    return True
