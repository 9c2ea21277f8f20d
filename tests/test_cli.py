"""The command line: what it accepts, its defaults, how it reports a user's mistake, and a whole
run end to end on a tiny generated dataset (and again from the feature cache)."""

import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import visual_ablation_experiment_optimized as vae
from helpers import cli_args

SCRIPT = Path(vae.__file__).resolve()
ALL_REPRESENTATIONS = ("simple_stats", "rank_based", "stats", "spectral", "matrix_norms", "distribution",
                       "frequency", "flat_vec", "info_theoretic", "ensemble", "delta_spectral", "delta_canonical")
FLAGS = ("--dataset", "--num-runs", "--output-dir", "--quick", "--cache-features", "--cache-dir", "--data-dir",
         "--dropout", "--weight-decay", "--hidden-dim", "--batch-size", "--sample-layers", "--no-amp",
         "--num-workers", "--representations", "--layer-groups", "--max-epochs", "--patience", "--lr", "--seed",
         "--label-column", "--device", "--sequential-runs", "--sanity-rows")


# --- arguments --------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["--sample-layers", "0"],
    ["--sample-layers", "1.5"],
    ["--num-runs", "0"],
    ["--representations", "nope"],
    ["--representations", "spectral,nope"],
    ["--layer-groups", "nope"],
    ["--device", "tpu"],
], ids=lambda args: " ".join(args))
def test_invalid_argument_is_rejected_with_usage_error(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        vae.parse_config(args)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_help_mentions_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        vae.parse_config(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    declared = [o for a in vae.build_parser()._actions for o in a.option_strings if o.startswith("--")]
    assert set(FLAGS) <= set(declared)
    for flag in declared:
        assert flag in text, flag


def test_defaults_match_the_users_guide():
    cfg = vae.parse_config([])
    assert cfg.dataset == "1k"
    assert cfg.num_runs == 10 and cfg.runs == 10
    assert cfg.output_dir == "visual-ablation-results-optimized"
    assert cfg.cache_dir == ".feature_cache"
    assert cfg.cache_features is False and cfg.quick is False and cfg.no_amp is False
    assert cfg.dropout == 0.5
    assert cfg.weight_decay == 1e-4
    assert cfg.hidden_dim == 512
    assert cfg.batch_size == 256
    assert cfg.sample_layers == 1.0
    assert cfg.num_workers == 4
    assert cfg.max_epochs == 200
    assert cfg.patience == 15
    assert cfg.lr == 1e-3
    assert cfg.seed == 42
    assert cfg.label_column == "category_label"
    assert tuple(cfg.layer_groups) == ("all", "visual")
    assert tuple(cfg.representations) == ALL_REPRESENTATIONS[:-1]  # delta_canonical by name only


def test_quick_trains_three_runs():
    assert vae.parse_config(["--quick", "--num-runs", "7"]).runs == 3


def test_comma_lists_are_parsed_in_order_without_duplicates():
    cfg = vae.parse_config(["--representations", "spectral,simple_stats,spectral", "--layer-groups", "text,all"])
    assert tuple(cfg.representations) == ("spectral", "simple_stats")
    assert tuple(cfg.layer_groups) == ("text", "all")


def test_user_error_is_one_line_on_stderr_and_exit_code_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = vae.main(["--dataset", "nonsense", "--output-dir", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err


# --- end to end -------------------------------------------------------------------------------

REPRESENTATIONS = ("simple_stats", "spectral", "delta_spectral", "delta_canonical")
GROUP_KEYS = {"all_layers_results": "all_layers", "visual_only_results": "visual_only", "text_only_results": "text_only"}
TOP_LEVEL_KEYS = {"dataset", "num_runs", "num_classes", "num_all_layers", "num_visual_layers", "num_text_layers",
                  "optimizations", "all_layers_results", "visual_only_results", "text_only_results", "config",
                  "complete", "feature_extraction"}
OPTIMIZATION_KEYS = {"fast_svd", "gpu_normalization", "mixed_precision", "batch_size", "num_workers", "sample_layers"}
ENTRY_KEYS = (
    {"representation", "num_layers", "feature_dim", "per_run_results", "learning_curves",
     "val_confusion_matrices", "test_confusion_matrices", "training_time_mean", "training_time_std",
     "training_time_total", "best_epoch_mean", "best_epoch_std"}
    | {f"{s}_acc_{stat}" for s in ("train", "val", "test") for stat in ("mean", "std")}
    | {f"{s}_{m}_{stat}" for s in ("val", "test") for m in ("f1", "precision", "recall") for stat in ("mean", "std")}
    | {f"{s}_acc_all_runs" for s in ("train", "val", "test")}
)
PER_RUN_KEYS = {"run", "train_acc", "val_acc", "test_acc", "val_f1", "test_f1", "val_precision", "test_precision",
                "val_recall", "test_recall", "training_time", "best_epoch", "feature_dim"}
CURVE_KEYS = {"val_acc_history", "train_loss_history", "best_epoch"}


def run_cli(args, cwd):
    # One BLAS/OpenMP thread: on a small shared CPU, threads spinning on tiny matrices make training
    # tens of times slower; the results do not depend on it.
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cli_runs(tiny_dataset_path, tmp_path_factory):
    """The CLI run twice with the same arguments and --cache-features: each run's exit and results."""
    tmp = tmp_path_factory.mktemp("cli")
    args = ["--dataset", str(tiny_dataset_path), "--output-dir", str(tmp / "out"), "--cache-dir", str(tmp / "cache"),
            "--cache-features", "--num-runs", "2", "--max-epochs", "8", "--patience", "4", "--hidden-dim", "32",
            "--batch-size", "32", "--num-workers", "0", "--device", "cpu",
            "--representations", ",".join(REPRESENTATIONS), "--layer-groups", "all,visual,text"]
    out_dir = tmp / "out" / "visual_ablation_tiny"
    runs = []
    for _ in range(2):
        process = run_cli(args, cwd=tmp)
        results = json.loads((out_dir / "results.json").read_text()) if process.returncode == 0 else None
        runs.append({"process": process, "results": results})
    return {"out_dir": out_dir, "first": runs[0], "second": runs[1], "args": args}


@pytest.fixture(scope="module")
def results(cli_runs):
    process = cli_runs["first"]["process"]
    assert process.returncode == 0, process.stderr[-3000:]
    return cli_runs["first"]["results"]


def entries(results):
    return [e for key in GROUP_KEYS for e in results[key]]


def test_cli_run_exits_0(cli_runs):
    process = cli_runs["first"]["process"]
    assert process.returncode == 0, process.stderr[-3000:]


def test_cli_run_writes_results_json_txt_and_png(cli_runs, results):
    out_dir = cli_runs["out_dir"]
    assert (out_dir / "results.json").is_file()
    assert (out_dir / "results.txt").is_file()
    assert (out_dir / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_json_has_the_published_top_level_keys(results):
    assert TOP_LEVEL_KEYS <= results.keys()
    assert OPTIMIZATION_KEYS <= results["optimizations"].keys()
    assert results["complete"] is True
    assert "label_mapping" not in results  # the labels are already 0..K-1


def test_results_json_describes_the_dataset_and_its_layers(results):
    assert results["dataset"] == "tiny"
    assert results["num_classes"] == 4
    assert results["num_runs"] == 2
    assert results["num_all_layers"] == 128
    assert results["num_visual_layers"] == 64
    assert results["num_text_layers"] == 64


def test_results_json_records_the_configuration(results):
    config = results["config"]
    assert config["num_runs"] == 2 and config["max_epochs"] == 8 and config["hidden_dim"] == 32
    assert list(config["representations"]) == list(REPRESENTATIONS)
    assert list(config["layer_groups"]) == ["all", "visual", "text"]


def test_a_copy_of_the_script_and_its_command_line_lie_beside_the_results(cli_runs, results):
    out_dir = cli_runs["out_dir"]
    copy = (out_dir / vae.script_copy_name(results["script_sha256"])).read_bytes()
    assert hashlib.sha256(copy).hexdigest() == results["script_sha256"] == hashlib.sha256(SCRIPT.read_bytes()).hexdigest()
    assert all(e["provenance"]["script_sha256"] == results["script_sha256"] for e in results["all_layers_results"])
    command = (out_dir / vae.COMMAND_FILE).read_text().strip()
    assert command == results["command"]
    words = shlex.split(command)
    assert words[0] == SCRIPT.name
    assert vae.parse_config(words[1:]) == vae.parse_config(cli_runs["args"])  # the command reruns this experiment


def test_results_json_has_one_entry_per_representation_and_group(results):
    for key, suffix in GROUP_KEYS.items():
        assert [e["representation"] for e in results[key]] == [f"{rep}_{suffix}" for rep in REPRESENTATIONS]


def test_every_entry_has_the_published_keys(results):
    for entry in entries(results):
        assert ENTRY_KEYS <= entry.keys(), entry["representation"]
        assert len(entry["per_run_results"]) == 2
        for run in entry["per_run_results"]:
            assert PER_RUN_KEYS <= run.keys(), entry["representation"]
        assert len(entry["learning_curves"]) == 2
        for curve in entry["learning_curves"]:
            assert CURVE_KEYS <= curve.keys(), entry["representation"]
        assert [r["run"] for r in entry["per_run_results"]] == [0, 1]


def test_entries_count_their_layers(results):
    for key, layers in (("all_layers_results", 128), ("visual_only_results", 64), ("text_only_results", 64)):
        assert {e["num_layers"] for e in results[key]} == {layers}


def test_feature_dim_is_the_representation_width_times_the_layers(results):
    simple_stats, spectral, delta_spectral, delta_canonical = results["all_layers_results"]
    assert simple_stats["feature_dim"] == 5 * 128
    assert spectral["feature_dim"] == 32 * 128
    assert delta_spectral["feature_dim"] == 32 * 64  # one update per down/up pair
    # (out + in) * rank per pair: at rank 1 as many features as the factors hold weights
    assert delta_canonical["feature_dim"] == sum(rows * cols for rows, cols in vae.sd15_lora_shapes(rank=1).values())


def test_confusion_matrices_count_every_row_of_their_split(results):
    split = vae.split_indices(120)
    for entry in entries(results):
        for name, size in (("val", len(split["val"])), ("test", len(split["test"]))):
            matrices = entry[f"{name}_confusion_matrices"]
            assert len(matrices) == 2
            for matrix in matrices:
                assert len(matrix) == 4 and all(len(row) == 4 for row in matrix)
                assert sum(map(sum, matrix)) == size


def test_test_accuracy_is_the_trace_of_the_test_confusion_matrix(results):
    for entry in entries(results):
        for run, matrix in zip(entry["per_run_results"], entry["test_confusion_matrices"]):
            correct = sum(matrix[i][i] for i in range(4))
            assert run["test_acc"] == pytest.approx(correct / sum(map(sum, matrix)))


def test_strong_signal_is_learned_well_above_chance(results):
    best = max(e["test_acc_mean"] for e in results["all_layers_results"]
               if e["representation"] in ("simple_stats_all_layers", "spectral_all_layers"))
    assert best > 0.4  # chance is 0.25 with 4 classes


def test_results_txt_table_mentions_each_representation(cli_runs, results):
    table = (cli_runs["out_dir"] / "results.txt").read_text()
    for rep in REPRESENTATIONS:
        assert rep in table


def test_first_run_computes_the_features(results):
    assert results["feature_extraction"]["computed"] > 0
    assert results["feature_extraction"]["loaded_from_cache"] == 0


def test_second_identical_run_computes_no_features(cli_runs):
    process = cli_runs["second"]["process"]
    assert process.returncode == 0, process.stderr[-3000:]
    extraction = cli_runs["second"]["results"]["feature_extraction"]
    assert extraction["computed"] == 0
    assert extraction["loaded_from_cache"] > 0


def test_ci_runs_the_readmes_test_command_verbatim_in_a_new_virtual_environment():
    root = Path(vae.__file__).parent
    readme = (root / "README.md").read_text()
    ci = (root / ".ci" / "run").read_text()
    test_command = next(line for line in readme.splitlines() if line.startswith("pip install") and "pytest" in line)
    assert test_command in ci.splitlines()
    assert "-m venv" in ci


def test_a_redirected_log_holds_lines_per_phase_and_entry_and_no_progress_bars(tmp_path, tiny_dataset_path, capsys):
    assert vae.main(cli_args(tmp_path, tiny_dataset_path, "--layer-groups", "all")) == 0
    out, err = capsys.readouterr()  # neither is a terminal here
    assert "%|" not in err and "epochs" not in err
    assert "features: computing" in out + err and "simple_stats_all_layers          test acc" in out
    assert len((out + err).splitlines()) < 40
