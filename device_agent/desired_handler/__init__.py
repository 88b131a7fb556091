"""The device's side of a rollout: signed desired-state messages in, the slots converged to them out.

Two halves, on two threads of the running agent (``device_agent.runner``):

``receive(payload)`` (the MQTT link's thread; fast, no network) decides on one message of the retained
``…/desired`` topic and persists the decision in ``desired.json`` (atomic): verified against the pinned fleet
key, this device's id, the last accepted seq and the version policy (``check_move``), then ``accepted``,
``duplicate`` or ``rejected`` (recorded, nothing else changes). See :mod:`.receive`.

``converge()`` (the worker thread; also callable directly) brings the slots to the accepted desired state:
watch a probation to its end, nothing when current, the standby slot without download, else download, install
and probation through the updater; final outcomes are not retried, transient ones are retried with backoff.
See :mod:`.handler` (and :mod:`.watch` for the probation steps).

Modules: ``record`` (``desired.json``: ``DesiredRecord``, ``read_desired_seq``), ``options``
(``HandlerOptions``, ``MaintenanceWindow``), ``receive`` (the receiving half: ``check_move``, ``Decision``),
``watch`` (probation watched and ended) and ``handler`` (``DesiredHandler``, ``Step``). Everything public is
re-exported here; import from ``device_agent.desired_handler``.
"""

from .handler import DOWNLOADS, RETRYABLE, DesiredHandler, Step
from .options import HandlerOptions, MaintenanceWindow
from .receive import Decision, VersionNotAllowedError, check_move, decide
from .record import DESIRED_FILE, DESIRED_SPEC, DesiredFileError, DesiredRecord, read_desired_seq, read_desired_state

__all__ = [
    "DESIRED_FILE",
    "DESIRED_SPEC",
    "DOWNLOADS",
    "RETRYABLE",
    "Decision",
    "DesiredFileError",
    "DesiredHandler",
    "DesiredRecord",
    "HandlerOptions",
    "MaintenanceWindow",
    "Step",
    "VersionNotAllowedError",
    "check_move",
    "decide",
    "read_desired_seq",
    "read_desired_state",
]
