"""Helpers of the CLI-level tests: tiny datasets in the real format, and how a run is checked."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset

import visual_ablation_experiment_optimized as vae

SCRIPT = Path(vae.__file__).resolve()
CPU = torch.device("cpu")
GROUP_KEYS = ("all_layers_results", "visual_only_results", "text_only_results")
TINY_TRAINING = ["--num-runs", "2", "--max-epochs", "6", "--patience", "3", "--hidden-dim", "32",
                 "--batch-size", "32", "--num-workers", "0", "--device", "cpu"]
VISUAL_MODULE, TEXT_MODULE = "blk.attn1.to_q", "blk.attn2.to_q"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def cli_args(tmp_path, dataset, *extra):
    """A tiny CPU run of one representation on a dataset; later flags override earlier ones."""
    return ["--dataset", str(dataset), "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
            *TINY_TRAINING, "--representations", "simple_stats", *extra]


def user_error(capsys, argv) -> str:
    """Run main, check it reported one line 'error: ...' on stderr with exit code 2, and return that line."""
    capsys.readouterr()  # what writing the test's dataset printed
    code = vae.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err[-2000:]
    return lines[0]


def error_line(err: str) -> str:
    """The one 'error:' line of a run whose stderr also holds progress bars."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def strict_json(text):
    """JSON as the standard defines it: NaN and Infinity are refused."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def results_of(tmp_path, name):
    return json.loads((tmp_path / "out" / f"visual_ablation_{name}" / "results.json").read_text())


def balanced_labels(rows, classes):
    """Labels that put every class in each split of the published split."""
    labels = np.empty(rows, dtype=np.int64)
    for idx in vae.split_indices(rows).values():
        labels[idx] = np.arange(len(idx)) % classes
    return labels


def lora_weights(rows, modules=(VISUAL_MODULE, TEXT_MODULE), seed=0):
    """Rank-1 down (1, 8) and up (8, 1) factors of each module, as float32 arrays."""
    rng = np.random.default_rng(seed)
    columns = {}
    for module in modules:
        columns[f"{module}.lora.down.weight"] = rng.standard_normal((rows, 1, 8)).astype(np.float32)
        columns[f"{module}.lora.up.weight"] = rng.standard_normal((rows, 8, 1)).astype(np.float32)
    return columns


def save_dataset(path, columns) -> Path:
    Dataset.from_dict(columns).save_to_disk(str(path))
    return path


def adapters(path, rows=60, modules=(VISUAL_MODULE, TEXT_MODULE), labels=None, **extra) -> Path:
    """A small save_to_disk dataset of rank-1 LoRA modules whose splits hold both classes."""
    columns = lora_weights(rows, modules)
    columns["category_label"] = balanced_labels(rows, 2) if labels is None else labels
    columns.update(extra)
    return save_dataset(path, columns)


def edited_script(tmp_path, name, *edits):
    """A copy of the script with edits (old, new), each old text found once, imported as module `name`."""
    source = SCRIPT.read_text()
    for old, new in edits:
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
