"""Run README commands for real: the CLIs from ``.venv/bin`` in a workspace folder, long-running ones in the
background (readiness polled, bounded; stopped by PID), placeholders substituted from an explicit table.

The *what* (which commands, their placeholders, expected output, set-up between them) lives in
tests/test_readme_commands.py; this module is the *how*.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .parse import Block, Command, Invocation, expand

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"
OUR_CLIS = ("model-packager", "device-agent", "fleet-server")
COMMAND_TIMEOUT_S = 180.0
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0

Hook = Callable[["Workspace"], None]


@dataclass(frozen=True)
class Background:
    """How a long-running command is judged ready, and whether it stops as soon as it was (``stop_when_ready``,
    with the reason) instead of at the end of the walkthrough."""

    ready: Callable[[Workspace], bool]
    stop_when_ready: str = ""


@dataclass(frozen=True)
class Spec:
    """What the test does with one README command (keyed by its normalised text).

    ``variants``: ``"full"`` runs it with every ``[optional]`` group, ``"bare"`` without any.
    ``subs``: placeholders of this command only (token -> value; ``{name}`` is filled from the workspace).
    ``extra``: arguments appended (only where the README's defaults cannot work in a test, e.g. fixed ports).
    ``expect``: fragments the standard output must contain (every variant). ``exit``: expected status.
    ``capture``: workspace variable -> regex with one group, read from the standard output.
    ``covered_elsewhere``: alternative (of ``a|b``) -> the test that covers it, when it cannot run here.
    ``before`` / ``after``: set-up the walkthrough needs around the command (not README commands).
    """

    variants: tuple[str, ...] = ("full",)
    subs: Mapping[str, str] = field(default_factory=dict)
    extra: tuple[str, ...] = ()
    expect: tuple[str, ...] = ()
    exit: int = 0
    capture: Mapping[str, str] = field(default_factory=dict)
    background: Background | None = None
    covered_elsewhere: Mapping[str, str] = field(default_factory=dict)
    before: Hook | None = None
    after: Hook | None = None
    why: str = ""  # why extra arguments, a non-zero exit or set-up are needed


@dataclass(frozen=True)
class Snippet:
    """A ``python`` block: text replacements (each must occur), then ``check`` appended, run with the venv's
    python in the workspace."""

    replace: Mapping[str, str]
    check: str
    before: Hook | None = None


@dataclass
class Ran:
    key: str
    argv: tuple[str, ...]
    status: int | None
    seconds: float
    note: str = ""


class WalkthroughError(AssertionError):
    """A README command did not do what the README says (the message holds the command, status and output)."""


def _tail(text: str, n: int = 3000) -> str:
    return text if len(text) <= n else "…" + text[-n:]


class Workspace:
    """A folder the README's relative paths resolve in, the variables placeholders are filled from, the
    background processes started so far, and a record of every command run."""

    def __init__(self, root: Path, variables: dict[str, str]) -> None:
        self.root = root
        self.vars: dict[str, str] = {"ws": str(root), **variables}
        self.background: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        self.ran: list[Ran] = []
        self.readme: dict[str, Command] = {}
        self.objects: dict[str, Any] = {}  # what set-up hooks share (e.g. the pager receiver)
        self.env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "PYTHONUNBUFFERED": "1"}
        self.env.pop("PYTHONPATH", None)  # the CLIs must work as installed, not from the test's import path

    # ---- placeholders --------------------------------------------------------------------------------------
    def fill(self, text: str) -> str:
        try:
            return text.format_map(self.vars)
        except KeyError as exc:
            raise WalkthroughError(f"placeholder value {text!r} needs workspace variable {exc} that no earlier "
                                   f"step set; known: {sorted(self.vars)}") from None

    def substitute(self, argv: tuple[str, ...], subs: Mapping[str, str], used: set[str]) -> tuple[str, ...]:
        """Replace whole tokens equal to a key; a key starting with '/' also replaces a path prefix."""
        out = []
        for tok in argv:
            new = tok
            for key, value in subs.items():
                if tok == key:
                    new = self.fill(value)
                elif key.startswith("/") and tok.startswith(key + "/"):
                    new = self.fill(value) + tok[len(key):]
                else:
                    continue
                used.add(key)
                break
            out.append(new)
        return tuple(out)

    # ---- processes -----------------------------------------------------------------------------------------
    def resolve(self, argv: tuple[str, ...]) -> list[str]:
        if argv[0] in OUR_CLIS:
            exe = VENV_BIN / argv[0]
            if not os.access(exe, os.X_OK):
                raise WalkthroughError(f"{exe} is missing: the README's `{argv[0]}` must be the installed CLI "
                                       "(pip install -e '.[dev]')")
            return [str(exe), *argv[1:]]
        found = shutil.which(argv[0], path=self.env["PATH"])
        if found is None:
            raise WalkthroughError(f"`{argv[0]}` (README command {' '.join(argv)!r}) is not on PATH")
        return [found, *argv[1:]]

    def run(self, key: str, argv: tuple[str, ...], *, expect_exit: int = 0, expect: tuple[str, ...] = (),
            note: str = "") -> str:
        """Run to completion (bounded); WalkthroughError unless the status and output are as expected."""
        t0 = time.monotonic()
        try:
            proc = subprocess.run(self.resolve(argv), cwd=self.root, env=self.env, capture_output=True,
                                  timeout=COMMAND_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired as exc:
            raise WalkthroughError(f"`{' '.join(argv)}` (README: {key!r}) did not finish within "
                                   f"{COMMAND_TIMEOUT_S:.0f} s") from exc
        out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
        self.ran.append(Ran(key, argv, proc.returncode, time.monotonic() - t0, note))
        if proc.returncode != expect_exit:
            raise WalkthroughError(f"`{' '.join(argv)}` (README: {key!r}) exited {proc.returncode}, expected "
                                   f"{expect_exit}\n--- stdout\n{_tail(out)}\n--- stderr\n{_tail(err)}")
        missing = [f for f in (self.fill(e) for e in expect) if f not in out]
        if missing:
            raise WalkthroughError(f"`{' '.join(argv)}` (README: {key!r}) printed none of {missing}\n--- stdout\n"
                                   f"{_tail(out)}\n--- stderr\n{_tail(err)}")
        return out

    def start(self, key: str, argv: tuple[str, ...], bg: Background, note: str = "") -> None:
        """Start in the background and poll ``bg.ready`` (bounded); WalkthroughError with the log otherwise."""
        name = re.sub(r"[^A-Za-z0-9]+", "-", " ".join(argv[:2]))[:40] + f"-{len(self.ran)}"
        log = self.root / f"{name}.log"
        t0 = time.monotonic()
        with log.open("wb") as fh:
            proc = subprocess.Popen(self.resolve(argv), cwd=self.root, env=self.env, stdout=fh,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.background[name] = (proc, log)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                self.background.pop(name)
                raise WalkthroughError(f"`{' '.join(argv)}` (README: {key!r}) exited {proc.returncode} before it "
                                       f"was ready; its log:\n{_tail(log.read_text(errors='replace'))}")
            if bg.ready(self):
                break
            if time.monotonic() > deadline:
                raise WalkthroughError(f"`{' '.join(argv)}` (README: {key!r}) was not ready within "
                                       f"{READY_TIMEOUT_S:.0f} s; its log:\n{_tail(log.read_text(errors='replace'))}")
            time.sleep(0.2)
        self.ran.append(Ran(key, argv, None, time.monotonic() - t0,
                            "; ".join(filter(None, [f"background pid {proc.pid}, ready", bg.stop_when_ready
                                                    and f"stopped: {bg.stop_when_ready}", note]))))
        if bg.stop_when_ready:
            self.stop(name)

    def stop(self, name: str) -> int:
        """SIGTERM by PID, SIGKILL after STOP_TIMEOUT_S; returns the exit status (WalkthroughError unless 0)."""
        proc, log = self.background.pop(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)
                raise WalkthroughError(f"{name} (pid {proc.pid}) ignored SIGTERM for {STOP_TIMEOUT_S:.0f} s; "
                                       f"killed. Its log:\n{_tail(log.read_text(errors='replace'))}") from None
        text = log.read_text(errors="replace")
        if proc.returncode != 0:
            raise WalkthroughError(f"{name} (pid {proc.pid}) exited {proc.returncode} on SIGTERM; its log:\n"
                                   f"{_tail(text)}")
        if "Traceback (most recent call last)" in text:
            raise WalkthroughError(f"{name} (pid {proc.pid}) logged a traceback while it ran:\n{_tail(text)}")
        return proc.returncode

    def stop_all(self) -> list[str]:
        """Stop every background process (newest first); returns the problems instead of raising."""
        problems = []
        for name in reversed(list(self.background)):
            try:
                self.stop(name)
            except WalkthroughError as exc:
                problems.append(str(exc))
        return problems

    def log_of(self, prefix: str) -> str:
        """The log of the running background process whose name starts with ``prefix``."""
        for name, (_, log) in self.background.items():
            if name.startswith(prefix):
                return log.read_text(errors="replace")
        return ""

    # ---- README commands -----------------------------------------------------------------------------------
    def run_command(self, cmd: Command, spec: Spec, placeholders: Mapping[str, str]) -> None:
        """Every invocation ``cmd`` stands for, as ``spec`` says; raises WalkthroughError on the first failure."""
        subs = {**placeholders, **spec.subs}
        used: set[str] = set()
        if spec.before:
            self.hook(cmd.key, spec.before)
        for variant in spec.variants:
            for inv in expand(cmd.tokens, with_optional=variant == "full"):
                if inv.alternative is not None and inv.alternative in spec.covered_elsewhere:
                    self.ran.append(Ran(cmd.key, inv.argv, None, 0.0,
                                        f"covered by {spec.covered_elsewhere[inv.alternative]}"))
                    continue
                self._invoke(cmd, spec, inv, subs, used)
        stale = set(spec.subs) - used
        if stale:
            raise WalkthroughError(f"README command {cmd.key!r} no longer contains {sorted(stale)}: update its "
                                   "subs in tests/test_readme_commands.py")
        if spec.after:
            self.hook(cmd.key, spec.after)

    def hook(self, key: str, fn: Hook) -> None:
        """Run a set-up hook and record it (by its function name) with how long it took."""
        t0 = time.monotonic()
        fn(self)
        self.ran.append(Ran(key, (f"[{fn.__name__}]",), None, time.monotonic() - t0, "set-up hook"))

    def _invoke(self, cmd: Command, spec: Spec, inv: Invocation, subs: Mapping[str, str], used: set[str]) -> None:
        argv = self.substitute(inv.argv, subs, used) + tuple(self.fill(a) for a in spec.extra)
        if spec.background is not None:
            self.start(cmd.key, argv, spec.background, note=spec.why)
            return
        out = self.run(cmd.key, argv, expect_exit=spec.exit, expect=spec.expect, note=spec.why)
        for var, pattern in spec.capture.items():
            m = re.search(pattern, out, re.MULTILINE)
            if m is None:
                raise WalkthroughError(f"`{' '.join(argv)}` printed nothing matching {pattern!r} (for {var}):\n"
                                       f"{_tail(out)}")
            self.vars[var] = m.group(1)

    def run_derived(self, key: str, replace: Mapping[str, str], *, note: str) -> str:
        """Set-up by a README command with some tokens replaced (e.g. the build command for version 1.1.0)."""
        cmd = self.readme[key]
        inv = expand(cmd.tokens, with_optional=True)[0]
        argv = tuple(self.fill(replace.get(t, t)) for t in inv.argv)
        return self.run(key, argv, note=note)

    def run_snippet(self, block: Block, snippet: Snippet) -> None:
        code = block.text
        for old, new in snippet.replace.items():
            if old not in code:
                raise WalkthroughError(f"README.md:{block.line}: the python block no longer contains {old!r}: update "
                                       "its replacements in tests/test_readme_commands.py")
            code = code.replace(old, self.fill(new))
        if snippet.before:
            self.hook(f"python block at README.md:{block.line}", snippet.before)
        path = self.root / f"readme_block_{block.line}.py"
        path.write_text(code + "\n" + snippet.check + "\n")
        self.run(f"python block at README.md:{block.line}", ("python", str(path)))
