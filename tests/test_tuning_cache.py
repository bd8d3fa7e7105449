"""The tuning cache: round trip, keys, corruption, two processes writing at once."""

import json
import multiprocessing

import pytest

from sparsecomp.tuning.tuning_cache import TuningCache, environment_key, kernel_source_hash

KEY = {"gpu": "test-gpu", "capability": "9.0", "torch": "x", "triton": "y", "kernels": "z"}


def test_round_trip_and_keys(tmp_path):
    cache = TuningCache(KEY, tmp_path)
    assert cache.get("d128/n32768") is None
    cache.put("d128/n32768", {"block_m": 128, "num_warps": 8})
    cache.put("d64/n8192", {"block_m": 64, "num_warps": 4})
    again = TuningCache(dict(KEY), tmp_path)
    assert again.get("d128/n32768") == {"block_m": 128, "num_warps": 8} and len(again.entries()) == 2
    other_gpu = TuningCache(KEY | {"gpu": "other"}, tmp_path)
    assert other_gpu.path != cache.path and other_gpu.entries() == {}


def test_environment_key_names_the_stack():
    key = environment_key()
    assert {"gpu", "capability", "torch", "triton", "kernels"} <= set(key)
    assert key["kernels"] == kernel_source_hash() and len(key["kernels"]) == 16


@pytest.mark.parametrize("damage", ["garbage", "checksum"])
def test_a_corrupt_file_is_moved_aside_and_rebuilt(tmp_path, damage):
    cache = TuningCache(KEY, tmp_path)
    cache.put("a", {"num_warps": 4})
    if damage == "garbage":
        cache.path.write_text('{"schema": 1, "entr')
    else:
        data = json.loads(cache.path.read_text())
        data["entries"]["a"]["num_warps"] = 8  # edited without its checksum
        cache.path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="corrupt"):
        assert cache.get("a") is None
    assert cache.path.with_suffix(".corrupt").exists()
    cache.put("b", {"num_warps": 2})
    assert TuningCache(KEY, tmp_path).entries() == {"b": {"num_warps": 2}}


def _writer(directory: str, prefix: str, count: int) -> None:
    cache = TuningCache(KEY, directory)
    for i in range(count):
        cache.put(f"{prefix}{i}", {"i": i})


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), p, 40)) for p in ("x", "y")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    entries = TuningCache(KEY, tmp_path).entries()
    assert len(entries) == 80 and entries["x39"] == {"i": 39} and entries["y0"] == {"i": 0}
    assert not list(tmp_path.glob("*.tmp"))  # no temporary file left behind
