import numpy as np
import pytest

from asg.data.npz_cache import cached_arrays


def test_cached_arrays_builds_once_rebuilds_a_wrong_or_corrupt_file(tmp_path):
    path, calls = tmp_path / "c" / "a.npz", []

    def build():
        calls.append(1)
        return {"x": np.arange(6).reshape(2, 3)}

    first = cached_arrays(path, build, "test arrays", {"x": (2, 3)})
    again = cached_arrays(path, build, "test arrays", {"x": None})
    assert len(calls) == 1 and np.array_equal(first["x"], again["x"]) and not list(path.parent.glob("*.tmp"))
    cached_arrays(path, build, "test arrays", {"x": (3, 2)})  # another shape than the file's: made again
    assert len(calls) == 2
    path.write_bytes(b"not an npz")
    with pytest.warns(UserWarning, match="ignoring unreadable test arrays cache"):
        rebuilt = cached_arrays(path, build, "test arrays", {"x": (2, 3)})
    assert len(calls) == 3 and np.array_equal(rebuilt["x"], first["x"])
