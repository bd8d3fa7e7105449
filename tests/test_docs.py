"""The docs name only what exists: every ``sparsecomp.<name>`` resolves, every ``sparsecomp <command>``
and its ``--options`` are the CLI's, every relative link points at a file."""

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NAME = re.compile(r"(?<![.\w])sparsecomp(?:\.[A-Za-z_][A-Za-z0-9_]*)+")  # not torch.ops.sparsecomp...
CODE = re.compile(r"```[a-z]*\n(.*?)```|`([^`\n]+)`", re.DOTALL)
COMMAND = re.compile(r"^\s*(?:\$ )?sparsecomp ([a-z][a-z-]*)(.*)$", re.MULTILINE)
LINK = re.compile(r"\]\(([^)#:]+)(?:#[^)]*)?\)")


def resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_name_the_docs_use_exists(doc):
    text = doc.read_text()
    names = {n.rstrip(".") for n in NAME.findall(text) if not n.endswith((".py", ".md", ".json"))}
    missing = sorted(n for n in names if not resolves(n.removesuffix(".py")))
    assert not missing, f"{doc.name} names what does not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_command_and_option_the_docs_use_exists(doc):
    from sparsecomp.cli import _parser

    sub = next(a for a in _parser()._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    options = {cmd: {o for a in p._actions for o in a.option_strings} for cmd, p in sub.choices.items()}
    code = "\n".join(block or inline for block, inline in CODE.findall(doc.read_text()))
    bad, shown = [], COMMAND.findall(code)
    for cmd, rest in shown:
        if cmd not in options:
            bad.append(f"sparsecomp {cmd}")
            continue
        bad += [f"sparsecomp {cmd} {o}" for o in re.findall(r"(--[a-z-]+)", rest) if o not in options[cmd]]
    assert not bad, f"{doc.name} shows commands or options the CLI does not have: {bad}"
    if doc.name == "cli.md":  # the reference shows every command
        assert {cmd for cmd, _ in shown} == set(options)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_points_at_a_file(doc):
    broken = [t for t in LINK.findall(doc.read_text()) if not (doc.parent / t).exists()]
    assert not broken, f"{doc.name} links to missing files: {broken}"


def test_the_results_index_lists_every_result_and_only_files_that_exist():
    """benchmarks/results/README.md is the record's index: each file it names exists, and each result
    (a .md with its .json / .csv, or a standalone file) is named there."""
    results = ROOT / "benchmarks" / "results"
    index = (results / "README.md").read_text()
    named = set()
    for cell in re.findall(r"`([^`]+)`", index):
        if "/" in cell:  # a path: a script or its argument
            continue
        for name in re.findall(r"[\w{},]+\.(?:md|json|txt|log)", cell):
            brace = re.fullmatch(r"(\w*)\{([\w,]+)\}(\w*\.\w+)", name)
            named |= {f"{brace[1]}{p}{brace[3]}" for p in brace[2].split(",")} if brace else {name}
    missing = sorted(n for n in named if not (results / n).exists())
    assert not missing, f"the results index names files that do not exist: {missing}"
    stems = {Path(n).stem for n in named}
    unlisted = sorted(p.name for p in results.iterdir() if p.name != "README.md" and p.stem not in stems)
    assert not unlisted, f"results not in benchmarks/results/README.md: {unlisted}"
