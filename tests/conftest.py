"""Shared fixtures: the script imported as a module, and small generated datasets in the real format."""

import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import visual_ablation_experiment_optimized as vae  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs a CUDA path on a real GPU (skipped without one)")
    config.addinivalue_line("markers", "subprocess: runs the script as a process of its own")


def pytest_collection_modifyitems(items):
    """Every test of an interrupted run starts the script as a process of its own (mutation testing
    leaves these out: its rewritten script runs only inside pytest)."""
    for item in items:
        if "interrupted" in getattr(item, "fixturenames", ()):
            item.add_marker("subprocess")


@pytest.fixture(scope="session")
def script():
    """The experiment script, imported as a module."""
    return vae


@pytest.fixture(scope="session")
def tiny_spec():
    """A small dataset in the published layout (to_q/to_v, rank 1, 128 tensors) with a strong class signal
    (seed 1: each of its splits holds every class)."""
    return vae.SyntheticSpec(rows=120, num_classes=4, seed=1, planted=None, visual_share=0.7, gain_spread=0.2,
                             tail_spread=0.4, prototype_strength=0.2)


@pytest.fixture(scope="session")
def tiny_dataset_path(tmp_path_factory, tiny_spec):
    """tiny_spec written with save_to_disk, as a user's local dataset would be."""
    return vae.write_synthetic_dataset(tiny_spec, tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(autouse=True)
def keep_sigterm_handler():
    """main() installs a SIGTERM handler; the test process gets its own back afterwards."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


@pytest.fixture
def no_computing(monkeypatch):
    """Fail the test if any feature is computed or any model trained: the check must come first."""
    def refuse(name):
        def computed(*args, **kwargs):
            raise AssertionError(f"{name} was called before the input was checked")
        return computed

    monkeypatch.setattr(vae, "compute_pending", refuse("compute_pending (features)"))
    monkeypatch.setattr(vae, "train_runs", refuse("train_runs (training)"))
