"""Reliability: a mistake the user can make is reported in the first second as one line and exit
code 2; numbers that are wrong say so; an interrupted run loses nothing and can be resumed; the
feature cache cannot be read half-written or poisoned; running out of GPU memory slows a run
down instead of ending it."""

import dataclasses
import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

import visual_ablation_experiment_optimized as vae

from helpers import (CPU, GROUP_KEYS, SCRIPT, TEXT_MODULE, TINY_TRAINING, VISUAL_MODULE, adapters, balanced_labels,
                     cli_args, error_line, lora_weights, results_of, save_dataset, strict_json, user_error)


# --- check before computing: one line, exit code 2 ---------------------------------------------

@pytest.mark.usefixtures("no_computing")
def test_unknown_preset_is_an_error_listing_the_presets(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    message = user_error(capsys, cli_args(tmp_path, "5k"))
    assert "5k" in message
    assert "1k" in message and "sanity-check" in message


@pytest.mark.usefixtures("no_computing")
@pytest.mark.parametrize("dataset", ["someone/lora-weights", "1k"], ids=["hub_id", "preset"])
def test_unreachable_hub_is_an_error_suggesting_an_offline_dataset(dataset, tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    message = user_error(capsys, cli_args(tmp_path, dataset))
    assert "sanity-check" in message


def empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def directory_of_notes(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.txt").write_text("adapters will go here")
    return tmp_path / "notes"


def text_file(tmp_path):
    (tmp_path / "adapters.txt").write_text("not a dataset")
    return tmp_path / "adapters.txt"


def parquet_name_without_parquet_data(tmp_path):
    (tmp_path / "adapters.parquet").write_text("not parquet")
    return tmp_path / "adapters.parquet"


def saved_dataset_missing_its_data_file(tmp_path):
    path = adapters(tmp_path / "half-copied")
    for arrow in path.glob("*.arrow"):
        arrow.unlink()
    return path


@pytest.mark.usefixtures("no_computing")
@pytest.mark.parametrize("make", [empty_directory, directory_of_notes, text_file, parquet_name_without_parquet_data,
                                  saved_dataset_missing_its_data_file], ids=lambda make: make.__name__)
def test_path_holding_no_dataset_is_an_error_naming_the_path(make, tmp_path, capsys):
    path = make(tmp_path)
    message = user_error(capsys, cli_args(tmp_path, path))
    assert path.name in message


@pytest.mark.usefixtures("no_computing")
def test_dataset_without_lora_columns_is_an_error_listing_columns_found(tmp_path, capsys):
    path = save_dataset(tmp_path / "no-lora", {"category_label": balanced_labels(60, 2),
                                                "folder": [f"adapter-{i}" for i in range(60)],
                                                "num_images": np.arange(60)})
    message = user_error(capsys, cli_args(tmp_path, path))
    assert "LoRA" in message
    assert "folder" in message and "num_images" in message


@pytest.mark.usefixtures("no_computing")
def test_missing_label_column_is_an_error_listing_candidate_columns(tmp_path, capsys):
    path = adapters(tmp_path / "adapters", folder=[f"adapter-{i}" for i in range(60)])
    message = user_error(capsys, cli_args(tmp_path, path, "--label-column", "kind"))
    assert "kind" in message
    assert "category_label" in message and "folder" in message
    assert ".lora." not in message  # tensors are no candidates


@pytest.mark.usefixtures("no_computing")
def test_label_column_with_a_single_class_is_an_error(tmp_path, capsys):
    path = adapters(tmp_path / "adapters", labels=np.zeros(60, dtype=np.int64))
    message = user_error(capsys, cli_args(tmp_path, path))
    assert "category_label" in message and "single class" in message


@pytest.mark.usefixtures("no_computing")
def test_lora_column_whose_matrices_differ_in_shape_is_an_error_naming_column_and_row(tmp_path, capsys):
    column = f"{VISUAL_MODULE}.lora.down.weight"
    columns = {name: array.tolist() for name, array in lora_weights(60).items()}
    columns[column][7] = [[0.5] * 6]  # one adapter with a narrower factor
    columns["category_label"] = balanced_labels(60, 2)
    path = save_dataset(tmp_path / "ragged", columns)

    message = user_error(capsys, cli_args(tmp_path, path))
    assert column in message
    assert "row 7" in message


@pytest.fixture
def visual_only_dataset(tmp_path):
    """Adapters whose LoRA layers are all self-attention (attn1): the text group selects nothing."""
    return adapters(tmp_path / "visual-only", modules=(VISUAL_MODULE, "blk.attn1.to_v"))


def test_layer_group_selecting_nothing_is_skipped_with_a_notice_when_another_group_runs(
        visual_only_dataset, tmp_path, capsys):
    code = vae.main(cli_args(tmp_path, visual_only_dataset, "--layer-groups", "all,text"))
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    assert "notice" in out and "'text'" in out and "skipped" in out
    results = results_of(tmp_path, "visual-only")
    assert [e["representation"] for e in results["all_layers_results"]] == ["simple_stats_all_layers"]
    assert not results.get("text_only_results")


@pytest.mark.usefixtures("no_computing")
def test_layer_groups_selecting_nothing_at_all_are_an_error(visual_only_dataset, tmp_path, capsys):
    message = user_error(capsys, cli_args(tmp_path, visual_only_dataset, "--layer-groups", "text"))
    assert "text" in message and "no LoRA layers" in message


@pytest.fixture
def class_only_in_training_split(tmp_path):
    """Two classes in every split, and a third only in two training rows."""
    labels = balanced_labels(60, 2)
    labels[vae.split_indices(60)["train"][:2]] = 2
    return adapters(tmp_path / "rare-class", labels=labels)


@pytest.mark.usefixtures("no_computing")
def test_split_lacking_a_class_is_an_error_suggesting_the_flag(class_only_in_training_split, tmp_path, capsys):
    message = user_error(capsys, cli_args(tmp_path, class_only_in_training_split))
    assert "val" in message and "test" in message
    assert "--allow-missing-classes" in message


def test_split_lacking_a_class_runs_with_the_flag_and_records_a_warning(class_only_in_training_split, tmp_path,
                                                                        capsys):
    code = vae.main(cli_args(tmp_path, class_only_in_training_split, "--allow-missing-classes"))
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    assert "WARNING" in out + err
    results = results_of(tmp_path, "rare-class")
    assert results["complete"] is True
    [warning] = [w for w in results["warnings"] if w.startswith("split lacks classes")]
    assert "val" in warning and "test" in warning


@pytest.mark.usefixtures("no_computing")
@pytest.mark.parametrize("flag", ["--output-dir", "--cache-dir"])
@pytest.mark.parametrize("where", ["a_regular_file", "under_a_regular_file"])
def test_directory_that_cannot_be_written_is_an_error_naming_the_flag(flag, where, tiny_dataset_path, tmp_path,
                                                                      capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    target = blocker if where == "a_regular_file" else blocker / "sub"
    message = user_error(capsys, cli_args(tmp_path, tiny_dataset_path, flag, str(target)))
    assert flag in message and str(target) in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.usefixtures("no_computing")
def test_cuda_device_without_cuda_is_an_error(tiny_dataset_path, tmp_path, capsys):
    message = user_error(capsys, cli_args(tmp_path, tiny_dataset_path, "--device", "cuda"))
    assert "CUDA" in message and "--device cpu" in message


def test_cuda_device_with_an_index_becomes_the_current_device(monkeypatch):
    made_current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    assert vae.resolve_device(vae.Config(device="cuda:1")) == torch.device("cuda:1")
    assert made_current == [torch.device("cuda:1")]


# --- numbers that are wrong say so ------------------------------------------------------------

NAN_COLUMN, INF_COLUMN = f"{VISUAL_MODULE}.lora.down.weight", f"{TEXT_MODULE}.lora.up.weight"


@pytest.fixture
def nonfinite_dataset(tmp_path):
    """2 NaN in a visual column, 1 NaN and 2 Inf in a text column, 5 in all."""
    columns = lora_weights(60)
    columns[NAN_COLUMN][[3, 8], 0, 2] = np.nan
    columns[INF_COLUMN][[10, 11, 12], [0, 4, 7], 0] = [np.inf, -np.inf, np.nan]
    columns["category_label"] = balanced_labels(60, 2)
    return save_dataset(tmp_path / "nonfinite", columns)


def test_nonfinite_weights_are_an_error_counting_them_per_column_and_suggesting_the_flag(
        nonfinite_dataset, tmp_path, capsys):
    code = vae.main(cli_args(tmp_path, nonfinite_dataset))
    message = error_line(capsys.readouterr().err)
    assert code == 2
    assert "5 NaN/Inf" in message
    assert f"{NAN_COLUMN} (2)" in message and f"{INF_COLUMN} (3)" in message
    assert "--allow-nonfinite" in message


def test_allowed_nonfinite_weights_are_zeroed_and_counted_per_column_in_results_json(
        nonfinite_dataset, tmp_path, capsys):
    code = vae.main(cli_args(tmp_path, nonfinite_dataset, "--allow-nonfinite"))
    assert code == 0, capsys.readouterr().err[-2000:]
    results = results_of(tmp_path, "nonfinite")
    assert results["nonfinite_weights"] == {"zeroed": True, "counts": {NAN_COLUMN: 2, INF_COLUMN: 3}}
    assert np.isfinite(results["all_layers_results"][0]["test_acc_mean"])


def test_nonfinite_counts_stay_exact_when_raw_weights_of_several_groups_are_read(nonfinite_dataset, tmp_path,
                                                                                 capsys):
    code = vae.main(cli_args(tmp_path, nonfinite_dataset, "--allow-nonfinite",
                             "--representations", "simple_stats,flat_vec", "--layer-groups", "all,visual"))
    assert code == 0, capsys.readouterr().err[-2000:]
    counts = results_of(tmp_path, "nonfinite")["nonfinite_weights"]["counts"]
    assert counts == {NAN_COLUMN: 2, INF_COLUMN: 3}


def test_nonfinite_counts_are_recorded_when_the_features_come_from_the_cache(nonfinite_dataset, tmp_path, capsys):
    args = cli_args(tmp_path, nonfinite_dataset, "--allow-nonfinite", "--cache-features")
    assert vae.main(args) == 0
    assert vae.main(args) == 0, capsys.readouterr().err[-2000:]
    results = results_of(tmp_path, "nonfinite")
    assert results["feature_extraction"]["computed"] == 0  # the second run read every feature from the cache
    assert results["nonfinite_weights"] == {"zeroed": True, "counts": {NAN_COLUMN: 2, INF_COLUMN: 3}}


@pytest.mark.parametrize("budget_bytes", [None, 0], ids=["resident", "streamed"])
def test_feature_constant_on_the_training_split_standardises_to_finite_values_on_every_split(budget_bytes):
    features = np.column_stack([np.full(10, 0.3, dtype=np.float32), np.arange(10, dtype=np.float32)])
    features[8, 0] = 5.0  # the validation row holds another value
    splits = {"train": np.arange(0, 7), "val": np.array([7, 8]), "test": np.array([9])}

    data = vae.standardise(features, np.arange(10) % 2, splits, 2, CPU, budget_bytes=budget_bytes)

    x = {split: torch.cat(list(data.features.eval_chunks(split))) for split in splits}
    for split, values in x.items():
        assert torch.isfinite(values).all(), split
    assert x["train"][:, 0].abs().max().item() < 1e-6
    assert x["val"][1, 0].item() == pytest.approx(5.0 - 0.3, rel=1e-5)  # unit scale, not divided by ~0


def test_resident_standardisation_matches_the_formula_and_leaves_the_callers_features_unchanged():
    rng = np.random.default_rng(3)
    features = rng.standard_normal((40, 5)).astype(np.float32) * 7 + 2
    original = features.copy()
    splits = {"train": np.arange(0, 30), "val": np.arange(30, 35), "test": np.arange(35, 40)}

    data = vae.standardise(features, np.arange(40) % 2, splits, 2, CPU)

    np.testing.assert_array_equal(features, original)
    train = original[splits["train"]].astype(np.float64)
    expected = (original[splits["test"]] - train.mean(0)) / (train.std(0, ddof=1) + vae.EPS)
    np.testing.assert_allclose(torch.cat(list(data.features.eval_chunks("test"))).numpy(), expected, rtol=1e-5)


def tiny_split_data(rows=60, features=6, classes=3):
    """Standardised features with a class signal, split 40 / 10 / 10."""
    rng = np.random.default_rng(0)
    labels = np.arange(rows) % classes
    x = (rng.standard_normal((rows, features)) + labels[:, None]).astype(np.float32)
    splits = {"train": np.arange(0, 40), "val": np.arange(40, 50), "test": np.arange(50, 60)}
    return vae.standardise(x, labels, splits, classes, CPU)


TINY_CONFIG = vae.Config(num_runs=3, max_epochs=6, patience=3, hidden_dim=16, batch_size=16, num_workers=0,
                         device="cpu")


@pytest.fixture(scope="module")
def diverged_entry():
    """A results entry of 3 runs where run 1 starts from NaN weights, so its loss is NaN at once."""
    mlp = vae.CLASSIFIERS["mlp"]
    real_init = mlp.init

    def nan_in_run_1(seeds, *args, **kwargs):
        params, buffers = real_init(seeds, *args, **kwargs)
        if vae.run_seed(TINY_CONFIG, 1) in seeds:
            params["w0"][seeds.index(vae.run_seed(TINY_CONFIG, 1))] = float("nan")
        return params, buffers

    data = tiny_split_data()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mlp, "init", nan_in_run_1)
        result = vae.train_runs(data, TINY_CONFIG, CPU, "diverging", vae.CLASSIFIERS["mlp"])
    return vae.evaluate_entry(result, data, TINY_CONFIG, CPU, "simple_stats_all_layers", num_layers=4)


def test_run_whose_loss_becomes_nonfinite_is_reported_as_failed(diverged_entry):
    assert diverged_entry["failed_runs"] == [1]
    assert diverged_entry["num_successful_runs"] == 2
    assert "non-finite" in diverged_entry["per_run_results"][1]["failed"]
    assert diverged_entry["per_run_results"][0]["failed"] is None
    assert diverged_entry["per_run_results"][2]["failed"] is None


def test_run_whose_loss_becomes_nonfinite_stops_training_at_once(diverged_entry):
    epochs = [len(curve["train_loss_history"]) for curve in diverged_entry["learning_curves"]]
    assert epochs[1] == 1
    assert epochs[0] > 1 and epochs[2] > 1


def test_means_and_spreads_are_over_the_successful_runs_only(diverged_entry):
    ok = [0, 2]
    runs = diverged_entry["per_run_results"]
    for metric in ("train_acc", "val_acc", "test_acc", "val_f1", "test_f1", "val_precision", "test_precision",
                   "val_recall", "test_recall", "best_epoch"):
        values = np.array([runs[k][metric] for k in ok], dtype=np.float64)
        assert diverged_entry[f"{metric}_mean"] == pytest.approx(values.mean()), metric
        assert diverged_entry[f"{metric}_std"] == pytest.approx(values.std(ddof=1)), metric


def test_entry_with_a_failed_run_is_written_as_standard_json_without_nan(diverged_entry, tmp_path):
    path = tmp_path / "results.json"
    vae.write_json_atomic(path, {"all_layers_results": [diverged_entry]})
    written = strict_json(path.read_text())  # results.json is read by tools other than Python's json
    assert None in written["all_layers_results"][0]["learning_curves"][1]["train_loss_history"]


# --- nothing lost: atomic results, a real interruption, --resume --------------------------------

@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk_full", "ctrl_c"])
def test_results_json_interrupted_mid_write_keeps_the_previous_file_and_leaves_no_temporary(
        failure, tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    vae.write_json_atomic(path, {"complete": False, "all_layers_results": [{"representation": "spectral"}]})
    before = path.read_bytes()

    def fail_once_written(fd):  # the new content is in the temporary file, not yet on disk
        raise failure

    monkeypatch.setattr(vae.os, "fsync", fail_once_written)
    with pytest.raises(type(failure)):
        vae.write_json_atomic(path, {"complete": True})

    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


# enough entries (8 representations x 3 groups, up to 12 epochs each) that the run is still training
# well after its first entry is written, when the test interrupts it
INTERRUPTED_REPRESENTATIONS = "simple_stats,rank_based,stats,matrix_norms,distribution,info_theoretic,spectral,delta_spectral"


def interruptible_args(dataset, output_dir):
    return ["--dataset", str(dataset), "--output-dir", str(output_dir), "--cache-dir", str(output_dir.parent / "cache"),
            *TINY_TRAINING, "--max-epochs", "12", "--patience", "6",
            "--representations", INTERRUPTED_REPRESENTATIONS, "--layer-groups", "all,visual,text"]


def cli_env():
    # One BLAS/OpenMP thread: the machine is small and shared; results do not depend on it.
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def finished_entries(results_path) -> list[dict]:
    """The entries results.json holds now (it is written atomically, so it always parses)."""
    if not results_path.exists():
        return []
    results = json.loads(results_path.read_text())
    return [e for key in GROUP_KEYS for e in results.get(key, [])]


def interrupt_after_first_entry(args, workdir, signum) -> dict:
    """Start the CLI, send signum as soon as results.json holds a finished entry, and wait for it to end."""
    results_path = Path(args[args.index("--output-dir") + 1]) / "visual_ablation_tiny" / "results.json"
    with open(workdir / "stdout.txt", "w") as out, open(workdir / "stderr.txt", "w") as err:
        # a shell's background job ignores SIGINT, and its children inherit that: give Ctrl-C back its default
        process = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=workdir, env=cli_env(),
                                   stdout=out, stderr=err,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 180
            while not finished_entries(results_path):
                assert process.poll() is None, f"the run ended before an entry was written: {process.returncode}"
                assert time.monotonic() < deadline, "no entry was written in 180 s"
                time.sleep(0.02)
            process.send_signal(signum)
            code = process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return {"code": code, "stderr": (workdir / "stderr.txt").read_text(), "results_path": results_path,
            "results": json.loads(results_path.read_text())}


@pytest.fixture(scope="module")
def interrupted(tiny_dataset_path, tmp_path_factory):
    """A run of 24 entries on the tiny dataset, stopped with Ctrl-C (SIGINT) after its first entry."""
    workdir = tmp_path_factory.mktemp("interrupted")
    args = interruptible_args(tiny_dataset_path, workdir / "out")
    return dict(interrupt_after_first_entry(args, workdir, signal.SIGINT), args=args, output_dir=workdir / "out")


def copy_of(interrupted, tmp_path) -> tuple[list[str], Path]:
    """The interrupted run's output in a fresh directory, and its arguments pointed there."""
    output_dir = tmp_path / "out"
    shutil.copytree(interrupted["output_dir"], output_dir)
    args = list(interrupted["args"])
    args[args.index("--output-dir") + 1] = str(output_dir)
    return args, output_dir / "visual_ablation_tiny" / "results.json"


def test_ctrl_c_exits_130_saying_how_to_resume(interrupted):
    assert interrupted["code"] == 130, interrupted["stderr"][-2000:]
    assert "Traceback" not in interrupted["stderr"]
    assert "--resume" in interrupted["stderr"]


def test_ctrl_c_leaves_a_valid_incomplete_results_json_with_the_finished_entries(interrupted):
    results = strict_json(interrupted["results_path"].read_text())
    assert results["complete"] is False
    names = [e["representation"] for e in finished_entries(interrupted["results_path"])]
    assert 1 <= len(names) < 24
    assert names[0] == "simple_stats_all_layers"


def test_ctrl_c_leaves_results_txt_and_the_plots_of_the_finished_entries(interrupted):
    out_dir = interrupted["results_path"].parent
    assert "simple_stats_all_layers " in (out_dir / "results.txt").read_text()  # a finished entry's runs
    for plot in ("summary.png", "retention.png"):
        assert (out_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.usefixtures("no_computing")
def test_rerun_of_an_interrupted_run_without_resume_is_refused_mentioning_resume(interrupted, tmp_path, capsys):
    args, results_path = copy_of(interrupted, tmp_path)
    before = results_path.read_bytes()
    message = user_error(capsys, args)
    assert "--resume" in message
    assert results_path.read_bytes() == before


@pytest.mark.usefixtures("no_computing")
def test_resume_with_another_configuration_is_refused_naming_the_changed_setting(interrupted, tmp_path, capsys):
    args, results_path = copy_of(interrupted, tmp_path)
    message = user_error(capsys, [*args, "--resume", "--num-runs", "3"])
    assert "--resume" in message
    assert "num_runs" in message or "--num-runs" in message


def with_finished_entries_made_by(results_path, **provenance):
    results = json.loads(results_path.read_text())
    for entry in finished_entries(results_path):
        name = entry["representation"]
        target = next(e for key in GROUP_KEYS for e in results.get(key, []) if e["representation"] == name)
        target["provenance"] = {**target["provenance"], **provenance}
    results_path.write_text(json.dumps(results))


@pytest.mark.usefixtures("no_computing")
@pytest.mark.parametrize("field, value", [("precision", "bfloat16"), ("script_sha256", "0" * 64), ("torch", "1.0.0")])
def test_resume_refuses_entries_made_with_another_script_precision_or_torch_naming_it(interrupted, tmp_path, capsys,
                                                                                     field, value):
    args, results_path = copy_of(interrupted, tmp_path)
    with_finished_entries_made_by(results_path, **{field: value})
    message = user_error(capsys, [*args, "--resume"])
    assert f"{field}: {value} ->" in message and "--accept-mixed-provenance" in message


def test_resume_accepting_mixed_provenance_marks_the_entries_and_keeps_each_script(interrupted, tmp_path):
    args, results_path = copy_of(interrupted, tmp_path)
    with_finished_entries_made_by(results_path, precision="bfloat16", script_sha256="f" * 64)
    (results_path.parent / vae.script_copy_name("f" * 64)).write_text("# the earlier script\n")
    assert vae.main([*args, "--resume", "--accept-mixed-provenance"]) == 0
    results = json.loads(results_path.read_text())
    kept = [e["representation"] for e in finished_entries(interrupted["results_path"])]
    table = (results_path.parent / "results.txt").read_text()
    section = table.split("Entries made with another script")[1]
    for name in kept:
        assert f"precision: bfloat16 -> float32" in next(line for line in section.splitlines() if line.startswith(name))
    assert {e["provenance"]["precision"] for e in finished_entries(results_path)} == {"bfloat16", "float32"}
    copies = sorted(p.name for p in results_path.parent.glob("script-*.py"))
    assert copies == sorted([vae.script_copy_name("f" * 64), vae.script_copy_name(results["script_sha256"])])


def test_resume_refuses_a_dataset_rewritten_in_place_since_the_interrupted_run(tiny_dataset_path, tmp_path, capsys):
    dataset = tmp_path / "tiny"
    shutil.copytree(tiny_dataset_path, dataset)
    args = cli_args(tmp_path, dataset, "--layer-groups", "all")
    assert vae.main(args) == 0
    results_path = tmp_path / "out" / "visual_ablation_tiny" / "results.json"
    results = json.loads(results_path.read_text())
    results["complete"] = False
    results_path.write_text(json.dumps(results))
    arrow = next(dataset.glob("*.arrow"))
    content = bytearray(arrow.read_bytes())
    content[len(content) // 2] ^= 0xFF  # same size, other weights
    arrow.write_bytes(bytes(content))
    message = user_error(capsys, [*args, "--resume"])
    assert "another configuration (the dataset's data);" in message


def test_a_full_disk_for_the_script_copy_is_one_error_line(tiny_dataset_path, tmp_path, capsys, monkeypatch):
    real_write = vae.write_atomic

    def disk_full_for_the_script_copy(path, write, durable=True):
        if path.name.startswith("script-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, write, durable)

    monkeypatch.setattr(vae, "write_atomic", disk_full_for_the_script_copy)
    message = user_error(capsys, cli_args(tmp_path, tiny_dataset_path))
    assert "cannot write the script copy" in message and "No space left on device" in message


@pytest.fixture(scope="module")
def resumed(interrupted, tmp_path_factory):
    """The interrupted run continued with --resume, as a new process."""
    args, results_path = copy_of(interrupted, tmp_path_factory.mktemp("resumed"))
    process = subprocess.run([sys.executable, str(SCRIPT), *args, "--resume"], cwd=results_path.parents[2],
                             env=cli_env(), capture_output=True, text=True, timeout=300)
    return {"process": process, "results_path": results_path}


def test_resume_finishes_the_run_with_every_entry(resumed):
    assert resumed["process"].returncode == 0, resumed["process"].stderr[-2000:]
    results = json.loads(resumed["results_path"].read_text())
    assert results["complete"] is True
    for key, suffix in zip(GROUP_KEYS, ("all_layers", "visual_only", "text_only")):
        assert [e["representation"] for e in results[key]] == [
            f"{rep}_{suffix}" for rep in INTERRUPTED_REPRESENTATIONS.split(",")]


def test_resume_keeps_entries_finished_before_the_interruption_unchanged(interrupted, resumed):
    assert resumed["process"].returncode == 0, resumed["process"].stderr[-2000:]
    after = {e["representation"]: e for e in finished_entries(resumed["results_path"])}
    for entry in finished_entries(interrupted["results_path"]):
        assert after[entry["representation"]]["per_run_results"] == entry["per_run_results"]
        assert after[entry["representation"]] == entry


@pytest.mark.subprocess
def test_sigterm_ends_the_run_like_ctrl_c_keeping_finished_entries(tiny_dataset_path, tmp_path):
    run = interrupt_after_first_entry(interruptible_args(tiny_dataset_path, tmp_path / "out"), tmp_path,
                                      signal.SIGTERM)
    assert run["code"] == 130, run["stderr"][-2000:]
    assert "Traceback" not in run["stderr"]
    assert run["results"]["complete"] is False
    assert finished_entries(run["results_path"])
    out_dir = run["results_path"].parent
    assert "simple_stats_all_layers " in (out_dir / "results.txt").read_text()
    assert all((out_dir / plot).exists() for plot in ("summary.png", "retention.png"))


# --- the cache: never half-written, never poisoned ---------------------------------------------

def test_concurrent_writers_of_one_key_never_expose_a_half_written_file(tmp_path, capsys):
    cache = vae.FeatureCache(tmp_path / "cache")
    key = {"format": 1, "dataset": "abc", "unit": f"{VISUAL_MODULE}.lora.down.weight", "representation": "spectral"}
    array = np.arange(256 * 1024, dtype=np.float32).reshape(1024, 256)  # 1 MB: a write takes a while
    cache.save(key, array)

    def write_repeatedly():
        for _ in range(40):
            cache.save(key, array)

    writers = [threading.Thread(target=write_repeatedly) for _ in range(2)]
    for writer in writers:
        writer.start()
    loads = []
    while any(writer.is_alive() for writer in writers):
        loads.append(cache.load(key))
    for writer in writers:
        writer.join()

    assert loads
    assert all(loaded is not None and np.array_equal(loaded, array) for loaded in loads)
    assert "unusable" not in capsys.readouterr().out
    assert sorted(p.name for p in cache.directory.iterdir()) == [cache.path(key).name]


class _CreatesFile:
    """Unpickling this creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_tampered_cache_file_is_refused_during_a_run_and_its_feature_recomputed(tiny_dataset_path, tiny_spec,
                                                                                   tmp_path, capsys):
    args = cli_args(tmp_path, tiny_dataset_path, "--cache-features", "--layer-groups", "all")
    assert vae.main(args) == 0
    loaded = vae.load_experiment_dataset(vae.Config(dataset=str(tiny_dataset_path)))
    store = vae.FeatureStore(loaded.fingerprint, tmp_path / "cache", persistent=True, reader=None,
                             zero_nonfinite=False)
    key = store.key(next(iter(tiny_spec.shapes)), "simple_stats")
    path = store.cache.path(key)
    assert path.exists(), "the first run should have cached this feature"
    marker = tmp_path / "pwned"
    path.write_bytes(pickle.dumps({"key": key, "data": _CreatesFile(marker)}))
    capsys.readouterr()

    code = vae.main(args)
    out, err = capsys.readouterr()

    assert code == 0, err[-2000:]
    assert not marker.exists()
    assert path.name in out + err
    assert results_of(tmp_path, "tiny")["feature_extraction"]["computed"] == 1
    assert store.cache.load(key) is not None  # the recomputed features replaced the tampered file


# --- out of GPU memory: smaller pieces, and the run goes on ----------------------------------

def test_training_out_of_memory_splits_the_ensemble_keeps_every_run_and_says_so(monkeypatch, capsys):
    real_train = vae.train_ensemble

    def fits_one_run_at_a_time(data, cfg, slices, *args, **kwargs):
        if len(slices) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_train(data, cfg, slices, *args, **kwargs)

    monkeypatch.setattr(vae, "train_ensemble", fits_one_run_at_a_time)
    cfg = vae.Config(num_runs=4, max_epochs=3, patience=3, hidden_dim=16, batch_size=16, num_workers=0)
    result = vae.train_runs(tiny_split_data(), cfg, CPU, "spectral_all_layers", vae.CLASSIFIERS["mlp"])

    assert [h.seed for h in result.histories] == [vae.run_seed(cfg, k) for k in range(4)]
    assert all(h.val_acc and h.failed is None for h in result.histories)
    assert result.best_params["w0"].shape[0] == 4
    out = capsys.readouterr().out
    assert "out of GPU memory training spectral_all_layers; continuing with 2 models at a time" in out


def test_training_retry_after_out_of_memory_starts_after_the_failed_attempt_is_freed(monkeypatch):
    real_train = vae.train_ensemble
    failed_attempt = []

    def fails_while_holding_an_ensemble(data, cfg, slices, *args, **kwargs):
        if len(slices) > 1:
            parameters = torch.zeros(len(slices), 1024)  # what a failed attempt holds when it runs out of memory
            failed_attempt.append(weakref.ref(parameters))
            raise torch.OutOfMemoryError("CUDA out of memory")
        assert failed_attempt[0]() is None, "the failed attempt's tensors are still alive during the retry"
        return real_train(data, cfg, slices, *args, **kwargs)

    monkeypatch.setattr(vae, "train_ensemble", fails_while_holding_an_ensemble)
    cfg = vae.Config(num_runs=2, max_epochs=2, patience=2, hidden_dim=8, batch_size=16, num_workers=0)
    assert len(vae.train_runs(tiny_split_data(), cfg, CPU, "spectral_all_layers", vae.CLASSIFIERS["mlp"]).histories) == 2


def test_evaluation_out_of_memory_halves_its_row_chunk_and_gives_the_same_predictions(monkeypatch, capsys):
    data = tiny_split_data()
    cfg = vae.Config(num_runs=2, max_epochs=2, patience=2, hidden_dim=8, batch_size=16, num_workers=0)
    result = vae.train_runs(data, cfg, CPU, "spectral_all_layers", vae.CLASSIFIERS["mlp"])
    expected = vae.predictions(result.logits(data, None), data, "train")
    real_logits = result.logits(data, None)

    def fits_four_rows(x):
        if x.shape[-2] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_logits(x)

    got = vae.predictions_fitting(fits_four_rows, data, "train")
    assert torch.equal(got, expected)
    assert "4-row chunks" in capsys.readouterr().out


@pytest.fixture
def tiny_loaded(tiny_dataset_path):
    loaded = vae.load_experiment_dataset(vae.Config(dataset=str(tiny_dataset_path)))
    return loaded, vae.lora_modules(loaded.dataset.column_names)


def test_extraction_out_of_memory_continues_with_smaller_chunks_and_says_so(tiny_loaded, tmp_path, monkeypatch,
                                                                             capsys):
    loaded, modules = tiny_loaded
    real_compute = vae.compute_pending
    chunk_sizes = []

    def out_of_memory_once(store, work, cfg, device, chunk_bytes):
        chunk_sizes.append(chunk_bytes)
        if len(chunk_sizes) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_compute(store, work, cfg, device, chunk_bytes)

    monkeypatch.setattr(vae, "compute_pending", out_of_memory_once)
    cfg = vae.Config(representations=("simple_stats",), cache_dir=str(tmp_path / "cache"), num_workers=0)
    store = vae.extract_features(loaded, modules, cfg, CPU)

    for unit in vae.feature_units(modules, "simple_stats"):
        assert store.get(unit, "simple_stats").shape == (120, 5)
    assert chunk_sizes == [vae.CHUNK_BYTES, vae.CHUNK_BYTES // 2]
    out = capsys.readouterr().out
    assert "out of GPU memory" in out and f"{vae.CHUNK_BYTES // 2 >> 20} MB chunks" in out


def test_features_finished_before_an_extraction_out_of_memory_are_not_recomputed(tiny_loaded, tmp_path,
                                                                                 monkeypatch):
    loaded, modules = tiny_loaded
    real_compute = vae.compute_pending
    calls = []

    def out_of_memory_after_three_modules(store, work, cfg, device, chunk_bytes):
        calls.append(len(work))
        if len(calls) == 1:
            real_compute(store, work[:3], cfg, device, chunk_bytes)
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_compute(store, work, cfg, device, chunk_bytes)

    monkeypatch.setattr(vae, "compute_pending", out_of_memory_after_three_modules)
    cfg = vae.Config(representations=("simple_stats",), cache_dir=str(tmp_path / "cache"), num_workers=0)
    store = vae.extract_features(loaded, modules, cfg, CPU)

    units = vae.feature_units(modules, "simple_stats")
    assert calls == [len(modules), len(modules) - 3]
    columns = [c for m in modules for c in m.columns]
    assert store.computed == len(units) + len(columns)  # each feature, and each column's NaN/Inf count, stored once


def test_resume_names_what_makes_a_results_json_unusable():
    assert vae.results_shape_problem([1, 2]) == "it holds a JSON list, not an object"
    assert vae.results_shape_problem({"groups": "all"}) == "its groups or config have the wrong type"
    assert vae.results_shape_problem({"groups": ["all"], "all_layers_results": [{"name": 1}]}) == \
        "the entries of group 'all' lack a representation name"
    assert vae.results_shape_problem({"groups": [3]}) == "the entries of group 3 lack a representation name"
    assert vae.results_shape_problem({"config": {}}) is None  # a run saved before any group: usable
    assert vae.results_shape_problem({"groups": ["all"]}) is None


def test_resume_names_each_changed_setting_with_its_old_and_new_value():
    old = json.loads(json.dumps(dataclasses.asdict(vae.Config(hidden_dim=256))))  # as results.json holds it
    assert vae.config_changes(old, dataclasses.asdict(vae.Config(hidden_dim=512))) == ["hidden_dim: 256 -> 512"]


@pytest.fixture
def finished_tiny_run(tiny_dataset_path, tmp_path):
    """(arguments, results.json path, its contents) of a finished run on the tiny dataset."""
    args = cli_args(tmp_path, tiny_dataset_path)
    assert vae.main(args) == 0
    results_path = tmp_path / "out" / "visual_ablation_tiny" / "results.json"
    return args, results_path, json.loads(results_path.read_text())


def test_a_run_stopped_before_rank_0_wrote_its_results_resumes_from_the_other_ranks_files(finished_tiny_run, tmp_path, capsys):
    args, results_path, results = finished_tiny_run
    held = results["all_layers_results"][0]
    (results_path.parent / vae.RANK_FILE.format(1)).write_text(json.dumps({"config": results["config"], "all_layers_results": [held]}))
    results_path.unlink()  # rank 1 had finished an entry; rank 0 had written nothing yet
    refusal = user_error(capsys, args)
    assert "holds an interrupted run" in refusal and "--resume" in refusal and "--output-dir" in refusal
    assert vae.main([*args, "--resume"]) == 0
    again = next(e for e in results_of(tmp_path, "tiny")["all_layers_results"] if e["representation"] == held["representation"])
    assert again["training_time_total"] == held["training_time_total"]  # gathered, not trained again


def test_a_run_stopped_before_finishing_any_entry_is_simply_run_again(finished_tiny_run):
    args, results_path, results = finished_tiny_run
    results_path.write_text(json.dumps({**results, "complete": False, "all_layers_results": [], "visual_only_results": []}))
    assert vae.main(args) == 0  # nothing to resume: no --resume needed
    assert json.loads(results_path.read_text())["complete"] is True


def test_resume_of_results_without_their_configuration_compares_against_the_defaults(finished_tiny_run, capsys):
    args, results_path, results = finished_tiny_run
    del results["config"]
    results_path.write_text(json.dumps({**results, "complete": False}))
    refusal = user_error(capsys, [*args, "--resume"])
    assert "another configuration" in refusal and "rerun with its flags or choose another --output-dir" in refusal
    assert f"; max_epochs: {vae.Config().max_epochs} -> 6;" in refusal  # each changed setting, one after another


def test_resume_names_every_provenance_its_finished_entries_differ_in(finished_tiny_run, capsys):
    args, results_path, results = finished_tiny_run
    for entry in results["all_layers_results"]:
        entry["provenance"] = {**entry["provenance"], "precision": "bfloat16", "torch": "1.0.0"}
    results_path.write_text(json.dumps({**results, "complete": False}))
    refusal = user_error(capsys, [*args, "--resume"])
    assert "were made with another precision: bfloat16 -> float32; torch: 1.0.0 -> " in refusal
    assert refusal.endswith("resume with that script, device and torch, or pass --accept-mixed-provenance to keep "
                            "them (marked in results.txt)")
