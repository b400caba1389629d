"""Every command the README and docs/*.md tell a user to run is run, as typed, by some test.

A test declares what it runs with ``@pytest.mark.documents("detserve mine --results R --out O --band 0.2-0.5")``:
the command as the test types it, placeholders for paths. This checker (no server, about a second)

- extracts every command from the fenced code blocks of README.md and docs/*.md (lines starting with
  ``detserve``, ``make``, ``bash``, ``python -m detserve``; ``\\`` continuations joined, ``# comments`` and
  ``&&`` chains split off) and the ``--help``-documented paths issue 21 names (``ISSUE_PATHS``);
- expands documented alternatives into one command each: ``models load|unload`` and ``--format
  coco|yolo|labelstudio`` are two and three commands, and a test must run each;
- requires, for every such command, a declaration with the same subcommand (for ``build``, the same
  detector), every documented flag, and the documented value where the docs listed alternatives;
- requires every declaration to cover some documented command, to use only options the CLI has, and
  its words and flags to appear as strings in its own test module (a declaration the test does not type
  is a lie this catches).

Why a declaration and not a trace of what ran: the fast suite does not run the slow tests, and a
command typed in a subprocess leaves no trace the checker could read without running it.
"""

from __future__ import annotations

import ast
import itertools
import re
import shlex
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
PREFIXES = ("detserve ", "make ", "bash ", "python -m detserve")

# Paths that issue 21 (part 5) names and that --help documents outside the fenced blocks.
ISSUE_PATHS = (
    "detserve build hf --checkpoint DIR",
    "detserve build mmdet --config CONFIG.py --checkpoint model.pth",  # issue 27
    "detserve build yolo --checkpoint best.pt",
    "detserve build fasterrcnn_mobilenet_v3_large_320_fpn --checkpoint ck.pt",
    "detserve build maskrcnn_resnet50_fpn --checkpoint ck.pt",
    "detserve detect photo.jpg --model m --draw out/",
    "detserve serve --repository R --replicas 2",
    "detserve status --url 127.0.0.1:8001",
    "detserve rollback retina",
)

# Documented commands no test may run, each with why. Kept short on purpose.
EXEMPT = {
    "make test": "runs this suite: a test running it would recurse",
    # TensorRT needs a CUDA GPU: scripts/gpu_check.sh builds --target tensorrt there; on CPU machines
    # tests/unit/test_tensorrt.py runs the fp16 command and checks its refusal with a hint.
    "detserve build ssdlite320_mobilenet_v3_large --num-classes 6 --checkpoint detserve/weights/demo_ssdlite320_shapes.pt"
    " --target tensorrt --precision fp16": "needs a CUDA GPU and TensorRT",
    "detserve build ... --target tensorrt --precision int8 --calibration-images photos/": "needs a CUDA GPU and TensorRT",
}


@dataclass(frozen=True)
class Signature:
    """What a command selects: its path (``models load``; ``make demo``), the build detector, its flags."""

    path: tuple[str, ...]
    detector: str | None = None  # build only: the detector picks the path; None matches any
    flags: frozenset[str] = frozenset()
    values: frozenset[tuple[str, str]] = frozenset()  # (flag, value): documented choices; declarations: all

    def covers(self, documented: Signature) -> bool:
        same_detector = documented.detector is None or self.detector == documented.detector
        return (
            self.path == documented.path and same_detector and documented.flags <= self.flags and documented.values <= self.values
        )

    def __str__(self) -> str:
        words = [*self.path, *([self.detector] if self.detector else [])]
        return " ".join(words + sorted(self.flags))


@dataclass(frozen=True)
class Command:
    text: str
    where: str  # file:line, or where a declaration is
    signature: Signature
    tokens: tuple[str, ...] = field(default=(), compare=False)


# --------------------------------------------------------------------------------------------
# documented commands
# --------------------------------------------------------------------------------------------


def _fenced_lines(path: Path) -> list[tuple[int, str]]:
    """(first line number, logical line) of every code-block line: continuations joined, comments cut."""
    out: list[tuple[int, str]] = []
    inside, pending, start = False, "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        if raw.strip().startswith("```"):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append((start, " ".join((pending + line).split())))
        pending = ""
    return out


def _commands_in(text: str) -> list[str]:
    """The user commands of one logical line: ``&&`` chains split, ``$`` prompts and ``VAR=x`` prefixes dropped."""
    found = []
    for part in text.split("&&"):
        part = re.sub(r"^\s*(\$\s+)?([A-Z_][A-Z0-9_]*=\S*\s+)*", "", part).strip()
        if part.startswith(PREFIXES):
            found.append(part)
    return found


def _alternatives(tokens: list[str]) -> list[tuple[list[str], set[int]]]:
    """Each expansion of ``a|b`` tokens, with the indices of the tokens that were chosen among alternatives."""
    choices = [t.split("|") if "|" in t and "://" not in t else [t] for t in tokens]
    chosen = {k for k, c in enumerate(choices) if len(c) > 1}
    return [(list(combo), chosen) for combo in itertools.product(*choices)]


def documented_commands() -> list[Command]:
    commands = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for number, line in _fenced_lines(path):
            for text in _commands_in(line):
                where = f"{path.relative_to(ROOT)}:{number}"
                commands += _expanded(text, where)
    for text in ISSUE_PATHS:
        commands += _expanded(text, "issue 21 part 5 (ISSUE_PATHS)")
    return [c for c in commands if c.text not in EXEMPT]


def _expanded(text: str, where: str) -> list[Command]:
    out = []
    for tokens, chosen in _alternatives(shlex.split(text)):
        shown = text if len(_alternatives(shlex.split(text))) == 1 else " ".join(tokens)
        out.append(Command(shown, where, parse(tokens, chosen, keep_all_values=False), tuple(tokens)))
    return out


# --------------------------------------------------------------------------------------------
# parsing a command line against the real CLI
# --------------------------------------------------------------------------------------------


@cache
def _cli() -> Any:
    import typer.main

    from detserve.app.cli import app

    return typer.main.get_command(app)


def _options(command: Any) -> dict[str, bool]:
    """Option name -> whether it takes a value."""
    names: dict[str, bool] = {}
    for p in command.params:
        if p.param_type_name != "option":
            continue
        for name in [*p.opts, *p.secondary_opts]:
            names[name] = not p.is_flag and p.nargs > 0
    return names


class UnknownOption(ValueError):
    pass


def parse(tokens: list[str], chosen: set[int] | None = None, keep_all_values: bool = True) -> Signature:
    """A command's signature; ``chosen``: token indices that were alternatives (their values are required)."""
    chosen = chosen or set()
    if tokens[:2] == ["python", "-m"]:
        tokens = ["detserve", *tokens[3:]]  # python -m detserve / detserve.app.cli
        chosen = {k - 2 for k in chosen}
    if tokens[0] in ("make", "bash"):
        return Signature(tuple(tokens[:2]))
    command, path, k = _cli(), ["detserve"], 1
    while hasattr(command, "commands") and k < len(tokens) and tokens[k] in command.commands:
        command, k = command.commands[tokens[k]], k + 1
        path.append(tokens[k - 1])
    options = _options(command)
    flags, values, positionals = set(), set(), []
    while k < len(tokens):
        token, index = tokens[k], k
        k += 1
        if not token.startswith("--"):
            positionals.append(token)
            continue
        name, _, inline = token.partition("=")
        if name not in options:
            raise UnknownOption(f"{' '.join(path)} has no option {name}")
        flags.add(name)
        if options[name] and not inline:
            inline, index, k = tokens[k] if k < len(tokens) else "", k, k + 1
        if inline and (keep_all_values or index in chosen):
            values.add((name, inline))
    detector = None
    if path == ["detserve", "build"] and positionals and positionals[0] not in ("...",):
        detector = positionals[0]
    return Signature(tuple(path), detector, frozenset(flags), frozenset(values))


# --------------------------------------------------------------------------------------------
# declarations in the tests
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Declaration:
    command: Command
    module: Path
    test: str


def _is_documents(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "documents"
        and isinstance(node.func.value, ast.Attribute)
        and node.func.value.attr == "mark"
    )


@cache
def _module(path: Path) -> tuple[ast.Module, frozenset[str]]:
    """A test module's tree and every string it types outside its declarations (and their words)."""
    tree = ast.parse(path.read_text())
    inside = {id(n) for call in ast.walk(tree) if _is_documents(call) for n in ast.walk(call)}
    strings: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in inside:
            strings.add(node.value)
            strings.update(node.value.split())
    return tree, frozenset(strings)


def declarations(root: Path = TESTS) -> list[Declaration]:
    found = []
    for path in sorted(root.rglob("test_*.py")):
        tree, _ = _module(path)
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for deco in node.decorator_list:
                if not _is_documents(deco):
                    continue
                assert isinstance(deco, ast.Call)
                for arg in deco.args:
                    assert isinstance(arg, ast.Constant) and isinstance(arg.value, str), f"{path}:{deco.lineno}"
                    tokens = shlex.split(arg.value)
                    where = f"{path.relative_to(ROOT)}:{deco.lineno} {node.name}"
                    command = Command(arg.value, where, parse(tokens), tuple(tokens))
                    found.append(Declaration(command, path, node.name))
    return found


def uncovered(documented: list[Command], declared: list[Declaration]) -> list[str]:
    return [
        f"{c.where}: `{c.text}` — no test declares it (@pytest.mark.documents with {c.signature})"
        for c in documented
        if not any(d.command.signature.covers(c.signature) for d in declared)
    ]


# --------------------------------------------------------------------------------------------
# the checks
# --------------------------------------------------------------------------------------------


def test_every_documented_command_is_run_by_a_test() -> None:
    missing = uncovered(documented_commands(), declarations())
    assert not missing, "documented commands no test runs:\n" + "\n".join(missing)


def test_every_declaration_is_a_documented_command() -> None:
    documented = documented_commands()
    exempt = [c for text, _ in EXEMPT.items() for c in _expanded(text, "EXEMPT")]
    stray = [
        f"{d.command.where}: `{d.command.text}` covers no command of README.md, docs/*.md or ISSUE_PATHS"
        for d in declarations()
        if not any(d.command.signature.covers(c.signature) for c in documented + exempt)
    ]
    assert not stray, "\n".join(stray)


def test_declared_words_and_flags_are_typed_by_the_test_module() -> None:
    """A declaration names only what its module passes: each word, flag and build detector is a string there."""
    lies = []
    for d in declarations():
        _, strings = _module(d.module)
        sig = d.command.signature
        words = [*sig.path[1:], *sig.flags, *([sig.detector] if sig.detector else [])]
        words += [v for flag, v in sig.values if flag in ("--format", "--shape")]
        missing = [w for w in words if w not in strings]
        if missing:
            lies.append(f"{d.command.where}: declares {missing} but the module never types them")
    assert not lies, "\n".join(lies)


def test_documented_flags_exist_on_the_cli() -> None:
    """Documentation that names an option the CLI does not have fails here (parse raises UnknownOption)."""
    assert len(documented_commands()) > 30


def test_the_checker_fails_when_a_declaration_is_deleted() -> None:
    documented, declared = documented_commands(), declarations()
    assert not uncovered(documented, declared)
    for drop in ("detserve mine", "detserve promote", "make demo"):
        without = [d for d in declared if not d.command.text.startswith(drop)]
        assert len(without) < len(declared), drop
        missing = uncovered(documented, without)
        assert missing and all(drop in m for m in missing), missing


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("detserve models load|unload retina", [("models", "load"), ("models", "unload")]),
        ("detserve loadtest --model m --shape fixed|step", [("--shape", "fixed"), ("--shape", "step")]),
    ],
)
def test_alternatives_expand_into_one_command_each(line: str, expected: list[tuple[str, str]]) -> None:
    commands = _expanded(line, "here")
    assert len(commands) == len(expected)
    for command, (a, b) in zip(commands, expected, strict=True):
        sig = command.signature
        assert (a in sig.path and b in sig.path) or (a, b) in sig.values


def test_continuations_comments_and_chains(tmp_path: Path) -> None:
    doc = tmp_path / "d.md"
    doc.write_text(
        "```bash\n"
        "detserve eval --model demo --annotations a.json \\\n"
        "    --max-det 100   # a comment --not-a-flag\n"
        "# detserve not-a-command\n"
        "detserve samples photos/ && detserve build ... --target tensorrt\n"
        "```\n"
        "detserve outside a block\n"
    )
    lines = _fenced_lines(doc)
    assert lines[0] == (2, "detserve eval --model demo --annotations a.json --max-det 100")
    assert [c for _, line in lines for c in _commands_in(line)][1:] == [
        "detserve samples photos/",
        "detserve build ... --target tensorrt",
    ]
    assert parse(shlex.split(lines[0][1])).flags == {"--model", "--annotations", "--max-det"}
    with pytest.raises(UnknownOption, match="--nope"):
        parse(["detserve", "status", "--nope"])
