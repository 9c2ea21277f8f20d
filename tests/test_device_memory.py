"""Device memory at the published scale: features streamed from disk when they do not fit, the same
runs as resident training; out-of-memory falls back instead of failing; memory is released between
entries; the predicted peak is printed before each entry and agrees with what training allocates."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import visual_ablation_experiment_optimized as vae

from helpers import CPU, SCRIPT, cli_args

CFG = vae.Config(num_runs=3, hidden_dim=32, batch_size=32, max_epochs=8, patience=4, device="cpu", num_workers=0)


@pytest.fixture(scope="module")
def memmapped_problem(tmp_path_factory):
    """600 rows of 24 features, 4 classes, on disk as a memory-mapped matrix (as large features are)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(4, size=600)
    path = tmp_path_factory.mktemp("features") / "features.npy"
    features = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(600, 24))
    features[:] = rng.standard_normal((600, 24)) + 1.2 * rng.standard_normal((4, 24))[labels]
    return features, labels, vae.split_indices(600)


def per_run_accuracies(data, cfg):
    result = vae.train_runs(data, cfg, CPU, "test", vae.CLASSIFIERS["mlp"])
    return [h.val_acc for h in result.histories], vae.predictions(result.logits(data, None), data, "test")


# --- streaming ------------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 2], ids=["in_process", "worker_processes"])
def test_streamed_training_gives_the_same_runs_as_resident_training(memmapped_problem, workers):
    features, labels, splits = memmapped_problem
    streamed = vae.standardise(features, labels, splits, 4, CPU, budget_bytes=0, workers=workers, batch=CFG.batch_size)
    resident = vae.standardise(features, labels, splits, 4, CPU, batch=CFG.batch_size)
    assert isinstance(streamed.features, vae.StreamedFeatures) and isinstance(resident.features, vae.ResidentFeatures)

    streamed_curves, streamed_test = per_run_accuracies(streamed, CFG)
    resident_curves, resident_test = per_run_accuracies(resident, CFG)

    assert streamed_curves == resident_curves  # every run's validation accuracy, every epoch
    assert torch.equal(streamed_test, resident_test)


def test_streamed_blocks_of_a_single_step_give_the_same_runs(memmapped_problem, monkeypatch):
    """Blocks as small as one step of every run (the case of very wide features) change nothing either."""
    features, labels, splits = memmapped_problem
    monkeypatch.setattr(vae, "ROW_CHUNK_BYTES", 1)
    streamed = vae.standardise(features, labels, splits, 4, CPU, budget_bytes=0, batch=CFG.batch_size)
    resident = vae.standardise(features, labels, splits, 4, CPU, batch=CFG.batch_size)
    assert streamed.features.block_rows == 1
    assert per_run_accuracies(streamed, CFG)[0] == per_run_accuracies(resident, CFG)[0]


def test_each_run_visits_every_training_row_once_per_epoch_in_its_own_order():
    order = vae.epoch_order(1000, [torch.Generator().manual_seed(s) for s in (1, 2, 3)], CPU)
    for run in order:
        assert sorted(run.tolist()) == list(range(1000))
    assert not torch.equal(order[0], order[1])


def test_the_device_budget_never_changes_a_number(tmp_path, tiny_dataset_path):
    """The same command, features streamed (a budget too small for them) or resident: every run the same."""
    assert vae.main(cli_args(tmp_path, tiny_dataset_path, "--max-resident-features-gb", "1e-9",
                             "--output-dir", str(tmp_path / "streamed"))) == 0
    assert vae.main(cli_args(tmp_path, tiny_dataset_path, "--output-dir", str(tmp_path / "resident"))) == 0
    streamed, resident = (vae.json.loads(next((tmp_path / where).glob("*/results.json")).read_text())
                          for where in ("streamed", "resident"))
    for a, b in zip(streamed["all_layers_results"] + streamed["visual_only_results"],
                    resident["all_layers_results"] + resident["visual_only_results"]):
        for key in ("train_acc_all_runs", "val_acc_all_runs", "test_acc_all_runs", "learning_curves"):
            assert a[key] == b[key], (a["representation"], key)
        assert a["batch_order"] == b["batch_order"] == "per_run"


def test_streaming_reads_in_process_with_a_notice_when_shared_memory_is_too_small(memmapped_problem, monkeypatch,
                                                                                  capsys):
    features, labels, splits = memmapped_problem
    block_bytes = len(splits["train"]) * features.shape[1] * 4  # a block holds at most the training split
    monkeypatch.setattr(vae.shutil, "disk_usage", lambda path: SimpleNamespace(free=block_bytes))  # room for one block

    data = vae.standardise(features, labels, splits, 4, CPU, budget_bytes=0, workers=4, batch=CFG.batch_size)

    assert data.features.loader.num_workers == 0
    assert "/dev/shm has 0.00 GiB free" in capsys.readouterr().out


# --- out of memory and release between entries -----------------------------------------------------

def test_features_that_run_out_of_device_memory_are_streamed_instead(memmapped_problem, monkeypatch, capsys):
    features, labels, splits = memmapped_problem

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(vae, "ResidentFeatures", out_of_memory)
    data = vae.standardise(features, labels, splits, 4, CPU, batch=CFG.batch_size)

    assert isinstance(data.features, vae.StreamedFeatures)
    assert "ran out of device memory; streaming their rows from disk" in capsys.readouterr().out


def test_the_device_budget_is_measured_after_the_previous_entry_is_released(tmp_path, tiny_dataset_path, monkeypatch):
    held = []  # weak references to each entry's features and trained weights
    real_standardise, real_train_runs, real_free = vae.standardise, vae.train_runs, vae.free_memory_bytes

    def standardise(*args, **kwargs):
        data = real_standardise(*args, **kwargs)
        held.append(weakref.ref(data.features.x["train"]))
        return data

    def train_runs(*args, **kwargs):
        result = real_train_runs(*args, **kwargs)
        held.append(weakref.ref(result.best_params["w0"]))
        return result

    def free_memory_bytes(device):
        assert not [ref for ref in held if ref() is not None], "a previous entry's tensors are alive"
        return real_free(device)

    for name, patched in (("standardise", standardise), ("train_runs", train_runs), ("free_memory_bytes", free_memory_bytes)):
        monkeypatch.setattr(vae, name, patched)
    assert vae.main(cli_args(tmp_path, tiny_dataset_path, "--representations", "simple_stats,spectral",
                             "--classifiers", "mlp,linear")) == 0
    results = vae.json.loads(next((tmp_path / "out").glob("*/results.json")).read_text())
    entries = sum(len(v) for k, v in results.items() if k.endswith("_results"))
    assert len(held) == entries // 2 * 3  # per (representation, group): its features, then two classifiers' weights


def test_free_gpu_memory_is_read_after_the_allocator_returns_its_cached_blocks(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: calls.append("mem_get_info") or (8 << 30, 80 << 30))

    assert vae.feature_budget_bytes(torch.device("cuda", 0), 0) == 4 << 30

    assert calls == ["empty_cache", "mem_get_info"]


# --- the predicted peak ----------------------------------------------------------------------------

MEASURE_PEAK = """
import json, sys
from pathlib import Path
import numpy as np, torch
import visual_ablation_experiment_optimized as vae

def status(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024

spec = json.loads(sys.argv[1])
cpu, classifier = torch.device("cpu"), spec.pop("classifier")
budget = spec.pop("budget_bytes", None)
rng = np.random.default_rng(0)
labels = rng.integers(4, size=2000)
x = rng.standard_normal((2000, spec.pop("features")), dtype=np.float32) + rng.standard_normal((4, 1), dtype=np.float32)[labels]
cfg = vae.Config(**spec, patience=50, device="cpu", num_workers=0)
torch.set_num_threads(1)
warm = vae.standardise(x[:60, :8].copy(), labels[:60], vae.split_indices(60), 4, cpu)  # torch's first-use allocations
vae.train_runs(warm, vae.dataclasses.replace(cfg, max_epochs=1), cpu, "warm-up", vae.CLASSIFIERS[classifier])
del warm
Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current resident size
before = status("VmRSS")
data = vae.standardise(x, labels, vae.split_indices(2000), 4, cpu, budget_bytes=budget, batch=cfg.batch_size)
result = vae.train_runs(data, cfg, cpu, "measured", vae.CLASSIFIERS[classifier])
vae.evaluate_entry(result, data, cfg, cpu, "measured", 1)
model = vae.CLASSIFIERS[classifier]
predicted = model.peak_bytes(data, cfg, len(vae.run_slices(cfg, model)), None)
print(json.dumps({"measured": status("VmHWM") - before, "predicted": predicted}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
@pytest.mark.parametrize("spec", [
    {"classifier": "mlp", "features": 6000, "num_runs": 3, "hidden_dim": 256, "batch_size": 64, "max_epochs": 2},
    {"classifier": "linear", "features": 6000, "num_runs": 3, "batch_size": 64, "max_epochs": 2},
    {"classifier": "mlp", "features": 1000, "num_runs": 10, "hidden_dim": 512, "batch_size": 256, "max_epochs": 2},
    {"classifier": "mlp", "features": 6000, "num_runs": 3, "hidden_dim": 256, "batch_size": 64, "max_epochs": 2,
     "budget_bytes": 0},
], ids=["mlp_wide_features", "linear_grid", "mlp_many_runs", "mlp_streamed"])
def test_predicted_peak_memory_agrees_with_what_training_allocates(spec):
    """On CPU tensors the device is the process: its peak resident size over training, with every large
    allocation mapped straight from the system (so a freed one is returned), is the peak allocated."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(SCRIPT.parent)}
    run = subprocess.run([sys.executable, "-c", MEASURE_PEAK, json.dumps(spec)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    peak = json.loads(run.stdout.strip().splitlines()[-1])
    assert peak["measured"] > 50 << 20  # large enough that the interpreter's own allocations are noise
    assert 0.8 <= peak["measured"] / peak["predicted"] <= 1.25, peak


def test_the_predicted_peak_is_printed_before_each_entry_trains(tmp_path, tiny_dataset_path, capsys):
    assert vae.main(cli_args(tmp_path, tiny_dataset_path, "--classifiers", "mlp,linear")) == 0
    out = capsys.readouterr().out
    assert re.search(r"simple_stats_all_layers: 2 models at a time, features resident, predicted peak device memory "
                     r"\d+\.\d\d GiB", out)
    assert "simple_stats_all_layers_linear: 10 models at a time" in out
