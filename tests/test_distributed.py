"""Several processes under torchrun: the same per-run numbers as one process, rank 0 alone writing the
outputs, shared storage checked, one error line for a failure every rank meets, and restarts resuming."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import visual_ablation_experiment_optimized as vae

from helpers import SCRIPT, TINY_TRAINING, results_of

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def job_args(tmp_path, dataset, output):
    return ["--dataset", str(dataset), "--output-dir", str(tmp_path / output), "--cache-dir", str(tmp_path / "cache"),
            *TINY_TRAINING, "--representations", "simple_stats,spectral,matrix_norms"]


def run(command, **env):
    """A subprocess on one thread per process, as torchrun sets it, so one and two processes do the same arithmetic."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPT.parent), **env})
    return done


def entries(results):
    return [e for key, section in results.items() if key.endswith("_results") for e in section]


@pytest.fixture(scope="module")
def one_and_two_processes(tiny_dataset_path, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("torchrun")
    one = run([sys.executable, str(SCRIPT), *job_args(tmp_path, tiny_dataset_path, "one")])
    two = run([*TORCHRUN, str(SCRIPT), *job_args(tmp_path, tiny_dataset_path, "two")])
    return tmp_path, one, two


def test_two_processes_give_every_run_the_numbers_one_process_gives(one_and_two_processes):
    tmp_path, one, two = one_and_two_processes
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    alone = json.loads((tmp_path / "one" / "visual_ablation_tiny" / "results.json").read_text())
    together = json.loads((tmp_path / "two" / "visual_ablation_tiny" / "results.json").read_text())

    assert together["complete"] is True and together["processes"] == 2
    assert [e["representation"] for e in entries(together)] == [e["representation"] for e in entries(alone)]
    for a, b in zip(entries(alone), entries(together)):
        for split in ("train", "val", "test"):
            assert b[f"{split}_acc_all_runs"] == a[f"{split}_acc_all_runs"], (a["representation"], split)


def test_rank_zero_alone_writes_the_outputs_and_leaves_no_rank_files(one_and_two_processes):
    tmp_path, _, two = one_and_two_processes
    out = tmp_path / "two" / "visual_ablation_tiny"
    assert (out / "results.txt").exists() and (out / "summary.png").exists()
    assert not list(out.glob(vae.RANK_FILE.format("*")))
    assert two.stdout.count("wrote ") == 1  # the closing line, printed once


def test_both_processes_train_a_share_of_the_jobs():
    jobs = [vae.Job("group", rep, "all", ("mlp",)) for rep in ("a", "b", "c", "d")]
    costs = [10, 40, 30, 20]
    shares = [vae.assigned_jobs(jobs, costs, vae.Ranks(rank, 2)) for rank in (0, 1)]
    # longest first to the least loaded: b (40) -> 0, c (30) -> 1, d (20) -> 1, a (10) -> 0; each in plan order
    assert [[j.representation for j in share] for share in shares] == [["a", "b"], ["c", "d"]]


def fresh_run(tmp_path, *args):
    """Two processes on a machine where nothing the run needs was built yet."""
    return run([*TORCHRUN, str(SCRIPT), "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
                *TINY_TRAINING, "--representations", "simple_stats", "--layer-groups", "all", *args])


def visible(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_two_processes_on_a_fresh_machine_generate_the_sanity_check_data_once(tmp_path):
    done = fresh_run(tmp_path, "--dataset", "sanity-check", "--sanity-rows", "200", "--data-dir", str(tmp_path / "data"))
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = visible(tmp_path / "data")  # one table, no partial copy left behind
    assert built.startswith("sanity-check-200-")
    assert json.loads((tmp_path / "out" / "visual_ablation_sanity-check" / "results.json").read_text())["complete"]


def test_two_processes_build_a_fresh_adapter_folders_table_once_and_export_it_once(tmp_path):
    from test_adapter_folders import labelled_folder
    folder = labelled_folder(tmp_path / "adapters", "diffusers", labels=("cat", "dog") * 20)
    done = fresh_run(tmp_path, "--dataset", str(folder), "--export-dataset", str(tmp_path / "export"),
                     "--allow-missing-classes")
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(visible(tmp_path / "cache" / "adapter_tables")) == 1
    assert (tmp_path / "export" / "state.json").exists() and done.stdout.count("exported the table") == 1


def test_two_processes_refuse_features_that_overflow_in_one_line(tmp_path):
    from helpers import adapters, lora_weights
    dataset = adapters(tmp_path / "huge", **{k: v * np.float32(1e30) for k, v in lora_weights(60).items()})
    done = fresh_run(tmp_path, "--dataset", str(dataset))
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode != 0 and len(errors) == 1 and "features overflow" in errors[0], done.stderr[-3000:]


def test_every_module_is_extracted_by_exactly_one_rank_whatever_each_found_cached():
    modules = vae.lora_modules([f"m{i}.lora.{side}.weight" for i in range(7) for side in ("down", "up")])
    shares = [vae.extraction_share(modules, vae.Ranks(rank, 3)) for rank in range(3)]
    assert sorted(name for share in shares for name in share) == sorted(m.name for m in modules)


def test_an_error_every_process_meets_is_printed_once(tmp_path, tiny_dataset_path):
    done = run([*TORCHRUN, str(SCRIPT), *job_args(tmp_path, tiny_dataset_path, "bad"), "--label-column", "nope"])
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nope" in errors[0], done.stderr[-3000:]


UNSHARED = """
import sys
import visual_ablation_experiment_optimized as vae
if vae.launcher_ranks().rank == 1:  # as if rank 1 were on a node that mounts another disk there
    vae.token_seen = lambda path, token: False
sys.exit(vae.main(sys.argv[1:]))
"""


def test_a_cache_directory_that_is_not_shared_storage_is_refused(tmp_path, tiny_dataset_path):
    script = tmp_path / "unshared.py"
    script.write_text(UNSHARED)
    done = run([*TORCHRUN, str(script), *job_args(tmp_path, tiny_dataset_path, "unshared")])
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert errors[0].startswith("error: rank 1: --cache-dir") and "is not shared between the processes" in errors[0]


DIFFERENT_DATA = """
import sys
import visual_ablation_experiment_optimized as vae
args, other_copy = sys.argv[1:-1], sys.argv[-1]
if vae.launcher_ranks().rank == 1:  # as if rank 1's node held another copy of the data at that path
    args[args.index("--dataset") + 1] = other_copy
sys.exit(vae.main(args))
"""


def test_processes_reading_different_copies_of_the_data_stop_with_one_error(tmp_path, tiny_dataset_path):
    other = tmp_path / "node2" / tiny_dataset_path.name
    shutil.copytree(tiny_dataset_path, other)
    arrow = next(other.glob("*.arrow"))
    content = bytearray(arrow.read_bytes())
    content[len(content) // 2] ^= 0xFF  # a byte of the weights
    arrow.write_bytes(bytes(content))
    script = tmp_path / "different.py"
    script.write_text(DIFFERENT_DATA)
    done = run([*TORCHRUN, str(script), *job_args(tmp_path, tiny_dataset_path, "different"), str(other)])
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode != 0 and len(errors) == 1, done.stderr[-3000:]
    assert "the processes read different data" in errors[0]


STALLS = """
import sys, time
import visual_ablation_experiment_optimized as vae
vae.RANK_SILENCE_LIMIT, vae.POLL_SECONDS, vae.BEAT_SECONDS = 6, 0.2, 0.5
if vae.launcher_ranks().rank == 1:  # as if rank 1 hung on stuck storage as it started training
    vae.train_ensemble = lambda *args, **kwargs: time.sleep(3600)
sys.exit(vae.main(sys.argv[1:]))
"""


def test_a_rank_that_stops_making_progress_ends_the_job_with_one_error_in_bounded_time(tmp_path, tiny_dataset_path):
    script = tmp_path / "stalls.py"
    script.write_text(STALLS)
    started = time.monotonic()
    done = run([*TORCHRUN, str(script), *job_args(tmp_path, tiny_dataset_path, "stalls")])
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode != 0 and len(errors) == 1, done.stderr[-3000:]
    assert "rank 1 has made no progress" in errors[0]
    assert time.monotonic() - started < 120  # the limit (6 s here), not the hour rank 1 would sleep


def test_rank_and_world_size_without_torchrun_are_refused_in_one_line(tmp_path, tiny_dataset_path, capsys, monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert vae.main(job_args(tmp_path, tiny_dataset_path, "srun")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and "torchrun" in err


# --- interrupted runs: rank files and restarts ---------------------------------------------------

@pytest.fixture
def interrupted_two_process_run(tmp_path, tiny_dataset_path, monkeypatch):
    """A finished run turned into one interrupted while rank 1 held an entry rank 0 had not gathered."""
    monkeypatch.chdir(tmp_path)
    args = job_args(tmp_path, tiny_dataset_path, "out")
    assert vae.main(args) == 0
    results_path = tmp_path / "out" / "visual_ablation_tiny" / "results.json"
    results = json.loads(results_path.read_text())
    held = results["all_layers_results"].pop()
    results["complete"] = False
    results_path.write_text(json.dumps(results))
    rank_file = results_path.parent / vae.RANK_FILE.format(1)
    rank_file.write_text(json.dumps({"config": results["config"], "all_layers_results": [held]}))
    return args, held


def test_resume_keeps_the_entries_another_rank_had_finished(interrupted_two_process_run, tmp_path):
    args, held = interrupted_two_process_run
    assert vae.main([*args, "--resume"]) == 0
    results = results_of(tmp_path, "tiny")
    assert results["complete"] is True
    again = next(e for e in results["all_layers_results"] if e["representation"] == held["representation"])
    assert again["training_time_total"] == held["training_time_total"]  # gathered, not trained again
    assert not list((tmp_path / "out" / "visual_ablation_tiny").glob(vae.RANK_FILE.format("*")))


def test_a_run_torchrun_restarts_resumes_without_being_asked(interrupted_two_process_run, tmp_path, monkeypatch):
    args, held = interrupted_two_process_run
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "TORCHELASTIC_RESTART_COUNT": "1"}.items():
        monkeypatch.setenv(name, value)
    assert vae.main(args) == 0  # no --resume: the restart is one
    results = results_of(tmp_path, "tiny")
    assert results["complete"] is True
    assert held["representation"] in [e["representation"] for e in results["all_layers_results"]]


def test_without_resume_an_interrupted_run_of_several_processes_is_not_overwritten(interrupted_two_process_run, capsys):
    args, _ = interrupted_two_process_run
    assert vae.main(args) == 2
    assert "holds an interrupted run" in capsys.readouterr().err
