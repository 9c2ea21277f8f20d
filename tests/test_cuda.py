"""CUDA paths on a real GPU: skipped without one.  A session lent a GPU runs these first
(`python -m pytest tests -m cuda -q`)."""

import json
import subprocess
import sys

import pytest
import torch

import visual_ablation_experiment_optimized as vae
from helpers import SCRIPT

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_readme_quick_command_runs_on_cuda_and_completes(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--dataset", "sanity-check", "--quick", "--device", "cuda",
                           "--output-dir", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data"),
                           "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "visual_ablation_sanity-check" / "results.json").read_text())
    assert results["complete"] is True and results["device"].startswith("cuda")
    entries = results["all_layers_results"] + results["visual_only_results"]
    assert len(entries) == 2 * len(vae.DEFAULT_REPRESENTATIONS)
    assert all(e["num_successful_runs"] == 3 for e in entries)
