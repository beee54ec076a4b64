"""Demo AIP clients for a two-terminal round trip: a device with a few built-in tools, and a
constellation that sends it one task. Both are real `websockets` clients that behave like UFO's;
they report what happens through `on_event`, and the CLI prints it. They use only what a client
would: the protocol module, the tool-plan format, and their own code.
"""

from ccm.demo.constellation import describe_task_end, run_constellation
from ccm.demo.device import device_metadata, run_device
from ccm.demo.link import DEFAULT_FEATURES, DemoError, ws_url
from ccm.demo.tools import TaskOutcome, run_actions, run_task, run_tool

__all__ = [
    "DEFAULT_FEATURES",
    "DemoError",
    "TaskOutcome",
    "describe_task_end",
    "device_metadata",
    "run_actions",
    "run_constellation",
    "run_device",
    "run_task",
    "run_tool",
    "ws_url",
]
