"""CUDA paths on a real GPU: skipped without one.  A session lent a GPU runs these first
(`python -m pytest tests -m cuda -q`)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import visual_ablation_experiment_optimized as vae
from helpers import SCRIPT

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_readme_quick_command_runs_on_cuda_and_completes(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--dataset", "sanity-check", "--quick", "--sample-layers", "0.5",
                           "--device", "cuda",
                           "--output-dir", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data"),
                           "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "visual_ablation_sanity-check" / "results.json").read_text())
    assert results["complete"] is True and results["device"].startswith("cuda")
    entries = results["all_layers_results"] + results["visual_only_results"]
    assert len(entries) == 2 * len(vae.DEFAULT_REPRESENTATIONS)
    assert all(e["num_successful_runs"] == 3 for e in entries)


@pytest.mark.parametrize("classifier", ["mlp", "linear"])
def test_predicted_peak_memory_bounds_what_cuda_allocates(classifier):
    device = torch.device("cuda")
    rng = np.random.default_rng(0)
    labels = rng.integers(4, size=20000)
    features = rng.standard_normal((20000, 20000), dtype=np.float32)  # 1.6 GB, resident
    cfg = vae.Config(num_runs=10, max_epochs=2, patience=50, device="cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    data = vae.standardise(features, labels, vae.split_indices(20000), 4, device, batch=cfg.batch_size)
    result = vae.train_runs(data, cfg, device, "measured", vae.CLASSIFIERS[classifier])
    vae.evaluate_entry(result, data, cfg, device, "measured", 1)
    measured = torch.cuda.max_memory_allocated(device) - before
    model = vae.CLASSIFIERS[classifier]
    predicted = model.peak_bytes(data, cfg, len(vae.run_slices(cfg, model)), vae.amp_dtype(cfg, device))
    assert 0.7 <= measured / predicted <= 1.25, (measured, predicted)
