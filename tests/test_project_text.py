"""The project speaks of the product: no text in the tree describes the work that made it
(sessions, device budgets, issue progress)."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROCESS = re.compile(
    r"\bsessions? \d+|\b(next|this|last|previous|earlier) session\b|device time (ran out|is scarce|budget|left)"
    r"|\bissue #?\d+,? in progress",
    re.IGNORECASE,
)


def tracked_text_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / n for n in names.splitlines()]


def test_no_text_speaks_of_the_work_process():
    hits = []
    for path in tracked_text_files():
        if path == Path(__file__).resolve() or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        hits += [f"{path.relative_to(ROOT)}:{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1)
                 if PROCESS.search(line)]  # fmt: skip
        if PROCESS.search(path.name):
            hits.append(f"file name {path.relative_to(ROOT)}")
    assert not hits, "text about the work process, not the product:\n" + "\n".join(hits)


@pytest.mark.parametrize(
    "line",
    # assembled here so that this file does not itself hold the phrases it forbids
    [" ".join(w) for w in (("measured in", "sess" + "ion 12"), ("left for the next", "sess" + "ion"),
                           ("dev" + "ice time", "ran out"), ("iss" + "ue 5,", "in progress"))],
)  # fmt: skip
def test_the_check_catches_process_talk(line):
    assert PROCESS.search(line)


@pytest.mark.parametrize("line", ["ms of device time per CUDA kernel", "a Hugging Face session token"])
def test_the_check_leaves_product_text_alone(line):
    assert not PROCESS.search(line)
