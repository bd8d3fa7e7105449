"""Text for calibration and evaluation that every machine has: Python standard library sources and
synthetic retrieval prompts (a pass key hidden in filler text).

Calibration and evaluation use disjoint files (``CALIBRATION_FILES`` / ``EVALUATION_FILES``), so a
plan is never judged on the text it was fitted on.
"""

from __future__ import annotations

import hashlib
import random
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Long modules present from Python 3.9 to 3.13 (each well over 8K tokens).
CALIBRATION_FILES = ("inspect.py", "typing.py", "subprocess.py", "tarfile.py")
EVALUATION_FILES = ("argparse.py", "configparser.py", "enum.py")
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    "The river flows past the old mill and the town sleeps under the hills. "
)


def stdlib_text(name: str) -> str:
    return (Path(sysconfig.get_paths()["stdlib"]) / name).read_text(encoding="utf-8")


def documents_fingerprint(names) -> str:
    """Which text the named files are here: they are this Python's own standard library, so two
    Python versions evaluate on different text (their results do not compare)."""
    digest = hashlib.sha256("".join(stdlib_text(n) for n in names).encode()).hexdigest()[:12]
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return f"{', '.join(names)} of Python {version}'s standard library (sha256 {digest})"


def document_ids(tokenizer, names, length: int) -> list[list[int]]:
    """The first ``length`` tokens of each named standard library file (files too short are skipped)."""
    out = []
    for name in names:
        ids = tokenizer(stdlib_text(name))["input_ids"]
        if len(ids) >= length:
            out.append(list(ids[:length]))
    return out


@dataclass
class PasskeyPrompt:
    ids: list[int]  # prompt followed by the answer's tokens
    answer_start: int  # index of the answer's first token in ``ids``
    passkey: str


def passkey_prompt(tokenizer, length: int, seed: int, depth: float | None = None) -> PasskeyPrompt:
    """About ``length`` tokens of filler with one line "The pass key is NNNNN. Remember it." at a
    random depth (or ``depth`` in [0, 1]), ending with the question and the answer (teacher-forced:
    a model retrieves the key when it predicts each answer token)."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    depth = rng.random() if depth is None else depth
    enc = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    filler, needle = enc(FILLER), enc(f" The pass key is {key}. Remember it. {key} is the pass key. ")
    question = enc(" What is the pass key? The pass key is")
    answer = enc(f" {key}")
    room = max(0, length - len(needle) - len(question) - len(answer))
    body = (filler * (room // max(1, len(filler)) + 1))[:room]
    at = int(depth * len(body))
    prompt = body[:at] + needle + body[at:] + question
    return PasskeyPrompt(prompt + answer, len(prompt), key)


def default_calibration_ids(tokenizer, lengths, *, passkeys: int = 2, seed: int = 0) -> list[list[int]]:
    """The default calibration set at each length: the calibration files' first tokens plus a few
    pass key prompts."""
    out = []
    for n in lengths:
        out += document_ids(tokenizer, CALIBRATION_FILES, n)
        out += [passkey_prompt(tokenizer, n, seed=seed * 1000 + n + i).ids for i in range(passkeys)]
    return out
