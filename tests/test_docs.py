"""The docs say what the code does: their Python blocks run (those that are self-contained and
need no GPU), what they print is what they claim, and their shell commands name real files,
scripts, stages and `python -m roi_ops` options."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from roi_ops.__main__ import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)

# Python blocks that are not meant to run as they stand, each with why.
NOT_RUNNABLE = {
    ("contract.md", "roi_ops.roi_pool(input, rois"): "a signature, not code",
    (
        "deployment.md",
        "import torch\n\n# the dynamo exporter",
    ): "a fragment: `model`, `features` and `rois` are yours",
    ("torchvision.md", "patch = roi_ops.patch_torchvision()"): "a fragment: `model` is yours",
}


def _blocks(language: str) -> list[tuple[str, int, str]]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            if match.group(1) == language:
                line = text[: match.start()].count("\n") + 1
                found.append((page.name, line, match.group(2)))
    return found


def _skip_reason(page: str, code: str) -> str | None:
    for (name, start), reason in NOT_RUNNABLE.items():
        if page == name and code.lstrip().startswith(start):
            return reason
    code_only = "\n".join(line.split("#", 1)[0] for line in code.splitlines())
    if "cuda" in code_only and not torch.cuda.is_available():
        return "needs CUDA"
    if "torchvision" in code_only and importlib.util.find_spec("torchvision") is None:
        return "needs torchvision (the torchvision CI stage runs it)"
    return None


PYTHON_BLOCKS = _blocks("python")
RUNNER = """
import contextlib, io, json, sys, traceback
blocks = json.load(sys.stdin)
results = []
for code in blocks:
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "<doc block>", "exec"), {"__name__": "__doc_block__"})
        results.append({"ok": True, "stdout": out.getvalue()})
    except BaseException:
        results.append({"ok": False, "stdout": out.getvalue(), "error": traceback.format_exc()})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def python_results() -> dict[int, dict]:
    """Every runnable Python block run once, in one fresh process (blocks may set globals such
    as the value checks, which must not leak into other tests)."""
    runnable = [
        i for i, (page, _, code) in enumerate(PYTHON_BLOCKS) if not _skip_reason(page, code)
    ]
    done = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps([PYTHON_BLOCKS[i][2] for i in runnable]),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    return dict(zip(runnable, results, strict=True))


@pytest.mark.parametrize(
    "index", range(len(PYTHON_BLOCKS)), ids=[f"{p}:{n}" for p, n, _ in PYTHON_BLOCKS]
)
def test_python_block_runs(python_results, index):
    page, line, code = PYTHON_BLOCKS[index]
    reason = _skip_reason(page, code)
    if reason:
        pytest.skip(reason)
    result = python_results[index]
    assert result["ok"], f"{page}:{line} raised:\n{result['error']}"
    for expected in re.findall(r"^print\(.*\)\s+#\s*(.+)$", code, re.M):
        assert expected.strip() in result["stdout"], (page, line, expected, result["stdout"])


# Shell commands -----------------------------------------------------------------------------


def _shell_lines() -> list[tuple[str, int, str]]:
    """Logical lines of sh/bash blocks, and inline `python -m roi_ops ...` spans of the text."""
    lines = []
    for language in ("sh", "bash"):
        for page, start, code in _blocks(language):
            for offset, line in enumerate(code.replace("\\\n", " ").splitlines()):
                if line.strip():
                    lines.append((page, start + offset + 1, line))
    for page in PAGES:
        text = FENCE.sub("", page.read_text())
        for match in re.finditer(r"`((?:python3? -m roi_ops|bash scripts/)[^`]*)`", text):
            lines.append((page.name, 0, match.group(1).replace("\n", " ")))  # line 0: inline
    return lines


def _stages() -> set[str]:
    text = (ROOT / "scripts" / "gpu_check.sh").read_text()
    return set(re.findall(r"^\s+([a-z]+)\)", text, re.M))


def _check_path(text: str, where: str) -> None:
    if "path/to" in text or text.startswith("$") or text.startswith("/"):
        return  # a placeholder or a location on the user's machine
    path = text.split("[", 1)[0]
    matches = list(ROOT.glob(path)) if "*" in path else [ROOT / path]
    assert matches and all(m.exists() for m in matches), f"{where}: {text!r} does not exist"


def _check_mention(args: list[str], where: str) -> None:
    """An inline mention such as `python -m roi_ops bench --plot`: the command and every option
    it names exist (arguments may be left out)."""
    if not args:
        return
    commands = build_parser()._subparsers._group_actions[0].choices
    if args[0].startswith("-"):
        return
    assert args[0] in commands, f"{where}: no command {args[0]!r}"
    known = {o for action in commands[args[0]]._actions for o in action.option_strings}
    for arg in args[1:]:
        if arg.startswith("--"):
            assert arg.split("=")[0] in known, f"{where}: no option {arg!r}"


def _check_command(words: list[str], where: str, inline: bool = False) -> None:
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        words = words[1:]  # VAR=value prefixes
    if not words:
        return
    program, args = words[0], words[1:]
    if program in ("python", "python3") and args[:2] == ["-m", "roi_ops"]:
        if inline:
            _check_mention(args[2:], where)
        else:
            parsed = build_parser().parse_args(args[2:])  # exits (fails the test) on a bad option
            assert parsed.command, where
    elif program in ("python", "python3") and args[:2] == ["-m", "pytest"]:
        for arg in args[2:]:
            if not arg.startswith("-") and ("/" in arg or arg in ("tests",)):
                _check_path(arg, where)
    elif program in ("python", "python3", "bash", "torchrun"):
        script = next((a for a in args if a.endswith((".py", ".sh"))), None)
        if script:
            _check_path(script, where)
        if script == "scripts/gpu_check.sh":
            stages = [a for a in args[args.index(script) + 1 :] if not a.startswith("-")]
            unknown = set(stages) - _stages()
            assert not unknown, f"{where}: unknown gpu_check.sh stages {unknown}"
    elif program == "pip" and args[:1] == ["install"]:
        for i, arg in enumerate(args):
            if arg == "-e":
                _check_path(args[i + 1], where)


SHELL_LINES = _shell_lines()


@pytest.mark.parametrize(
    ("page", "line", "command"),
    SHELL_LINES,
    ids=[f"{p}:{n}:{c[:40]}" for p, n, c in SHELL_LINES],
)
def test_shell_command_is_real(page, line, command):
    where = f"{page}:{line}: {command}"
    words = shlex.split(command, comments=True)
    try:
        _check_command(words, where, inline=line == 0)
    except SystemExit as stop:
        pytest.fail(f"{where}: `python -m roi_ops` rejects it (exit {stop.code})")


def test_docs_name_no_package_that_is_not_on_pypi():
    for page in PAGES:
        text = page.read_text()
        assert not re.search(r"pip install [\"']?roi-ops", text), page.name


def test_index_lists_the_backends_priorities():
    from roi_ops.registry import REGISTRY

    text = (ROOT / "docs" / "index.md").read_text()
    for entry in REGISTRY.entries():
        if entry.backend is not None and entry.distribution is not None:
            assert re.search(rf"^{entry.name}\s+\w+\s+{entry.backend.priority}\s", text, re.M), (
                entry.name
            )
    rows = re.findall(
        r"^\| `(\w+)` \|.*\| (-?\d+) \|$", (ROOT / "docs" / "backends.md").read_text(), re.M
    )
    priorities = [int(p) for _, p in rows]
    assert priorities == sorted(priorities, reverse=True) and len(rows) >= 4
