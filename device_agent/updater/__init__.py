"""Installing a model package into the A/B slots: an explicit state machine persisted on entry to each state.

States and transitions (``TRANSITIONS`` is the single source; ``Updater._enter`` refuses anything else)::

    idle ──deploy──▶ downloading ─▶ verifying                       (the rollout path joins the install path)
    idle ──install─▶ verifying ─▶ staging ─▶ smoke_test ─▶ activating ─▶ idle                       (installed)
                                                          activating ─▶ probation ─▶ idle           (committed)
                                                                        probation ─▶ rolling_back ─▶ idle
                                                                                     (rolled_back | rollback_failed)
    downloading | verifying | staging | smoke_test ─▶ idle                        (rejected | failed | deferred)
    idle ──rollback─▶ rolling_back ─▶ idle     (rolled_back; no usable standby: refused before entering, failed;
                                                a standby that is not older: refused, failed (standby_not_older))
    idle ──activate_standby─▶ activating ─▶ probation ─▶ …          (a rollout names the newer standby version)

* **downloading** (``deploy``): the caller's ``fetch`` brings the package file (``device_agent.download``: HTTP
  Range resume, never past the declared length, sha256 checked against the desired state). A failure goes back
  to idle with the download's reason (``hash_mismatch``, ``length_exceeded``, ``download_interrupted``, …).
* **verifying**: the whole package is verified (signatures chain to the pinned root, nothing expired by
  ``max(wall clock, high-water)``, target, every file's hash and length) without writing a byte; then the
  version must be newer than the active one of the same model name. A rejection here leaves both slots
  untouched, so the standby (previous version) survives a bad package.
* **staging**: the package is verified again while it is unpacked into ``slots/<inactive>.tmp`` (a second
  pass closes the gap between checking and extracting); the tree is fsynced and ``.complete`` written last.
* **smoke_test**: the staged model is loaded with the target's threads, the golden inputs are run and
  compared with the golden probabilities (tolerance from the package, same argmax); image packages first
  check that each golden image preprocesses to its golden row. Failure discards the staged folder; the active
  slot and the standby are untouched. Then the caller's ``before_activate`` hook runs (rollouts: wait for the
  maintenance window and for no running batch, measure the previous version's p95); it may defer the swap
  (``DeferredError`` -> ``deferred``, the staged folder is discarded, the caller retries later).
* **activating**: the staged folder replaces the inactive slot (the old standby) and ``active.json`` is
  replaced atomically to name it. The previous version stays in the other slot as the new standby.
* **probation** (only when the caller asks for it): the new version serves while a watcher
  (``device_agent.probation``) judges it; ``finish_probation`` commits (``committed``) or rolls back.
* **rolling_back**: ``active.json`` is switched to the standby slot (ready, unexpired, files intact); no
  download. Asked for while idle, a missing or damaged standby is refused before anything changes (``failed``),
  and so is a standby that is not older than the active model (``standby_not_older``: a rollback only goes
  back, ``checks.goes_back``); from probation the state is entered first, and a rollback that cannot be done is
  reported as ``rollback_failed`` (the new version keeps serving), distinct from every other status.
* **activating** straight from idle (``activate_standby``): a rollout names the version the standby slot holds
  and it is not older than the active one (rolled out again after being rolled back). The pointer is switched
  without a download, then the version is on probation like a new install; the result says it was a switch to
  the standby slot, never a rollback.

Modules: ``states`` (the states, ``TRANSITIONS``, ``InstallResult``, the ``update.json`` record and the
``EDGEFLEET_FAILPOINT`` test hook), ``errors`` (``UpdateError`` and its refusals), ``checks`` (version order,
reserved names, slot files, the device's target), ``smoke`` (the smoke test), ``machine`` (``Updater``: the
shell that enters the states) and ``recovery`` (what ``Updater.recover()`` repairs at every start-up).
Everything public is re-exported here; import from ``device_agent.updater``.
"""

from .checks import check_newer, check_reserved, files_intact, goes_back, load_device_target
from .errors import (
    DeferredError,
    IllegalTransitionError,
    InProbationError,
    NoStandbyError,
    NotNewerError,
    ReservedNameError,
    SmokeTestError,
    StandbyNotOlderError,
    UpdateError,
    WrongPackageError,
)
from .machine import Updater
from .smoke import IMAGE_ATOL, GoldenVerdict, compare_golden, smoke_test
from .states import (
    FAILPOINT_ENV,
    HISTORY_LENGTH,
    OK_STATUSES,
    TRANSITIONS,
    InstallResult,
    UpdateRecord,
    UpdateState,
    check_transition,
)

__all__ = [
    "FAILPOINT_ENV",
    "HISTORY_LENGTH",
    "IMAGE_ATOL",
    "OK_STATUSES",
    "TRANSITIONS",
    "DeferredError",
    "GoldenVerdict",
    "IllegalTransitionError",
    "InProbationError",
    "InstallResult",
    "NoStandbyError",
    "NotNewerError",
    "ReservedNameError",
    "SmokeTestError",
    "StandbyNotOlderError",
    "UpdateError",
    "UpdateRecord",
    "UpdateState",
    "Updater",
    "WrongPackageError",
    "check_newer",
    "check_reserved",
    "check_transition",
    "compare_golden",
    "files_intact",
    "goes_back",
    "load_device_target",
    "smoke_test",
]
