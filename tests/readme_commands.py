"""The README's fenced commands, read the way a user copies them: for the tests that run them, and for the test
that holds every one of them either run by a test or marked as needing what CI does not have.

A bash command is one line of a ```bash block (a trailing `\\` joins the next), without its comment; a python
block is one command. A command is marked when its comment (for python: a comment line of the block) holds
`[GPU]`, `[weights]`, `[SLURM]` or `[network]`, or several of them: `[GPU, weights]`. A test runs a command by
asking `readme_command("<its start>")` for it, which the check finds in the test files.
"""
import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEEDS = ("GPU", "weights", "SLURM", "network")
_MARK = re.compile(r"\[((?:GPU|weights|SLURM|network)(?:, (?:GPU|weights|SLURM|network))*)\]")


@dataclass(frozen=True)
class Command:
    text: str  # the command as a user runs it (bash: the comment and the line joins removed)
    needs: tuple  # the marks: what it needs that CI does not have
    line: int  # where it starts in the README (1-based)
    language: str  # "bash" or "python"


def _split_comment(line: str) -> tuple:
    """(command, comment) of a bash line: the first `#` outside quotes starts the comment."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:]
    return line.rstrip(), ""


def _needs(comment: str) -> tuple:
    return tuple(need for mark in _MARK.findall(comment) for need in mark.split(", "))


def fenced_commands(text: str = None) -> list:
    """Every command of the README's ```bash and ```python blocks, in order."""
    lines = (ROOT / "README.md").read_text().splitlines() if text is None else text.splitlines()
    commands, language, pending, block = [], None, None, []
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if line.startswith("```"):
            if language is None:
                language = line[3:].strip() or "text"
                block = []
            else:
                if language == "python":
                    source = "\n".join(text_ for _, text_ in block)
                    commands.append(Command(source, _needs(source), block[0][0] if block else number, "python"))
                language = None
            continue
        if language == "python":
            block.append((number, raw))
        elif language == "bash":
            command, comment = _split_comment(line)
            continues = command.endswith("\\")
            command = command.removesuffix("\\").rstrip()
            if pending is not None:  # the continuation of the line before
                start, joined, needs = pending
                command, needs = f"{joined} {command}", needs + _needs(comment)
            else:
                start, needs = number, _needs(comment)
            pending = (start, command, needs) if continues else None
            if command and not continues:  # (a line that is all comment is no command)
                commands.append(Command(command, needs, start, "bash"))
    return commands


def readme_command(start: str) -> Command:
    """The README's one command that starts with `start`: a test that runs a README command gets it here, so the
    check below sees it run."""
    found = [c for c in fenced_commands() if c.text.startswith(start)]
    assert len(found) == 1, f"{len(found)} README commands start with {start!r}"
    return found[0]


def claimed_starts(test_files) -> set:
    """The `readme_command("...")` arguments in these test files (string literals, read from the source)."""
    starts = set()
    for path in test_files:
        for node in ast.walk(ast.parse(Path(path).read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "readme_command" and node.args \
                    and isinstance(node.args[0], ast.Constant):
                starts.add(node.args[0].value)
    return starts


def unchecked(commands, starts) -> list:
    """The commands neither marked nor run by a test: what the README promises and nothing checks."""
    return [c for c in commands if not c.needs and not any(c.text.startswith(s) for s in starts)]
