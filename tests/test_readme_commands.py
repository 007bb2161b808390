"""Every ```bash block of README.md and of docs/**/*.md runs as written, or says why not.

A command runs unless it carries one of these comments, which the README shows as written:
- `# needs: WHAT` names what CI does not have (COCO, pretrained weights, a GPU, network,
  minutes of CPU, a file of your own); the command is not run.
- `# ci: .ci/run` marks a command CI runs itself; the test checks that .ci/run has it.
- `# exits N` states the command's documented exit status; the test expects N, not 0.

Commands run in reading order (README.md, then the docs pages in the order of mkdocs.yml's
nav; every page is in the nav, so each block runs once), in one temporary directory, as a
reader's shell would: variables assigned by earlier blocks (`TINY="..."`, on the Grids page)
are defined, `.venv` links to this
interpreter's environment (so `.venv/bin/ocl-bench` works) and its bin directory comes first
on PATH. Two changes to what is written: absolute paths under /tmp/ point into the
temporary directory (a stale /tmp/t.sqlite would make a grid skip its cells, and a run must
not write outside it), and OCL_BENCH_* variables are unset (a developer's weights must not
let a command pass that fails for a reader without them).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAV_PAGE = re.compile(r"^\s*-\s+(?:[^\n]*?:\s+)?([\w./-]+\.md)\s*$", re.M)


def nav_pages(mkdocs_yml: str) -> list[str]:
    """The pages of mkdocs.yml's nav, in order (paths under docs/)."""
    lines = mkdocs_yml.split("\nnav:\n", 1)[1].splitlines()
    nav = []
    for line in lines:
        if line.strip() and not line[0].isspace() and not line.startswith("-"):
            break  # the next top-level key
        nav.append(line)
    return NAV_PAGE.findall("\n".join(nav))


DOC_PAGES = [ROOT / "docs" / page for page in nav_pages((ROOT / "mkdocs.yml").read_text())]
DOCUMENTS = [ROOT / "README.md", *DOC_PAGES]
FENCE = re.compile(r"^```(\S*)\s*$")
# Fenced languages that hold no shell commands; any other fence (sh, console, none) would
# let a command escape this test, so it is refused.
NOT_SHELL = {"toml", "python", "text", "json", "html", "csv"}
# The markers may follow other words of a comment ("# a preset; needs: COCO").
NEEDS = re.compile(r"(?:^|\s)#[^\n]*?\bneeds:\s*(.*?)\s*$", re.M)
EXITS = re.compile(r"(?:^|\s)#[^\n]*?\bexits (\d+)\b")
CI = re.compile(r"(?:^|\s)#\s*ci: \.ci/run\s*$", re.M)
ASSIGNMENT = re.compile(r"[A-Za-z_]\w*=(\"[^\"]*\"|'[^']*'|\S*)\s*")
TMP = re.compile(r"(?<![\w./-])/tmp/")
TIMEOUT_S = 900  # one command; the slowest measured takes a few minutes on a loaded machine


@dataclass(frozen=True)
class Command:
    where: str  # file:line of its first line
    text: str  # as written, continuation lines included
    needs: str  # why it is not run ('' when it is)
    status: int  # the exit status it must end with
    ci: bool  # .ci/run runs it

    @property
    def assignment(self) -> bool:
        """A bare `NAME=value`: a variable later commands use, nothing to run."""
        return ASSIGNMENT.fullmatch(self.text) is not None

    @property
    def runs(self) -> bool:
        return not (self.needs or self.ci or self.assignment)


@dataclass(frozen=True)
class Block:
    where: str
    language: str
    commands: list[Command]


def _complete(text: str) -> bool:
    """Whether `text` is a whole command: no trailing backslash and no open quote."""
    if text.rstrip().endswith("\\"):
        return False
    try:
        shlex.split(text, comments=True)
    except ValueError:
        return False
    return True


def _command(where: str, text: str) -> Command:
    needs = NEEDS.search(text)
    exits = EXITS.search(text)
    return Command(
        where=where,
        text=text,
        needs=needs.group(1) if needs else "",
        status=int(exits.group(1)) if exits else 0,
        ci=CI.search(text) is not None,
    )


def parse_blocks(text: str, name: str) -> list[Block]:
    """Every fenced block of a Markdown text; a bash block split into its commands (comment
    lines between commands are prose, as the README uses them)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        i += 1
        if not fence:
            continue
        start, body = i, []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        commands: list[Command] = []
        pending: list[str] = []
        for n, line in enumerate(body, start + 1):
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if not pending:
                first = n
            pending.append(line)
            if _complete("\n".join(pending)):
                commands.append(_command(f"{name}:{first}", "\n".join(pending)))
                pending = []
        assert not pending, f"{name}:{first}: a command never ends (open quote or backslash)"
        blocks.append(Block(f"{name}:{start}", fence.group(1), commands))
    return blocks


def documented_blocks() -> list[Block]:
    return [
        b
        for path in DOCUMENTS
        for b in parse_blocks(path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix())
    ]


def _bash_blocks() -> list[Block]:
    return [b for b in documented_blocks() if b.language == "bash"]


SAMPLE = """
Text.

```bash
NAME="a b
  c"
# a comment line
tool one $NAME \\
  --flag x   # needs: COCO 2017
tool two 'a=[1, 2]'  # exits 1
tool three  # ci: .ci/run
```

```toml
x = 1
```
"""


def test_the_parser_splits_commands_and_reads_their_markers() -> None:
    bash, toml = parse_blocks(SAMPLE, "S.md")
    assert (bash.language, toml.language, toml.where) == ("bash", "toml", "S.md:14")
    name, one, two, three = bash.commands
    assert name.assignment and not name.runs and name.where == "S.md:5"
    assert one.text == "tool one $NAME \\\n  --flag x   # needs: COCO 2017"
    assert (one.needs, one.runs, one.where) == ("COCO 2017", False, "S.md:8")
    assert (two.status, two.runs, two.needs) == (1, True, "")
    assert three.ci and not three.runs


def test_the_nav_reads_every_docs_page_once() -> None:
    """A page left out of the nav would have its commands never run; one listed twice, twice."""
    on_disk = sorted((ROOT / "docs").glob("**/*.md"))
    assert sorted(DOC_PAGES) == on_disk, "mkdocs.yml's nav and the pages of docs/ differ"
    assert len(set(DOC_PAGES)) == len(DOC_PAGES), "a page is listed twice in the nav"
    sample = "site_name: x\nnav:\n  - Home: index.md\n  - Part:\n      - a/b.md\nplugins: []\n"
    assert nav_pages(sample) == ["index.md", "a/b.md"]


def test_every_fence_is_bash_or_holds_no_commands() -> None:
    """A command in a ```sh, ```console or unlabelled block would escape this test."""
    odd = [
        f"{b.where} ({b.language or 'no language'})"
        for b in documented_blocks()
        if b.language not in NOT_SHELL | {"bash"}
    ]
    assert not odd, f"fenced blocks neither bash nor {sorted(NOT_SHELL)}: {odd}"


def test_every_command_runs_or_says_why_not() -> None:
    commands = [c for b in _bash_blocks() for c in b.commands]
    assert sum(c.runs for c in commands) >= 10  # the parser found the README's commands
    for c in commands:
        assert not NEEDS.search(c.text) or c.needs, f"{c.where}: '# needs:' names nothing"
        assert not (c.runs and re.search(r"git clone|pip install", c.text)), (
            f"{c.where}: runs on CI but reaches the network: mark it '# needs: network'"
        )
    ci_run = (ROOT / ".ci" / "run").read_text()
    for c in commands:
        if c.ci:  # the command itself, before its comment, is a line of .ci/run
            assert re.sub(r"\s*#.*$", "", c.text) in ci_run.splitlines(), c.where


def _env(bin_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCL_BENCH_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def reader_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The directory a reader runs the README from, shared by every block in order."""
    work = tmp_path_factory.mktemp("readme")
    (work / ".venv").symlink_to(sys.prefix)
    (work / "tmp").mkdir()
    yield work


BLOCKS = [b for b in _bash_blocks() if any(c.runs for c in b.commands)]


# slow: minutes in all (CI runs it; `-m "not slow"` leaves it out locally).
@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_readme_block_runs_as_written(block: Block, reader_dir: Path) -> None:
    blocks = _bash_blocks()
    earlier = [c for b in blocks[: blocks.index(block) + 1] for c in b.commands]
    env = _env(Path(sys.executable).parent)
    for command in block.commands:
        if not command.runs:
            continue
        began = time.monotonic()
        # The variables assigned so far, as a reader's shell has them at this command.
        before = earlier[: earlier.index(command)]
        script = "\n".join([*(c.text for c in before if c.assignment), command.text])
        script = TMP.sub(f"{reader_dir}/tmp/", script)
        done = subprocess.run(
            ["bash", "-c", script],
            cwd=reader_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        assert done.returncode == command.status, (
            f"{command.where}: exit {done.returncode} (documented: {command.status})\n"
            f"{command.text}\n--- stderr (end) ---\n{done.stderr[-3000:]}"
        )
        # -s shows what each command costs (CI time is budgeted)
        print(f"\n{command.where}: {time.monotonic() - began:.1f} s wall")
