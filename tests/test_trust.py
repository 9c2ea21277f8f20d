"""Numbers a researcher can publish: every input or state that would make a number wrong is refused
with one line (exit code 2) or shown plainly in the outputs, never averaged in silently."""

import errno
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import Dataset

import visual_ablation_experiment_optimized as vae
from helpers import (CPU, SCRIPT, TEXT_MODULE, VISUAL_MODULE, adapters, balanced_labels, cli_args, edited_script,
                     error_line, lora_weights, results_of, save_dataset, user_error)

ROWS = 60
VISUAL_DOWN = f"{VISUAL_MODULE}.lora.down.weight"


def run_ok(capsys, argv) -> tuple[str, str]:
    code = vae.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    return out, err


# --- labels --------------------------------------------------------------------------------------

def labels_with_gaps(gaps=(3, 17)):
    labels = balanced_labels(ROWS, 2).astype(object)
    labels[list(gaps)] = None
    return labels.tolist()


@pytest.mark.usefixtures("no_computing")
def test_rows_without_a_label_are_refused_counting_them_and_suggesting_drop_unlabeled(tmp_path, capsys):
    dataset = adapters(tmp_path / "gaps", labels=labels_with_gaps())
    message = user_error(capsys, cli_args(tmp_path, dataset))
    assert f"2 of {ROWS} rows have no label" in message and "--drop-unlabeled" in message


@pytest.mark.parametrize("blank", ["", " ", "\t"])
def test_blank_string_labels_count_as_missing_not_as_a_class(blank):
    ds = Dataset.from_dict({"category_label": ["cat", blank, "dog", "dog"]})
    with pytest.raises(vae.ExperimentError, match="1 of 4 rows have no label"):
        vae.encode_labels(ds, "category_label")
    labels = vae.encode_labels(ds, "category_label", drop_unlabeled=True)
    assert labels.class_names == ["cat", "dog"] and labels.codes.tolist() == [0, -1, 1, 1]


def test_a_table_of_up_factors_only_runs_what_applies_and_says_what_it_skipped(tmp_path, capsys):
    columns = {k: v for k, v in lora_weights(ROWS).items() if ".lora.up." in k}
    dataset = save_dataset(tmp_path / "uponly", {**columns, "category_label": balanced_labels(ROWS, 2)})
    run_ok(capsys, cli_args(tmp_path, dataset, "--representations", "simple_stats,delta_spectral", "--layer-groups", "all"))
    results = results_of(tmp_path, "uponly")
    assert [e["representation"] for e in results["all_layers_results"]] == ["simple_stats_all_layers"]
    table = (tmp_path / "out" / "visual_ablation_uponly" / "results.txt").read_text()
    assert "not computed: delta_spectral on all: no module of the group holds both factors" in table


def test_only_pair_representations_on_a_table_of_one_factor_is_refused(tmp_path, capsys):
    columns = {k: v for k, v in lora_weights(ROWS).items() if ".lora.up." in k}
    dataset = save_dataset(tmp_path / "uponly", {**columns, "category_label": balanced_labels(ROWS, 2)})
    assert "no group has any" in user_error(capsys, cli_args(tmp_path, dataset, "--representations", "delta_spectral"))


def test_nan_labels_of_a_float_column_count_as_missing():
    ds = Dataset.from_dict({"category_label": [0.0, float("nan"), 1.0, 1.0]})
    with pytest.raises(vae.ExperimentError, match="1 of 4 rows have no label"):
        vae.encode_labels(ds, "category_label")


def test_dropped_unlabeled_rows_leave_integer_classes_not_strings_of_floats():
    ds = Dataset.from_dict({"category_label": [0, None, 1, 1, None, 0]})
    labels = vae.encode_labels(ds, "category_label", drop_unlabeled=True)
    assert labels.class_names == ["0", "1"] and labels.mapping is None
    assert labels.codes.tolist() == [0, -1, 1, 1, -1, 0]
    assert labels.unlabeled == 2


def test_dropped_unlabeled_rows_are_in_no_split():
    ds = Dataset.from_dict({"category_label": labels_with_gaps((0, 5, 9))})
    splits = vae.labeled_splits(vae.encode_labels(ds, "category_label", drop_unlabeled=True))
    kept = np.concatenate(list(splits.values()))
    assert sorted(kept.tolist()) == sorted(set(range(ROWS)) - {0, 5, 9})


def test_drop_unlabeled_runs_and_records_the_rows_left_out(tmp_path, capsys):
    dataset = adapters(tmp_path / "gaps", labels=labels_with_gaps())
    run_ok(capsys, cli_args(tmp_path, dataset, "--drop-unlabeled"))
    results = results_of(tmp_path, "gaps")
    assert results["unlabeled_rows"] == 2
    assert sum(results["split_sizes"].values()) == ROWS - 2
    assert any("left out 2 rows without a label" in w for w in results["warnings"])


@pytest.mark.usefixtures("no_computing")
def test_label_column_of_lists_is_refused_in_one_line(tmp_path, capsys):
    dataset = adapters(tmp_path / "lists", labels=[[int(x)] for x in balanced_labels(ROWS, 2)])
    message = user_error(capsys, cli_args(tmp_path, dataset))
    assert "'category_label' holds list" in message and "--label-column" in message


@pytest.mark.usefixtures("no_computing")
def test_label_column_of_dicts_is_refused_in_one_line(tmp_path, capsys):
    dataset = adapters(tmp_path / "dicts", labels=[{"class": int(x)} for x in balanced_labels(ROWS, 2)])
    assert "holds struct" in user_error(capsys, cli_args(tmp_path, dataset))


# --- weights whose features overflow ---------------------------------------------------------

def huge_weights(path, magnitude, dtype):
    columns = {k: v.astype(dtype) * dtype(magnitude) for k, v in lora_weights(ROWS).items()}
    columns["category_label"] = balanced_labels(ROWS, 2)
    return save_dataset(path, columns)


def test_finite_weights_whose_features_overflow_are_refused_naming_layer_and_representation(tmp_path, capsys):
    dataset = huge_weights(tmp_path / "huge", 1e30, np.float32)
    code = vae.main(cli_args(tmp_path, dataset))
    message = error_line(capsys.readouterr().err)
    assert code == 2 and "features overflow" in message
    assert f"simple_stats of {VISUAL_DOWN}" in message and "--allow-nonfinite" in message


def test_overflowing_features_are_zeroed_and_recorded_with_allow_nonfinite(tmp_path, capsys):
    dataset = huge_weights(tmp_path / "huge", 1e30, np.float32)
    run_ok(capsys, cli_args(tmp_path, dataset, "--allow-nonfinite"))
    results = results_of(tmp_path, "huge")
    counts = results["nonfinite_features"]["counts"]
    assert counts[f"simple_stats of {VISUAL_DOWN}"] > 0
    assert any("zeroed NaN/Inf features" in w for w in results["warnings"])
    assert all(e["num_successful_runs"] == 2 for e in results["all_layers_results"])


def test_overflowing_features_recomputed_after_extraction_are_refused_too(tmp_path):
    """A feature file lost after extraction is recomputed when a group reads it: its NaN/Inf are counted and
    refused as extraction's are, not zeroed silently."""
    loaded = vae.load_experiment_dataset(vae.Config(dataset=str(huge_weights(tmp_path / "huge", 1e30, np.float32))))
    modules = vae.lora_modules(loaded.dataset.column_names)
    cfg = vae.Config(representations=("simple_stats",), cache_dir=str(tmp_path / "cache"), allow_nonfinite=True,
                     num_workers=0)
    store = vae.extract_features(loaded, modules, cfg, CPU)
    store.zero_nonfinite, store.nonfinite_features = False, {}
    store.cache.path(store.key(VISUAL_DOWN, "simple_stats")).unlink()
    with pytest.raises(vae.ExperimentError, match=f"features overflow.*simple_stats of {VISUAL_DOWN}"):
        vae.group_feature_matrix(store, modules, "simple_stats")


def test_float64_weights_beyond_float32_are_refused_in_one_line_not_a_linear_algebra_traceback(tmp_path, capsys):
    dataset = huge_weights(tmp_path / "huge64", 1e201, np.float64)
    code = vae.main(cli_args(tmp_path, dataset, "--representations", "spectral,delta_spectral"))
    message = error_line(capsys.readouterr().err)
    assert code == 2 and "NaN/Inf values" in message and VISUAL_DOWN in message


@pytest.mark.usefixtures("no_computing")
def test_a_missing_lora_scale_is_refused_before_computing(tmp_path, capsys):
    scales = [1.0] * ROWS
    scales[7] = None
    dataset = adapters(tmp_path / "scaled", lora_scale=scales)
    message = user_error(capsys, cli_args(tmp_path, dataset, "--representations", "delta_spectral"))
    assert "lora_scale" in message and "missing" in message and "row 7" in message


@pytest.mark.usefixtures("no_computing")
@pytest.mark.parametrize("scale", [float("nan"), -1.0, 0.0, 1e30])
def test_implausible_lora_scale_is_refused_before_computing(scale, tmp_path, capsys):
    scales = np.ones(ROWS, dtype=np.float32)
    scales[7] = scale
    dataset = adapters(tmp_path / "scaled", lora_scale=scales)
    message = user_error(capsys, cli_args(tmp_path, dataset, "--representations", "delta_spectral"))
    assert "lora_scale" in message and "row 7" in message


# --- runs that never learned ---------------------------------------------------------------------

def test_stalled_run_is_one_whose_kept_weights_barely_fit_the_training_split():
    y = torch.arange(100) % 10  # chance 0.1
    train_acc = [0.18, 0.92, 0.80, 0.15, 0.40]
    best_epoch = [2, 30, 3, 40, 40]
    assert vae.stalled_runs(train_acc, best_epoch, y) == [True, False, False, True, False]


def test_a_run_stopped_in_its_first_five_epochs_stalls_unless_it_fitted_half_the_way_from_chance():
    y = torch.arange(100) % 10  # chance 0.1: half the way is 0.55
    assert vae.stalled_runs([0.40, 0.40, 0.40, 0.54, 0.56], [1, 5, 6, 5, 5], y) == [True, True, False, True, False]


def test_a_run_exactly_at_either_margin_has_not_stalled():
    y = torch.tensor([0] * 35 + [1] * 33 + [2] * 32)  # chance 0.35: 0.415 is exactly 10% of the way to 1
    assert vae.stalled_runs([0.415], [40], y) == [False]
    y = torch.arange(100) % 4  # chance 0.25: 0.625 is exactly half the way
    assert vae.stalled_runs([0.625], [5], y) == [False]


def test_chance_of_the_stall_rule_is_the_majority_class_share():
    y = torch.tensor([0] * 80 + [1] * 20)  # predicting class 0 everywhere scores 0.8
    assert vae.stalled_runs([0.81, 0.95], [40, 40], y) == [True, False]


def stalled_entry(name, stalled, classifier="mlp", runs=3):
    return {"representation": name, "classifier": classifier, "failed_runs": [], "test_acc_all_runs": [0.5] * runs,
            "per_run_results": [{"run": k, "stalled": k in stalled} for k in range(runs)]}


def test_stalled_runs_failed_to_train_when_another_run_learned_from_the_same_features():
    entry = stalled_entry("spectral_all_layers", stalled=[0, 2])
    assert vae.training_outcome(entry, [entry]) == {"failed_to_train_runs": [0, 2], "no_signal": False}


def test_stalled_runs_failed_to_train_when_another_classifier_learned_from_the_same_features():
    mlp = stalled_entry("spectral_all_layers", stalled=[0, 1, 2])
    linear = stalled_entry("spectral_all_layers_linear", stalled=[1], classifier="linear")
    vae.with_training_outcomes([mlp, linear])
    assert mlp["failed_to_train_runs"] == [0, 1, 2] and not mlp["no_signal"]


def test_features_no_run_of_any_classifier_learned_from_carry_no_signal():
    mlp = stalled_entry("spectral_all_layers", stalled=[0, 1, 2])
    linear = stalled_entry("spectral_all_layers_linear", stalled=[0, 1, 2], classifier="linear")
    other = stalled_entry("stats_all_layers", stalled=[])  # other features learned: no help to these
    vae.with_training_outcomes([mlp, linear, other])
    assert mlp["no_signal"] and linear["no_signal"] and mlp["failed_to_train_runs"] == []


def test_runs_that_fit_the_training_split_of_features_without_signal_remembered_it_and_did_not_learn():
    mlp = stalled_entry("spectral_down", stalled=[0, 2])  # run 1 fitted its training rows ...
    linear = stalled_entry("spectral_down_linear", stalled=[0], classifier="linear")
    for entry in (mlp, linear):
        entry["above_chance"] = False  # ... yet neither entry predicts the test split better than chance
    vae.with_training_outcomes([mlp, linear])
    assert mlp["no_signal"] and linear["no_signal"] and mlp["failed_to_train_runs"] == []


def frozen_args(tmp_path, dataset, *extra):
    """Training the MLP with a learning rate of 0: none of its runs can learn, every one stalls."""
    return cli_args(tmp_path, dataset, "--lr", "0", "--layer-groups", "all", *extra)


@pytest.fixture
def frozen_run(tmp_path, capsys):
    dataset = adapters(tmp_path / "frozen")
    out, err = run_ok(capsys, frozen_args(tmp_path, dataset))
    return out + err, results_of(tmp_path, "frozen")


def test_an_mlp_that_learns_nothing_alone_is_reported_as_no_signal_without_rerun_advice(frozen_run, tmp_path):
    printed, results = frozen_run
    [entry] = results["all_layers_results"]
    assert [r["stalled"] for r in entry["per_run_results"]] == [True, True]
    assert entry["no_signal"] and entry["failed_to_train_runs"] == []
    assert "--min-epochs" not in printed and "failed to train" not in printed
    assert "# no signal" in (tmp_path / "out" / "visual_ablation_frozen" / "results.txt").read_text()


def test_stalled_runs_stay_in_the_mean_as_the_published_protocol_and_the_median_is_reported(frozen_run):
    _, results = frozen_run
    [entry] = results["all_layers_results"]
    assert entry["test_acc_mean"] == pytest.approx(np.mean(entry["test_acc_all_runs"]))
    assert entry["test_acc_median"] == pytest.approx(np.median(entry["test_acc_all_runs"]))


def test_mlp_runs_failed_to_train_where_the_linear_probe_learned_and_are_warned_with_min_epochs(tmp_path, capsys):
    columns = lora_weights(ROWS)
    labels = balanced_labels(ROWS, 2)
    columns[VISUAL_DOWN] += 3 * labels[:, None, None]  # a signal the probe, with its own learning rate, finds
    dataset = save_dataset(tmp_path / "frozen", {**columns, "category_label": labels})
    out, err = run_ok(capsys, frozen_args(tmp_path, dataset, "--classifiers", "mlp,linear"))
    results = results_of(tmp_path, "frozen")
    mlp, linear = results["all_layers_results"]
    assert not any(r["stalled"] for r in linear["per_run_results"])
    assert mlp["failed_to_train_runs"] == [0, 1] and not mlp["no_signal"]
    assert "WARNING" in out + err and "--min-epochs 6" in out + err  # twice the patience of 3
    assert any("simple_stats_all_layers (runs 0, 1)" in w for w in results["warnings"])


def test_failed_to_train_warning_suggests_more_epochs_than_the_run_already_had():
    entry = {"representation": "flat_vec_all_layers", "failed_to_train_runs": [1]}
    results = {"groups": ["all"], "all_layers_results": [entry]}
    assert "rerun with --min-epochs 30" in vae.failed_to_train_warning(results, vae.Config(patience=15))
    assert "rerun with --min-epochs 60" in vae.failed_to_train_warning(results, vae.Config(patience=15, min_epochs=30))


def test_sequential_runs_flag_the_same_stalled_runs(frozen_run, tmp_path, capsys):
    _, ensemble = frozen_run
    run_ok(capsys, frozen_args(tmp_path, tmp_path / "frozen", "--sequential-runs", "--output-dir", str(tmp_path / "seq")))
    sequential = json.loads((tmp_path / "seq" / "visual_ablation_frozen" / "results.json").read_text())
    stalled = lambda results: [r["stalled"] for r in results["all_layers_results"][0]["per_run_results"]]
    assert stalled(sequential) == stalled(ensemble)


@pytest.mark.parametrize("sequential", [False, True])
def test_min_epochs_keeps_every_run_training_until_that_epoch(sequential, tmp_path, capsys):
    dataset = adapters(tmp_path / "slow")
    extra = ["--sequential-runs"] if sequential else []
    run_ok(capsys, frozen_args(tmp_path, dataset, "--patience", "1", "--max-epochs", "12", "--min-epochs", "9", *extra))
    curves = results_of(tmp_path, "slow")["all_layers_results"][0]["learning_curves"]
    assert all(len(c["val_acc_history"]) >= 9 for c in curves)


# --- one run per output directory ----------------------------------------------------------------

HOLD_LOCK = """
import sys, time
sys.path.insert(0, {root!r})
import visual_ablation_experiment_optimized as vae
from pathlib import Path
with vae.exclusive_output_dir(Path({out!r})):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_second_run_into_a_directory_in_use_is_refused_naming_the_holder(tmp_path, capsys):
    dataset = adapters(tmp_path / "shared")
    out_dir = tmp_path / "out" / "visual_ablation_shared"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK.format(root=str(SCRIPT.parent), out=str(out_dir))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        message = user_error(capsys, cli_args(tmp_path, dataset, "--seed", "7"))
    finally:
        holder.kill()
        holder.wait()
    assert str(out_dir) in message and f"pid {holder.pid}" in message and "--output-dir" in message


def test_lock_left_by_a_dead_process_is_taken_over(tmp_path, capsys):
    dataset = adapters(tmp_path / "stale")
    out_dir = tmp_path / "out" / "visual_ablation_stale"
    out_dir.mkdir(parents=True)
    (out_dir / vae.LOCK_FILE).write_text("pid 999999999: a run that died\n")
    run_ok(capsys, cli_args(tmp_path, dataset))
    assert (out_dir / vae.LOCK_FILE).read_text().startswith(f"pid {os.getpid()}:")


# --- cached features follow the code -------------------------------------------------------------

def changed_fingerprints(module) -> set[str]:
    kinds = [*vae.REPRESENTATIONS, vae.NONFINITE, vae.SHAPES]
    return {kind for kind in kinds
            if vae.code_fingerprint(vae.stored_code(kind)) != module.code_fingerprint(module.stored_code(kind))}


def test_editing_a_constant_changes_the_cache_key_of_exactly_the_representations_reading_it(tmp_path):
    edited = edited_script(tmp_path, "floor_edit", ("GRAM_RELATIVE_FLOOR = 1e-5", "GRAM_RELATIVE_FLOOR = 2e-5"))
    assert changed_fingerprints(edited) == {"spectral", "matrix_norms", "ensemble", "delta_spectral"}


def test_editing_shared_batch_code_changes_the_cache_key_of_exactly_its_users(tmp_path):
    edited = edited_script(tmp_path, "sort_edit", ("    return values.sort(dim=1).values\n",
                                                    "    return values.sort(dim=1, stable=True).values\n"))
    assert changed_fingerprints(edited) == {"rank_based", "stats", "distribution", "frequency", "info_theoretic",
                                            "ensemble"}


def test_rerun_after_an_edit_recomputes_only_the_representations_it_touches(tmp_path, capsys):
    dataset = adapters(tmp_path / "edit")
    argv = cli_args(tmp_path, dataset, "--representations", "simple_stats,spectral", "--cache-features",
                    "--layer-groups", "all")
    run_ok(capsys, argv)
    edited = edited_script(tmp_path, "rerun_edit", ("GRAM_RELATIVE_FLOOR = 1e-5", "GRAM_RELATIVE_FLOOR = 2e-5"))
    shutil.rmtree(tmp_path / "out")
    assert edited.main(argv) == 0
    extraction = results_of(tmp_path, "edit")["feature_extraction"]
    assert extraction["computed"] == 4  # spectral of the 4 tensor columns; simple_stats came from the cache


# --- odd datasets -------------------------------------------------------------------------------

def test_one_module_under_two_names_is_refused_naming_both():
    columns = [f"unet.{VISUAL_DOWN}", VISUAL_DOWN, f"{TEXT_MODULE}.lora.down.weight"]
    with pytest.raises(vae.ExperimentError, match=rf"{VISUAL_MODULE}.*unet\.{VISUAL_MODULE}.*same LoRA module"):
        vae.lora_modules(columns)


def test_dataset_dot_names_the_output_after_the_directory(tmp_path, monkeypatch):
    (tmp_path / "my-adapters").mkdir()
    monkeypatch.chdir(tmp_path / "my-adapters")
    assert vae.dataset_short_name(".") == "my-adapters"
    assert vae.dataset_short_name("./") == "my-adapters"


@pytest.mark.usefixtures("no_computing")
def test_parquet_files_of_different_tables_are_refused_in_one_line(tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    weights = lora_weights(4)
    first = {VISUAL_DOWN: [m.tolist() for m in weights[VISUAL_DOWN]], "category_label": [0, 1, 0, 1]}
    second = {f"{TEXT_MODULE}.lora.down.weight": first[VISUAL_DOWN], "category_label": ["a", "b", "a", "b"]}
    pq.write_table(pa.table(first), folder / "a.parquet")
    pq.write_table(pa.table(second), folder / "b.parquet")
    code = vae.main(cli_args(tmp_path, folder))
    message = error_line(capsys.readouterr().err)
    assert code == 2 and "cannot be read as one table" in message and "column names don't match" in message


@pytest.mark.usefixtures("no_computing")
@pytest.mark.parametrize("content, problem", [("[]", "not a results file"), ('{"groups": "all"}', "not a results file"),
                                              ('{"groups": ["all"], "all_layers_results": [{"test_acc_mean": 0.5}]}',
                                               "not a results file"), ('{"groups": [', "is unreadable")])
def test_resume_of_a_results_json_of_another_shape_is_refused_in_one_line(content, problem, tmp_path, capsys):
    dataset = adapters(tmp_path / "odd")
    out_dir = tmp_path / "out" / "visual_ablation_odd"
    out_dir.mkdir(parents=True)
    (out_dir / "results.json").write_text(content)
    message = user_error(capsys, cli_args(tmp_path, dataset, "--resume"))
    assert "results.json" in message and problem in message and "move it away" in message


@pytest.mark.usefixtures("no_computing")
def test_symlink_loop_in_an_adapter_folder_is_named_a_symlink_loop(tmp_path, capsys):
    folder = tmp_path / "looped" / "cat"
    folder.mkdir(parents=True)
    os.symlink("b.safetensors", folder / "a.safetensors")
    os.symlink("a.safetensors", folder / "b.safetensors")
    code = vae.main(cli_args(tmp_path, tmp_path / "looped"))
    assert code == 2 and "symlink loop" in error_line(capsys.readouterr().err)


@pytest.mark.usefixtures("no_computing")
def test_dataset_path_that_is_a_symlink_loop_is_named_as_such(tmp_path, capsys):
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    assert "symlink loop" in user_error(capsys, cli_args(tmp_path, tmp_path / "loop"))


@pytest.mark.usefixtures("no_computing")
def test_dataset_path_that_is_a_dangling_symlink_is_named_as_such(tmp_path, capsys):
    os.symlink(tmp_path / "moved-away", tmp_path / "dangling")
    message = user_error(capsys, cli_args(tmp_path, tmp_path / "dangling"))
    assert "dangling" in message and "fix the link" in message


# --- a full disk ---------------------------------------------------------------------------------

def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_caching_features_warns_once_and_finishes_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(vae.FeatureCache, "_write", disk_full)
    dataset = adapters(tmp_path / "full")
    out, err = run_ok(capsys, cli_args(tmp_path, dataset, "--cache-features"))
    assert (out + err).count("cannot write feature files") == 1
    assert results_of(tmp_path, "full")["complete"] is True


def test_disk_full_while_writing_results_is_one_error_naming_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(vae, "write_json_atomic", disk_full)
    dataset = adapters(tmp_path / "full")
    code = vae.main(cli_args(tmp_path, dataset))
    message = error_line(capsys.readouterr().err)
    assert code == 2 and "No space left on device" in message and "--resume" in message


def test_cache_file_path_taken_by_a_directory_is_recomputed_with_a_warning(tmp_path, capsys):
    dataset = adapters(tmp_path / "dirs")
    argv = cli_args(tmp_path, dataset, "--cache-features")
    run_ok(capsys, argv)
    for pkl in (tmp_path / "cache").glob("*.pkl"):
        pkl.unlink()
        pkl.mkdir()
    shutil.rmtree(tmp_path / "out")
    out, err = run_ok(capsys, argv)
    assert "cannot write feature files" in out + err
    assert results_of(tmp_path, "dirs")["complete"] is True
