"""The README as one walkthrough: which commands it holds, whether the test knows each of them, and running them
block by block in README order.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .parse import Block, Command, ReadmeFormatError, blocks, commands, inline_commands
from .runner import ROOT, Ran, Snippet, Spec, Workspace


@dataclass(frozen=True)
class Tables:
    """Everything tests/test_readme_commands.py declares about the README."""

    placeholders: Mapping[str, str]  # README token -> value, for every command
    specs: Mapping[str, Spec]  # command key -> how it runs here
    snippets: Mapping[str, Snippet]  # "python: <first line>" -> how the python block runs
    covered_elsewhere: Mapping[str, str]  # command key -> "tests/<file>.py::<test>" that exercises it instead
    hoist: Mapping[str, tuple[str, str]]  # command key -> (key prefix of the command it must precede, why)


def snippet_key(block: Block) -> str:
    return f"python: {block.first_line}"


def scenarios(markdown: str) -> list[Block]:
    """Fenced blocks and inline commands, in README order."""
    return sorted([*blocks(markdown), *inline_commands(markdown)], key=lambda b: b.line)


def readme_commands(markdown: str) -> list[Command]:
    return [c for b in scenarios(markdown) if b.kind == "commands" for c in commands(b)]


def _test_exists(ref: str) -> str | None:
    """None when ``tests/<file>.py::<name>`` names a test function that exists, else the problem."""
    m = re.fullmatch(r"(tests/[\w/]+\.py)::(test_\w+)", ref)
    if m is None:
        return f"{ref!r} is not 'tests/<file>.py::test_<name>'"
    path = ROOT / m.group(1)
    if not path.is_file():
        return f"{ref!r}: {m.group(1)} does not exist"
    if not re.search(rf"^\s*def {m.group(2)}\(", path.read_text(), re.MULTILINE):
        return f"{ref!r}: no function {m.group(2)} in {m.group(1)}"
    return None


def coverage_problems(markdown: str, t: Tables) -> list[str]:
    """Every way the README and the tables disagree: a command or block nobody runs or allow-lists, a table
    entry the README no longer has, an allow-list entry naming a test that does not exist."""
    problems: list[str] = []
    keys: set[str] = set()
    tokens: set[str] = set()
    snippets: set[str] = set()
    try:
        for b in scenarios(markdown):
            if b.kind == "python":
                snippets.add(snippet_key(b))
                if snippet_key(b) not in t.snippets:
                    problems.append(f"README.md:{b.line} ({b.heading}): python block {snippet_key(b)!r} is not run; "
                                    "add it to SNIPPETS in tests/test_readme_commands.py")
            elif b.kind == "commands":
                for c in commands(b):
                    keys.add(c.key)
                    tokens.update(c.tokens)
                    if c.key not in t.specs and c.key not in t.covered_elsewhere:
                        problems.append(f"README.md:{c.line} ({b.heading}): command {c.key!r} is neither run nor "
                                        "allow-listed; add it to SPECS (or COVERED_ELSEWHERE with the test that "
                                        "runs it) in tests/test_readme_commands.py")
    except ReadmeFormatError as exc:
        return [str(exc)]
    for name, table in (("SPECS", t.specs), ("COVERED_ELSEWHERE", t.covered_elsewhere), ("HOIST", t.hoist)):
        problems += [f"{name} entry {k!r} is no longer a README command" for k in table if k not in keys]
    problems += [f"SNIPPETS entry {k!r} is no longer a README python block" for k in t.snippets if k not in snippets]
    problems += [f"{k!r} is both run (SPECS) and allow-listed" for k in t.specs if k in t.covered_elsewhere]
    for k in t.placeholders:
        if not any(tok == k or (k.startswith("/") and tok.startswith(k + "/")) for tok in tokens):
            problems.append(f"PLACEHOLDERS entry {k!r} appears in no README command")
    refs = list(t.covered_elsewhere.values())
    refs += [r for s in t.specs.values() for r in s.covered_elsewhere.values()]
    problems += [p for p in map(_test_exists, refs) if p]
    return problems


def run_walkthrough(markdown: str, ws: Workspace, t: Tables) -> None:
    """Run every README block in order; commands allow-listed elsewhere are recorded, hoisted ones run just
    before the command that needs them. Raises WalkthroughError (an AssertionError) on the first failure."""
    problems = coverage_problems(markdown, t)
    assert not problems, "README and tests/test_readme_commands.py disagree:\n" + "\n".join(problems)
    ws.readme = {c.key: c for c in readme_commands(markdown)}
    done: dict[str, str] = {}  # command key -> where it ran
    for b in scenarios(markdown):
        if b.kind == "python":
            ws.run_snippet(b, t.snippets[snippet_key(b)])
            continue
        if b.kind != "commands":
            continue
        for c in commands(b):
            for key, (before, why) in t.hoist.items():
                if key not in done and c.key.startswith(before):
                    ws.run_command(ws.readme[key], t.specs[key], t.placeholders)
                    done[key] = f"run early, before README.md:{c.line}: {why}"
            if c.key in done:
                ws.ran.append(Ran(c.key, c.tokens, None, 0.0, done[c.key]))
                continue
            if c.key in t.covered_elsewhere:
                ws.ran.append(Ran(c.key, c.tokens, None, 0.0, f"covered by {t.covered_elsewhere[c.key]}"))
            else:
                ws.run_command(c, t.specs[c.key], t.placeholders)
            done[c.key] = f"the same command as README.md:{c.line}"


def report(ws: Workspace) -> str:
    """One line per invocation: seconds, status, the argv as run (workspace path shortened), and any note."""
    lines = []
    for r in ws.ran:
        status = "-" if r.status is None else str(r.status)
        argv = " ".join(r.argv).replace(str(ws.root), "$WS")
        lines.append(f"{r.seconds:6.2f}s  {status:>2}  {argv[:150]}" + (f"   [{r.note}]" if r.note else ""))
    return "\n".join(lines)


def read_readme() -> str:
    return Path(ROOT / "README.md").read_text()
