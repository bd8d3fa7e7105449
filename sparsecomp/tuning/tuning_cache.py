"""The on-disk cache of tuned kernel choices, per GPU and software stack.

One JSON file per environment key (GPU name and capability, torch and triton versions, the kernel
sources' hash), under ``$SPARSECOMP_CACHE_DIR`` or ``$XDG_CACHE_HOME/sparsecomp`` (default
``~/.cache/sparsecomp``). Entries map a shape bucket (text) to a choice (a JSON object).

Safe under concurrency: every update takes an exclusive lock on a side file, re-reads the file,
merges and writes a temporary file that atomically replaces the old one, so two processes tuning
at once lose nothing and a reader never sees half a file. A file that does not parse or whose
checksum does not match is moved aside (``.corrupt``) with a warning and rebuilt from scratch.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

SCHEMA = 1
# The prefill kernels and index builders (in sparsecomp.kernels.prefill), and their common options.
KERNEL_SOURCES = (
    "prefill/block_sparse_attention.py", "prefill/block_index.py", "prefill/block_lists.py",
    "prefill/adaptive_index.py", "prefill/column_mass.py", "common.py",
)  # fmt: skip


def cache_dir() -> Path:
    explicit = os.environ.get("SPARSECOMP_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparsecomp"


def kernel_source_hash() -> str:
    """Hash of the kernel sources: a tuned choice is only valid for the code it was tuned on."""
    from .. import kernels  # installed inside the package, or kernels/ beside it in a checkout

    folder = Path(kernels.__file__).resolve().parent
    digest = hashlib.sha256()
    for name in KERNEL_SOURCES:
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:16]


def environment_key(device=None) -> dict:
    """What a tuned choice depends on besides the shape: GPU, capability, torch, triton, kernels."""
    import torch
    import triton

    key = {"torch": torch.__version__, "triton": triton.__version__, "kernels": kernel_source_hash()}
    if torch.cuda.is_available():
        device = torch.device(device or "cuda")
        key["gpu"] = torch.cuda.get_device_name(device)
        key["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        key["gpu"], key["capability"] = "cpu", "-"
    return key


def _checksum(entries: dict) -> str:
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


class TuningCache:
    """Tuned choices of one environment (``environment_key()`` unless given)."""

    def __init__(self, key: dict | None = None, directory: Path | str | None = None):
        self.key = key if key is not None else environment_key()
        self.directory = Path(directory) if directory is not None else cache_dir()
        name = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:24]
        self.path = self.directory / f"tuning-{name}.json"

    @contextmanager
    def _locked(self):
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict:
        """The entries on disk; a missing file is empty, a corrupt one is moved aside and empty."""
        try:
            data = json.loads(self.path.read_text())
            entries = data["entries"]
            if (
                data.get("schema") != SCHEMA
                or data.get("key") != self.key
                or data.get("checksum") != _checksum(entries)
            ):
                raise ValueError("schema, key or checksum mismatch")
            return entries
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            aside = self.path.with_suffix(".corrupt")
            os.replace(self.path, aside)
            message = f"sparsecomp: tuning cache {self.path} was corrupt ({e}); moved to {aside}, rebuilding"
            warnings.warn(message, stacklevel=3)
            return {}

    def _write(self, entries: dict) -> None:
        data = {"schema": SCHEMA, "key": self.key, "entries": entries, "checksum": _checksum(entries)}
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)  # atomic: readers see the old file or the new one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def entries(self) -> dict:
        with self._locked():
            return self._read()

    def get(self, bucket: str) -> dict | None:
        return self.entries().get(bucket)

    def put(self, bucket: str, choice: dict) -> None:
        """Store ``choice`` for ``bucket``, keeping every other process's entries."""
        with self._locked():
            entries = self._read()
            entries[bucket] = choice
            self._write(entries)
