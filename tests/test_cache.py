"""The feature cache: files that round-trip exactly, and files that cannot be trusted are reported,
removed and recomputed, never executed."""

import pickle
from pathlib import Path

import numpy as np
import pytest

import visual_ablation_experiment_optimized as vae

KEY = {"format": 1, "dataset": "abc123", "unit": "blk.attn1.to_q.lora.down.weight", "representation": "spectral"}


@pytest.fixture
def cache(tmp_path):
    return vae.FeatureCache(tmp_path / "cache")


def saved_features(cache, key=KEY):
    """A (rows, F) float32 feature array saved under key, with values easy to find in the file."""
    array = np.arange(1, 1 + 64 * 16, dtype=np.float32).reshape(64, 16) / 7
    cache.save(key, array)
    return array


@pytest.mark.parametrize("array", [
    np.random.default_rng(0).standard_normal((30, 32)).astype(np.float32),
    np.random.default_rng(1).standard_normal((5, 3, 2)),
    np.arange(12, dtype=np.int64).reshape(4, 3),
    np.asfortranarray(np.random.default_rng(2).standard_normal((6, 4)).astype(np.float32)),
], ids=["float32", "float64_3d", "int64", "fortran_order"])
def test_saved_features_load_back_with_dtype_shape_and_values(cache, array):
    cache.save(KEY, array)
    loaded = cache.load(KEY)
    assert loaded.dtype == array.dtype
    assert loaded.shape == array.shape
    np.testing.assert_array_equal(loaded, array)


def test_missing_file_gives_none(cache):
    assert cache.load(KEY) is None


def test_truncated_file_is_reported_removed_and_gives_none(cache, capsys):
    saved_features(cache)
    path = cache.path(KEY)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    assert cache.load(KEY) is None
    captured = capsys.readouterr()
    assert path.name in captured.out + captured.err
    assert not path.exists()


def test_file_with_a_flipped_data_byte_is_reported_removed_and_gives_none(cache, capsys):
    array = saved_features(cache)
    path = cache.path(KEY)
    content = bytearray(path.read_bytes())
    at = content.find(array.tobytes())
    assert at >= 0, "the features' bytes should be stored as they are"
    content[at + 100] ^= 0x01
    path.write_bytes(bytes(content))

    assert cache.load(KEY) is None
    captured = capsys.readouterr()
    assert path.name in captured.out + captured.err
    assert not path.exists()


class _Touch:
    """Unpickling this creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


class _Open:
    """Unpickling this opens (creates) the marker file for writing."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("payload_class", [_Touch, _Open])
def test_tampered_file_that_would_run_code_is_refused(cache, tmp_path, capsys, payload_class):
    saved_features(cache)
    marker = tmp_path / "pwned"
    path = cache.path(KEY)
    path.write_bytes(pickle.dumps({"key": KEY, "data": payload_class(marker)}))

    assert cache.load(KEY) is None
    assert not marker.exists()
    captured = capsys.readouterr()
    assert path.name in captured.out + captured.err
    assert not path.exists()


def test_file_holding_another_key_gives_none(cache):
    other = dict(KEY, unit="blk.attn2.to_v.lora.up.weight")
    saved_features(cache, other)
    cache.path(KEY).parent.mkdir(parents=True, exist_ok=True)
    cache.path(KEY).write_bytes(cache.path(other).read_bytes())

    assert cache.load(KEY) is None


def test_writes_leave_no_temporary_files(cache):
    for unit in ("a", "b", "a"):  # the last one overwrites an existing file
        cache.save(dict(KEY, unit=unit), np.ones((3, 2), dtype=np.float32))
    names = sorted(p.name for p in cache.directory.iterdir())
    assert names == sorted({cache.path(dict(KEY, unit="a")).name, cache.path(dict(KEY, unit="b")).name})
    assert not any(name.endswith(".tmp") for name in names)


# --- keys of the feature store ----------------------------------------------------------------

def store(fingerprint, tmp_path):
    """A persistent feature store over a dataset with this fingerprint (no weights are read here)."""
    return vae.FeatureStore(fingerprint, tmp_path / "cache", persistent=True, reader=None,
                            zero_nonfinite=False)


def test_store_key_is_the_same_for_the_same_features(tmp_path):
    assert store("fp1", tmp_path).key("blk.attn1.to_q", "spectral") == store("fp1", tmp_path).key("blk.attn1.to_q", "spectral")


@pytest.mark.parametrize("fingerprint, unit, representation", [
    ("fp2", "blk.attn1.to_q", "spectral"),
    ("fp1", "blk.attn2.to_q", "spectral"),
    ("fp1", "blk.attn1.to_q", "simple_stats"),
], ids=["dataset_fingerprint", "unit", "representation"])
def test_store_key_and_cache_file_differ_when_anything_they_depend_on_differs(tmp_path, fingerprint, unit,
                                                                              representation):
    base = store("fp1", tmp_path).key("blk.attn1.to_q", "spectral")
    other = store(fingerprint, tmp_path).key(unit, representation)
    cache = vae.FeatureCache(tmp_path)
    assert base != other
    assert cache.path(base) != cache.path(other)
