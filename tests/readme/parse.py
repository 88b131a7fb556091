"""README.md as data: fenced blocks, the commands in them, and the concrete invocations a command stands for.

Pure functions over text (no files, no processes), so the rules are easy to test:

- A fence with no language, or ``sh``/``shell``/``bash``/``console``, holds commands. ``text`` marks a block
  that is not commands (diagrams, folder layouts); ``python`` is code run as a whole. Any other language is
  refused, so a new kind of block cannot slip past the test unread.
- In a command block, a line ending in ``\\`` continues on the next; ``#`` starts a comment; ``;`` separates
  commands on one line.
- Notation inside a command: ``[--flag VALUE]`` is an optional group, ``pause|resume`` lists alternatives (one
  invocation each, in the order written).
- In prose, an inline code span that is a full invocation of one of the project's CLIs (program, subcommand and
  at least one more word, e.g. ``device-agent predict --dir D INPUT``) or a ``make TARGET`` is a command too.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

COMMAND_LANGS = frozenset({"", "sh", "shell", "bash", "console"})
PROSE_LANGS = frozenset({"text"})
CODE_LANGS = frozenset({"python"})
_FENCE = re.compile(r"^ {0,3}(```+|~~~+)\s*([^\s`]*)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_ALTERNATIVE = re.compile(r"^[A-Za-z0-9_-]+(\|[A-Za-z0-9_-]+)+$")
_INLINE_SPAN = re.compile(r"(?<!`)`([^`]+)`(?!`)")
_INLINE_COMMAND = re.compile(r"^(?:(?:model-packager|device-agent|fleet-server) \S+ \S.*|make [a-z][a-z0-9-]*)$")


class ReadmeFormatError(ValueError):
    """The README holds something this parser does not know how to read (the message names the line)."""


@dataclass(frozen=True)
class Block:
    line: int  # 1-based README line of the opening fence
    heading: str  # the nearest heading above it
    lang: str  # the fence's info string ("" when none)
    text: str  # the lines between the fences (for an inline command: the code span)
    inline: bool = False  # a command in an inline code span of the prose, not a fenced block

    @property
    def kind(self) -> str:
        """``commands``, ``python`` or ``prose``; ReadmeFormatError for any other fence language."""
        if self.inline or self.lang in COMMAND_LANGS:
            return "commands"
        if self.lang in CODE_LANGS:
            return self.lang
        if self.lang in PROSE_LANGS:
            return "prose"
        raise ReadmeFormatError(
            f"README.md:{self.line} ({self.heading!r}): fenced block in language {self.lang!r}; use no language "
            f"for commands, `text` for diagrams and listings, or `python` (see tests/readme/parse.py)")

    @property
    def first_line(self) -> str:
        return next((ln.strip() for ln in self.text.splitlines() if ln.strip()), "")


@dataclass(frozen=True)
class Command:
    block: Block
    line: int  # README line where the command starts
    tokens: tuple[str, ...]  # as written: optional groups and alternatives not yet expanded

    @property
    def key(self) -> str:
        """The command as one normalised line (continuations joined, comment dropped, single spaces)."""
        return " ".join(self.tokens)


@dataclass(frozen=True)
class Invocation:
    alternative: str | None  # which of ``a|b|c`` this is (None when the command has no alternatives)
    argv: tuple[str, ...]


def blocks(markdown: str) -> list[Block]:
    """Every fenced block in ``markdown``, in order. ReadmeFormatError on an unclosed fence."""
    out: list[Block] = []
    heading = "(top)"
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            h = _HEADING.match(lines[i])
            if h:
                heading = h.group(2)
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].lstrip().startswith(fence):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ReadmeFormatError(f"README.md:{start + 1}: fence {fence} is never closed")
        out.append(Block(start + 1, heading, lang, "\n".join(body)))
        i += 1
    return out


def inline_commands(markdown: str) -> list[Block]:
    """Inline code spans in the prose (outside fences) that are commands, each as a one-command Block."""
    out: list[Block] = []
    heading, fence = "(top)", ""
    for n, line in enumerate(markdown.splitlines(), 1):
        m = _FENCE.match(line)
        if m and (not fence or line.lstrip().startswith(fence)):
            fence = "" if fence else m.group(1)
            continue
        if fence:
            continue
        h = _HEADING.match(line)
        if h:
            heading = h.group(2)
            continue
        out += [Block(n, heading, "", s.group(1), inline=True) for s in _INLINE_SPAN.finditer(line)
                if _INLINE_COMMAND.match(s.group(1))]
    return out


def commands(block: Block) -> list[Command]:
    """The commands of a command block, in order. ReadmeFormatError on a dangling continuation or bad quoting."""
    out: list[Command] = []
    pending: list[str] = []
    first = 0
    lines = block.text.splitlines()
    for n, raw in enumerate(lines):
        line_no = block.line + n + (0 if block.inline else 1)
        if not pending:
            first = line_no
        if raw.rstrip().endswith("\\"):
            pending.append(raw.rstrip()[:-1])
            continue
        pending.append(raw)
        logical, pending = " ".join(pending), []
        lexer = shlex.shlex(logical, posix=True, punctuation_chars=";")
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError as exc:
            raise ReadmeFormatError(f"README.md:{first}: cannot split {logical.strip()!r}: {exc}") from None
        current: list[str] = []
        for tok in [*tokens, ";"]:
            if tok == ";":
                if current:
                    out.append(Command(block, first, tuple(current)))
                current = []
            else:
                current.append(tok)
    if pending:
        raise ReadmeFormatError(f"README.md:{first}: the block ends inside a `\\` continuation")
    return out


def optional_groups(tokens: tuple[str, ...]) -> list[tuple[int, int]]:
    """(start, end) token index ranges, end exclusive, of each ``[...]`` group. ReadmeFormatError if unbalanced."""
    groups: list[tuple[int, int]] = []
    start: int | None = None
    for i, tok in enumerate(tokens):
        if tok.startswith("["):
            if start is not None:
                raise ReadmeFormatError(f"nested optional group at {tok!r} in {' '.join(tokens)!r}")
            start = i
        if tok.endswith("]") and start is not None:
            groups.append((start, i + 1))
            start = None
        elif tok.endswith("]"):
            raise ReadmeFormatError(f"unbalanced ']' at {tok!r} in {' '.join(tokens)!r}")
    if start is not None:
        raise ReadmeFormatError(f"unclosed '[' in {' '.join(tokens)!r}")
    return groups


def expand(tokens: tuple[str, ...], *, with_optional: bool) -> list[Invocation]:
    """The invocations a written command stands for: every optional group kept (``with_optional``) or dropped,
    and one invocation per alternative of an ``a|b|c`` token (at most one such token per command)."""
    keep: list[str] = []
    groups = optional_groups(tokens)
    inside = {i for a, b in groups for i in range(a, b)}
    for i, tok in enumerate(tokens):
        if i in inside:
            if with_optional:
                keep.append(tok.removeprefix("[").removesuffix("]"))
        else:
            keep.append(tok)
    alt = [i for i, tok in enumerate(keep) if _ALTERNATIVE.match(tok)]
    if not alt:
        return [Invocation(None, tuple(keep))]
    if len(alt) > 1:
        raise ReadmeFormatError(f"more than one a|b alternative in {' '.join(tokens)!r}")
    i = alt[0]
    return [Invocation(choice, (*keep[:i], choice, *keep[i + 1:])) for choice in keep[i].split("|")]
