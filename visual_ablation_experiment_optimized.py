"""Visual-only ablation of LoRA weight representations.

Question: how much of what a LoRA adapter was trained on (its label) can a classifier read
from its weights, and how much of that survives when only the visual (self-attention,
`attn1`) layers are kept?  Every LoRA tensor of every adapter is turned into feature
representations (statistics, quantiles, singular-value spectra, norms, FFT, histograms,
raw weights, the weight update's canonical factors); an MLP is trained on each representation
for repeated seeded runs, once on all layers and once on the visual layers alone (and on any
other layer group asked for).  Which parts of the network carry the label: linear probes and
k-nearest neighbours beside the MLP (--classifiers mlp,linear,knn), each LoRA factor alone
(--layer-groups all,up,down), a probe per module, factor, block and position (--layer-map), one
block left out at a time (--block-ablation).

Run it:
    python visual_ablation_experiment_optimized.py --dataset 50k --cache-features
    python visual_ablation_experiment_optimized.py --dataset sanity-check --quick --sample-layers 0.5

The second needs no network: it generates 360 adapters of Stable Diffusion v1.5 shapes in ten classes,
whose up factors carry the class in five documented blocks (answer.json beside the data), and trains
3 runs per entry on half of the layers in about a minute and a half on 2 CPU cores.  Expect every
representation well above chance (0.111) on all layers, lower accuracy on the visual layers alone,
and the answer printed under the table.

It writes <output-dir>/visual_ablation_<dataset>/ with
    results.json        every run's metrics, learning curves, confusion matrices and the configuration
    results.txt         the comparison table: accuracy on all layers vs each group, drop, retention
    summary.png         test accuracy per representation and layer group, with error bars
    retention.png       each group's accuracy as a fraction of all layers', 95% Fieller intervals over runs
    layer_map.png       with --layer-map: each module's accuracy, blocks in network order by positions
    confusion_<best>.png  the best entry's test confusion matrix
    script.py, command.txt  the code that ran and its command line
results.json is rewritten after every finished entry; an interrupted run continues with --resume.
Under torchrun (torchrun --nproc-per-node N visual_ablation_experiment_optimized.py <flags>) the
processes share extraction and entries, and give the per-run numbers one process gives.

--dataset takes a preset (1k, 10k, 50k, 100k, small), a hub id, a save_to_disk or parquet path,
a folder of adapter .safetensors files (diffusers, PEFT or kohya names), or sanity-check.

Data flows one way, and the sections below follow it, each calling only those above it:
    configuration -> data (resolve --dataset, split, labels, layers and groups) -> representations
    (one registry) -> feature extraction and cache -> on-device data -> model and training -> metrics
    and reports -> main (the command line, then the run)
then an appendix of input plumbing the experiment calls into: writing tables, the generated dataset,
adapter folders, the Arrow reader.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import errno
import fcntl
import functools
import hashlib
import inspect
import io
import itertools
import json
import math
import mmap
import os
import pickle
import platform
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
import weakref
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


# =============================================================================================
# Configuration
# =============================================================================================

HUB_PRESETS = {
    "1k": "jacekduszenko/lora-ws-1k",
    "10k": "jacekduszenko/lora-ws-10k",
    "50k": "jacekduszenko/lora-ws-50k",
    "100k": "jacekduszenko/lora-ws-100k",
    "small": "jacekduszenko/weights-dataset-small",
}
SANITY_CHECK = "sanity-check"

# evaluated unless --representations says otherwise: the published ten and delta_spectral.  The registry
# under "Representations" holds them all; delta_canonical is as wide as the raw weights, so training on
# it costs as much as flat_vec, the largest entry, and it is asked for by name.
DEFAULT_REPRESENTATIONS = (
    "simple_stats", "rank_based", "stats", "spectral", "matrix_norms", "distribution",
    "frequency", "flat_vec", "info_theoretic", "ensemble", "delta_spectral",
)
BUILTIN_GROUPS = ("all", "visual", "text")
FACTORS = ("down", "up")  # a LoRA update is up @ down
# --layer-groups: a module group, a factor (its tensors in every module), or both as GROUP:FACTOR
GROUP_CHOICES = BUILTIN_GROUPS + FACTORS + tuple(f"{g}:{f}" for g in BUILTIN_GROUPS for f in FACTORS)
SPLIT_SEED = 42  # the published split; fixed so results stay comparable with the paper
EPS = 1e-8       # the original's guard for divisions and standardisation
FEATURE_FORMAT_VERSION = 1  # bump when any representation's output changes


class ExperimentError(Exception):
    """A problem the user can fix; `main` prints it as one line and exits with code 2."""

    same_on_every_rank = False  # under torchrun: agreed by every rank, so reported by rank 0 alone


@dataclass(frozen=True)
class Config:
    """Everything that decides what the experiment computes, built once from the command line."""

    dataset: str = "1k"
    """preset (1k, 10k, 50k, 100k, small), hub id owner/name, local dataset path, folder of adapters, or sanity-check"""
    num_runs: int = 10
    """seeded training runs per (representation, layer group); run k uses seed + k"""
    output_dir: str = "visual-ablation-results-optimized"
    """where visual_ablation_<dataset>/ is written"""
    quick: bool = False
    """3 runs instead of --num-runs, for development"""
    cache_features: bool = False
    """store computed features under --cache-dir and reuse them"""
    cache_dir: str = ".feature_cache"
    """feature cache directory"""
    data_dir: str = "data"
    """where generated datasets (sanity-check) are written"""
    dropout: float = 0.5
    """dropout after each hidden block"""
    weight_decay: float = 1e-4
    """Adam L2 penalty"""
    hidden_dim: int = 512
    """width of the three hidden layers"""
    batch_size: int = 256
    """training mini-batch size"""
    sample_layers: float = 1.0
    """fraction of LoRA modules to keep (seeded; down/up pairs stay together)"""
    no_amp: bool = False
    """train in full precision on CUDA too"""
    num_workers: int = 4
    """parallel readers: threads reading weight chunks, DataLoader workers when features are streamed"""
    representations: tuple[str, ...] = DEFAULT_REPRESENTATIONS
    """representations to evaluate"""
    layer_groups: tuple[str, ...] = ("all", "visual")
    """layer groups to evaluate: all, visual (attn1), text (attn2); up, down: one factor's tensors; visual:up ..."""
    custom_groups: tuple[tuple[str, str], ...] = ()
    """extra groups (name, regex on the module name; a name ending :up or :down keeps that factor), evaluated too"""
    max_epochs: int = 200
    """upper bound on training epochs"""
    patience: int = 15
    """epochs without a better validation accuracy before a run stops"""
    lr: float = 1e-3
    """Adam learning rate"""
    seed: int = 42
    """base seed of the runs and of --sample-layers"""
    label_column: str = "category_label"
    """column holding the class label"""
    labels: str | None = None
    """for a folder of adapters: CSV of `adapter path, label` rows (else metadata.json or folder names)"""
    skip_mismatched: bool = False
    """for a folder of adapters: leave out adapters whose tensors differ from the others (else stop)"""
    export_dataset: str | None = None
    """for a folder of adapters: also save the table built from it here with save_to_disk"""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N"""
    sequential_runs: bool = False
    """train runs one at a time instead of as one batched ensemble (for comparison)"""
    compile: str = "auto"
    """torch.compile the training step: auto (on CUDA only, where it pays), on, off"""
    max_resident_features_gb: float = 0.0
    """features larger than this are streamed from disk during training (0: half the free device memory)"""
    sanity_rows: int = 360
    """rows of the generated sanity-check dataset (360: its 252 training rows are one batch of 256)"""
    resume: bool = False
    """continue an interrupted run in the same output directory, skipping finished entries"""
    accept_mixed_provenance: bool = False
    """with --resume: keep finished entries made by another script, precision or torch version (marked)"""
    allow_nonfinite: bool = False
    """zero NaN/Inf weights (recorded in results.json) instead of refusing the dataset"""
    allow_missing_classes: bool = False
    """run even when a split lacks a class (warned and recorded in results.json) instead of refusing"""
    drop_unlabeled: bool = False
    """leave out rows whose label is missing (recorded in results.json) instead of refusing the dataset"""
    min_epochs: int = 0
    """no early stopping before this epoch (0: the published protocol, stopping whenever patience runs out)"""
    classifiers: tuple[str, ...] = ("mlp",)
    """classifiers trained on every entry (CLASSIFIERS): mlp (the published protocol), linear, knn"""
    layer_map: tuple[str, ...] = ()
    """representations whose accuracy is mapped module by module"""
    layer_map_classifier: str = "linear"
    """the classifier trained on each module alone for the layer map"""
    block_ablation: bool = False
    """also train on all layers minus one block at a time, and report each block's drop"""

    @property
    def runs(self) -> int:
        """Derived: the number of runs actually trained."""
        return 3 if self.quick else self.num_runs

    @property
    def group_names(self) -> tuple[str, ...]:
        """Derived: every group evaluated, built-in ones first."""
        return self.layer_groups + tuple(name for name, _ in self.custom_groups)


# --- several processes: torchrun -------------------------------------------------------------
#
# Under torchrun (RANK, WORLD_SIZE and LOCAL_RANK in the environment) every process prepares the same
# experiment, extracts its share of the features into the shared cache, trains the jobs assigned to
# it on its own GPU (cuda:LOCAL_RANK) or the CPU, and hands its entries to rank 0, which alone writes
# the outputs.  Seeds and splits never depend on the number of processes.

# Ranks meet in collectives only where all of them arrive within moments (checks, sums); where one may
# wait hours for the others (after extraction, at the end) it polls files in the output directory
# instead: each rank touches its own as it makes progress, and a rank silent for RANK_SILENCE_LIMIT
# ends the job with one error.  So no wait is longer than that, however a rank was lost.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
RANK_SILENCE_LIMIT = 30 * 60  # seconds without progress (an epoch, an extraction chunk) before a rank counts as lost
POLL_SECONDS, BEAT_SECONDS = 5.0, 10.0


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes torchrun started; one process alone without it."""

    rank: int = 0
    world: int = 1
    local: int = 0
    restarted: bool = False
    """torchrun restarted the job after a failure: it resumes"""


def launcher_ranks() -> Ranks:
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return Ranks()
    ranks = Ranks(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")),
                  int(env.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0)
    if ranks.world > 1 and not ("MASTER_ADDR" in env and "MASTER_PORT" in env):
        raise ExperimentError("RANK and WORLD_SIZE are set but MASTER_ADDR and MASTER_PORT are not: start the "
                              "processes with torchrun (README: several GPUs or nodes), or unset RANK and WORLD_SIZE")
    return ranks


@contextmanager
def process_group(ranks: Ranks):
    """torch.distributed for the job's duration, with gloo: ranks only wait for and sum small values."""
    if ranks.world == 1:
        yield
        return
    torch.distributed.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        torch.distributed.barrier()


def summed(ranks: Ranks, value: int) -> int:
    """value summed over every rank."""
    if ranks.world == 1:
        return value
    total = torch.tensor([value], dtype=torch.int64)
    torch.distributed.all_reduce(total)
    return int(total.item())


def raise_agreed(problem: ExperimentError | None, ranks: Ranks) -> None:
    """A check every rank makes before computing, agreed on: every rank raises the first problem any
    rank met, which rank 0 alone reports (naming the rank where not every rank met it)."""
    if ranks.world > 1:
        messages = [None] * ranks.world
        torch.distributed.all_gather_object(messages, None if problem is None else str(problem))
        failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
        if not failed:
            return
        rank, message = failed[0]
        everywhere = len(failed) == ranks.world and all(m == message for _, m in failed)
        problem = ExperimentError(message if everywhere else f"rank {rank}: {message}")
        problem.same_on_every_rank = True
    if problem is not None:
        raise problem


def agreed(check: Callable, ranks: Ranks):
    """check()'s result on every rank, or on every rank the first problem a rank's check met (raise_agreed)."""
    try:
        result, problem = check(), None
    except ExperimentError as err:
        result, problem = None, err
    raise_agreed(problem, ranks)
    return result


class Progress:
    """Under torchrun, this rank's sign of life: a file in the output directory it touches at most every
    BEAT_SECONDS as it makes progress (training epochs, extraction chunks, waiting), which the others read."""

    def __init__(self):
        self.path: Path | None = None
        self.out_dir: Path | None = None
        self.token = ""
        self.last = 0.0

    def beat(self) -> None:
        if self.path is not None and time.monotonic() - self.last > BEAT_SECONDS:
            self.path.touch()
            self.last = time.monotonic()


PROGRESS = Progress()  # set up by wait_setup; progress anywhere in the run beats through it


def wait_setup(out_dir: Path, ranks: Ranks) -> None:
    """Name this run's progress and arrival files (a token every rank shares: files of an earlier attempt
    never count) and beat once."""
    if ranks.world == 1:
        return
    token = [os.urandom(6).hex()]
    torch.distributed.broadcast_object_list(token, src=0)
    PROGRESS.token, PROGRESS.out_dir = token[0], out_dir
    PROGRESS.path, PROGRESS.last = out_dir / f".alive-{token[0]}-{ranks.rank}", 0.0
    PROGRESS.beat()


def wait_for_ranks(ranks: Ranks, stage: str) -> None:
    """Wait until every rank has reached this stage, however long that takes while they make progress;
    one error naming a rank that made none for RANK_SILENCE_LIMIT (stuck storage, a lost worker)."""
    if ranks.world == 1:
        return
    arrived = lambda r: PROGRESS.out_dir / f".{stage}-{PROGRESS.token}-{r}"
    arrived(ranks.rank).touch()
    waiting_since = time.time()
    while missing := [r for r in range(ranks.world) if not arrived(r).exists()]:
        PROGRESS.beat()
        for r in missing:
            beat = PROGRESS.out_dir / f".alive-{PROGRESS.token}-{r}"
            silent = time.time() - (beat.stat().st_mtime if beat.exists() else waiting_since)
            if silent > RANK_SILENCE_LIMIT:
                raise ExperimentError(f"rank {r} has made no progress for {RANK_SILENCE_LIMIT // 60} minutes (a lost "
                                      "worker or stuck storage); the job stops: run it again with --resume")
        time.sleep(POLL_SECONDS)
    barrier(ranks)  # every rank is here: returns at once


def remove_wait_files(out_dir: Path) -> None:
    for path in [*out_dir.glob(".alive-*"), *out_dir.glob(".extracted-*"), *out_dir.glob(".finished-*")]:
        path.unlink(missing_ok=True)


# --- the device, precision and seeds ---------------------------------------------------------

def resolve_device(cfg: Config, ranks: Ranks = Ranks()) -> torch.device:
    """The one place that decides where tensors live; under torchrun each rank's own GPU."""
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ExperimentError(f"--device {cfg.device} asked for CUDA, but no CUDA device is available; use --device cpu")
    if ranks.world > 1 and cfg.device.startswith("cuda:"):
        raise ExperimentError(f"--device {cfg.device} under torchrun: each process takes its own GPU (cuda:LOCAL_RANK); "
                              "use --device cuda")
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if cfg.device == "auto" else cfg.device)
    if device.type == "cuda" and ranks.world > 1:
        device = torch.device("cuda", ranks.local)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 training matmuls on tensor cores (features stay float64)
        if device.index is not None:
            # made current: events and streams that guard pinned reader buffers are those of this device
            torch.cuda.set_device(device)
    return device


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """Mixed precision only on CUDA: bfloat16 where supported, else float16 (with loss scaling)."""
    if cfg.no_amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def free_memory_bytes(device: torch.device) -> int:
    """Memory free on the device now: the GPU's, or the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def release_device_memory(device: torch.device) -> None:
    """Return the blocks the CUDA allocator caches for tensors no longer referenced, so free memory
    reads true.  (No gc.collect(): a Ctrl-C arriving while it runs a finaliser would be swallowed.)"""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def progress_bar(*args, **kwargs):
    """A tqdm bar, drawn only when stderr is a terminal: a redirected log keeps the one line per phase and
    per entry that the run writes, not thousands of bar updates."""
    return tqdm(*args, disable=None, **kwargs)


def halving_on_oom(attempt: Callable[[int], object], size: int, smallest: int, device: torch.device, doing: str,
                   size_text: Callable[[int], str], remedy: str = "free the GPU or use --device cpu"):
    """attempt(size), halving size for as long as the device runs out of memory, with a notice each time;
    an ExperimentError once smallest fails too.  The retry runs outside the except clause: its traceback
    holds the failed attempt's tensors, which are released first."""
    while True:
        try:
            return attempt(size)
        except torch.OutOfMemoryError:
            if size <= smallest:
                raise ExperimentError(f"out of GPU memory {doing} with {size_text(size)}; {remedy}") from None
        size = max(size // 2, smallest)
        release_device_memory(device)
        tqdm.write(f"notice: out of GPU memory {doing}; continuing with {size_text(size)}")


def compile_available(device: torch.device) -> str | None:
    """None when torch.compile can be used on this device, else why not."""
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support this Python/platform ({platform.python_version()})"
    if device.type == "cuda" and not torch.utils._triton.has_triton():
        return "torch.compile needs Triton for CUDA, and it is not installed"
    return None


def run_seed(cfg: Config, run: int) -> int:
    """The one place that turns a run index into a seed."""
    return cfg.seed + run


# =============================================================================================
# Data: resolve the dataset, load it, split it, label it, find its LoRA layers and groups
# =============================================================================================

# --- resolving --dataset ---------------------------------------------------------------------

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
LORA_COLUMN = re.compile(r"(?P<module>.+)\.lora\.(?P<side>down|up)\.weight")


@dataclass
class LoadedDataset:
    """A dataset resolved from --dataset, with what the cache key needs to know about it."""

    dataset: "datasets.Dataset"
    name: str          # short name used in the output directory
    source: str        # what --dataset resolved to, for results.json
    fingerprint: str   # changes whenever the data could have changed
    warnings: list[str] = field(default_factory=list)  # what loading left out, for results.json
    answer: dict | None = None  # where the generated sanity-check planted its class signal


def write_atomic(path: Path, write: Callable, durable: bool = True) -> None:
    """write(binary file) into a temporary file beside path, then rename it into place: readers see the
    old file or the whole new one, never half.  Opened with mode 0o666 for the kernel to apply the
    umask, so the file gets the permissions of any other (mkstemp's 0600 would hide it from the group)."""
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def building(path: Path):
    """Held while path is looked for and, if absent, built: processes that share it (torchrun's ranks, two
    runs on one data directory) build it once, and the others wait, then find it built."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


FILE_HASHES = "file_hashes.json"  # in --cache-dir: each data file's SHA-256 by its path, size and mtime


def file_sha256(path: str) -> str:
    """Read through a small reused buffer: large chunks read by several threads would stay in the
    allocator's per-thread arenas and raise the process's memory for the rest of the run."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def content_hashes(files: list[str], memo_dir: Path | None) -> list[str]:
    """Each file's SHA-256, hashed in parallel threads; with memo_dir, remembered by the file's real path,
    size and mtime, so a file is read again only when it changed (or was copied: a copy hashes alike)."""
    keys = [f"{os.path.realpath(f)}:{st.st_size}:{st.st_mtime_ns}" for f, st in zip(files, map(os.stat, files))]
    memo_path = None if memo_dir is None else memo_dir / FILE_HASHES
    with building(memo_path) if memo_path else nullcontext():  # processes sharing the cache hash a new file once
        try:
            memo = json.loads(memo_path.read_text()) if memo_path else {}
        except (OSError, json.JSONDecodeError):
            memo = {}
        missing = [(f, k) for f, k in zip(files, keys) if k not in memo]
        if missing:
            with ThreadPoolExecutor(min(8, len(missing))) as pool:
                memo.update(zip([k for _, k in missing], pool.map(file_sha256, [f for f, _ in missing])))
            if memo_path:
                write_atomic(memo_path, lambda f: f.write(json.dumps(memo).encode()))
    return [memo[k] for k in keys]


def dataset_fingerprint(ds, memo_dir: Path | None = None) -> str:
    """Identify the data behind a dataset by its content, wherever its files sit (copies on two nodes
    agree; a file rewritten in place does not): its Arrow files' names, sizes and SHA-256, or, for a
    table held in memory, datasets' own fingerprint."""
    files = sorted(f["filename"] for f in ds.cache_files)
    if files:
        parts = [(Path(f).name, os.stat(f).st_size, h) for f, h in zip(files, content_hashes(files, memo_dir))]
        identity = json.dumps([parts, ds.num_rows, ds.column_names])
    else:
        identity = json.dumps([ds._fingerprint, ds.num_rows, ds.column_names])
    return hashlib.sha256(identity.encode()).hexdigest()[:24]


def load_hub_dataset(hub_id: str):
    import datasets
    try:
        return datasets.load_dataset(hub_id, split="train")
    except ConnectionError as err:
        raise ExperimentError(
            f"cannot reach the Hugging Face Hub for {hub_id} ({type(err).__name__}); "
            "use --dataset sanity-check or a local dataset path") from None
    except FileNotFoundError as err:
        raise ExperimentError(f"{hub_id} was not found on the Hub ({err}); check the id") from None


def brief(err: BaseException) -> str:
    """An error's first line, and its last when that says more (a cast error ends with its reason)."""
    lines = str(err).strip().splitlines() or [type(err).__name__]
    return (lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1].strip()}")[:300]


def _load_local_dataset(path: Path):
    import datasets
    if path.is_file() and path.suffix == ".parquet":
        return datasets.load_dataset("parquet", data_files=str(path), split="train")
    if path.is_dir() and (path / "dataset_dict.json").exists():
        splits = datasets.load_from_disk(str(path))
        if "train" not in splits:
            raise ExperimentError(f"{path} holds splits {list(splits)} but no 'train' split; save the adapters as 'train'")
        return splits["train"]
    if path.is_dir() and (path / "state.json").exists():
        return datasets.load_from_disk(str(path))
    if path.is_dir():
        parquet = sorted(str(p) for p in path.rglob("*.parquet"))
        if parquet:
            return datasets.load_dataset("parquet", data_files=parquet, split="train")
    raise ExperimentError(
        f"{path} holds no dataset: expected a save_to_disk directory or parquet file(s)")


def load_local_dataset(path: Path):
    """A save_to_disk directory (Dataset or DatasetDict, taking `train`), or parquet file(s); a
    damaged one (half-copied, not really parquet) is a user error naming what is wrong."""
    import datasets
    from datasets.exceptions import DatasetGenerationError
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own multi-line log of the error below
    try:
        return _load_local_dataset(path)
    except (pa.ArrowInvalid, FileNotFoundError, json.JSONDecodeError) as err:
        raise ExperimentError(f"{path} cannot be read as a dataset ({type(err).__name__}: {brief(err)}); "
                              "it may be damaged or half-copied: copy or save it again") from None
    except DatasetGenerationError as err:  # parquet files that are not one table
        raise ExperimentError(f"the parquet files of {path} cannot be read as one table ({brief(err.__cause__ or err)}); "
                              "keep only files with the same columns and types there") from None
    finally:
        datasets.logging.set_verbosity(verbosity)


def dataset_short_name(spec: str) -> str:
    """Preset name, or the last component of a path (`.` and `..` resolved) or hub id (never a whole path)."""
    path = Path(spec.rstrip("/\\"))
    name = Path(os.path.abspath(path)).name if os.path.lexists(path) else path.name
    name = name or "root"
    return Path(name).stem if name.endswith(".parquet") else name


def load_experiment_dataset(cfg: Config, ranks: Ranks = Ranks()) -> LoadedDataset:
    """Resolve --dataset to a Dataset: sanity-check, preset, local path, then hub id.  A table built here
    (generated, or from a folder of adapters) is built once however many processes ask (see building);
    rank 0 alone exports it."""
    spec, warnings, answer = cfg.dataset, [], None
    if spec == SANITY_CHECK:
        path = write_sanity_check_dataset(Path(cfg.data_dir), rows=cfg.sanity_rows)
        ds, source = load_local_dataset(path), f"generated {SANITY_CHECK} ({cfg.sanity_rows} rows)"
        answer = json.loads((path / "answer.json").read_text())  # reported beside the results
    elif spec in HUB_PRESETS:
        ds, source = load_hub_dataset(HUB_PRESETS[spec]), HUB_PRESETS[spec]
    elif Path(spec).exists() and is_adapter_folder(Path(spec)):
        table, label_source = build_adapter_table(Path(spec), Path(cfg.cache_dir), cfg.labels and Path(cfg.labels),
                                                  cfg.num_workers, cfg.skip_mismatched)
        print(f"adapters in {spec}: labels from {label_source}")
        if cfg.export_dataset and ranks.rank == 0:
            print(f"exported the table to {export_dataset(table, Path(cfg.export_dataset))}")
        ds, source = load_local_dataset(table), f"folder of adapters (labels: {label_source})"
        warnings = skipped_adapter_warnings(table)
    elif Path(spec).exists():
        ds, source = load_local_dataset(Path(spec)), "local path"
    elif os.path.islink(spec):
        raise ExperimentError(f"--dataset: {unreadable(Path(spec), FileNotFoundError())}; fix the link")
    elif HUB_ID.fullmatch(spec):
        ds, source = load_hub_dataset(spec), spec
    else:
        raise ExperimentError(
            f"--dataset {spec!r} is neither a preset ({', '.join([*HUB_PRESETS, SANITY_CHECK])}), "
            "an existing path, nor a hub id owner/name")
    if cfg.export_dataset and "folder of adapters" not in source:
        raise ExperimentError("--export-dataset saves the table built from a folder of adapters; "
                              f"{spec} already is a dataset")
    if ds._indices is not None:  # the Arrow table ignores an indices mapping: materialise it
        ds = ds.flatten_indices()
    return LoadedDataset(ds, dataset_short_name(spec), source, dataset_fingerprint(ds, Path(cfg.cache_dir)), warnings,
                         answer)


# --- the split -------------------------------------------------------------------------------

def split_indices(num_rows: int) -> dict[str, np.ndarray]:
    """Row indices of train (70%), val (~10%) and test (~20%), exactly as the published split."""
    from datasets import Dataset
    rows = Dataset.from_dict({"row": np.arange(num_rows)})
    try:
        first = rows.train_test_split(test_size=0.3, seed=SPLIT_SEED)
        second = first["test"].train_test_split(test_size=0.67, seed=SPLIT_SEED)
    except ValueError as err:
        raise ExperimentError(f"{num_rows} rows are too few to split 70/10/20 ({err}); use a larger dataset") from None
    return {"train": np.asarray(first["train"]["row"]),
            "val": np.asarray(second["train"]["row"]),
            "test": np.asarray(second["test"]["row"])}


# --- labels and layers -----------------------------------------------------------------------

@dataclass
class Labels:
    codes: np.ndarray           # (rows,) int64 in [0, num_classes), -1 for a row without a label
    class_names: list[str]      # name of each code
    mapping: dict | None        # original label -> code, when labels were not already 0..K-1

    @property
    def unlabeled(self) -> int:
        return int((self.codes < 0).sum())


def label_values(ds, column: str) -> tuple[np.ndarray, np.ndarray]:
    """The label column's values, and which rows have one (not None, not NaN); a column of lists,
    dicts or matrices holds no class per adapter and is refused."""
    if column not in ds.column_names:
        candidates = [c for c in ds.column_names if not LORA_COLUMN.fullmatch(c)]
        raise ExperimentError(f"label column {column!r} not found; pass --label-column with one of: "
                              + (", ".join(candidates[:10]) or "(no non-tensor columns)"))
    chunked = ds.data.table.column(column)
    if pa.types.is_dictionary(chunked.type):
        chunked = chunked.cast(chunked.type.value_type)
    if pa.types.is_nested(chunked.type) or isinstance(chunked.type, pa.ExtensionType):
        raise ExperimentError(f"label column {column!r} holds {chunked.type} values, not one class per adapter; "
                              "pass --label-column naming a column of integers or strings")
    values = chunked.to_numpy(zero_copy_only=False)  # a null becomes None, or NaN in a numeric column
    labeled = ~chunked.is_null(nan_is_null=True).to_numpy(zero_copy_only=False)
    if pa.types.is_string(chunked.type) or pa.types.is_large_string(chunked.type):  # "" or " " names no class
        labeled &= ~pc.equal(pc.utf8_trim_whitespace(chunked), "").fill_null(False).to_numpy(zero_copy_only=False)
    return values, labeled


def encode_labels(ds, column: str, drop_unlabeled: bool = False) -> Labels:
    """Class codes of every row.  Rows without a label are refused, or coded -1 with drop_unlabeled;
    integer labels read as floats (a column holding nulls) are integers again."""
    if ds._indices is not None:  # read through the Arrow table, which ignores an indices mapping
        ds = ds.flatten_indices()
    values, labeled = label_values(ds, column)
    missing = int((~labeled).sum())
    if missing and not drop_unlabeled:
        raise ExperimentError(f"{missing} of {len(values)} rows have no label in {column!r} (None, NaN or blank); "
                              "label them, or pass --drop-unlabeled to leave them out")
    present = values[labeled]
    if present.dtype.kind == "f" and np.array_equal(present, np.round(present)):
        present = present.astype(np.int64)
    classes, codes = np.unique(present, return_inverse=True)
    is_contiguous_int = np.issubdtype(classes.dtype, np.integer) and np.array_equal(classes, np.arange(len(classes)))
    mapping = None if is_contiguous_int else {str(v): i for i, v in enumerate(classes.tolist())}
    names = [str(v) for v in classes.tolist()]
    if "category_name" in ds.column_names and column != "category_name":
        named = ds.data.table.column("category_name").to_numpy(zero_copy_only=False)[labeled]
        names = [str(named[np.argmax(codes == i)]) for i in range(len(classes))]
    all_codes = np.full(len(values), -1, dtype=np.int64)
    all_codes[labeled] = codes
    return Labels(all_codes, names, mapping)


def labeled_splits(labels: Labels) -> dict[str, np.ndarray]:
    """The published split over the labelled rows (all rows, unless some were dropped), as table rows."""
    rows = np.flatnonzero(labels.codes >= 0)
    return {split: rows[idx] for split, idx in split_indices(len(rows)).items()}


def missing_classes(labels: Labels, splits: dict[str, np.ndarray]) -> dict[str, list[str]]:
    """For each split, the classes it holds no example of."""
    missing = {}
    for split, idx in splits.items():
        absent = sorted(set(range(len(labels.class_names))) - set(np.unique(labels.codes[idx]).tolist()))
        if absent:
            missing[split] = [labels.class_names[c] for c in absent]
    return missing


@dataclass(frozen=True)
class Module:
    """One LoRA module: its down and/or up tensor columns (pairs stay together)."""

    name: str
    columns: tuple[str, ...]

    @property
    def down(self) -> str | None:
        return next((c for c in self.columns if c.endswith(".lora.down.weight")), None)

    @property
    def up(self) -> str | None:
        return next((c for c in self.columns if c.endswith(".lora.up.weight")), None)


def refuse_duplicate_modules(names: list[str]) -> None:
    """`unet.X` and `X` are one module saved twice; counted as two, every layer count and feature
    dimension would be wrong."""
    seen = {}
    for name in sorted(names):
        other = seen.setdefault(unwrapped_name(name), name)
        if other != name:
            raise ExperimentError(f"columns of {other} and {name} are the same LoRA module under two names; "
                                  "keep one of them in the dataset")


def lora_modules(column_names: list[str]) -> list[Module]:
    """LoRA tensor columns found by name, grouped into modules, sorted."""
    by_module = defaultdict(list)
    for col in column_names:
        match = LORA_COLUMN.fullmatch(col)
        if match:
            by_module[match["module"]].append(col)
    if not by_module:
        raise ExperimentError(
            "no LoRA columns (names ending in .lora.down.weight / .lora.up.weight) found; columns: "
            + ", ".join(column_names[:6]) + (" ..." if len(column_names) > 6 else ""))
    refuse_duplicate_modules(list(by_module))
    return [Module(m, tuple(sorted(cols))) for m, cols in sorted(by_module.items())]


def sample_modules(modules: list[Module], fraction: float, seed: int) -> list[Module]:
    """A seeded sample of modules; down/up pairs stay together and every group uses this one sample."""
    if fraction >= 1.0:
        return modules
    keep = max(1, round(fraction * len(modules)))
    chosen = np.random.default_rng(seed).choice(len(modules), size=keep, replace=False)
    return [modules[i] for i in sorted(chosen)]


BUILTIN_GROUP_PATTERNS = {"all": None, "visual": r"\.attn1\.", "text": r"\.attn2\."}


def group_factor(name: str) -> tuple[str, str | None]:
    """(module group, factor or None for both) of a group's name: up -> (all, up), visual:up -> (visual, up)."""
    if name in FACTORS:
        return "all", name
    base, _, factor = name.rpartition(":")
    return (base, factor) if base and factor in FACTORS else (name, None)


def factor_only(modules: list[Module], factor: str | None) -> list[Module]:
    """The modules with only one factor's tensor kept (None: both): per-tensor representations then
    describe that factor alone, and pair representations find nothing to describe."""
    if factor is None:
        return modules
    return [Module(m.name, (getattr(m, factor),)) for m in modules if getattr(m, factor)]


def group_pattern(name: str, custom: tuple[tuple[str, str], ...]) -> str | None:
    """The regex a group's modules match (None: every module)."""
    patterns = {**BUILTIN_GROUP_PATTERNS, **dict(custom)}
    return patterns[name] if name in patterns else patterns[group_factor(name)[0]]


def layer_groups(modules: list[Module], names: tuple[str, ...],
                 custom: tuple[tuple[str, str], ...] = ()) -> dict[str, list[Module]]:
    """Each requested group's modules: visual = self-attention (attn1), text = cross-attention (attn2),
    a custom group = modules whose name matches its regex; with a factor, that factor's tensors alone."""
    groups = {}
    for name in names:
        pattern = group_pattern(name, custom)
        selected = [m for m in modules if pattern is None or re.search(pattern, m.name)]
        groups[name] = factor_only(selected, group_factor(name)[1])
    return groups


# SD UNet attention blocks: down_blocks.i.attentions.j, mid_block.attentions.j, up_blocks.i.attentions.j
UNET_BLOCK = re.compile(r"(?:.*\.)?(?P<block>(?:down|up)_blocks\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+)\.(?P<rest>.+)")
UNET_BLOCK_ORDER = ("down_blocks", "mid_block", "up_blocks")  # the order activations pass through them
PROJECTION_ORDER = ("to_q", "to_k", "to_v", "to_out", "q_proj", "k_proj", "v_proj", "o_proj", "out_proj")


def module_place(name: str) -> tuple[str, str]:
    """(block, position in the block) of a module: an SD attention block and the rest of the path
    (transformer_blocks.0.attn1.to_q), or for any other architecture the path up to its last numbered
    component (model.layers.3) and the rest (self_attn.q_proj)."""
    match = UNET_BLOCK.fullmatch(name)
    if match:
        return match["block"], match["rest"]
    parts = name.split(".")
    numbered = [i for i, part in enumerate(parts[:-1]) if part.isdigit()]
    cut = numbered[-1] + 1 if numbered else len(parts) - 1
    return ".".join(parts[:cut]) or parts[0], ".".join(parts[cut:])


def natural_key(text: str) -> list:
    """Sorts numbered names as numbers (blocks.2 before blocks.10)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text)]


def block_order_key(block: str) -> tuple:
    """Blocks in network order: SD down, mid, up blocks, then any other block by its numbered path."""
    rank = next((i for i, kind in enumerate(UNET_BLOCK_ORDER) if kind in block), len(UNET_BLOCK_ORDER))
    return rank, natural_key(block)


def position_order_key(position: str) -> list:
    """Positions in a block by path, projections as q, k, v, out rather than alphabetically."""
    return [(PROJECTION_ORDER.index(c) if c in PROJECTION_ORDER else len(PROJECTION_ORDER), natural_key(c))
            for c in position.split(".")]


def network_blocks(modules: list[Module]) -> dict[str, list[Module]]:
    """Modules by block, blocks in network order."""
    blocks = defaultdict(list)
    for m in modules:
        blocks[module_place(m.name)[0]].append(m)
    return {b: blocks[b] for b in sorted(blocks, key=block_order_key)}


MAP_LEVELS = ("modules", "blocks", "positions", "factors")  # a layer map's levels, as results.json names them


@dataclass(frozen=True)
class Probe:
    """What one classifier of a layer map reads alone, and where it sits: a module's down or up tensor or
    its pair, a block, a position (one attention type and projection, across blocks) or a factor."""

    place: tuple[tuple[str, str], ...]
    """(module, block, position, factor) as far as they apply, e.g. (("block", "mid_block.attentions.0"),)"""
    modules: tuple[Module, ...]

    @property
    def name(self) -> str:
        place = dict(self.place)
        return f"{place['module']}_{place['factor']}" if "module" in place else next(iter(place.values()))


def by_position(modules: list[Module]) -> dict[str, list[Module]]:
    """Modules by position in their block, positions in block order."""
    positions = defaultdict(list)
    for m in modules:
        positions[module_place(m.name)[1]].append(m)
    return {p: positions[p] for p in sorted(positions, key=position_order_key)}


MAX_LORA_SCALE = 1e4  # alpha / rank beyond this is no trained adapter: a corrupted or mislabelled column


def lora_scales(table: pa.Table) -> np.ndarray | None:
    """alpha / rank per adapter when the table records it (lora_scale): it scales the update up @ down.
    A missing, non-finite, non-positive or absurd scale would silently distort the pair representations: refused."""
    if "lora_scale" not in table.column_names:
        return None
    column = table.column("lora_scale")
    scales = column.to_numpy(zero_copy_only=False).astype(np.float64)
    bad = np.flatnonzero(column.is_null(nan_is_null=True).to_numpy(zero_copy_only=False)
                         | ~np.isfinite(scales) | (scales <= 0) | (scales > MAX_LORA_SCALE))
    if bad.size:
        raise ExperimentError(f"lora_scale of {bad.size} rows is missing or outside (0, {MAX_LORA_SCALE:g}] "
                              f"(row {bad[0]}: {scales[bad[0]]}); it must be alpha / rank of each adapter: "
                              "fix the column or remove it")
    return scales.astype(np.float32)


# =============================================================================================
# Representations: (N, rows, cols) matrices -> (N, F) features, batched, no loop over samples
# =============================================================================================

TOP_K = 10
QUANTILES_RANK_BASED = (0.01, 0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95, 0.99)
QUANTILES_DISTRIBUTION = (0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95)
HISTOGRAM_BINS = 50
GRAM_RELATIVE_FLOOR = 1e-5  # below s_max * this, Gram-derived singular values lose digits: use an SVD
SIGN_TIE_RELATIVE = 1e-6  # entries of a singular vector this close to its largest magnitude tie for pivot


def singular_values(matrices: torch.Tensor) -> torch.Tensor:
    """Exact singular values, descending, of a batch (N, a, b): (N, min(a, b)).

    For a low-rank factor the k x k Gram matrix (k = min(a, b)) holds them exactly as the
    square roots of its eigenvalues, at a fraction of an SVD's cost.  Forming it squares the
    condition number, so it is done in float64 and matrices whose smallest value is tiny
    relative to the largest are recomputed with a full SVD.
    """
    x = matrices.double()
    gram = x @ x.mT if x.shape[-2] <= x.shape[-1] else x.mT @ x
    values = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(-1)
    ill = values[:, -1] < GRAM_RELATIVE_FLOOR * values[:, 0]
    if ill.any():
        values[ill] = torch.linalg.svdvals(x[ill])
    return values.float()


def sort_rows(values: torch.Tensor) -> torch.Tensor:
    """Each row sorted ascending; on a CPU numpy's vectorised sort is about 10x torch.sort."""
    if values.device.type == "cpu":
        return torch.from_numpy(np.sort(values.numpy(), axis=1))
    return values.sort(dim=1).values


class MatrixBatch:
    """A batch of matrices with the intermediates several representations share, computed once."""

    def __init__(self, matrices: torch.Tensor):
        self.matrices = matrices

    @cached_property
    def flat(self) -> torch.Tensor:
        return self.matrices.flatten(1)

    @cached_property
    def mean(self) -> torch.Tensor:
        return self.flat.mean(1)

    @cached_property
    def centered(self) -> torch.Tensor:
        return self.flat - self.mean[:, None]

    @cached_property
    def std(self) -> torch.Tensor:
        # unbiased, as the original; from the shared centred values (torch.std is several times slower on a CPU)
        return (self.centered.square().sum(1) / max(self.flat.shape[1] - 1, 0)).sqrt()

    @cached_property
    def skew_kurtosis(self) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.centered / (self.std[:, None] + EPS)
        z2 = z.square()
        return (z2 * z).mean(1), z2.square().mean(1)

    @cached_property
    def min(self) -> torch.Tensor:
        return self.flat.amin(1)

    @cached_property
    def max(self) -> torch.Tensor:
        return self.flat.amax(1)

    @cached_property
    def sorted(self) -> torch.Tensor:
        return sort_rows(self.flat)

    def quantiles(self, qs: tuple[float, ...]) -> torch.Tensor:
        """Linearly interpolated quantiles from the sorted values (no torch.quantile size limit)."""
        n = self.sorted.shape[1]
        pos = torch.tensor(qs, dtype=torch.float64, device=self.flat.device) * (n - 1)
        lo = pos.floor().long()
        hi = (lo + 1).clamp_max(n - 1)
        frac = (pos - lo).to(self.sorted.dtype)
        low, high = self.sorted[:, lo], self.sorted[:, hi]
        return low + frac * (high - low)

    @cached_property
    def median(self) -> torch.Tensor:
        return self.sorted[:, (self.sorted.shape[1] - 1) // 2]  # the lower middle value

    @cached_property
    def singular_values(self) -> torch.Tensor:
        return singular_values(self.matrices)

    @cached_property
    def frobenius(self) -> torch.Tensor:
        return self.flat.square().sum(1).sqrt()

    @cached_property
    def fft_magnitude(self) -> torch.Tensor:
        spectrum = torch.view_as_real(torch.fft.fft2(self.matrices))
        return spectrum.square_().sum(-1).sqrt_().flatten(1)  # |z| without complex abs's slower hypot


class PairBatch:
    """A batch of LoRA modules: down (N, r, in) and up (N, out, r), the update being scale * up @ down
    (scale (N,), or None for 1).  The update is never formed: with up = Q_up R_up and
    down^T = Q_down R_down (QR, float64), up @ down = Q_up (R_up R_down^T) Q_down^T, so the SVD of
    the r x r core, mapped through the two Qs, is the update's."""

    def __init__(self, down: MatrixBatch, up: MatrixBatch, scale: torch.Tensor | None = None):
        self.down, self.up, self.scale = down, up, scale

    @cached_property
    def up_qr(self):
        """Q_up (N, out, r), R_up (N, r, r), float64."""
        return torch.linalg.qr(self.up.matrices.double())

    @cached_property
    def down_qr(self):
        """Q_down (N, in, r), R_down (N, r, r) of down^T, float64."""
        return torch.linalg.qr(self.down.matrices.double().mT)

    @cached_property
    def core(self) -> torch.Tensor:
        """(N, r, r) float64: R_up R_down^T, which has the singular values of up @ down (unscaled)."""
        return self.up_qr.R @ self.down_qr.R.mT

    @cached_property
    def delta_singular_values(self) -> torch.Tensor:
        """(N, r) float32: singular values of the update, descending, times |scale|.  From r x r matrices
        only, batched on any device (QR of a tall factor is a loop per matrix on CUDA): with
        up^T up = V_u L_u V_u^T and down down^T = V_d L_d V_d^T (float64), up = W_u L_u^1/2 V_u^T and
        down^T = W_d L_d^1/2 V_d^T for isometries W, so up @ down has the singular values of
        L_u^1/2 V_u^T V_d L_d^1/2.  A factor with eigenvalues below GRAM_RELATIVE_FLOOR^2 of its largest
        loses digits there: those pairs take the QR core instead."""
        up, down = self.up.matrices.double(), self.down.matrices.double()
        lu, vu = torch.linalg.eigh(up.mT @ up)
        ld, vd = torch.linalg.eigh(down @ down.mT)
        core = (lu.clamp_min(0).sqrt()[:, :, None] * vu.mT) @ (vd * ld.clamp_min(0).sqrt()[:, None, :])
        values = torch.linalg.svdvals(core)
        floor = GRAM_RELATIVE_FLOOR ** 2
        ill = (lu[:, 0] < floor * lu[:, -1]) | (ld[:, 0] < floor * ld[:, -1])  # eigh: ascending
        if ill.any():
            values[ill] = torch.linalg.svdvals(PairBatch(MatrixBatch(down[ill]), MatrixBatch(up[ill])).core)
        values = values.float()
        return values if self.scale is None else values * self.scale.abs()[:, None]


def top_k_padded(values: torch.Tensor, k: int = TOP_K) -> torch.Tensor:
    """The first k columns of descending values, zero-padded to k."""
    top = values[:, :k]
    return F.pad(top, (0, k - top.shape[1]))


def spectrum_features(values: torch.Tensor) -> torch.Tensor:
    """32 features of a descending spectrum (N, k): top-10 values (zero-padded); the same divided
    by their sum; 9 relative gaps (s_i - s_i+1)/s_i; entropy of the normalised values; condition
    number over the true values (at most 10); nuclear norm (sum of all values)."""
    top = top_k_padded(values)
    normalised = top / (top.sum(1, keepdim=True) + EPS)
    gaps = (top[:, :-1] - top[:, 1:]) / (top[:, :-1] + EPS)
    entropy = -(normalised * torch.log(normalised + EPS)).sum(1)
    true_top = values[:, :TOP_K]
    condition = true_top[:, 0] / (true_top[:, -1] + EPS)  # corrected: the original divided by padding
    nuclear = values.sum(1)
    return torch.cat([top, normalised, gaps, entropy[:, None], condition[:, None], nuclear[:, None]], 1)


def simple_stats(b: MatrixBatch) -> torch.Tensor:
    """5: Frobenius norm, mean, std, max, min."""
    return torch.stack([b.frobenius, b.mean, b.std, b.max, b.min], 1)


def rank_based(b: MatrixBatch) -> torch.Tensor:
    """11: quantiles 1, 5, 10, 25, 50, 75, 90, 95, 99 %; IQR (75-25); range (99-1)."""
    q = b.quantiles(QUANTILES_RANK_BASED)
    return torch.cat([q, (q[:, 5] - q[:, 3])[:, None], (q[:, 8] - q[:, 0])[:, None]], 1)


def stats(b: MatrixBatch) -> torch.Tensor:
    """7: mean, std, median (lower middle), min, max, skewness, kurtosis."""
    skew, kurt = b.skew_kurtosis
    return torch.stack([b.mean, b.std, b.median, b.min, b.max, skew, kurt], 1)


def spectral(b: MatrixBatch) -> torch.Tensor:
    """32: spectrum_features of the matrix's singular values."""
    return spectrum_features(b.singular_values)


def matrix_norms(b: MatrixBatch) -> torch.Tensor:
    """7: Frobenius, nuclear, spectral, max column abs-sum, max row abs-sum, nuclear/Frobenius, spectral/Frobenius."""
    sv = b.singular_values
    nuclear, spectral_norm = sv.sum(1), sv[:, 0]
    absolute = b.matrices.abs()
    max_col = absolute.sum(1).max(1).values
    max_row = absolute.sum(2).max(1).values
    fro = b.frobenius
    return torch.stack([fro, nuclear, spectral_norm, max_col, max_row, nuclear / (fro + EPS), spectral_norm / (fro + EPS)], 1)


def distribution(b: MatrixBatch) -> torch.Tensor:
    """12: quantiles 5, 10, 25, 50, 75, 90, 95 %; IQR; mean absolute deviation; std/|mean|; skewness; kurtosis."""
    q = b.quantiles(QUANTILES_DISTRIBUTION)
    mad = (b.flat - b.mean[:, None]).abs().mean(1)
    cv = b.std / (b.mean.abs() + EPS)
    skew, kurt = b.skew_kurtosis
    return torch.cat([q, torch.stack([q[:, 4] - q[:, 2], mad, cv, skew, kurt], 1)], 1)


def frequency(b: MatrixBatch) -> torch.Tensor:
    """14: 2-D FFT magnitudes: top 10 (zero-padded), mean, std, max, share of energy in the top 10."""
    mag = MatrixBatch(b.fft_magnitude)
    top = top_k_padded(mag.sorted[:, -TOP_K:].flip(1))
    energy_share = top.square().sum(1) / (mag.flat.square().sum(1) + EPS)
    return torch.cat([top, torch.stack([mag.mean, mag.std, mag.max, energy_share], 1)], 1)


def flat_vec(b: MatrixBatch) -> torch.Tensor:
    """rows*cols: the raw weights, row-major."""
    return b.flat


def info_theoretic(b: MatrixBatch) -> torch.Tensor:
    """2: entropy of a 50-bin histogram over [min, max]; that entropy / ln 50."""
    # bin k holds edge_k <= x < edge_k+1 (the last bin also holds the max), as numpy.histogram:
    # counted from the sorted values by searching the 49 inner edges
    steps = torch.arange(1, HISTOGRAM_BINS, device=b.flat.device, dtype=torch.float64) / HISTOGRAM_BINS
    lo, hi = b.min[:, None].double(), b.max[:, None].double()
    edges = (lo + (hi - lo) * steps).to(b.sorted.dtype)
    below = torch.searchsorted(b.sorted, edges)  # values below each inner edge
    n = b.flat.shape[1]
    cumulative = F.pad(below, (1, 0), value=0)
    counts = torch.diff(F.pad(cumulative, (0, 1), value=n), dim=1)
    p = counts.to(b.flat.dtype) / n
    entropy = -torch.special.xlogy(p, p).sum(1)
    return torch.stack([entropy, entropy / math.log(HISTOGRAM_BINS)], 1)


def ensemble(b: MatrixBatch) -> torch.Tensor:
    """67: spectral (32) + matrix_norms (7) + distribution (12) + frequency (14) + info_theoretic (2)."""
    return torch.cat([spectral(b), matrix_norms(b), distribution(b), frequency(b), info_theoretic(b)], 1)


def delta_spectral(p: PairBatch) -> torch.Tensor:
    """32: spectrum_features of the singular values of the weight update up @ down (times its scale)."""
    return spectrum_features(p.delta_singular_values)


def pivot_signs(u: torch.Tensor) -> torch.Tensor:
    """(N, k): the sign of each column's pivot in u (N, m, k), the first entry (lowest row index)
    whose magnitude is within SIGN_TIE_RELATIVE of the column's largest; +1 for a zero pivot.
    An exact argmax would let rounding choose between entries that are equal in exact arithmetic
    (structured factors), so the sign would depend on how the update was factorised."""
    magnitude = u.abs()
    near_largest = magnitude >= (1 - SIGN_TIE_RELATIVE) * magnitude.amax(1, keepdim=True)
    first = near_largest.to(torch.uint8).argmax(1, keepdim=True)  # argmax returns the first of equal maxima
    pivot = u.gather(1, first).squeeze(1)
    return torch.where(pivot < 0, -1.0, 1.0).to(u.dtype)


def delta_canonical(p: PairBatch) -> torch.Tensor:
    """(out + in) * r: the canonical factors of the weight update scale * up @ down = U S V^T (its
    thin SVD, S descending, |scale| folded into S): U S^1/2 row-major (out x r: row i holds the r
    pairs' entries i), then sign(scale) V S^1/2 row-major (in x r), so the first part times the
    second transposed is the update.  Each pair's sign makes the pivot of its U column positive
    (pivot_signs).  Unchanged by up -> up G^-1, down -> G down (any invertible G, sign flips of a
    pair included) where the singular values are distinct; equal ones leave their vectors free up
    to a rotation, and a pair whose singular value is zero is all zeros."""
    u_core, values, v_core_t = torch.linalg.svd(p.core, full_matrices=False)
    u = p.up_qr.Q @ u_core
    v = p.down_qr.Q @ v_core_t.mT
    # the scale enters after the shared, unscaled decomposition (delta_spectral reads it too); a
    # negative one flips V rather than U, so U keeps the sign convention
    scale = torch.ones_like(values[:, 0]) if p.scale is None else p.scale.to(values)
    u_weights = (values * scale.abs()[:, None]).sqrt() * pivot_signs(u)
    v_weights = u_weights * scale.sign()[:, None]
    return torch.cat([(u * u_weights[:, None]).flatten(1), (v * v_weights[:, None]).flatten(1)], 1).float()


# The registry: name -> (function, the batch it reads: a MatrixBatch of single LoRA tensors, or a
# PairBatch of modules' down and up factors).  A new representation is a function above and a line here;
# --representations, extraction, the cache and the reports take their names from it.
REPRESENTATIONS: dict[str, tuple[Callable[..., torch.Tensor], type]] = {
    "simple_stats": (simple_stats, MatrixBatch),
    "rank_based": (rank_based, MatrixBatch),
    "stats": (stats, MatrixBatch),
    "spectral": (spectral, MatrixBatch),
    "matrix_norms": (matrix_norms, MatrixBatch),
    "distribution": (distribution, MatrixBatch),
    "frequency": (frequency, MatrixBatch),
    "flat_vec": (flat_vec, MatrixBatch),
    "info_theoretic": (info_theoretic, MatrixBatch),
    "ensemble": (ensemble, MatrixBatch),
    "delta_spectral": (delta_spectral, PairBatch),
    "delta_canonical": (delta_canonical, PairBatch),
}
MATRIX_REPRESENTATIONS = {name: f for name, (f, batch) in REPRESENTATIONS.items() if batch is MatrixBatch}
PAIR_REPRESENTATIONS = {name: f for name, (f, batch) in REPRESENTATIONS.items() if batch is PairBatch}


# =============================================================================================
# Feature extraction and cache
# =============================================================================================

def referenced_names(code) -> set[str]:
    """Global and attribute names a code object uses, nested functions and comprehensions included."""
    names = set(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            names |= referenced_names(const)
    return names


@functools.cache
def code_fingerprint(function) -> str:
    """A hash of the source of a function and of everything of this script it reads: the functions
    it calls, the members of the batch classes it uses, the constants it reads (transitively).  Part
    of the cache key, so editing a representation (or a constant it uses, such as the Gram floor)
    recomputes exactly the representations that depend on it."""
    script = sys.modules[function.__module__]
    members = {name: getattr(member, "func", member) for cls in (MatrixBatch, PairBatch)
               for name, member in vars(cls).items() if callable(getattr(member, "func", member))}
    parts, seen, todo = [], set(), [function]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        parts.append(inspect.getsource(current))
        for name in sorted(referenced_names(current.__code__)):
            value = vars(script).get(name)
            if name in members:
                todo.append(members[name])
            if inspect.isfunction(value) and value.__module__ == script.__name__:
                todo.append(value)
            elif inspect.isclass(value) and value.__module__ == script.__name__ and inspect.isfunction(value.__init__):
                todo.append(value.__init__)
            elif isinstance(value, (int, float, str, tuple)):
                parts.append(f"{name} = {value!r}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


class CacheError(Exception):
    """A cache file that cannot be trusted (unreadable, truncated, tampered)."""


class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and bytes only: any class or function reference is refused,
    so a tampered file cannot run code."""

    def find_class(self, module, name):
        raise CacheError(f"refers to {module}.{name}, which a feature cache file never does")


class FeatureCache:
    """Per-(unit, representation) feature arrays as .pkl files holding only plain data plus a checksum."""

    def __init__(self, directory: Path, durable: bool = True):
        self.directory = directory
        self.durable = durable  # fsync before the rename, so a crash never leaves a torn file
        self.in_memory: dict[Path, np.ndarray] = {}  # arrays whose file could not be written (disk full)

    def path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return self.directory / f"{digest}.pkl"

    def exists(self, key: dict) -> bool:
        path = self.path(key)
        return path in self.in_memory or path.is_file()

    def load(self, key: dict) -> np.ndarray | None:
        path = self.path(key)
        if path in self.in_memory:
            return self.in_memory[path]
        if not path.exists():
            return None
        try:
            payload = _DataOnlyUnpickler(io.BytesIO(path.read_bytes())).load()
            if not isinstance(payload, dict) or payload.get("key") != key:
                raise CacheError("holds another entry")
            data = payload["data"]
            if hashlib.sha256(data).hexdigest() != payload["sha256"]:
                raise CacheError("checksum mismatch")
            return np.frombuffer(data, dtype=payload["dtype"]).reshape(payload["shape"]).copy()
        except OSError as err:  # e.g. a directory where the file should be: left alone
            tqdm.write(f"warning: cache file {path} cannot be read ({err.strerror or err}); recomputing")
            return None
        except (CacheError, pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as err:
            tqdm.write(f"warning: cache file {path.name} is unusable ({err}); removing it and recomputing")
            path.unlink(missing_ok=True)
            return None

    def save(self, key: dict, array: np.ndarray) -> None:
        """Write the array; when that fails (disk full, a directory in the way) keep it in memory for
        this run and say so once: the run goes on, only later runs lose the cache."""
        try:
            self._write(key, array)
        except OSError as err:
            if not self.in_memory:
                tqdm.write(f"warning: cannot write feature files to {self.directory} ({err.strerror or err}); "
                           "keeping features in memory for this run, nothing more is cached")
            self.in_memory[self.path(key)] = np.array(array)

    def _write(self, key: dict, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        data = array.tobytes()
        payload = {"key": key, "dtype": array.dtype.str, "shape": array.shape,
                   "sha256": hashlib.sha256(data).hexdigest(), "data": data}
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path(key), lambda f: pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL), self.durable)


NONFINITE = "nonfinite_count"  # per row, the NaN/Inf values of a column: stored like a representation
SHAPES = "matrix_shapes"  # per column of the table, its checked (rows, cols), -1 where not checked yet


def nonfinite_per_row(weights: torch.Tensor) -> torch.Tensor:
    """(N, 1): the NaN/Inf values of each matrix."""
    return (~torch.isfinite(weights)).flatten(1).sum(1, keepdim=True)


def stored_code(kind: str) -> Callable:
    """The code behind each kind of stored array, whose fingerprint is part of its cache key."""
    if kind == NONFINITE:
        return nonfinite_per_row
    return column_shape if kind == SHAPES else REPRESENTATIONS[kind][0]


CHUNK_BYTES = 4 << 20  # weights per read on a CPU: amortises per-operation overhead, while the chunks in
                      # flight and the ~10 chunk-sized intermediates of the statistics stay small
CUDA_CHUNK_BYTES = 256 << 20  # on a GPU larger chunks keep it busy; halved on out-of-memory
MIN_CHUNK_BYTES = 1 << 20


class FeatureStore:
    """Features of every row of the table, (rows, F) per (unit, representation), where a unit is a
    column, or a module for pair representations.  Kept on disk, not in memory: in the cache
    directory with --cache-features, else in a temporary directory removed at exit.  flat_vec is
    the weights themselves, so it is read from the dataset when a group needs it, never stored."""

    def __init__(self, fingerprint: str, cache_dir: Path, persistent: bool, reader: WeightReader,
                 zero_nonfinite: bool):
        self.fingerprint, self.reader = fingerprint, reader
        self.shapes: dict[str, tuple[int, int]] = {}  # checked matrix shapes of the columns in use
        self.zero_nonfinite = zero_nonfinite
        self.nonfinite: dict[str, int] = {}  # column -> NaN/Inf values found in it
        self.nonfinite_features: dict[str, int] = {}  # "<representation> of <unit>" -> NaN/Inf features
        self.cache_dir = cache_dir
        self._scratch: tempfile.TemporaryDirectory | None = None
        self.cache = FeatureCache(cache_dir if persistent else self.scratch_dir(), durable=persistent)
        self.recompute = None  # (unit, representation) -> None, set by extract_features
        self._previous_raw: tuple[dict[str, int], weakref.ref] = ({}, lambda: None)  # column offsets, matrix
        self.computed = 0

    def scratch_dir(self) -> Path:
        """A temporary directory inside the cache directory, removed at exit."""
        if self._scratch is None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self._scratch = tempfile.TemporaryDirectory(dir=self.cache_dir, prefix="scratch-")
        return Path(self._scratch.name)

    def key(self, unit: str, representation: str, part: str = "features") -> dict:
        """Identifies stored features: the data, the unit, the representation, and the code that computes it."""
        return {"format": FEATURE_FORMAT_VERSION, "dataset": self.fingerprint, "unit": unit,
                "representation": representation, "code": code_fingerprint(stored_code(representation)),
                "part": part}

    def checked_shapes(self, columns: list[str]) -> dict[str, tuple[int, int]]:
        """Every column's matrix shape, checked to be the same in every row; the check reads every
        row's list offsets, so its result is cached with the features."""
        key = self.key("columns", SHAPES)
        cached = self.cache.load(key)
        known = {} if cached is None else {c: (int(r), int(k)) for c, (r, k) in zip(self.reader.table.column_names, cached)
                                           if r >= 0}
        if all(c in known for c in columns):
            return {c: known[c] for c in columns}
        known.update({c: self.reader.column_shape(c) for c in columns if c not in known})
        names = self.reader.table.column_names
        self.cache.save(key, np.array([known.get(c, (-1, -1)) for c in names], dtype=np.int64))
        return {c: known[c] for c in columns}

    def has(self, unit: str, representation: str) -> bool:
        """True when a file holds these features; it is validated when read (get)."""
        return self.cache.exists(self.key(unit, representation))

    def count_nonfinite(self, columns: list[str]) -> None:
        """Total the stored per-row NaN/Inf counts of these columns (computed or cached alike), and
        refuse them unless they are to be zeroed."""
        for column in columns:
            count = int(self.get(column, NONFINITE).sum())
            if count:
                self.nonfinite[column] = count
        if self.nonfinite and not self.zero_nonfinite:
            total = sum(self.nonfinite.values())
            listed = ", ".join(f"{c} ({n})" for c, n in sorted(self.nonfinite.items())[:5])
            more = f" and {len(self.nonfinite) - 5} more" if len(self.nonfinite) > 5 else ""
            raise ExperimentError(f"the weights hold {total} NaN/Inf values in {len(self.nonfinite)} columns: "
                                  f"{listed}{more}; fix the dataset or pass --allow-nonfinite to zero them")

    def count_nonfinite_features(self, units: list[tuple[str, str]]) -> None:
        """Features can overflow where weights are finite (|w| ~ 1e30 squares past float32): their
        stored NaN/Inf counts are totalled per (unit, representation) and refused unless zeroed."""
        for unit, representation in units:
            if self.cache.exists(self.key(unit, representation, "nonfinite")):
                count = int(self.get(unit, representation, "nonfinite").sum())
                self.nonfinite_features[f"{representation} of {unit}"] = count
        if self.nonfinite_features and not self.zero_nonfinite:
            listed = ", ".join(f"{name} ({n})" for name, n in list(self.nonfinite_features.items())[:3])
            more = f" and {len(self.nonfinite_features) - 3} more" if len(self.nonfinite_features) > 3 else ""
            raise ExperimentError(f"features overflow to NaN/Inf although the weights are finite: {listed}{more}; "
                                  "the weights are too large for float32 arithmetic: rescale the dataset, leave "
                                  "those representations out, or pass --allow-nonfinite to zero those values")

    def put(self, unit: str, representation: str, array: np.ndarray) -> None:
        """Store features with NaN/Inf zeroed and counted: the count decides whether they may be used.
        A count is stored only when it is not zero, and before the features, so stored features
        without a count file have none."""
        bad = ~np.isfinite(array)
        if bad.any():
            array[bad] = 0
            self.cache.save(self.key(unit, representation, "nonfinite"), np.array([bad.sum()]))
        self.cache.save(self.key(unit, representation), array)
        self.computed += 1

    def get(self, unit: str, representation: str, part: str = "features") -> np.ndarray:
        """The features (or their NaN/Inf count), read and checked; a file found unusable (reported and
        removed by the cache) is recomputed from the weights at once, and its NaN/Inf refused or
        recorded as extraction's are."""
        array = self.cache.load(self.key(unit, representation, part))
        if array is None and self.recompute is not None:
            self.recompute(unit, representation)
            if representation == NONFINITE:
                self.count_nonfinite([unit])
            else:
                self.count_nonfinite_features([(unit, representation)])
            array = self.cache.load(self.key(unit, representation, part))
        if array is None:
            raise ExperimentError(f"features of {unit} ({representation}) cannot be read back from "
                                  f"{self.cache.directory}; is another process changing it? Run again")
        return array

    def empty_matrix(self, width: int, memory_limit: int | None = None) -> np.ndarray:
        """A float32 (rows of the table, width) matrix to fill: in memory, or a memory-mapped scratch
        file when larger than half the available memory (or memory_limit)."""
        n = self.reader.table.num_rows
        limit = free_memory_bytes(torch.device("cpu")) // 2 if memory_limit is None else memory_limit
        if 4 * n * width <= limit:
            return np.empty((n, width), dtype=np.float32)
        path = Path(tempfile.mkstemp(dir=self.scratch_dir(), suffix=".npy")[1])
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, width))

    def raw_weights(self, columns: list[str], memory_limit: int | None = None) -> np.ndarray:
        """flat_vec: the columns' weights side by side, (rows, sum of rows*cols), read chunk by chunk;
        a matrix larger than half the available memory (or memory_limit) is a memory-mapped file.
        Columns of the previous matrix, while its caller still holds it (the visual group right
        after all layers), are copied from it instead of being read again."""
        widths = [math.prod(self.shapes[c]) for c in columns]
        previous_offsets, previous_ref = self._previous_raw
        previous = previous_ref()
        n = self.reader.table.num_rows
        out = self.empty_matrix(sum(widths), memory_limit)
        offset = 0
        for column, width in zip(columns, widths):
            if previous is not None and column in previous_offsets:
                start = previous_offsets[column]
                out[:, offset:offset + width] = previous[:, start:start + width]
                offset += width
                continue
            rows = max(1, CHUNK_BYTES // (4 * width))
            buffer = np.empty((rows, width), dtype=np.float32)
            for start in range(0, n, rows):
                stop = min(start + rows, n)
                self.reader.read(column, start, stop, buffer[:stop - start])
                out[start:stop, offset:offset + width] = buffer[:stop - start]
                # counted during extraction and refused there unless --allow-nonfinite
                np.nan_to_num(out[start:stop, offset:offset + width], copy=False, nan=0.0, posinf=0.0, neginf=0.0)
            offset += width
        self._previous_raw = (dict(zip(columns, np.cumsum([0] + widths[:-1]).tolist())), weakref.ref(out))
        return out


@dataclass
class ChunkTask:
    """Rows [start, stop) of one module's columns, and the features to compute from them."""

    module: Module
    columns: list[str]
    todo: list[tuple[str, str]]
    start: int
    stop: int
    last: bool  # the module's final chunk: its features are complete after it


def pending_work(store: FeatureStore, modules: list[Module], representations: tuple[str, ...]):
    """For each module, the (unit, representation) features not yet in the store; every column's
    NaN/Inf count is one of them, so every run knows it, even one that computes nothing else."""
    matrix_reps = [NONFINITE] + [r for r in representations if r in MATRIX_REPRESENTATIONS and r != "flat_vec"]
    pair_reps = [r for r in representations if r in PAIR_REPRESENTATIONS]
    for module in modules:
        todo = [(col, rep) for col in module.columns for rep in matrix_reps if not store.has(col, rep)]
        if module.down and module.up:
            todo += [(module.name, rep) for rep in pair_reps if not store.has(module.name, rep)]
        if todo:
            yield module, todo


def chunk_tasks(work, num_rows: int, shapes: dict[str, tuple[int, int]], chunk_bytes: int) -> list[ChunkTask]:
    """Split each module's pending work into row chunks of about chunk_bytes of weights."""
    tasks = []
    for module, todo in work:
        needs_pair = any(unit == module.name for unit, _ in todo)
        columns = [c for c in module.columns if needs_pair or any(unit == c for unit, _ in todo)]
        rows = max(1, chunk_bytes // (4 * sum(math.prod(shapes[c]) for c in columns)))
        for start in range(0, num_rows, rows):
            stop = min(start + rows, num_rows)
            tasks.append(ChunkTask(module, columns, todo, start, stop, last=stop == num_rows))
    return tasks


class ChunkLoader:
    """Reads chunk tasks ahead of the computation into a ring of reusable buffers: with
    --num-workers > 0 a pool of threads reads (pread releases the GIL, so reads overlap each other
    and the compute); on CUDA the buffers are pinned, so copies to the device are asynchronous."""

    def __init__(self, reader: WeightReader, tasks: list[ChunkTask], shapes: dict[str, tuple[int, int]],
                 workers: int, device: torch.device):
        self.reader, self.tasks, self.shapes, self.device = reader, tasks, shapes, device
        self.depth = workers + 1
        slot_floats = max((sum(math.prod(shapes[c]) for c in t.columns) * (t.stop - t.start) for t in tasks), default=0)
        pinned = device.type == "cuda"
        self.slots = [torch.empty(slot_floats, pin_memory=pinned) for _ in range(self.depth + 1)]
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="reader") if workers else None

    def _read(self, task: ChunkTask, slot: int) -> dict[str, torch.Tensor]:
        views, offset = {}, 0
        n = task.stop - task.start
        for column in task.columns:
            size = n * math.prod(self.shapes[column])
            view = self.slots[slot][offset:offset + size].view(n, *self.shapes[column])
            self.reader.read(column, task.start, task.stop, view.numpy())
            views[column] = view
            offset += size
        return views

    def __iter__(self):
        """Yield (task, host tensors by column) in order; a slot is reused only once the caller has
        moved on and, on CUDA, its copy to the device has finished."""
        free, pending, copied = deque(range(len(self.slots))), deque(), {}
        remaining = iter(self.tasks)

        def submit() -> None:
            task = next(remaining, None)
            if task is None:
                return
            slot = free.popleft()
            if slot in copied:
                copied.pop(slot).synchronize()
            result = self.pool.submit(self._read, task, slot) if self.pool else self._read(task, slot)
            pending.append((task, slot, result))

        for _ in range(self.depth):
            submit()
        try:
            while pending:
                task, slot, result = pending.popleft()
                yield task, (result.result() if self.pool else result)
                if self.device.type == "cuda":
                    copied[slot] = torch.cuda.Event()
                    copied[slot].record()
                free.append(slot)
                submit()
        finally:
            if self.pool:
                self.pool.shutdown(cancel_futures=True)


def chunk_features(task: ChunkTask, host: dict[str, torch.Tensor], store: FeatureStore,
                   device: torch.device) -> dict[tuple[str, str], torch.Tensor]:
    """Every pending feature of one chunk, computed on the device from one read of each column."""
    weights = {c: t.to(device, non_blocking=True) for c, t in host.items()}
    counts = {c: nonfinite_per_row(w) for c, w in weights.items()}
    out = {(c, NONFINITE): counts[c] for c in weights if (c, NONFINITE) in task.todo}
    # representations see finite weights (linear algebra fails on Inf); the counts refuse the dataset
    # unless --allow-nonfinite, which keeps these zeros
    weights = {c: torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0) if counts[c].any() else w
               for c, w in weights.items()}
    batches = {c: MatrixBatch(w) for c, w in weights.items()}
    module = task.module
    scales = store.reader.scales
    scale = None if scales is None else torch.from_numpy(scales[task.start:task.stop]).to(device)
    pair = PairBatch(batches[module.down], batches[module.up], scale) if module.down in batches and module.up in batches else None
    for unit, rep in task.todo:
        if rep == NONFINITE:
            continue
        if rep in PAIR_REPRESENTATIONS:
            out[unit, rep] = PAIR_REPRESENTATIONS[rep](pair)
        else:
            out[unit, rep] = MATRIX_REPRESENTATIONS[rep](batches[unit])
    return out


def compute_pending(store: FeatureStore, work: list, cfg: Config, device: torch.device, chunk_bytes: int) -> None:
    """Read every pending module chunk by chunk and store its features once its last chunk is done."""
    tasks = chunk_tasks(work, store.reader.table.num_rows, store.shapes, chunk_bytes)
    parts: dict[tuple[str, str], list[torch.Tensor]] = defaultdict(list)
    tqdm.write(f"features: computing {len(work)} modules' missing features")
    with progress_bar(total=len(work), desc="features", unit="module") as progress:
        for task, host in ChunkLoader(store.reader, tasks, store.shapes, cfg.num_workers, device):
            for key, features in chunk_features(task, host, store, device).items():
                parts[key].append(features.float())
            if task.last:
                for key in task.todo:
                    store.put(*key, torch.cat(parts.pop(key)).cpu().numpy())
                progress.update()
            PROGRESS.beat()


def unit_columns(modules: list[Module], representation: str) -> list[tuple[str, tuple[str, ...]]]:
    """(store unit, the columns it is computed from) making up a representation for a set of modules, in order."""
    if representation in PAIR_REPRESENTATIONS:
        return [(m.name, (m.down, m.up)) for m in modules if m.down and m.up]
    return [(c, (c,)) for m in modules for c in m.columns]


def feature_units(modules: list[Module], representation: str) -> list[str]:
    """The store units whose features make up a representation for a set of modules, in order."""
    return [unit for unit, _ in unit_columns(modules, representation)]


def extraction_share(modules: list[Module], ranks: Ranks) -> set[str]:
    """The modules whose missing features this rank computes: every world-th of the selected modules, a
    list every rank holds alike (never what each rank happened to find cached), so each is one rank's."""
    return {module.name for module in modules[ranks.rank::ranks.world]}


def extract_features(loaded: LoadedDataset, modules: list[Module], cfg: Config, device: torch.device,
                     ranks: Ranks = Ranks()) -> FeatureStore:
    """Compute every requested representation of every selected module that the store lacks: one
    pass over the weights, each column read once, all representations from that read.  On CUDA
    out-of-memory the row chunk is halved and the pass goes on from the first unfinished module.
    Under torchrun each rank computes the pending features of every world-th selected module (the same
    list on every rank, whatever each finds cached) into the shared cache, then waits for the others."""
    reader = WeightReader(loaded.dataset)
    store = FeatureStore(loaded.fingerprint, Path(cfg.cache_dir), cfg.cache_features, reader,
                         zero_nonfinite=cfg.allow_nonfinite)
    store.shapes = store.checked_shapes([c for m in modules for c in m.columns])
    chunk_bytes = CUDA_CHUNK_BYTES if device.type == "cuda" else CHUNK_BYTES

    def recompute(unit: str, representation: str) -> None:
        module = next(m for m in modules if unit == m.name or unit in m.columns)
        compute_pending(store, [(module, [(unit, representation)])], cfg, device, chunk_bytes)
    store.recompute = recompute
    work = list(pending_work(store, modules, cfg.representations))
    requested = sum(len(feature_units(modules, r)) for r in cfg.representations if r != "flat_vec")
    requested += sum(len(m.columns) for m in modules)  # the NaN/Inf counts
    store.loaded = requested - sum(len(todo) for _, todo in work)
    share = extraction_share(modules, ranks)

    def compute_share(chunk: int) -> None:  # what is still pending: an attempt cut short kept what it finished
        pending = [(module, todo) for module, todo in pending_work(store, modules, cfg.representations)
                   if module.name in share]
        compute_pending(store, pending, cfg, device, chunk)
    halving_on_oom(compute_share, chunk_bytes, MIN_CHUNK_BYTES, device, "during feature extraction",
                   lambda chunk: f"{chunk >> 20} MB chunks")
    wait_for_ranks(ranks, "extracted")  # every rank's share is in the cache
    agreed(lambda: store.count_nonfinite([c for m in modules for c in m.columns]), ranks)
    agreed(lambda: store.count_nonfinite_features([(unit, r) for r in cfg.representations if r != "flat_vec"
                                                   for unit in feature_units(modules, r)]), ranks)
    return store


def unit_width(representation: str, shapes: list[tuple[int, int]]) -> int:
    """How many features one unit gives: the representation run on a zero matrix of each shape."""
    batches = [MatrixBatch(torch.zeros(1, *shape)) for shape in shapes]
    if representation in PAIR_REPRESENTATIONS:
        return PAIR_REPRESENTATIONS[representation](PairBatch(*batches)).shape[1]
    return MATRIX_REPRESENTATIONS[representation](batches[0]).shape[1]


def group_feature_matrix(store: FeatureStore, modules: list[Module], representation: str,
                         memory_limit: int | None = None) -> np.ndarray:
    """A layer group's features for one representation: its units' features side by side, filled
    unit by unit into a matrix that is memory-mapped when large (delta_canonical is as wide as the weights)."""
    units = unit_columns(modules, representation)  # prepare_experiment checked that none is empty
    if representation == "flat_vec":
        return store.raw_weights([unit for unit, _ in units], memory_limit)
    widths = [unit_width(representation, [store.shapes[c] for c in columns]) for _, columns in units]
    out = store.empty_matrix(sum(widths), memory_limit)
    for (unit, _), start, width in zip(units, np.cumsum([0] + widths[:-1]).tolist(), widths):
        out[:, start:start + width] = store.get(unit, representation)
    return out


def mapped_modules(modules: list[Module], representation: str) -> list[Module]:
    """The modules a representation can describe alone (a pair representation needs both factors)."""
    return [m for m in modules if unit_columns([m], representation)]


def map_probes(modules: list[Module], representation: str) -> dict[str, list[Probe]]:
    """A layer map's levels (results.json keys), each one family of probes: every module's down tensor,
    up tensor and pair (a pair representation: the pair alone), every block, every position, and for a
    per-tensor representation every factor."""
    mapped, per_tensor = mapped_modules(modules, representation), representation not in PAIR_REPRESENTATIONS
    module_probes = []
    for m in mapped:
        block, position = module_place(m.name)
        for factor in [*FACTORS, None] if per_tensor else [None]:
            kept = factor_only([m], factor)
            if kept and (factor or (m.down and m.up)):
                place = (("module", m.name), ("block", block), ("position", position), ("factor", factor or "pair"))
                module_probes.append(Probe(place, tuple(kept)))
    levels = (module_probes,
              [Probe((("block", b),), tuple(ms)) for b, ms in network_blocks(mapped).items()],
              [Probe((("position", p),), tuple(ms)) for p, ms in by_position(mapped).items()],
              [Probe((("factor", f),), tuple(factor_only(mapped, f))) for f in FACTORS
               if per_tensor and factor_only(mapped, f)])
    return {level: probes for level, probes in zip(MAP_LEVELS, levels) if probes}


def features_width(store: FeatureStore, modules: list[Module], representation: str) -> int:
    """How many features of a representation a selection of modules gives."""
    return sum(unit_width(representation, [store.shapes[c] for c in columns])
               for _, columns in unit_columns(modules, representation))


def layer_map_matrix(store: FeatureStore, probes: list[Probe], representation: str,
                     memory_limit: int | None = None) -> tuple[np.ndarray, list[int]]:
    """For one level of the layer map: each probe's features alone, zero-padded to the widest probe's
    width, probe after probe, (rows, probes * width); and each probe's own width."""
    widths = [features_width(store, list(probe.modules), representation) for probe in probes]
    width = max(widths)
    out = store.empty_matrix(len(probes) * width, memory_limit)
    for i, (probe, own) in enumerate(zip(probes, widths)):
        out[:, i * width:i * width + own] = group_feature_matrix(store, list(probe.modules), representation, memory_limit)
        out[:, i * width + own:(i + 1) * width] = 0.0  # a constant column: standardised to 0, it never contributes
    return out, widths


# =============================================================================================
# On-device data: standardised features, resident on the device or streamed from disk
# =============================================================================================

EVAL_CHUNK_ROWS = 8192
ROW_CHUNK_BYTES = 2 ** 28  # bounds a temporary chunk of feature rows: the statistics' float64, a streamed block's


def standardisation(chunks) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased std (+ 1e-8) of the training rows, merged chunk by chunk in float64
    (Chan's parallel update) so a split too large for memory gets the same statistics.  A feature
    constant on the training split keeps a unit scale instead of dividing by zero."""
    count, mean, m2 = 0, None, None
    for chunk in chunks:
        x = chunk.double()
        n, chunk_mean = x.shape[0], x.mean(0)
        chunk_m2 = x.sub_(chunk_mean).square_().sum(0)
        del x
        if mean is None:
            count, mean, m2 = n, chunk_mean, chunk_m2
            continue
        delta = chunk_mean - mean
        total = count + n
        mean = mean + delta * (n / total)
        m2 = m2 + chunk_m2 + delta.square() * (count * n / total)
        count = total
    std = (m2 / max(count - 1, 1)).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std)) + EPS
    return mean.float(), std.float()


def rows_in_chunk(num_features: int, itemsize: int) -> int:
    """Rows of num_features values of itemsize bytes that fit ROW_CHUNK_BYTES (at least one)."""
    return max(1, ROW_CHUNK_BYTES // (itemsize * max(num_features, 1)))


def slice_rows(x: torch.Tensor, idx: torch.Tensor, blocks: torch.Tensor | None, width: int | None) -> torch.Tensor:
    """Rows idx (slices, batch) of x, each slice's own: all columns, or with blocks (the layer map) only
    columns blocks[slice] * width onwards, its module's.  One index_select of whole rows (for the layer map,
    of x seen as one module's width per row): on a CPU a third of the time of indexing two dimensions."""
    if blocks is None:
        return x.index_select(0, idx.flatten()).view(*idx.shape, x.shape[1])
    module_rows = idx * (x.shape[1] // width) + blocks[:, None]
    return x.view(-1, width).index_select(0, module_rows.flatten()).view(*idx.shape, width)


def epoch_order(n_train: int, generators: list[torch.Generator], device: torch.device) -> torch.Tensor:
    """(streams, n_train): the order each random stream's slices visit the training rows this epoch, a
    permutation drawn from its generator, wherever the features live: where they live never changes a number."""
    return torch.stack([torch.randperm(n_train, generator=g, device=device) for g in generators])


def for_slices(draws: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
    """Per-stream draws (streams, ...) as per-slice ones (slices, ...): shared[slice] is its stream's row
    (None: one stream per slice, in order)."""
    return draws if shared is None else draws[shared]


def step_rows(order: torch.Tensor, shared: torch.Tensor | None, step: int, batch: int) -> torch.Tensor:
    """(slices, batch): the training rows each slice reads at this step of the epoch."""
    return for_slices(order[:, step * batch:(step + 1) * batch], shared)


class ResidentFeatures:
    """Every split's standardised features held on the training device; mini-batches are gathers."""

    def __init__(self, features: np.ndarray, splits: dict[str, np.ndarray], device: torch.device):
        self.x = {s: torch.from_numpy(np.ascontiguousarray(features[idx])).to(device) for s, idx in splits.items()}
        mean, std = standardisation(self.x["train"].split(rows_in_chunk(features.shape[1], 8)))
        for v in self.x.values():  # in place: the raw rows are never held beside their standardised copy
            v.sub_(mean).div_(std)

    def epoch_batches(self, order: torch.Tensor, shared: torch.Tensor | None, batch: int, steps: int,
                      blocks: torch.Tensor | None, width: int | None):
        """(idx, features) per step; idx (slices, batch) rows of the training split (see step_rows, slice_rows)."""
        for step in range(steps):
            idx = step_rows(order, shared, step, batch)
            yield idx, slice_rows(self.x["train"], idx, blocks, width)

    def eval_chunks(self, split: str, rows: int = EVAL_CHUNK_ROWS):
        yield from self.x[split].split(rows)


class MemmapRows(torch.utils.data.Dataset):
    """Rows of a (memory-mapped) feature matrix, fetched by a sorted array of row numbers."""

    def __init__(self, features: np.ndarray):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.features[rows]))


class BlockRows(torch.utils.data.Sampler):
    """Yields the row numbers of each block read, in the order training reads them; set `blocks` before each epoch."""

    def __init__(self):
        self.blocks: list[np.ndarray] = []

    def __iter__(self):
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)


def stream_workers(workers: int, block_bytes: int) -> int:
    """DataLoader workers hand each block over through /dev/shm, two blocks in flight per worker: with
    less room there, a worker would be killed mid-epoch, so read in this process instead."""
    shm = Path("/dev/shm")
    if workers == 0 or not shm.is_dir():
        return workers
    needed, free = 2 * workers * block_bytes, shutil.disk_usage(shm).free
    if free >= needed:
        return workers
    tqdm.write(f"notice: /dev/shm has {free / 2 ** 30:.2f} GiB free, {workers} streaming workers need "
               f"{needed / 2 ** 30:.2f} GiB; reading feature rows in this process instead")
    return 0


class StreamedFeatures:
    """Features too large for the device: each slice visits the training rows in its own order, as with
    resident features, and the rows of a few consecutive steps of every slice (a block of about
    ROW_CHUNK_BYTES, at least one step) are read at once from a memory-mapped matrix by a DataLoader
    (worker processes, pinned memory, prefetching), standardised on the device and shared by the slices."""

    def __init__(self, features: np.ndarray, splits: dict[str, np.ndarray], device: torch.device, workers: int,
                 batch: int):
        self.features, self.splits, self.device = features, splits, device
        self.sampler = BlockRows()
        self.block_rows = rows_in_chunk(features.shape[1], features.itemsize)
        block_bytes = min(max(self.block_rows, batch), len(splits["train"])) * features.shape[1] * features.itemsize
        workers = stream_workers(workers, block_bytes)
        self.loader = torch.utils.data.DataLoader(
            MemmapRows(features), sampler=self.sampler, batch_size=None, num_workers=workers,
            pin_memory=device.type == "cuda", persistent_workers=workers > 0)
        train = splits["train"]
        chunk = rows_in_chunk(features.shape[1], 8)
        self.mean, self.std = standardisation(self._rows(train[i:i + chunk]) for i in range(0, len(train), chunk))
        self.train_rows = torch.from_numpy(train).to(device)

    def _rows(self, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.features[np.sort(rows)])).to(self.device)

    def epoch_batches(self, order: torch.Tensor, shared: torch.Tensor | None, batch: int, steps: int,
                      blocks: torch.Tensor | None, width: int | None):
        per_block = max(1, self.block_rows // (order.shape[0] * batch))  # steps whose rows are read together
        spans = [(first, min(first + per_block, steps)) for first in range(0, steps, per_block)]
        visits = self.splits["train"][order.cpu().numpy()]  # one copy per epoch, not per step
        self.sampler.blocks = [np.unique(visits[:, a * batch:b * batch]) for a, b in spans]
        for (first, last), read_rows, rows in zip(spans, self.sampler.blocks, self.loader):
            read = torch.from_numpy(read_rows).to(self.device, non_blocking=True)
            x = (rows.to(self.device, non_blocking=True) - self.mean) / self.std
            for step in range(first, last):
                idx = step_rows(order, shared, step, batch)
                yield idx, slice_rows(x, torch.searchsorted(read, self.train_rows[idx]), blocks, width)

    def eval_chunks(self, split: str, chunk_rows: int = EVAL_CHUNK_ROWS):
        rows, chunk_rows = self.splits[split], min(chunk_rows, rows_in_chunk(self.features.shape[1], 4))
        for i in range(0, len(rows), chunk_rows):
            chunk = rows[i:i + chunk_rows]
            order = np.argsort(chunk)  # read in file order, return in split order
            x = self._rows(chunk)[torch.from_numpy(np.argsort(order)).to(self.device)]
            yield (x - self.mean) / self.std


@dataclass
class SplitData:
    """Standardised features (resident on the device or streamed) and labels of each split."""

    features: ResidentFeatures | StreamedFeatures
    y: dict[str, torch.Tensor]
    num_classes: int
    feature_dim: int
    block_width: int | None = None
    """for the layer map: every module's features padded to this width, module after module"""

    def size(self, split: str) -> int:
        return self.y[split].shape[0]

    @property
    def input_dim(self) -> int:
        """Derived: the features one model reads."""
        return self.block_width or self.feature_dim


def feature_budget_bytes(device: torch.device, limit_gb: float) -> int:
    """How many bytes of features may live on the device: --max-resident-features-gb, else half of
    what is free now (GPUs are shared; the other half is for the model and its activations)."""
    if limit_gb > 0:
        return int(limit_gb * 2 ** 30)
    release_device_memory(device)  # memory the previous entry's tensors held, cached by the allocator
    return free_memory_bytes(device) // 2


def resident_features(features: np.ndarray, splits: dict[str, np.ndarray], device: torch.device) -> ResidentFeatures | None:
    """ResidentFeatures, or None when the device runs out of memory holding them (a shared GPU whose
    free memory shrank since the budget was measured)."""
    try:
        return ResidentFeatures(features, splits, device)
    except torch.OutOfMemoryError:
        pass  # released below, outside the handler, whose traceback holds the partial copies
    release_device_memory(device)
    return None


def standardise(features: np.ndarray, labels: np.ndarray, splits: dict[str, np.ndarray], num_classes: int,
                device: torch.device, budget_bytes: int | None = None, workers: int = 0,
                block_width: int | None = None, batch: int = Config.batch_size) -> SplitData:
    """The training data: features kept on the device when they fit the budget (and the device, found
    out by trying), else streamed; the batches, and so the numbers, are the same either way."""
    budget = feature_budget_bytes(device, 0) if budget_bytes is None else budget_bytes
    fits = features.nbytes <= budget
    source = resident_features(features, splits, device) if fits else None
    if source is None:
        why = "ran out of device memory" if fits else f"do not fit the {budget / 2 ** 30:.1f} GiB device budget"
        tqdm.write(f"notice: {features.nbytes / 2 ** 30:.1f} GiB of features {why}; streaming their rows from disk")
        source = StreamedFeatures(features, splits, device, workers, batch)
    y = {s: torch.from_numpy(labels[idx]).to(device) for s, idx in splits.items()}
    return SplitData(source, y, num_classes, features.shape[1], block_width)


# =============================================================================================
# Model and training: the runs of an entry trained together as one stacked ensemble
# =============================================================================================

BN_MOMENTUM, BN_EPS = 0.1, 1e-5          # nn.BatchNorm1d defaults
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam defaults
LR_FACTOR, LR_PATIENCE, LR_THRESHOLD = 0.5, 10, 1e-4  # ReduceLROnPlateau(mode="max", factor=0.5, patience=10)
NUM_HIDDEN = 3


# --- the classifiers ---------------------------------------------------------------------------
# A classifier is a class and a line in CLASSIFIERS (the end of this section); the flags, memory
# prediction, compile, layer map, block ablation, torchrun's costs and reports take it from there.


class Classifier:
    """Fits all models of an entry at once, a slice each (a run at a setting of `grid`, chosen per run on
    the validation split; None: --weight-decay): fit(data, cfg, slices, device, label) -> EnsembleResult;
    scores(params, buffers, blocks, data, amp) -> x -> (slices, rows, classes); peak_bytes(data, cfg,
    slices, amp): device memory at most; cost(data_rows, width, num_classes, slices, cfg): multiply-adds."""

    name: str = ""
    description: str = ""
    setting, setting_text, setting_format = "l2", "L2 strength", ".0e"
    grid: tuple[float, ...] | None = None
    trains_by_gradient: bool = False
    """a gradient-trained run can stall (fit nothing of its training split); see stalled_runs"""

    def settings(self, cfg: Config) -> tuple[float, ...]:
        return self.grid or (cfg.weight_decay,)

    def open_edges(self) -> tuple[float, ...]:
        """The grid's ends the best setting could lie beyond."""
        return (min(self.grid), max(self.grid))


def uniform_like_linear(gen: torch.Generator, fan_in: int, shape: tuple[int, ...]) -> torch.Tensor:
    """nn.Linear's initialisation: uniform in +-1/sqrt(fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(*shape, generator=gen) * 2 - 1) * bound


def init_layer_stack(seeds: list[int], dims: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    """Stacked linear layers dims[i] -> dims[i + 1], one slice per seed, each drawn as nn.Linear would with it."""
    per_slice = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        params = {}
        for i, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
            params[f"w{i}"] = uniform_like_linear(gen, fan_in, (fan_in, fan_out))
            params[f"b{i}"] = uniform_like_linear(gen, fan_in, (1, fan_out))
        per_slice.append(params)
    return {k: torch.stack([p[k] for p in per_slice]).to(device) for k in per_slice[0]}


@dataclass(frozen=True)
class ModelSizes:
    """Floats one slice of a classifier holds on the device, for predicting its peak memory."""

    params: int
    largest: int
    """the largest parameter tensor"""
    buffers: int
    activations: int
    """per training row: what the backward pass keeps, with the dropout draws"""
    eval_activations: int
    """per evaluated row: the layers' outputs alive at once"""


def layer_sizes(dims: list[int], extra_params: int, buffers: int, activations: int, eval_activations: int) -> ModelSizes:
    weights = [a * b for a, b in zip(dims[:-1], dims[1:])]
    return ModelSizes(sum(weights) + sum(dims[1:]) + extra_params, max(weights), buffers, activations, eval_activations)


def shared_rows_product(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(batch, in) rows shared by every slice -> (slices, batch, out): one product per slice, never a
    copy of the rows per slice."""
    return torch.stack([torch.addmm(bs[0], x, ws) for bs, ws in zip(b, w)])


def block_columns(x: torch.Tensor, block: int | None, width: int | None) -> torch.Tensor:
    """A layer map's module columns of rows x (all columns when block is None)."""
    return x if block is None else x[:, block * width:(block + 1) * width]


def input_layer(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, blocks: torch.Tensor | None) -> torch.Tensor:
    """Every slice's first layer.  x is (slices, batch, in), rows gathered per slice, or (batch, columns),
    rows shared by every slice, of which a slice reads all columns (blocks None) or only its own
    block of `in` columns (blocks[slice]: the layer map's module)."""
    if x.dim() == 3:
        return torch.baddbmm(b, x, w)
    if blocks is None:
        return shared_rows_product(x, w, b)
    width, parts, order = w.shape[1], [], []
    for block in blocks.unique().tolist():  # one product per block over its slices
        slices = (blocks == block).nonzero().squeeze(1)
        ws, bs = w[slices], b[slices]
        k, out = ws.shape[0], ws.shape[2]
        product = torch.addmm(bs.transpose(0, 1).reshape(1, k * out), block_columns(x, block, width),
                              ws.transpose(0, 1).reshape(width, k * out))
        parts.append(product.view(x.shape[0], k, out).transpose(0, 1))
        order.append(slices)
    return torch.cat(parts)[torch.argsort(torch.cat(order))]


# A step's fixed costs (launches, the Python loop, each epoch's evaluation) in multiply-adds per row and
# model: an entry's training time went as rows x models x (parameters + this) on our 2-core CPU, where
# features x rows x runs left the one process that drew flat_vec idle half the run
STEP_OVERHEAD_MACS = 2_500_000


class StackedNetwork(Classifier):
    """A network trained by Adam on the cross-entropy (train_ensemble): init(seeds, in_dim, num_classes, cfg,
    device) -> (parameters, running statistics); forward(params, buffers, x, dropout_scales, amp, blocks)
    -> (slices, batch, classes) in training mode when dropout_scales is given; sizes(in_dim, num_classes,
    cfg) -> ModelSizes.  Its first layer, `input_weight`, goes through input_layer (see blocks there)."""

    trains_by_gradient = True
    input_weight = "w0"
    lr: float | None = None
    """Adam's initial learning rate; None: --lr"""

    def penalised(self, name: str) -> bool:
        """Whether the L2 penalty applies to this parameter."""
        return True

    def dropout_shape(self, cfg: Config) -> tuple[int, ...] | None:
        """Per training row, the units that dropout draws for (None: no dropout)."""
        return None

    def fit(self, data: SplitData, cfg: Config, slices: Slices, device: torch.device, label: str) -> EnsembleResult:
        """train_ensemble, in parts of half as many models for as long as the device runs out of memory."""
        def in_parts(size: int) -> EnsembleResult:
            parts = [list(range(i, min(i + size, len(slices)))) for i in range(0, len(slices), size)]
            return merge_results([train_ensemble(data, cfg, slices.part(p), self, device, label) for p in parts])
        return halving_on_oom(in_parts, len(slices), 1, device, f"training {label}", lambda size: f"{size} models at a time",
                              "lower --batch-size or --hidden-dim, or free the GPU")

    def scores(self, params, buffers, blocks, data, amp):
        return lambda x: self.forward(params, buffers, x, None, amp, blocks)

    def peak_bytes(self, data: SplitData, cfg: Config, slices: int, amp: torch.dtype | None) -> int:
        """The most device memory training one ensemble should take: standardising (the features and a float64
        chunk of the statistics), or training: features (resident, or a streamed block or evaluation chunk),
        labels and each epoch's order per seed, per slice its parameters, their gradients, Adam's moments and best
        copy, plus the largest of a step's activations and update temporaries, an epoch's order being
        drawn, and an evaluation chunk's layer outputs."""
        f32, sizes = 4, self.sizes(data.input_dim, data.num_classes, cfg)
        n_train, rows = data.size("train"), sum(data.size(s) for s in ("train", "val", "test"))
        batch, eval_rows = min(cfg.batch_size, n_train), min(EVAL_CHUNK_ROWS, max(data.size(s) for s in ("val", "test")))
        row_bytes, resident = data.feature_dim * f32, isinstance(data.features, ResidentFeatures)
        statistics = min(rows_in_chunk(data.feature_dim, 8), n_train) * row_bytes * (2 if resident else 3)  # float64 chunk
        if resident:
            features = rows * row_bytes
        else:  # a block as read and standardised, or an evaluation chunk as read, put in order and standardised
            eval_rows = min(eval_rows, rows_in_chunk(data.feature_dim, 4))
            block = min(max(rows_in_chunk(data.feature_dim, f32), slices * batch), n_train)
            features = max(2 * block, 3 * eval_rows) * row_bytes
        order = min(slices, cfg.runs) * n_train * 8  # one per seed (SeedStreams): the runs', whatever the grid
        held = features + rows * 8 + order + slices * (5 * sizes.params + 2 * sizes.buffers) * f32
        cast = 2 if amp is not None else 0  # autocast's half-precision copies of the first layer's input and weights
        update = sizes.largest * (f32 * (4 if amp == torch.float16 else 1) + cast)  # Adam's temporary (+ fp16 rollback)
        step = batch * (data.input_dim * (f32 + cast) + sizes.activations * f32) * slices + slices * update
        evaluation = slices * eval_rows * sizes.eval_activations * f32
        return max(held + max(step, evaluation, 2 * order), (features if resident else 0) + statistics)

    def cost(self, data_rows: int, width: int, num_classes: int, slices: Slices, cfg: Config) -> int:
        """rows x models x (parameters, one multiply-add per row each, + a step's fixed cost)."""
        return data_rows * len(slices) * (self.sizes(width, num_classes, cfg).params + STEP_OVERHEAD_MACS)


class MLP(StackedNetwork):
    """The published protocol: Linear -> BatchNorm -> ReLU -> Dropout, three times, then Linear."""

    name, description = "mlp", "mlp (the published protocol)"

    def init(self, seeds, in_dim, num_classes, cfg, device):
        """Each slice initialised as nn.Linear and nn.BatchNorm1d would with its run's seed."""
        h = cfg.hidden_dim
        params = init_layer_stack(seeds, [in_dim] + [h] * NUM_HIDDEN + [num_classes], device)
        buffers = {}
        for i in range(NUM_HIDDEN):
            params[f"gamma{i}"] = torch.ones(len(seeds), 1, h, device=device)
            params[f"beta{i}"] = torch.zeros(len(seeds), 1, h, device=device)
            buffers[f"mean{i}"] = torch.zeros(len(seeds), 1, h, device=device)
            buffers[f"var{i}"] = torch.ones(len(seeds), 1, h, device=device)
        return params, buffers

    def forward(self, params, buffers, x, dropout_scales, amp, blocks=None):
        """dropout_scales (slices, batch, 3, hidden), each 0 or 1/(1-p), means training mode: batch
        statistics (running statistics updated in place) and dropout; None means evaluation."""
        autocast = torch.autocast(x.device.type, dtype=amp) if amp is not None else nullcontext()
        with autocast:
            h = input_layer(x, params["w0"], params["b0"], blocks)
            for i in range(NUM_HIDDEN):
                if i > 0:
                    h = torch.baddbmm(params[f"b{i}"], h, params[f"w{i}"])
                h = h.float()  # normalise in float32
                # by hand, not F.batch_norm on a (batch, slices x hidden) view: that view is a transposed copy
                # per layer, and its reductions round differently (outputs not identical), which over
                # hundreds of steps changes where runs stop and so their published numbers
                if dropout_scales is not None:
                    mean = h.mean(1, keepdim=True)
                    centered = h - mean
                    var = centered.square().mean(1, keepdim=True)  # biased, as BatchNorm normalises
                    n = h.shape[1]
                    with torch.no_grad():
                        buffers[f"mean{i}"].lerp_(mean, BN_MOMENTUM)
                        buffers[f"var{i}"].lerp_(var * n / max(n - 1, 1), BN_MOMENTUM)
                else:
                    centered, var = h - buffers[f"mean{i}"], buffers[f"var{i}"]
                h = torch.relu(centered * (torch.rsqrt(var + BN_EPS) * params[f"gamma{i}"]) + params[f"beta{i}"])
                if dropout_scales is not None:
                    h = h * dropout_scales[:, :, i]
            out = torch.baddbmm(params[f"b{NUM_HIDDEN}"], h, params[f"w{NUM_HIDDEN}"])
        return out.float()

    def sizes(self, in_dim, num_classes, cfg):
        """For the backward pass each hidden layer keeps its centred values, ReLU output, dropout draw and
        scale (4 per unit, fitted to measured peaks); evaluation holds about three layer outputs at once."""
        h = cfg.hidden_dim
        return layer_sizes([in_dim] + [h] * NUM_HIDDEN + [num_classes], extra_params=2 * NUM_HIDDEN * h,
                           buffers=2 * NUM_HIDDEN * h, activations=4 * NUM_HIDDEN * h + 3 * num_classes,
                           eval_activations=3 * h + num_classes)

    def dropout_shape(self, cfg):
        return (NUM_HIDDEN, cfg.hidden_dim)


# The L2 strengths the linear probe tries, on the mean cross-entropy + l2/2 * |w|^2 (the intercept is
# not penalised, as in scikit-learn: C = 1 / (l2 * training rows)); the validation split picks one per run.
LINEAR_L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)

# Adam's learning rate for the linear probe: a convex model on standardised features, where the MLP's
# 1e-3 leaves it far from its optimum when early stopping ends it
LINEAR_LR = 1e-2


class LinearProbe(StackedNetwork):
    """Multinomial logistic regression: logits x w + b per slice (no dropout, no running statistics)."""

    name, description = "linear", "linear (multinomial logistic regression, L2 chosen on val)"
    grid, lr = LINEAR_L2_GRID, LINEAR_LR

    def init(self, seeds, in_dim, num_classes, cfg, device):
        return init_layer_stack(seeds, [in_dim, num_classes], device), {}

    def forward(self, params, buffers, x, dropout_scales, amp, blocks=None):
        autocast = torch.autocast(x.device.type, dtype=amp) if amp is not None else nullcontext()
        with autocast:
            out = input_layer(x, params["w0"], params["b0"], blocks)
        return out.float()

    def sizes(self, in_dim, num_classes, cfg):
        return layer_sizes([in_dim, num_classes], extra_params=0, buffers=0, activations=3 * num_classes,
                           eval_activations=2 * num_classes)

    def penalised(self, name):
        return name.startswith("w")


# --- training --------------------------------------------------------------------------------

COMPILE_BACKEND = "inductor"


class CompileClock:
    """A torch.compile backend that delegates to another and adds up the seconds and the number of its
    compilations, so training time excludes them and results report them apart."""

    def __init__(self, backend: str | Callable):
        # torch.compile takes a backend's name or a callable; wrapping one needs the callable, and
        # torch._dynamo.lookup_backend is the only way to get it from a name
        self.backend = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend
        self.seconds, self.compilations = 0.0, 0

    def __call__(self, graph, example_inputs):
        started = time.perf_counter()
        try:
            return self.backend(graph, example_inputs)
        finally:
            self.seconds += time.perf_counter() - started
            self.compilations += 1


class CompiledForward:
    """A classifier's forward under torch.compile with dynamic shapes.  Only three sizes vary (slices drop
    out of the stack, the last batch is short, each entry has its own feature count); the others (hidden
    width, classes, hidden layers) are fixed for the process and marked static, so a varying size that
    happens to equal one (3 runs and 3 hidden layers) is never merged with it (duck shaping) and does not
    recompile when they part."""

    def __init__(self, classifier: StackedNetwork, backend: str | Callable = COMPILE_BACKEND):
        self.clock = CompileClock(backend)
        self.compiled = torch.compile(classifier.forward, dynamic=True, backend=self.clock)
        self.input_weight = classifier.input_weight

    def __call__(self, params, buffers, x, dropout_scales, amp, blocks=None):
        for name, t in {**params, **buffers}.items():
            for dim in range(2 if name == self.input_weight else 1, t.dim()):  # (slices, features, out)
                torch._dynamo.mark_static(t, dim)
        if dropout_scales is not None:  # (slices, batch, the classifier's dropout_shape)
            for dim in range(2, dropout_scales.dim()):
                torch._dynamo.mark_static(dropout_scales, dim)
        return self.compiled(params, buffers, x, dropout_scales, amp, blocks)


@functools.lru_cache(maxsize=None)
def _compiled_forward(classifier: StackedNetwork, mode: str, device_type: str) -> CompiledForward | None:
    wanted = mode == "on" or (mode == "auto" and device_type == "cuda")
    if not wanted:
        return None
    reason = compile_available(torch.device(device_type))
    if reason is None:
        return CompiledForward(classifier)
    if mode == "on":
        raise ExperimentError(f"--compile on: {reason}; use --compile off")
    tqdm.write(f"notice: {reason}; training without torch.compile")
    return None


def training_forward(cfg: Config, classifier: StackedNetwork, device: torch.device):
    """The training step's forward: compiled with torch.compile where asked (auto: on CUDA, where
    compilation pays for itself within an ensemble's first epochs), decided once per process."""
    return _compiled_forward(classifier, cfg.compile, device.type) or classifier.forward


def compile_seconds(forward) -> float:
    """Seconds the forward has spent compiling so far (0 when it is not compiled)."""
    return forward.clock.seconds if isinstance(forward, CompiledForward) else 0.0


# torch.amp.GradScaler's defaults
LOSS_SCALE_INIT, LOSS_SCALE_GROWTH_INTERVAL = 2.0 ** 16, 2000


class LossScaler:
    """Dynamic loss scaling for float16 training as torch.amp.GradScaler does it for each slice (each run
    its own GradScaler), without a host sync: a slice whose gradients are not finite skips its step
    (inside `adam_step`) and halves its scale; after LOSS_SCALE_GROWTH_INTERVAL finite steps in a row
    its scale doubles.  One run's overflow never skips another's step."""

    def __init__(self, slices: int, device: torch.device, enabled: bool):
        self.enabled = enabled
        self.scale = torch.full((slices,), LOSS_SCALE_INIT if enabled else 1.0, device=device)
        self.good_steps = torch.zeros(slices, device=device)

    def unscale(self, grads: list[torch.Tensor]) -> torch.Tensor | None:
        """Divide each slice's gradients (slices, ...) by its scale; return a (slices,) 'gradients are
        finite' flag, or None when disabled."""
        if not self.enabled:
            return None
        torch._foreach_mul_(grads, [(1.0 / self.scale).view(-1, *[1] * (g.dim() - 1)) for g in grads])
        finite = torch.stack([g.isfinite().flatten(1).all(1) for g in grads]).all(0)
        self.good_steps = torch.where(finite, self.good_steps + 1, torch.zeros_like(self.good_steps))
        grow = self.good_steps >= LOSS_SCALE_GROWTH_INTERVAL
        self.scale = torch.where(finite, torch.where(grow, self.scale * 2, self.scale), self.scale * 0.5)
        self.good_steps = torch.where(grow, torch.zeros_like(self.good_steps), self.good_steps)
        return finite

    def keep(self, index: torch.Tensor) -> None:
        self.scale, self.good_steps = self.scale[index], self.good_steps[index]


def adam_step(params: dict[str, torch.Tensor], state: dict[str, dict[str, torch.Tensor]], lr: torch.Tensor,
              step: torch.Tensor | int, decay: dict[str, torch.Tensor], finite: torch.Tensor | None) -> None:
    """torch.optim.Adam's update with a learning rate per slice (lr: (slices,)) and an L2 penalty per
    slice (decay[name]: (slices, 1, 1), for the parameters penalised), in place on stacked
    (slices, a, b) parameters: a few foreach kernels for all of them, not a loop of small ones.
    step counts each slice's steps taken (a number, or (slices,)), this one included.  With a loss
    scaler (finite: (slices,) given), a slice whose gradients were not finite changes nothing, as its
    GradScaler skipping optimizer.step(): the caller does not count it either."""
    beta1, beta2 = ADAM_BETAS
    names = list(params)
    p, m, v = [params[k] for k in names], [state[k]["m"] for k in names], [state[k]["v"] for k in names]
    with torch.no_grad():
        g = [params[k].grad for k in names]
        take = torch.ones((), device=lr.device)
        if finite is not None:  # weights of 0 skip a slice's step; non-finite values would turn them into NaN
            take = finite.float().view(-1, 1, 1)
            g = [torch.where(finite.view(-1, 1, 1), x, 0.0) for x in g]
        penalised = [i for i, k in enumerate(names) if k in decay]
        if penalised:
            torch._foreach_addcmul_([g[i] for i in penalised], [p[i] for i in penalised],
                                    [decay[names[i]] for i in penalised])
        torch._foreach_lerp_(m, g, [(1 - beta1) * take] * len(m))
        torch._foreach_lerp_(v, torch._foreach_mul(g, g), [(1 - beta2) * take] * len(v))
        steps = torch.as_tensor(step, dtype=torch.float64, device=lr.device).clamp_min(1).view(-1, 1, 1)  # 0: skipped
        step_size = (lr.view(-1, 1, 1) * take / (1 - beta1 ** steps)).float()
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [(1 - beta2 ** steps).sqrt().float()] * len(denom))
        torch._foreach_add_(denom, ADAM_EPS)
        torch._foreach_div_(denom, [step_size] * len(denom))  # a step of 0 (skipped): an infinite denominator
        torch._foreach_addcdiv_(p, m, denom, -1.0)
        for x in p:
            x.grad = None


@dataclass
class RunHistory:
    """What one slice (a run, at one L2 strength, of one module) records while it trains."""

    seed: int
    val_acc: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    best_val_acc: float = -1.0
    best_epoch: int = 0
    epochs_since_best: int = 0
    plateau_best: float = -math.inf
    plateau_bad_epochs: int = 0
    lr: float = 0.0
    setting: float = 0.0
    """the value of its classifier's setting it was trained with (the MLP's and linear probe's: L2)"""
    failed: str | None = None
    seconds: float = 0.0
    """its share of the ensemble's training time: each epoch's time split among the slices it trained"""


def plateau_update(h: RunHistory, val_acc: float) -> None:
    """ReduceLROnPlateau(mode='max', factor=0.5, patience=10, threshold=1e-4 relative) for one run."""
    if val_acc > h.plateau_best * (1 + LR_THRESHOLD):
        h.plateau_best, h.plateau_bad_epochs = val_acc, 0
    else:
        h.plateau_bad_epochs += 1
        if h.plateau_bad_epochs > LR_PATIENCE:
            h.lr *= LR_FACTOR
            h.plateau_bad_epochs = 0


@dataclass
class Slices:
    """What each slice of a stacked ensemble is: its seed (initialisation, shuffling, dropout), its value
    of the classifier's setting (L2 penalty, or k), the reported unit it is a candidate for (a run; for the layer map a module's run), and
    for the layer map the block of columns (the module) it reads."""

    seeds: list[int]
    setting: list[float]
    units: list[int]
    blocks: list[int] | None = None

    def part(self, picks: list[int]) -> Slices:
        return Slices([self.seeds[i] for i in picks], [self.setting[i] for i in picks], [self.units[i] for i in picks],
                      None if self.blocks is None else [self.blocks[i] for i in picks])

    def __len__(self) -> int:
        return len(self.seeds)

    @staticmethod
    def joined(parts: list[Slices]) -> Slices:
        """Parts' slices one after the other."""
        every = lambda attr: [v for part in parts for v in getattr(part, attr)]
        return Slices(every("seeds"), every("setting"), every("units"), None if parts[0].blocks is None else every("blocks"))


def run_slices(cfg: Config, classifier: Classifier, num_blocks: int | None = None) -> Slices:
    """Every slice of one entry, block by block, run by run, then setting: run k is seeded
    run_seed(cfg, k) whatever its block or setting, so paired comparisons stay paired."""
    picks = [(b, k, v) for b in range(num_blocks or 1) for k in range(cfg.runs) for v in classifier.settings(cfg)]
    return Slices(seeds=[run_seed(cfg, k) for _, k, _ in picks], setting=[v for _, _, v in picks],
                  units=[b * cfg.runs + k for b, k, _ in picks],
                  blocks=None if num_blocks is None else [b for b, _, _ in picks])


@dataclass
class EnsembleResult:
    classifier: Classifier
    slices: Slices
    histories: list[RunHistory]
    best_params: dict[str, torch.Tensor]
    best_buffers: dict[str, torch.Tensor]
    seconds: float
    """training, without compiling"""
    compile_seconds: float = 0.0

    def part(self, picks: list[int]) -> EnsembleResult:
        index = torch.tensor(picks, device=self.device)
        return EnsembleResult(self.classifier, self.slices.part(picks), [self.histories[i] for i in picks],
                              {k: p[index] for k, p in self.best_params.items()},
                              {k: b[index] for k, b in self.best_buffers.items()}, self.seconds, self.compile_seconds)

    @property
    def device(self) -> torch.device:
        return next(iter(self.best_params.values())).device

    def logits(self, data: SplitData, amp: torch.dtype | None):
        """x -> every slice's class scores, evaluation mode, with its best weights."""
        blocks = None if self.slices.blocks is None else torch.tensor(self.slices.blocks, device=self.device)
        return self.classifier.scores(self.best_params, self.best_buffers, blocks, data, amp)


def predictions(logits, data: SplitData, split: str, rows: int = EVAL_CHUNK_ROWS) -> torch.Tensor:
    """Every slice's predicted classes on a whole split, (slices, N), in chunks of rows."""
    return torch.cat([logits(x).argmax(-1) for x in data.features.eval_chunks(split, rows)], 1)


def predictions_fitting(logits, data: SplitData, split: str) -> torch.Tensor:
    """predictions, halving the row chunk for as long as the device runs out of memory."""
    return halving_on_oom(lambda rows: predictions(logits, data, split, rows), EVAL_CHUNK_ROWS, 1, data.y["val"].device,
                          "during evaluation", lambda rows: f"{rows}-row chunks")


class StackedModels:
    """The models of one ensemble, one slice each, held as one stacked set of parameters: the classifier's
    parameters and running statistics, Adam's moments and loss scale, each slice's L2 penalty (and, for
    the layer map, module block), and the best weights so far.  Slices that stop leave the stack.
    Changing the architecture is the classifier's init and forward; the optimiser is `step`."""

    def __init__(self, classifier: StackedNetwork, slices: Slices, data: SplitData, cfg: Config, device: torch.device):
        self.classifier, self.amp = classifier, amp_dtype(cfg, device)
        self.params, self.buffers = classifier.init(slices.seeds, data.input_dim, data.num_classes, cfg, device)
        for p in self.params.values():
            p.requires_grad_(True)
        self.moments = {k: {"m": torch.zeros_like(p), "v": torch.zeros_like(p)} for k, p in self.params.items()}
        self.per_slice = {"l2": torch.tensor(slices.setting, device=device).view(-1, 1, 1)}
        if slices.blocks is not None:
            self.per_slice["blocks"] = torch.tensor(slices.blocks, device=device)
        self.best_params = {k: p.detach().clone() for k, p in self.params.items()}
        self.best_buffers = {k: b.clone() for k, b in self.buffers.items()}
        self.active = list(range(len(slices)))  # the original slice index of each slice still in the stack
        self.scaler = LossScaler(len(slices), device, enabled=self.amp == torch.float16)
        self.steps = torch.zeros(len(slices), device=device)  # Adam's step count per slice (skipped float16 steps not counted)
        self.training_forward = training_forward(cfg, classifier, device)
        self.device = device

    def forward(self, x: torch.Tensor, dropout_scales: torch.Tensor | None) -> torch.Tensor:
        """Training mode: every slice's logits on its rows (running statistics updated)."""
        return self.training_forward(self.params, self.buffers, x, dropout_scales, self.amp, self.per_slice.get("blocks"))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation mode, with the current weights."""
        return self.classifier.forward(self.params, self.buffers, x, None, self.amp, self.per_slice.get("blocks"))

    def step(self, losses: torch.Tensor, lr: torch.Tensor) -> None:
        """Adam on every slice's mean loss, each with its learning rate and L2 penalty."""
        (losses * self.scaler.scale).sum().backward()
        finite = self.scaler.unscale([p.grad for p in self.params.values()])
        self.steps = self.steps + (1 if finite is None else finite.float())
        decay = {k: self.per_slice["l2"] for k in self.params if self.classifier.penalised(k)}
        adam_step(self.params, self.moments, lr, self.steps, decay, finite)

    def snapshot(self, slots: list[int]) -> None:
        """Copy these slices' current weights as their best."""
        if not slots:
            return
        index = torch.tensor(slots, device=self.device)
        targets = torch.tensor([self.active[s] for s in slots], device=self.device)
        for k, p in self.params.items():
            self.best_params[k][targets] = p.detach()[index]  # copies, not references
        for k, b in self.buffers.items():
            self.best_buffers[k][targets] = b[index]

    def keep(self, slots: list[int]) -> None:
        """Keep only these slices, tensor by tensor in place, so each old tensor is freed as its
        replacement is made (never a second copy of the whole model)."""
        keep = torch.tensor(slots, device=self.device)
        for k in self.params:
            self.params[k] = self.params[k].detach()[keep].requires_grad_(True)
        for tensors in (self.buffers, self.per_slice, *self.moments.values()):
            for k in tensors:
                tensors[k] = tensors[k][keep]
        self.steps = self.steps[keep]
        self.scaler.keep(keep)
        self.active = [self.active[s] for s in slots]


def epoch_end(histories: list[RunHistory], active: list[int], val_acc: list[float], epoch_loss: list[float],
              epoch: int, cfg: Config) -> tuple[list[int], list[int]]:
    """Record one epoch of every slice still training: (slots whose validation accuracy improved, slots
    that go on).  A slice stops when its loss is not finite or its patience runs out (not before --min-epochs)."""
    improved, keep = [], []
    for slot, r in enumerate(active):
        h = histories[r]
        h.val_acc.append(val_acc[slot])
        h.train_loss.append(epoch_loss[slot])
        if not math.isfinite(epoch_loss[slot]):
            h.failed = f"training loss became non-finite at epoch {epoch + 1}"
            continue
        if val_acc[slot] > h.best_val_acc:
            h.best_val_acc, h.best_epoch, h.epochs_since_best = val_acc[slot], epoch + 1, 0
            improved.append(slot)
        else:
            h.epochs_since_best += 1
        plateau_update(h, val_acc[slot])
        if h.epochs_since_best < cfg.patience or epoch + 1 < cfg.min_epochs:
            keep.append(slot)
    return improved, keep


class SeedStreams:
    """The random streams of an ensemble's slices (their shuffling and dropout): one generator per distinct
    seed.  Slices with the same seed (in the layer map, one run of every module at every L2 strength) would
    draw the same numbers in the same order for as long as they train, so each draw is made once and
    shared: the numbers of a generator per slice, at a fraction of the draws and of the memory."""

    def __init__(self, seeds: list[int], device: torch.device):
        distinct = {seed: i for i, seed in enumerate(dict.fromkeys(seeds))}
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in distinct]
        self.of_slice = [distinct[seed] for seed in seeds]
        self.device = device

    def drawing(self, active: list[int]) -> tuple[list[torch.Generator], torch.Tensor | None]:
        """The generators the active slices draw from, and each active slice's row among their draws (see
        for_slices)."""
        used = sorted({self.of_slice[r] for r in active})
        row = {stream: i for i, stream in enumerate(used)}
        rows = [row[self.of_slice[r]] for r in active]
        shared = None if rows == list(range(len(rows))) else torch.tensor(rows, device=self.device)
        return [self.generators[stream] for stream in used], shared


def dropout_scales(generators: list[torch.Generator], rows: int, shape: tuple[int, ...], p: float,
                   device: torch.device) -> torch.Tensor:
    """(streams, rows, *shape): each unit dropped with probability p (0), kept scaled by 1 / (1 - p) so its
    expected value is unchanged, drawn from each stream's generator."""
    draws = torch.stack([torch.rand(rows, *shape, generator=g, device=device) for g in generators])
    return (draws >= p).float().mul_(1.0 / (1.0 - p))


def train_ensemble(data: SplitData, cfg: Config, slices: Slices, classifier: StackedNetwork, device: torch.device,
                   progress_label: str = "") -> EnsembleResult:
    """Train one model per slice, all at once as stacked weights, each with its own initialisation,
    shuffling and dropout stream, L2 penalty, learning-rate schedule, early stopping and best weights.
    Slices that stop are dropped from the stack so the rest train at the cost of what is left."""
    started = time.perf_counter()
    models = StackedModels(classifier, slices, data, cfg, device)
    compiled_before = compile_seconds(models.training_forward)
    histories = [RunHistory(seed=s, lr=classifier.lr or cfg.lr, setting=l2) for s, l2 in zip(slices.seeds, slices.setting)]
    dropout = classifier.dropout_shape(cfg)
    streams = SeedStreams(slices.seeds, device)
    y_train, n_train = data.y["train"], data.size("train")
    batch = min(cfg.batch_size, n_train)
    # BatchNorm cannot normalise a batch of one row: a trailing batch of one is dropped
    steps = n_train // batch + (1 if n_train % batch > 1 else 0)

    epochs = progress_bar(range(cfg.max_epochs), desc=f"epochs {progress_label}".strip(), leave=False, unit="ep")
    for epoch in epochs:
        epoch_started = time.perf_counter()
        active = models.active
        lr = torch.tensor([histories[r].lr for r in active], device=device)
        generators, shared = streams.drawing(active)
        order = epoch_order(n_train, generators, device)
        loss_sum = torch.zeros(len(active), device=device)
        for idx, x in data.features.epoch_batches(order, shared, batch, steps, models.per_slice.get("blocks"), data.block_width):
            scales = for_slices(dropout_scales(generators, idx.shape[1], dropout, cfg.dropout, device), shared) if dropout else None
            logits = models.forward(x, scales)
            losses = F.cross_entropy(logits.flatten(0, 1), y_train[idx].flatten(), reduction="none").view(len(active), -1).mean(1)
            models.step(losses, lr)
            loss_sum += losses.detach()
        with torch.no_grad():
            val_acc = (predictions(models.logits, data, "val") == data.y["val"]).float().mean(1).tolist()
        improved, keep = epoch_end(histories, active, val_acc, (loss_sum / steps).tolist(), epoch, cfg)  # one host sync
        share = (time.perf_counter() - epoch_started) / len(active)
        for r in active:
            histories[r].seconds += share
        models.snapshot(improved)
        epochs.set_postfix(active=len(keep), best=f"{max(h.best_val_acc for h in histories):.3f}")
        PROGRESS.beat()
        if not keep:
            break
        if len(keep) < len(active):
            models.keep(keep)
    epochs.close()
    compiling = compile_seconds(models.training_forward) - compiled_before
    seconds = time.perf_counter() - started - compiling
    attributed = sum(h.seconds for h in histories) or 1.0
    for h in histories:  # compiling left out, set-up shared, as the total is
        h.seconds *= seconds / attributed
    return EnsembleResult(classifier, slices, histories, models.best_params, models.best_buffers, seconds, compiling)


def merge_results(parts: list[EnsembleResult]) -> EnsembleResult:
    """Slices trained in separate parts, as if trained together (slice order kept)."""
    return EnsembleResult(
        classifier=parts[0].classifier,
        slices=Slices.joined([p.slices for p in parts]),
        histories=[h for p in parts for h in p.histories],
        best_params={k: torch.cat([p.best_params[k] for p in parts]) for k in parts[0].best_params},
        best_buffers={k: torch.cat([p.best_buffers[k] for p in parts]) for k in parts[0].best_buffers},
        seconds=sum(p.seconds for p in parts), compile_seconds=sum(p.compile_seconds for p in parts))


def best_of_grid(result: EnsembleResult) -> EnsembleResult:
    """Per reported unit, in unit order, the slice of the grid with the best validation accuracy (ties go
    to the larger setting, the simpler model: the stronger penalty, the more neighbours; a slice whose
    training failed only when all did)."""
    units = result.slices.units
    chosen, seconds = [], []
    for unit in sorted(set(units)):
        candidates = [i for i, u in enumerate(units) if u == unit]
        usable = [i for i in candidates if result.histories[i].failed is None] or candidates
        chosen.append(max(usable, key=lambda i: (result.histories[i].best_val_acc, result.slices.setting[i])))
        seconds.append(sum(result.histories[i].seconds for i in candidates))  # a run's time: its whole grid
    best = result.part(chosen)
    best.histories = [dataclasses.replace(h, seconds=t) for h, t in zip(best.histories, seconds)]
    return best


def train_runs(data: SplitData, cfg: Config, device: torch.device, label: str, model: Classifier,
               num_blocks: int | None = None) -> EnsembleResult:
    """All runs of one entry (for the layer map: of every module) as one ensemble, or one run at a time
    with --sequential-runs; with a grid (the linear probe's L2, knn's k), each run's setting chosen on
    the validation split."""
    slices = run_slices(cfg, model, num_blocks)
    together = len(slices) // cfg.runs if cfg.sequential_runs else len(slices)
    peak = model.peak_bytes(data, cfg, together, amp_dtype(cfg, device))
    where = "resident" if isinstance(data.features, ResidentFeatures) else "streamed from disk"
    tqdm.write(f"{label}: {together} models at a time, features {where}, predicted peak device memory "
               f"{peak / 2 ** 30:.2f} GiB")
    if not cfg.sequential_runs:
        return best_of_grid(model.fit(data, cfg, slices, device, label))
    runs = [[i for i, unit in enumerate(slices.units) if unit % cfg.runs == k] for k in range(cfg.runs)]
    return best_of_grid(merge_results([model.fit(data, cfg, slices.part(picks), device, f"{label} run {k + 1}")
                                       for k, picks in enumerate(runs)]))


# --- classifiers fitted in one pass, without gradients: k-nearest neighbours ----------------------

def labelled_chunks(data: SplitData, split: str, rows: int = EVAL_CHUNK_ROWS):
    """(features, labels) of a split, chunk by chunk in split order."""
    start = 0
    for x in data.features.eval_chunks(split, rows):
        yield x, data.y[split][start:start + x.shape[0]]
        start += x.shape[0]


class OnePassClassifier(Classifier):
    """A classifier fitted without gradients: `parameters` makes every slice's parameters from the training
    split, `scores` computes with them.  Nothing is trained, so its runs differ only where its seed
    decides something, and no run can stall."""

    def parameters(self, data: SplitData, slices: Slices, device: torch.device) -> dict[str, torch.Tensor]:
        """Each slice's parameters, (slices, ...) tensors."""
        raise NotImplementedError

    def fit(self, data, cfg, slices, device, label):
        started = time.perf_counter()
        params = self.parameters(data, slices, device)
        blocks = None if slices.blocks is None else torch.tensor(slices.blocks, device=device)
        with torch.no_grad():
            val_acc = (predictions(self.scores(params, {}, blocks, data, None), data, "val") == data.y["val"]).float().mean(1)
        seconds = time.perf_counter() - started
        histories = [RunHistory(seed=s, setting=v, val_acc=[acc], best_val_acc=acc, seconds=seconds / len(slices))
                     for s, v, acc in zip(slices.seeds, slices.setting, val_acc.tolist())]
        return EnsembleResult(self, slices, histories, params, {}, seconds)

    def peak_bytes(self, data, cfg, slices, amp):
        """The features (when resident, else an evaluation chunk), the labels, and an evaluation chunk's scores."""
        f32, rows = 4, sum(data.size(s) for s in ("train", "val", "test"))
        eval_rows = min(EVAL_CHUNK_ROWS, max(data.size(s) for s in ("train", "val", "test")))
        features = rows if isinstance(data.features, ResidentFeatures) else 3 * eval_rows
        return features * data.feature_dim * f32 + rows * 8 + slices * eval_rows * data.num_classes * f32

    def cost(self, data_rows, width, num_classes, slices, cfg):
        """One pass over the rows per slice."""
        return data_rows * width * len(slices)


# The k tried, the validation split choosing one per run; 1-nearest-neighbour is the published baseline
KNN_K_GRID = (1, 3, 5, 9, 15, 25)
# At most this many query x training-row distances exist at once (float32: 64 MiB), whatever the rows
KNN_DISTANCE_ELEMENTS = 2 ** 24


def nearest_training_labels(data: SplitData, x: torch.Tensor, blocks: list[int | None], k: int) -> torch.Tensor:
    """(blocks, rows of x, k): for each block's columns, the labels of the k training rows nearest each row
    of x (squared Euclidean on the standardised features), nearest first.  Training rows are read in
    chunks, so that no more than KNN_DISTANCE_ELEMENTS distances exist at once, whatever the split's size."""
    rows, k = x.shape[0], min(k, data.size("train"))
    best_d = x.new_full((len(blocks), rows, 0), math.inf, dtype=torch.float32)
    best_y = data.y["train"].new_zeros((len(blocks), rows, 0))
    for chunk, y in labelled_chunks(data, "train", max(1, KNN_DISTANCE_ELEMENTS // rows)):
        d, labels = [], []
        for j, block in enumerate(blocks):
            q, t = block_columns(x, block, data.block_width).float(), block_columns(chunk, block, data.block_width).float()
            dist = torch.addmm(q.square().sum(1, keepdim=True), q, t.T, alpha=-2).add_(t.square().sum(1)).clamp_min_(0)
            candidates = torch.cat([best_d[j], dist], 1)
            nearest = candidates.topk(min(k, candidates.shape[1]), dim=1, largest=False)
            d.append(nearest.values)
            labels.append(torch.cat([best_y[j], y.expand(rows, -1)], 1).gather(1, nearest.indices))
        best_d, best_y = torch.stack(d), torch.stack(labels)
    return best_y


class NearestNeighbours(OnePassClassifier):
    """k-nearest neighbours on the standardised features (Euclidean), each neighbour one vote.  Every run
    finds the same neighbours; its seed only orders the classes for breaking a tie in the vote (a fixed
    order would favour the first class).  The neighbours of a chunk of rows are found once and shared by
    every slice reading the same columns (every run and every k)."""

    name, description = "knn", "knn (k-nearest neighbours, k chosen on val)"
    setting, setting_text, setting_format, grid = "k", "k (neighbours)", "d", KNN_K_GRID

    def open_edges(self):
        return (max(self.grid),)  # nothing lies below 1 neighbour

    def parameters(self, data, slices, device):
        tie_order = [torch.randperm(data.num_classes, generator=torch.Generator().manual_seed(s)) for s in slices.seeds]
        return {"k": torch.tensor([int(k) for k in slices.setting], device=device),
                "tie_order": torch.stack(tie_order).float().to(device) / data.num_classes}  # below 1: breaks ties only

    def scores(self, params, buffers, blocks, data, amp):
        block_of = [None] * len(params["k"]) if blocks is None else blocks.tolist()
        used = list(dict.fromkeys(block_of))
        slots_of = defaultdict(list)  # (block, k) -> the slices that vote alike, but for ties
        for slot, (block, k) in enumerate(zip(block_of, params["k"].tolist())):
            slots_of[block, k].append(slot)

        def votes(x: torch.Tensor) -> torch.Tensor:
            labels = nearest_training_labels(data, x, used, int(params["k"].max()))
            out = params["tie_order"][:, None, :].repeat(1, x.shape[0], 1)
            for (block, k), slots in slots_of.items():
                nearest = labels[used.index(block), :, :k]
                out[slots] += torch.zeros_like(out[0]).scatter_add_(1, nearest, torch.ones_like(nearest, dtype=out.dtype))
            return out
        return votes

    def peak_bytes(self, data, cfg, slices, amp):
        """Also a training chunk's distances to an evaluation chunk, merged with the nearest so far."""
        return super().peak_bytes(data, cfg, slices, amp) + 3 * KNN_DISTANCE_ELEMENTS * 4

    def cost(self, data_rows, width, num_classes, slices, cfg):
        """Every row's distance to every training row, per distinct block of columns."""
        return data_rows * data_rows * width * len(set(slices.blocks or [None]))


# --- the registry: --classifiers takes these names -----------------------------------------------

CLASSIFIERS = {c.name: c for c in (MLP(), LinearProbe(), NearestNeighbours())}


# =============================================================================================
# Metrics and reports
# =============================================================================================

GROUP_RESULT_KEYS = {"all": ("all_layers_results", "all_layers"),
                     "visual": ("visual_only_results", "visual_only"),
                     "text": ("text_only_results", "text_only")}


def group_result_key(group: str) -> tuple[str, str]:
    """(results.json list, entry-name suffix) of a group: the original's names for built-in groups;
    visual:up -> visual_up."""
    suffix = group.replace(":", "_")
    return GROUP_RESULT_KEYS.get(group, (f"{suffix}_results", suffix))


def confusion_matrices(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(runs, N) predictions -> (runs, true class, predicted class) counts."""
    runs = pred.shape[0]
    flat = torch.arange(runs, device=pred.device)[:, None] * num_classes ** 2 + y[None] * num_classes + pred
    return torch.bincount(flat.flatten(), minlength=runs * num_classes ** 2).view(runs, num_classes, num_classes)


def classification_metrics(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """Accuracy and macro precision, recall, F1 per run, over the classes present in truth or prediction
    (a class never predicted has precision 0, as scikit-learn's default)."""
    c = confusion.double()
    tp = c.diagonal(dim1=1, dim2=2)
    true_count, pred_count = c.sum(2), c.sum(1)
    # a count of 0 has tp 0, and precision + recall of 0 has product 0: the clamps make those 0 / 1
    precision, recall = tp / pred_count.clamp_min(1), tp / true_count.clamp_min(1)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-300)
    present = ((true_count + pred_count) > 0).double()
    macro = lambda m: (m * present).sum(1) / present.sum(1)
    return {"acc": tp.sum(1) / c.sum((1, 2)), "precision": macro(precision), "recall": macro(recall), "f1": macro(f1)}


# --- statistics over runs ----------------------------------------------------------------------
# The runs of an entry are its replicates: they differ in seed only, on one fixed split, so every
# spread and interval below is over seeds (the test split's own sampling is not in it).  Run k of
# every entry shares its seed, so comparisons between entries are paired by run.  The t-based
# intervals assume roughly normal run-to-run values; tests/test_statistics.py checks their
# coverage by simulation.

STD_DDOF = 1       # every reported spread is the sample std
CONFIDENCE = 0.95  # of every interval
ALPHA = 0.05       # "above chance" and "significant": at this level, after a family's correction


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std; NaN (null in results.json) where there are too few values for either."""
    arr = np.asarray(values, dtype=np.float64)
    mean = float(arr.mean()) if arr.size else float("nan")
    return mean, float(arr.std(ddof=STD_DDOF)) if arr.size > STD_DDOF else float("nan")


def distributions():
    """scipy.stats, imported when the reports need it: importing it costs about 60 MB that extraction,
    which runs first and may be memory-bound, should not carry."""
    import scipy.stats
    return scipy.stats


def t_quantile(n: int) -> float:
    """The two-sided CONFIDENCE quantile of Student's t with n - 1 degrees of freedom."""
    return float(distributions().t.ppf(0.5 + CONFIDENCE / 2, n - 1))


def t_interval(values, bounds: tuple[float, float] = (-math.inf, math.inf)) -> list[float] | None:
    """The Student-t interval of the mean, cut to the bounds the mean cannot leave (which keeps its
    coverage); None with fewer than 2 values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return None
    half = t_quantile(x.size) * x.std(ddof=1) / math.sqrt(x.size)
    return [float(max(x.mean() - half, bounds[0])), float(min(x.mean() + half, bounds[1]))]


def paired_t_p(differences) -> float | None:
    """Two-sided p-value of the paired t-test that the mean difference is 0; None with fewer than 2 pairs."""
    d = np.asarray(differences, dtype=np.float64)
    if d.size < 2:
        return None
    std = d.std(ddof=1)
    if std == 0:
        return 1.0 if d.mean() == 0 else 0.0
    return float(2 * distributions().t.sf(abs(d.mean()) / (std / math.sqrt(d.size)), d.size - 1))


def fieller_interval(a, b) -> list[float] | None:
    """Fieller's interval of mean(a) / mean(b) from paired values: every ratio r for which the paired
    t-test cannot tell the mean of a - r * b from 0, from 0 up when no value is negative.  None with
    fewer than 2 pairs, or when mean(b) itself cannot be told from 0 (the set of such r is then unbounded)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 2:
        return None
    t2 = t_quantile(a.size) ** 2 / a.size
    (saa, sab), (_, sbb) = np.cov(a, b, ddof=1)
    quadratic = b.mean() ** 2 - t2 * sbb
    linear = a.mean() * b.mean() - t2 * sab
    constant = a.mean() ** 2 - t2 * saa
    if quadratic <= 0:
        return None
    root = math.sqrt(max(linear ** 2 - quadratic * constant, 0.0))
    low = (linear - root) / quadratic
    return [max(low, 0.0) if min(a.min(), b.min()) >= 0 else low, (linear + root) / quadratic]


def above_chance_p(correct: list[int], rows: int, chance: float) -> float | None:
    """One-sided p-value that test accuracy exceeds chance.  Each run: the exact binomial test of its
    correct test predictions against Binomial(rows, chance).  Runs share their test rows, so their
    p-values are combined as (n / k) * the k-th smallest of n, k = ceil(n / 2) (about twice the
    median), valid however the runs depend on each other (Rüschendorf 1982)."""
    if not correct:
        return None
    p = np.sort(distributions().binom.sf(np.asarray(correct) - 1, rows, chance))
    k = math.ceil(len(p) / 2)
    return float(min(1.0, len(p) / k * p[k - 1]))


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment over one family (None: not tested, left out of the family)."""
    tested = [i for i, p in enumerate(pvalues) if p is not None]
    order = sorted(tested, key=lambda i: pvalues[i])
    adjusted, running = list(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def majority_share(labels) -> float:
    """Chance: the accuracy of always answering the most frequent class."""
    counts = np.bincount(np.asarray(labels))
    return float(counts.max() / counts.sum())


# A run "stalled" when the weights it keeps (its best epoch's) barely fit even the training split:
# their train accuracy covers less than STALL_MARGIN of the way from chance (the majority class's
# share) to 1, or, when the best epoch is among the first STALL_EARLY_EPOCHS, less than
# STALL_EARLY_MARGIN of it (early stopping ended the run before it fitted anything).
STALL_MARGIN, STALL_EARLY_MARGIN, STALL_EARLY_EPOCHS = 0.1, 0.5, 5


def stalled_runs(train_acc: list[float], best_epochs: list[int], y_train: torch.Tensor) -> list[bool]:
    """Per run, whether it stalled (see STALL_MARGIN)."""
    chance = majority_share(y_train.cpu().numpy())
    stalled = []
    for acc, epoch in zip(train_acc, best_epochs):
        learned = (acc - chance) / max(1 - chance, EPS)
        stalled.append(learned < STALL_MARGIN or (epoch <= STALL_EARLY_EPOCHS and learned < STALL_EARLY_MARGIN))
    return stalled


def split_metrics(result: EnsembleResult, data: SplitData, amp) -> tuple[dict, dict]:
    """Every slice's best weights evaluated on every split: (metrics per split as lists over slices,
    confusion matrices per split)."""
    metrics, confusions = {}, {}
    with torch.no_grad():
        for split in ("train", "val", "test"):
            pred = predictions_fitting(result.logits(data, amp), data, split)
            confusions[split] = confusion_matrices(pred, data.y[split], data.num_classes)
            metrics[split] = {k: v.tolist() for k, v in classification_metrics(confusions[split]).items()}
    return metrics, confusions


def entry_name(representation: str, group: str, classifier: str = "mlp") -> str:
    """An entry's name: the original's <representation>_<group suffix> for the MLP, _<classifier> after it otherwise."""
    name = f"{representation}_{group_result_key(group)[1]}"
    return name if classifier == "mlp" else f"{name}_{classifier}"


def runs_entry(result: EnsembleResult, metrics: dict, confusions: dict, data: SplitData, cfg: Config,
               entry_name: str, num_layers: int, feature_dim: int) -> dict:
    """The entry of a result's runs from their metrics: means, sample spreads, medians and the test
    accuracy's interval and test against chance over the successful runs, every run's values (failed
    runs named, stalled runs marked), learning curves, confusion matrices."""
    runs = len(result.histories)
    ok = [k for k, h in enumerate(result.histories) if h.failed is None]
    model = result.classifier
    stalled = stalled_runs(metrics["train"]["acc"], [h.best_epoch for h in result.histories], data.y["train"])
    per_run = []
    for k, h in enumerate(result.histories):
        row = {"run": k, "seed": h.seed, "training_time": h.seconds, "best_epoch": h.best_epoch,
               "feature_dim": feature_dim, "failed": h.failed,
               "stalled": k in ok and stalled[k] if model.trains_by_gradient else None}  # None: nothing to stall
        if model.grid:
            row[model.setting] = h.setting  # what the validation split chose
        for split in ("train", "val", "test"):
            row[f"{split}_acc"] = metrics[split]["acc"][k]
        for split in ("val", "test"):
            for m in ("f1", "precision", "recall"):
                row[f"{split}_{m}"] = metrics[split][m][k]
        per_run.append(row)

    entry = {"representation": entry_name, "classifier": model.name, "num_layers": num_layers,
             "feature_dim": feature_dim,
             "num_successful_runs": len(ok), "failed_runs": [k for k in range(runs) if k not in ok]}
    for split in ("train", "val", "test"):
        entry[f"{split}_acc_mean"], entry[f"{split}_acc_std"] = mean_std([metrics[split]["acc"][k] for k in ok])
        entry[f"{split}_acc_median"] = float(np.median([metrics[split]["acc"][k] for k in ok])) if ok else float("nan")
    entry["test_acc_ci95"] = t_interval([metrics["test"]["acc"][k] for k in ok], bounds=(0.0, 1.0))
    correct = confusions["test"].diagonal(dim1=1, dim2=2).sum(1).tolist()
    entry["above_chance_p"] = above_chance_p([correct[k] for k in ok], data.size("test"),
                                             majority_share(data.y["test"].cpu().numpy()))
    entry["above_chance"] = entry["above_chance_p"] is not None and entry["above_chance_p"] < ALPHA
    for split in ("val", "test"):
        for m in ("f1", "precision", "recall"):
            entry[f"{split}_{m}_mean"], entry[f"{split}_{m}_std"] = mean_std([metrics[split][m][k] for k in ok])
    entry["training_time_mean"], entry["training_time_std"] = mean_std([h.seconds for h in result.histories])
    entry["training_time_total"] = result.seconds
    entry["compile_time"] = result.compile_seconds  # torch.compile's, kept out of the training times
    entry["best_epoch_mean"], entry["best_epoch_std"] = mean_std([result.histories[k].best_epoch for k in ok])
    entry["per_run_results"] = per_run
    entry["learning_curves"] = [{"val_acc_history": h.val_acc, "train_loss_history": h.train_loss,
                                 "best_epoch": h.best_epoch} for h in result.histories]
    entry["val_confusion_matrices"] = confusions["val"].tolist()
    entry["test_confusion_matrices"] = confusions["test"].tolist()
    for split in ("train", "val", "test"):
        entry[f"{split}_acc_all_runs"] = metrics[split]["acc"]
    entry["training_mode"] = "sequential" if cfg.sequential_runs else "ensemble"
    entry["batch_order"] = "per_run"  # each run shuffles all training rows, resident or streamed
    return entry


def evaluate_entry(result: EnsembleResult, data: SplitData, cfg: Config, device: torch.device,
                   entry_name: str, num_layers: int) -> dict:
    """One results.json entry: the best weights of every run evaluated on every split."""
    metrics, confusions = split_metrics(result, data, amp_dtype(cfg, device))
    return runs_entry(result, metrics, confusions, data, cfg, entry_name, num_layers, data.feature_dim)


MAP_ENTRY_OMITS = ("learning_curves", "val_confusion_matrices", "test_confusion_matrices")  # kept lean: one per module


def layer_map_entries(result: EnsembleResult, data: SplitData, cfg: Config, device: torch.device,
                      probes: list[Probe], widths: list[int], representation: str) -> list[dict]:
    """One entry per probe from a level's ensemble (its slices probe by probe, run by run), with the
    probe's place; each probe charged the training time of its slices."""
    metrics, confusions = split_metrics(result, data, amp_dtype(cfg, device))
    entries = []
    for i, (probe, width) in enumerate(zip(probes, widths)):
        picks = list(range(i * cfg.runs, (i + 1) * cfg.runs))
        part = result.part(picks)
        part = dataclasses.replace(part, seconds=sum(h.seconds for h in part.histories),
                                   compile_seconds=result.compile_seconds * len(picks) / len(result.histories))
        part_metrics = {split: {k: [v[j] for j in picks] for k, v in m.items()} for split, m in metrics.items()}
        part_confusions = {split: c[picks] for split, c in confusions.items()}
        entry = runs_entry(part, part_metrics, part_confusions, data, cfg, f"{representation}_{probe.name}",
                           sum(len(m.columns) for m in probe.modules), width)
        entries.append({**dict(probe.place), **{k: v for k, v in entry.items() if k not in MAP_ENTRY_OMITS}})
    return entries


def json_safe(value):
    """NaN and Inf (a failed run's loss history) as null: results.json stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json_atomic(path: Path, obj: dict) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(json_safe(obj), indent=2, allow_nan=False).encode()))


SCRIPT_SOURCE = Path(__file__).read_bytes()  # read at start: the code that runs, even if the file is edited meanwhile
COMMAND_FILE = "command.txt"  # beside results.json, with script-<hash>.py: the command and code behind it


def script_sha256() -> str:
    return hashlib.sha256(SCRIPT_SOURCE).hexdigest()


def script_copy_name(sha256: str) -> str:
    """The copy of a script beside the results it produced: one per script that contributed entries."""
    return f"script-{sha256[:16]}.py"


def save_code(out_dir: Path, command: str) -> None:
    """A copy of the script that is running (kept beside those of earlier runs resumed here) and its
    command line, beside the results they produce."""
    try:
        write_atomic(out_dir / script_copy_name(script_sha256()), lambda f: f.write(SCRIPT_SOURCE))
        write_atomic(out_dir / COMMAND_FILE, lambda f: f.write(f"{command}\n".encode()))
    except OSError as err:
        raise ExperimentError(f"cannot write the script copy into {out_dir} ({err.strerror or err}); "
                              "free space there or choose another --output-dir") from None


def provenance(cfg: Config, device: torch.device, processes: int) -> dict:
    """What made an entry, beyond its configuration: the code, where and in what precision it trained."""
    amp = amp_dtype(cfg, device)
    return {"script_sha256": script_sha256(), "device": device.type,
            "precision": str(amp).removeprefix("torch.") if amp else "float32", "torch": torch.__version__,
            "processes": processes}


def library_versions() -> dict[str, str]:
    import datasets
    return {"python": platform.python_version(), "torch": torch.__version__, "datasets": datasets.__version__,
            "numpy": np.__version__, "pyarrow": pa.__version__}


def find_entry(results: dict, group: str, representation: str, classifier: str = "mlp") -> dict | None:
    name = entry_name(representation, group, classifier)
    return next((e for e in results.get(group_result_key(group)[0], []) if e["representation"] == name), None)


def entry_accuracy(results: dict, group: str, representation: str, classifier: str = "mlp") -> tuple[float, float] | None:
    entry = find_entry(results, group, representation, classifier)
    return None if entry is None else (entry["test_acc_mean"], entry["test_acc_std"])


def paired_accuracies(entry: dict, base: dict) -> tuple[np.ndarray, np.ndarray]:
    """(entry's, base's) test accuracies of the runs that succeeded in both, paired by run: run k of both
    shares its seed."""
    failed = set(base["failed_runs"]) | set(entry["failed_runs"])
    pairs = [(a, b) for k, (a, b) in enumerate(zip(entry["test_acc_all_runs"], base["test_acc_all_runs"])) if k not in failed]
    return tuple(np.array(pairs, dtype=np.float64).reshape(-1, 2).T)


def retention_interval(results: dict, group: str, representation: str,
                       classifier: str) -> tuple[float, list[float] | None] | None:
    """A group's mean test accuracy as a fraction of all layers' over their paired runs, with its Fieller
    interval (None: see fieller_interval); None where the two have no successful run in common."""
    base, entry = find_entry(results, "all", representation, classifier), find_entry(results, group, representation, classifier)
    if base is None or entry is None:
        return None
    acc, base_acc = paired_accuracies(entry, base)
    if not acc.size:
        return None
    return float(acc.mean() / max(base_acc.mean(), EPS)), fieller_interval(acc, base_acc)


def paired_drop(entry: dict, base: dict | None) -> dict:
    """All layers' test accuracy minus an entry's (a group's, or all layers' without a block) over their
    paired runs: its mean, paired t-interval and two-sided paired t-test p-value (null where fewer than 2 pairs)."""
    if base is None:
        drops = np.zeros(0)
    else:
        acc, base_acc = paired_accuracies(entry, base)
        drops = base_acc - acc
    interval = t_interval(drops, bounds=(-1.0, 1.0))
    return {"drop_mean": float(drops.mean()) if drops.size else float("nan"), "drop_ci95": interval,
            "drop_low": interval[0] if interval else float("nan"), "drop_high": interval[1] if interval else float("nan"),
            "drop_p": paired_t_p(drops)}


def successful_runs(entry: dict) -> list[int]:
    """The runs whose training loss stayed finite: means, spreads and medians are over these."""
    failed = set(entry["failed_runs"])
    return [k for k in range(len(entry["test_acc_all_runs"])) if k not in failed]


def measured(entry: dict | None) -> bool:
    """Whether an entry has finished with at least one successful run to report."""
    return entry is not None and bool(successful_runs(entry))


def all_runs_failed(entry: dict | None) -> bool:
    return entry is not None and not measured(entry)


def successful_accuracies(entry: dict) -> np.ndarray:
    return np.array([entry["test_acc_all_runs"][k] for k in successful_runs(entry)], dtype=np.float64)


def median_accuracy(entry: dict) -> float:
    """The median test accuracy over successful runs; computed here for results.json files that predate it."""
    median = entry.get("test_acc_median")
    if median is None:
        accs = successful_accuracies(entry)
        median = float(np.median(accs)) if accs.size else float("nan")
    return median


def near_chance_baseline(results: dict, representation: str, classifier: str = "mlp") -> bool:
    """Whether a representation's all-layers accuracy is measured but not above chance (its binomial
    test, see above_chance_p): the retentions of its groups then mean nothing."""
    base = find_entry(results, "all", representation, classifier)
    return measured(base) and not base["above_chance"]


def all_entries(results: dict) -> list[dict]:
    """Every finished entry of the layer groups, group after group."""
    return [e for g in results["groups"] for e in results.get(group_result_key(g)[0], [])]


def features_key(entry: dict) -> str:
    """What an entry was trained on, whichever its classifier: its name less the classifier's suffix."""
    name = entry["representation"]
    return name if entry["classifier"] == "mlp" else name.removesuffix(f"_{entry['classifier']}")


def stalled_run_indices(entry: dict) -> list[int]:
    return [r["run"] for r in entry["per_run_results"] if r["stalled"]]


def trained(entry: dict) -> bool:
    return any(r["stalled"] is not None for r in entry["per_run_results"])  # knn's runs: None, nothing to stall


def learned(entry: dict) -> bool:
    """Whether a trained entry learned from its features: a successful run fitted its training split (did
    not stall) and the entry is above chance on the test split (a network fitting features without
    signal remembers its training rows; so does knn, always)."""
    return (trained(entry) and entry.get("above_chance", True)
            and len(stalled_run_indices(entry)) < len(successful_runs(entry)))


def training_outcome(entry: dict, same_features: list[dict]) -> dict:
    """A stalled run failed to train when something learned from the same features (another run, or another
    classifier): --min-epochs may rescue it.  When nothing did, the features carry no signal the
    classifiers can use, and no rerun helps."""
    no_signal = measured(entry) and trained(entry) and not any(learned(e) for e in same_features)
    return {"failed_to_train_runs": [] if no_signal else stalled_run_indices(entry), "no_signal": no_signal}


def with_training_outcomes(entries: list[dict]) -> None:
    by_features = defaultdict(list)
    for e in entries:
        by_features[features_key(e)].append(e)
    for e in entries:
        e.update(training_outcome(e, by_features[features_key(e)]))


def holm_corrected(entries: list[dict], p_key: str, flag: str) -> None:
    """One family's p-values adjusted by Holm's method (<p_key>_holm) and its flag set from them."""
    for e, p in zip(entries, holm([e[p_key] for e in entries])):
        e[f"{p_key}_holm"], e[flag] = p, p is not None and p < ALPHA


def with_statistics(results: dict) -> None:
    """What compares entries, recomputed from their runs at every save: each entry's training outcome
    beside its other classifiers, each ablated block's drop, and the families' corrections: a layer map's
    modules are one family, and so are the blocks of one representation and classifier."""
    for g in results["groups"]:
        with_training_outcomes(results.get(group_result_key(g)[0], []))
    for layer_map in results.get("layer_map", []):
        for level in (lv for lv in MAP_LEVELS if lv in layer_map):  # each level one family
            holm_corrected(layer_map[level], "above_chance_p", "above_chance")
            with_training_outcomes(layer_map[level])
    ablation = results.get("block_ablation", [])
    with_training_outcomes(ablation)
    families = defaultdict(list)
    for entry in ablation:
        entry.update(paired_drop(entry, find_entry(results, "all", entry["features"], entry["classifier"])))
        families[entry["features"], entry["classifier"]].append(entry)
    for family in families.values():
        holm_corrected(family, "drop_p", "drop_significant")


def result_rows(results: dict) -> list[tuple[str, str]]:
    """(representation, classifier) of each row of the table and slot of the plots."""
    return [(rep, clf) for rep in results["config"]["representations"]
            for clf in results["config"].get("classifiers", ["mlp"])]


def row_label(representation: str, classifier: str) -> str:
    return representation if classifier == "mlp" else f"{representation} ({classifier})"


STALLED_MARK = "*"      # after a run that failed to train (the features taught the entry's other runs or classifiers)
NO_SIGNAL_MARK = "#"    # after an entry from whose features no run of any classifier learned
NEAR_CHANCE_MARK = "~"  # after a retention whose all-layers accuracy is not above chance
EDGE_MARK = "!"         # after a setting chosen at an edge of its classifier's grid (L2, k)


def number(value: float | None, spec: str = ".3f") -> str:
    """A value for the reports; n/a where there is none (a spread or interval of fewer than 2 runs)."""
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def interval_text(interval: list[float] | None, spec: str = ".3f") -> str:
    return "n/a" if interval is None else f"[{format(interval[0], spec)}, {format(interval[1], spec)}]"


def format_acc(entry: dict | None) -> str:
    """An entry's table cell: mean +- sample std (median) over its successful runs."""
    if entry is None:
        return "-"
    if not measured(entry):
        return "all runs failed"
    mark = NO_SIGNAL_MARK if entry.get("no_signal") else ""
    return f"{entry['test_acc_mean']:.3f} +- {number(entry['test_acc_std'])} ({median_accuracy(entry):.3f}){mark}"


def drop_and_retention(results: dict, group: str, representation: str, classifier: str = "mlp") -> str:
    """A group's drop and retention cells; the retention is marked when all layers' accuracy is near chance."""
    base, entry = find_entry(results, "all", representation, classifier), find_entry(results, group, representation, classifier)
    if not (measured(base) and measured(entry)):
        return f"{'':>8} {'':>11}"
    base_acc, acc = base["test_acc_mean"], entry["test_acc_mean"]
    mark = NEAR_CHANCE_MARK if near_chance_baseline(results, representation, classifier) else " "
    return f"{base_acc - acc:>+8.3f} {100 * acc / max(base_acc, EPS):>9.1f}%{mark}"


def run_cells(entry: dict) -> list[str]:
    """Each run's test accuracy as listed under the table: runs that failed to train marked, failed runs named."""
    failed, failed_to_train = set(entry["failed_runs"]), set(entry.get("failed_to_train_runs", []))
    return ["failed" if k in failed else f"{acc:.3f}{STALLED_MARK if k in failed_to_train else ' '}"
            for k, acc in enumerate(entry["test_acc_all_runs"])]


def chance_verdict(entry: dict) -> str:
    if entry["above_chance_p"] is None:
        return ""
    return f"p {entry['above_chance_p']:.2g}: {'above chance' if entry['above_chance'] else 'not above chance'}"


def per_run_lines(results: dict) -> list[str]:
    """Every entry's runs, its mean's interval and its test against chance."""
    entries = all_entries(results)
    width = max((len(e["representation"]) for e in entries), default=0)
    runs = max((len(e["test_acc_all_runs"]) for e in entries), default=0)
    return ["Test accuracy of each run (run 0 first); the mean's 95% t-interval; the test against chance"] + [
        f"{e['representation']:<{width}} " + f"{' '.join(f'{cell:<6}' for cell in run_cells(e)):<{7 * runs - 1}}"
        + f" {interval_text(e['test_acc_ci95']):>16}  {chance_verdict(e)}" for e in entries]


def interval_lines(results: dict) -> list[str]:
    """Each group's drop and retention against all layers with their intervals, paired by run."""
    lines = []
    for g in (g for g in results["groups"] if g != "all"):
        for row in result_rows(results):
            base, entry = find_entry(results, "all", *row), find_entry(results, g, *row)
            retention = retention_interval(results, g, *row)
            if not (measured(base) and measured(entry)) or retention is None:
                continue
            drop = paired_drop(entry, base)
            lines.append(f"{row_label(*row):<24} {g:<12} {drop['drop_mean']:>+8.3f} {interval_text(drop['drop_ci95'], '+.3f'):>18} "
                         f"{100 * retention[0]:>9.1f}% {interval_text(retention[1] and [100 * r for r in retention[1]], '.1f'):>16}")
    header = ["Drop and retention against all layers over paired runs, with 95% intervals (drop: paired t; "
              "retention: Fieller)", f"{'representation':<24} {'group':<12} {'drop':>8} {'interval':>18} "
              f"{'retention':>10} {'interval (%)':>16}"]
    return header + lines if lines else []


def chosen_settings(entry: dict) -> list[tuple[float, bool]]:
    """Per run of an entry whose classifier tries a grid: (the setting chosen, whether at an edge of the grid)."""
    model = CLASSIFIERS.get(entry["classifier"])
    if model is None or not model.grid:
        return []
    return [(r[model.setting], r[model.setting] in model.open_edges()) for r in entry["per_run_results"]]


def setting_lines(results: dict) -> list[str]:
    """Per classifier with a grid, each entry's chosen settings, run by run, those at an edge of the grid marked."""
    lines = []
    for model in (m for m in CLASSIFIERS.values() if m.grid):
        entries = [e for e in all_entries(results) + results.get("block_ablation", [])
                   if e["classifier"] == model.name and chosen_settings(e)]
        width = max((len(e["representation"]) for e in entries), default=0)
        grid = ", ".join(f"{v:{model.setting_format}}" for v in model.grid)
        lines += [f"{model.setting_text} each {model.name} run chose on the validation split ({EDGE_MARK}: at an "
                  f"open edge of the grid {grid}: the best may lie beyond it)"] if entries else []
        lines += [f"{e['representation']:<{width}} " + " ".join(f"{v:{model.setting_format}}{EDGE_MARK if edge else ' '}"
                                                               for v, edge in chosen_settings(e)) for e in entries]
    return lines


def map_grid(layer_map: dict, factor: str = "pair") -> tuple[list[str], list[str], dict[tuple[str, str], dict]]:
    """A layer map's blocks in network order, positions in block order, and its module probes of one
    factor (down, up or pair) by (block, position)."""
    modules = layer_map["modules"]
    cells = {(e["block"], e["position"]): e for e in modules if e["factor"] == factor}
    blocks = sorted({e["block"] for e in modules}, key=block_order_key)
    positions = sorted({e["position"] for e in modules}, key=position_order_key)
    return blocks, positions, cells


def map_factors(layer_map: dict) -> list[str]:
    """The factors a layer map probes module by module: pair, down and up, or pair alone."""
    return [f for f in ("pair", *FACTORS) if any(e["factor"] == f for e in layer_map["modules"])]


def level_entries(layer_map: dict, level: str, key: str) -> dict[str, dict]:
    """A level's probes by their place (block, position or factor)."""
    return {e[key]: e for e in layer_map.get(level, [])}


def position_labels(positions: list[str]) -> list[str]:
    """Positions without the path components every one of them starts with (transformer_blocks.0.)."""
    parts = [p.split(".") for p in positions]
    shared = 0
    while all(len(p) > shared + 1 and p[shared] == parts[0][shared] for p in parts):
        shared += 1
    return [".".join(p[shared:]) for p in parts]


def level_ranking(layer_map: dict, level: str) -> list[tuple[str, dict]]:
    """A level's measured probes by mean test accuracy, best first, each with its name."""
    entries = [e for e in layer_map.get(level, []) if measured(e)]
    name = lambda e: f"{e['module']} {e['factor']}" if level == "modules" else e[level.removesuffix("s")]
    return [(name(e), e) for e in sorted(entries, key=lambda e: -e["test_acc_mean"])]


def map_cell(entry: dict | None) -> str:
    """A layer-map cell: mean test accuracy, marked when not above chance (Holm-corrected over the map)."""
    if entry is None:
        return "-"
    if not measured(entry):
        return "failed"
    return f"{entry['test_acc_mean']:.3f}{' ' if entry['above_chance'] else NEAR_CHANCE_MARK}"


MAP_RANKED_MODULES = 10  # module probes listed by rank in results.txt (the grids show them all)


def layer_map_lines(layer_map: dict, chance: float, runs: int) -> list[str]:
    """A layer map as tables: per factor its module probes, blocks in network order down, positions across,
    the pair's table with each block and position probed alone in its margins; then every level ranked."""
    blocks, positions, _ = map_grid(layer_map)
    labels = position_labels(positions)
    block_width = max(len("position alone"), *(len(b) for b in blocks))
    width = max(7, *(len(label) for label in labels))
    lines = [f"Layer map of {layer_map['representation']}: test accuracy of {layer_map['classifier']} on each probe "
             f"alone, mean over {runs} runs ({NEAR_CHANCE_MARK}: not above chance {chance:.3f}, binomial test with "
             f"Holm's correction within each level; trained in {layer_map['training_time']:.1f}s)"]
    by_block, by_position = level_entries(layer_map, "blocks", "block"), level_entries(layer_map, "positions", "position")
    for factor in map_factors(layer_map):
        _, _, cells = map_grid(layer_map, factor)
        margin = factor == "pair" and by_block
        lines += [f"modules, {'both factors' if factor == 'pair' else f'{factor} factor alone'}:",
                  f"{'block':<{block_width}} " + " ".join(f"{label:>{width}}" for label in labels)
                  + (f" {'block alone':>{width}}" if margin else "")]
        lines += [f"{block:<{block_width}} " + " ".join(f"{map_cell(cells.get((block, p))):>{width}}" for p in positions)
                  + (f" {map_cell(by_block.get(block)):>{width}}" if margin else "") for block in blocks]
        if factor == "pair" and by_position:
            lines.append(f"{'position alone':<{block_width}} "
                         + " ".join(f"{map_cell(by_position.get(p)):>{width}}" for p in positions))
    ranked = level_ranking(layer_map, "modules")
    for level in MAP_LEVELS:
        entries = level_ranking(layer_map, level)[:MAP_RANKED_MODULES if level == "modules" else None]
        shown = f"best {len(entries)} of {len(ranked)}" if level == "modules" and len(ranked) > len(entries) else "all"
        if entries:
            lines.append(f"{level} ranked ({shown}): " + ", ".join(f"{name} {map_cell(e).strip()}" for name, e in entries))
    return lines


def block_ablation_lines(results: dict) -> list[str]:
    """Each block's entry: test accuracy without it, and the drop against all layers with its interval."""
    entries = results["block_ablation"]
    width = max(len("block"), *(len(e["block"]) for e in entries))
    lines = ["Block ablation: test accuracy on all layers but one block, mean +- sample std (median), and the drop "
             "from all layers' accuracy over paired runs with its 95% paired t-interval and paired t-test p-value, "
             "Holm-corrected over each representation's blocks",
             f"{'representation':<24} {'block':<{width}} {'without the block':>22} {'drop':>8} {'95% interval':>18} "
             f"{'p (Holm)':>9}"]
    for e in entries:
        verdict = "" if e["drop_p_holm"] is None else \
            f"{e['drop_p_holm']:>9.2g} {'significant' if e['drop_significant'] else ''}"
        lines.append(f"{row_label(e['features'], e['classifier']):<24} {e['block']:<{width}} {format_acc(e):>22} "
                     f"{number(e['drop_mean'], '+.3f'):>8} {interval_text(e['drop_ci95'], '+.3f'):>18} {verdict}")
    return lines


def table_notes(results: dict, groups: list[str]) -> list[str]:
    """How the numbers were made, and a footnote for each mark the table uses."""
    entries = all_entries(results) + results.get("block_ablation", [])
    notes = ["std: the sample std (ddof 1) over the successful runs. Intervals: 95%, over runs (seeds) on the one "
             "fixed split: Student t for a mean, paired t for a drop, Fieller for a retention; n/a with fewer than 2 "
             "successful runs, or for a retention whose all-layers accuracy cannot be told from 0. Above chance: each "
             f"run's correct test predictions against Binomial(test rows, chance), exact and one-sided; the runs' "
             "p-values combined as (n/k) x their k-th smallest, k = ceil(n/2), valid however runs depend on each "
             f"other; above chance when p < {ALPHA}"]
    if any(e.get("failed_to_train_runs") for e in entries):
        notes.append(f"{STALLED_MARK} failed to train: the run's kept weights barely fit the training split although "
                     "other runs or classifiers learned from the same features; it is counted in the mean and median; "
                     "rerun with --min-epochs N")
    if any(e.get("no_signal") for e in entries):
        notes.append(f"{NO_SIGNAL_MARK} no signal: no run of any classifier fitted even the training split of these "
                     "features; no rerun helps")
    if any(e["failed_runs"] for e in entries):
        notes.append("failed: the run's training loss became non-finite; it is left out of the mean, std and median")
    if groups and any(near_chance_baseline(results, *row) for row in result_rows(results)):
        notes.append(f"{NEAR_CHANCE_MARK} all-layers accuracy not above chance: retention not meaningful")
    notes += [f"- not computed: {line}" for line in results.get("not_applicable", [])]
    return notes


def finished_records(results: dict) -> list[dict]:
    """Every finished entry, block-ablation entry and layer map: what records its own provenance."""
    return all_entries(results) + results.get("block_ablation", []) + results.get("layer_map", [])


PROVENANCE_CHECKED = ("script_sha256", "precision", "torch")  # what --resume refuses to mix unless accepted


def provenance_differences(record: dict, current: dict) -> list[str]:
    """How a finished record's provenance differs from this run's, as 'field: theirs -> ours'."""
    theirs = record["provenance"]
    return [f"{k}: {theirs.get(k)} -> {current[k]}" for k in PROVENANCE_CHECKED if theirs.get(k) != current[k]]


def mixed_provenance_lines(results: dict) -> list[str]:
    """The finished records made by another script, precision or torch version than this run's (kept with
    --accept-mixed-provenance), each with what differs."""
    current = results.get("provenance")
    mixed = [(r, provenance_differences(r, current)) for r in finished_records(results) if current and "provenance" in r]
    lines = [f"{r['representation']:<32} {'; '.join(d)}" for r, d in mixed if d]
    return ["", "Entries made with another script, precision or torch version than this run's "
                "(kept with --accept-mixed-provenance; their code is in script-<hash>.py)", *lines] if lines else []


def chance_text(results: dict) -> str:
    """Chance as the reports state it: the test split's majority share, and 1/K beside it when they differ."""
    text = f"chance {results['chance']:.3f} (the test split's majority class)"
    if abs(results["chance"] - results["chance_uniform"]) > 5e-4:
        text += f", 1/K {results['chance_uniform']:.3f}"
    return text


def answer_lines(results: dict) -> list[str]:
    """Where the generated sanity-check planted its class signal, to hold the results against."""
    answer = results.get("answer")
    if answer is None:
        return []
    planted = sorted(((s, b) for b, s in answer["block_strength"].items() if s > 0), reverse=True)
    return ["", f"The answer (answer.json): the class is in the {answer['factor']} factors of "
            + ", ".join(f"{b} (strength {s:g})" for s, b in planted)
            + f"; visual (attn1) modules hold {answer['visual_share']:g} of their block's strength; every other "
              "block, and every down factor, holds none"]


def comparison_table(results: dict) -> str:
    """Fixed-width table: test accuracy on all layers vs each other group, drop and retention; below it
    every entry's accuracy run by run, the intervals, the maps and ablation, and the notes."""
    groups = [g for g in results["groups"] if g != "all"]
    rows = result_rows(results)
    width = max(16, *(len(row_label(*row)) for row in rows))
    header = f"{'representation':<{width}} {'all layers':>22}"
    for g in groups:
        header += f" {g:>22} {'drop':>8} {'retention':>11}"
    lines = [f"Test accuracy, mean +- sample std (median) over the successful runs ({results['dataset']}, "
             f"{results['num_runs']} runs, {results['num_classes']} classes, {chance_text(results)})",
             header, "-" * len(header)]
    for rep, clf in rows:
        line = f"{row_label(rep, clf):<{width}} {format_acc(find_entry(results, 'all', rep, clf)):>22}"
        for g in groups:
            line += f" {format_acc(find_entry(results, g, rep, clf)):>22} {drop_and_retention(results, g, rep, clf)}"
        lines.append(line)
    lines += answer_lines(results)
    lines += ["", *per_run_lines(results)]
    for section in (interval_lines(results), setting_lines(results)):
        lines += ["", *section] if section else []
    for layer_map in results.get("layer_map", []):
        lines += ["", *layer_map_lines(layer_map, results["chance"], results["num_runs"])]
    if results.get("block_ablation"):
        lines += ["", *block_ablation_lines(results)]
    lines += mixed_provenance_lines(results)
    lines += ["", *table_notes(results, groups)]
    if not results.get("complete"):
        lines.append("(partial: the run did not finish; continue it with --resume)")
    return "\n".join(line.rstrip() for line in lines)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # headless: no display on servers
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path) -> None:
    """Write a figure as PNG and free it; a "tight" box grows the image to any text past its edges."""
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)


def set_figure_title(fig, text: str) -> None:
    """A title centred on the figure, wrapped to its width (10 characters an inch at 10 pt, wider than most
    text), so that long entry names are not cut off; an axes title would sit off-centre beside long labels."""
    import textwrap
    width = int(fig.get_figwidth() * 10)
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in text.split("\n")), fontsize=10)


def bar_axes(rows: list[tuple[str, str]]):
    """A figure and axes wide enough for a slot of bars per representation and classifier."""
    return _pyplot().subplots(figsize=(max(8, 0.9 * len(rows) + 2), 5))


MUTED_BAR = {"hatch": "//", "alpha": 0.35}  # a bar drawn but not to be read at face value


def grouped_bars(ax, rows: list[tuple[str, str]], groups: list[str], values,
                 muted=lambda g, r: False) -> dict[tuple[str, tuple[str, str]], float]:
    """Bars per (representation, classifier) row, one per group; values(group, row) -> (height,
    (err_low, err_high) or None: no error bar) or None: no bar.  Bars where muted(group, row) are hatched and faded.  Returns each
    bar's x position by (group, row)."""
    width = 0.8 / len(groups)
    positions = {}
    for i, g in enumerate(groups):
        points = [values(g, r) or (np.nan, (0.0, 0.0)) for r in rows]
        xs = np.arange(len(rows)) + (i - (len(groups) - 1) / 2) * width
        errors = np.array([p[1] or (0.0, 0.0) for p in points]).T
        bars = ax.bar(xs, [p[0] for p in points], width, yerr=errors, capsize=3, label=group_result_key(g)[1].replace("_", " "))
        for r, x, bar in zip(rows, xs, bars):
            positions[g, r] = float(x)
            if muted(g, r):
                bar.set(**MUTED_BAR)
    ax.set_xticks(np.arange(len(rows)), [row_label(*r) for r in rows], rotation=30, ha="right")
    ax.set_xlim(-0.5, len(rows) - 0.5)  # every slot shown, also one whose bar is missing and carries a note
    return positions


def note_bars(ax, positions: dict[tuple[str, str], float], note) -> None:
    """note(group, rep) written upright at the foot of its bar where it returns text: an empty slot says why."""
    for (g, r), x in positions.items():
        text = note(g, r)
        if text:
            ax.text(x, 0.02, text, transform=ax.get_xaxis_transform(), rotation=90, ha="center", va="bottom",
                    fontsize=8, color="dimgray")


def failure_note(*entries: dict | None) -> str | None:
    return "all runs failed" if any(all_runs_failed(e) for e in entries) else None


def run_dots(ax, bars: list[tuple[float, dict | None]]) -> None:
    """Each successful run's test accuracy as a circle over its bar (x, entry); runs that failed to train as red crosses."""
    normal, failed_to_train = ([], []), ([], [])
    for x, entry in bars:
        if entry is None:
            continue
        marked = set(entry.get("failed_to_train_runs", []))
        for k in successful_runs(entry):
            xs, ys = failed_to_train if k in marked else normal
            xs.append(x)
            ys.append(entry["test_acc_all_runs"][k])
    if normal[0]:
        ax.scatter(*normal, s=16, facecolors="none", edgecolors="black", linewidths=0.8, zorder=3, label="single run")
    if failed_to_train[0]:
        ax.scatter(*failed_to_train, s=28, marker="x", color="red", zorder=4, label="run that failed to train")


def legend_beside(ax, handles=None) -> None:
    """The legend right of the axes, where it hides no bar or dot."""
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))


def figure_summary(results: dict):
    """Grouped bars: mean test accuracy per representation and layer group, error bars one std, a dot per run."""
    rows, groups = result_rows(results), list(results["groups"])
    fig, ax = bar_axes(rows)

    def accuracy(g, row):
        if not measured(find_entry(results, g, *row)):
            return None
        mean, std = entry_accuracy(results, g, *row)
        return mean, (std, std) if math.isfinite(std) else None
    positions = grouped_bars(ax, rows, groups, accuracy)
    run_dots(ax, [(x, find_entry(results, g, *row)) for (g, row), x in positions.items()])
    note_bars(ax, positions, lambda g, row: failure_note(find_entry(results, g, *row)))
    ax.axhline(results["chance"], color="gray", linestyle="--", linewidth=1, label="chance (majority class)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    set_figure_title(fig, f"Test accuracy per representation and layer group ({results['dataset']})\n"
                          f"bars: mean ±1 sample std over {results['num_runs']} runs (failed runs left out); "
                          "dots: single runs")
    legend_beside(ax)
    fig.tight_layout()
    return fig


def plot_summary(results: dict, path: Path) -> None:
    save_figure(figure_summary(results), path)


def figure_retention(results: dict):
    """Grouped bars: each group's accuracy as a fraction of all layers', with 95% Fieller intervals over
    paired runs (none where it is undefined: see fieller_interval); representations whose all-layers
    accuracy is not above chance are hatched."""
    from matplotlib.patches import Patch
    rows = result_rows(results)
    groups = [g for g in results["groups"] if g != "all"]
    fig, ax = bar_axes(rows)

    def retention(g, row):
        ratio = retention_interval(results, g, *row)
        if ratio is None:
            return None
        value, interval = ratio
        return value, (value - interval[0], interval[1] - value) if interval else None
    positions = grouped_bars(ax, rows, groups, retention, muted=lambda g, row: near_chance_baseline(results, *row))
    note_bars(ax, positions, lambda g, row: failure_note(find_entry(results, "all", *row), find_entry(results, g, *row)))
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="all layers")
    handles = ax.get_legend_handles_labels()[0]
    if any(near_chance_baseline(results, *row) for row in rows):
        handles.append(Patch(facecolor="lightgray", **MUTED_BAR,
                             label="all-layers accuracy not above chance:\nretention not meaningful"))
    ax.set_ylabel("accuracy / all-layers accuracy")
    set_figure_title(fig, f"Retention of each layer group ({results['dataset']})\n95% Fieller intervals over "
                          f"{results['num_runs']} runs paired by seed; none where fewer than 2 runs succeeded\n"
                          "or the all-layers accuracy cannot be told from 0")
    legend_beside(ax, handles)
    fig.tight_layout()
    return fig


def plot_retention(results: dict, path: Path) -> None:
    save_figure(figure_retention(results), path)


def best_entry(results: dict) -> dict | None:
    """The entry with the best mean test accuracy among those where no run failed, or None: the confusion
    matrix sums every run's, and a diverged run's predictions would distort it."""
    entries = [e for e in all_entries(results) if not e["failed_runs"]]
    return max(entries, key=lambda e: e["test_acc_mean"], default=None)


@functools.cache
def plot_font():
    """The font matplotlib draws text in by default."""
    from matplotlib import font_manager, ft2font
    return ft2font.FT2Font(font_manager.findfont(font_manager.FontProperties()))


def drawable(text: str) -> bool:
    """Whether the plot font has a glyph for every character (else matplotlib draws boxes and warns)."""
    return all(plot_font().get_char_index(ord(c)) for c in text)


def class_labels(names: list) -> list[str]:
    """Class names for the plot axes; a name the font cannot draw (CJK, emoji) is shown as its label index."""
    return [str(name) if drawable(str(name)) else str(i) for i, name in enumerate(names)]


def figure_confusion(results: dict, entry: dict):
    """The test confusion matrix of one entry, summed over runs, each true class's row normalised."""
    counts = np.asarray(entry["test_confusion_matrices"]).sum(0)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    names = class_labels(results["class_names"])
    renamed = names != [str(name) for name in results["class_names"]]
    size = max(5, 0.5 * len(names) + 2)
    fig, ax = _pyplot().subplots(figsize=(size + 1, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(np.arange(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(np.arange(len(names)), names)
    if len(names) <= 20:
        for (i, j), rate in np.ndenumerate(rates):
            ax.text(j, i, f"{rate:.2f}", ha="center", va="center", fontsize=7, color="white" if rate > 0.5 else "black")
    ax.set_xlabel("predicted" + (" (a number: the label index of a name the font cannot draw)" if renamed else ""))
    ax.set_ylabel("true")
    set_figure_title(fig, f"{entry['representation']}: test accuracy {entry['test_acc_mean']:.3f}\n"
                          f"rows sum to 1, counts summed over all {len(entry['test_confusion_matrices'])} runs")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def plot_confusion(results: dict, entry: dict, path: Path) -> None:
    save_figure(figure_confusion(results, entry), path)


def map_heatmap(ax, rows: list[str], columns: list[str], cell, norm, title: str):
    """One heatmap of probe accuracies: cell(i, j) -> the entry of row i, column j, or None; values
    printed, `~` where not above chance."""
    values = np.full((len(rows), len(columns)), np.nan)
    for i, j in itertools.product(range(len(rows)), range(len(columns))):
        entry = cell(i, j)
        if measured(entry):
            values[i, j] = entry["test_acc_mean"]
            mark = "" if entry["above_chance"] else NEAR_CHANCE_MARK
            ax.text(j, i, f"{values[i, j]:.2f}{mark}", ha="center", va="center", fontsize=7)
    image = ax.imshow(values, cmap="RdBu_r", norm=norm, aspect="auto")
    ax.set_xticks(np.arange(len(columns)), columns, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(np.arange(len(rows)), rows, fontsize=8)
    ax.set_title(title, fontsize=9)
    return image


def figure_layer_map(results: dict):
    """A row of panels per mapped representation: for each factor a heatmap of its module probes, blocks
    in network order down, positions across (the pair's with each block and position probed alone as a
    last column and row), and the factors probed alone; the colour scale is centred on chance."""
    from matplotlib.colors import TwoSlopeNorm
    maps, chance = results["layer_map"], results["chance"]
    norm = TwoSlopeNorm(vmin=0.0, vcenter=chance, vmax=1.0)
    panels = max(len(map_factors(m)) + 1 for m in maps)
    rows = max(len(map_grid(m)[0]) for m in maps) + 1
    fig, axes = _pyplot().subplots(len(maps), panels, figsize=(3.2 * panels + 3, (0.35 * rows + 2) * len(maps)),
                                   squeeze=False, layout="constrained")
    for ax_row, layer_map in zip(axes, maps):
        blocks, positions, _ = map_grid(layer_map)
        labels = dict(zip(positions, position_labels(positions)))
        by_block, by_position = level_entries(layer_map, "blocks", "block"), level_entries(layer_map, "positions", "position")
        for ax, factor in zip(ax_row, map_factors(layer_map)):
            _, _, cells = map_grid(layer_map, factor)
            margins = factor == "pair"
            row_names = blocks + (["position alone"] if margins and by_position else [])
            column_names = positions + (["block alone"] if margins and by_block else [])
            cell = lambda r, c: (by_position.get(c) if r == "position alone" else by_block.get(r) if c == "block alone"
                                 else cells.get((r, c)))
            image = map_heatmap(ax, row_names, [labels.get(c, c) for c in column_names],
                                lambda i, j: cell(row_names[i], column_names[j]), norm,
                                f"{layer_map['representation']}: {'both factors' if margins else factor + ' alone'}")
            if not margins:  # the same blocks as the first panel's
                ax.set_yticks(np.arange(len(row_names)), [""] * len(row_names))
        factors = level_ranking(layer_map, "factors")
        ax = ax_row[len(map_factors(layer_map))]
        if factors:
            names, entries = zip(*sorted(factors))
            ax.bar(names, [e["test_acc_mean"] for e in entries], yerr=[e["test_acc_std"] or 0 for e in entries],
                   color="tab:blue", capsize=4)
            ax.axhline(chance, color="black", linestyle="--", linewidth=1, label=f"chance {chance:.2f}")
            ax.set_ylim(0, 1)
            ax.set_title(f"{layer_map['representation']}: each factor alone (mean +- sample std)", fontsize=9)
            ax.legend(fontsize=7)
        for unused in ax_row[len(map_factors(layer_map)) + bool(factors):]:
            unused.axis("off")
        bar = fig.colorbar(image, ax=list(ax_row[:len(map_factors(layer_map))]), fraction=0.03)
        bar.ax.axhline(chance, color="black", linewidth=1.5)
        ticks = sorted({0.0, chance, 0.5, 1.0})
        bar.set_ticks(ticks)
        bar.set_ticklabels([f"chance {t:.2f}" if t == chance else f"{t:.1f}" for t in ticks])
    set_figure_title(fig, f"Test accuracy of each probe alone ({results['dataset']}), mean over {results['num_runs']} "
                          f"runs\nwhite: chance (majority class); {NEAR_CHANCE_MARK}: not above chance (binomial test, "
                          "Holm's correction within each level)")
    return fig


def plot_layer_map(results: dict, path: Path) -> None:
    save_figure(figure_layer_map(results), path)


# =============================================================================================
# Main
# =============================================================================================

# --- the command line ------------------------------------------------------------------------

def _checked(convert: Callable, accept: Callable, expected: str):
    """An argparse type: the text converted, and refused in one line saying what is expected when it
    does not convert or is out of range."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"{text} is not {expected}")
        return value
    return parse


_fraction = _checked(float, lambda v: 0.0 < v <= 1.0, "a fraction in (0, 1]")
_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _checked(int, lambda v: v >= 0, "a non-negative integer")
_probability = _checked(float, lambda v: 0.0 <= v < 1.0, "a probability in [0, 1)")
_device = _checked(str, lambda text: re.fullmatch(r"auto|cpu|cuda(:\d+)?", text), "one of auto, cpu, cuda, cuda:N")


def _choice_list(allowed: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(allowed)}")
        return names
    return parse


def _group_definition(text: str) -> tuple[str, str]:
    name, _, pattern = text.partition("=")
    if not re.fullmatch(r"[A-Za-z][\w-]*(:up|:down)?", name) or not pattern:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=REGEX or NAME:FACTOR=REGEX "
                                         "(e.g. attn=q_proj|k_proj|v_proj|o_proj, attn:up=q_proj)")
    if name in GROUP_CHOICES:
        raise argparse.ArgumentTypeError(f"{name} is a built-in group; choose it with --layer-groups")
    try:
        re.compile(pattern)
    except re.error as err:
        raise argparse.ArgumentTypeError(f"{pattern!r} is not a regular expression ({err})") from None
    return name, pattern


def add_data_arguments(add: Callable, defaults: Config) -> None:
    add("--dataset", default=defaults.dataset,
        help="preset (1k, 10k, 50k, 100k, small), hub id owner/name, local save_to_disk or parquet path, "
             "folder of adapter .safetensors files, or sanity-check")
    add("--data-dir", default=defaults.data_dir, help="directory for generated datasets (sanity-check)")
    add("--sanity-rows", type=_positive_int, default=defaults.sanity_rows,
        help="rows of the generated sanity-check dataset")
    add("--label-column", default=defaults.label_column, help="column holding the class label")
    add("--labels", default=None, metavar="CSV",
        help="folder of adapters: CSV of `adapter path, label` rows (default: metadata.json, else parent folder names)")
    add("--skip-mismatched", action="store_true",
        help="folder of adapters: leave out adapters whose tensors differ from the others instead of stopping")
    add("--export-dataset", default=None, metavar="DIR",
        help="folder of adapters: also save the table built from it with save_to_disk, for sharing")
    add("--drop-unlabeled", action="store_true",
        help="leave out rows whose label is missing (None/NaN; recorded in results.json) instead of refusing")
    add("--allow-nonfinite", action="store_true",
        help="zero NaN/Inf weights (recorded in results.json) instead of refusing the dataset")
    add("--allow-missing-classes", action="store_true",
        help="run even when a split lacks a class (warned, recorded) instead of refusing")


def add_experiment_arguments(add: Callable, defaults: Config) -> None:
    add("--representations", type=_choice_list(tuple(REPRESENTATIONS)), default=defaults.representations,
        help="comma list of representations (default: all but delta_canonical)")
    add("--layer-groups", type=_choice_list(GROUP_CHOICES), default=defaults.layer_groups,
        help="comma list of layer groups: all, visual (attn1), text (attn2); up or down: that factor's tensors "
             "of every module; GROUP:FACTOR both (visual:up: the up factors of the visual layers)")
    add("--group", dest="custom_groups", type=_group_definition, action="append", default=[], metavar="NAME=REGEX",
        help="define and evaluate a layer group: modules whose name matches REGEX (repeatable); a NAME ending in "
             ":up or :down keeps that factor's tensors alone")
    add("--sample-layers", type=_fraction, default=defaults.sample_layers,
        help="fraction of LoRA modules to use, seeded, down/up pairs kept together")
    add("--classifiers", type=_choice_list(tuple(CLASSIFIERS)), default=defaults.classifiers,
        help="comma list: " + ", ".join(c.description for c in CLASSIFIERS.values()))
    add("--layer-map", type=_choice_list(tuple(REPRESENTATIONS)), default=defaults.layer_map, metavar="REPR[,REPR...]",
        help="map test accuracy module by module for these representations (a classifier per module)")
    add("--layer-map-classifier", choices=tuple(CLASSIFIERS), default=defaults.layer_map_classifier,
        help="the classifier the layer map trains on each module alone")
    add("--block-ablation", action="store_true",
        help="also train on all layers minus one block at a time (for every representation and classifier)")
    add("--num-runs", type=_positive_int, default=defaults.num_runs, help="training runs per representation and layer group")
    add("--quick", action="store_true", help="3 runs instead of --num-runs")
    add("--seed", type=int, default=defaults.seed, help="base seed: run k uses seed + k")


def add_training_arguments(add: Callable, defaults: Config) -> None:
    add("--hidden-dim", type=_positive_int, default=defaults.hidden_dim, help="MLP hidden width")
    add("--dropout", type=_probability, default=defaults.dropout, help="dropout rate of the MLP")
    add("--weight-decay", type=float, default=defaults.weight_decay, help="Adam weight decay (L2)")
    add("--lr", type=float, default=defaults.lr, help="Adam learning rate")
    add("--batch-size", type=_positive_int, default=defaults.batch_size, help="training mini-batch size")
    add("--max-epochs", type=_positive_int, default=defaults.max_epochs, help="maximum training epochs")
    add("--patience", type=_positive_int, default=defaults.patience, help="early-stopping patience in epochs")
    add("--min-epochs", type=_non_negative_int, default=defaults.min_epochs,
        help="no early stopping before this epoch (0: the published protocol); reruns runs that failed to train")
    add("--sequential-runs", action="store_true",
        help="train runs one at a time instead of as one batched ensemble (for comparison)")


def add_running_arguments(add: Callable, defaults: Config) -> None:
    add("--output-dir", default=defaults.output_dir, help="directory for results")
    add("--resume", action="store_true",
        help="continue an interrupted run in the same output directory, skipping finished entries")
    add("--accept-mixed-provenance", action="store_true",
        help="with --resume: keep finished entries made by another script, precision or torch version "
             "(marked in results.txt) instead of refusing")
    add("--cache-features", action="store_true", help="cache computed features on disk and reuse them")
    add("--cache-dir", default=defaults.cache_dir, help="feature cache directory")
    add("--device", type=_device, default=defaults.device, help="auto, cpu, cuda or cuda:N")
    add("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    add("--compile", choices=("auto", "on", "off"), default=defaults.compile,
        help="torch.compile the training step: auto = on CUDA only, where compilation pays for itself")
    add("--num-workers", type=_non_negative_int, default=defaults.num_workers,
        help="parallel readers: threads reading weight chunks, DataLoader workers when features are streamed (0: none)")
    add("--max-resident-features-gb", type=float, default=defaults.max_resident_features_gb,
        help="stream features larger than this from disk during training (0: half the free device memory)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Visual-only ablation of LoRA weight representations.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = Config()
    add_data_arguments(p.add_argument_group("the dataset and its labels").add_argument, defaults)
    add_experiment_arguments(p.add_argument_group("what is compared").add_argument, defaults)
    add_training_arguments(p.add_argument_group("the classifiers' training").add_argument, defaults)
    add_running_arguments(p.add_argument_group("where it runs and writes").add_argument, defaults)
    return p


def parse_config(argv: list[str] | None = None) -> Config:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.custom_groups = tuple(dict(args.custom_groups).items())
    clash = [name for name, _ in args.custom_groups if name in args.layer_groups]
    if clash:
        parser.error(f"--group {clash[0]} is defined twice")
    return Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})


# --- the run ---------------------------------------------------------------------------------

def results_header(cfg: Config, loaded: LoadedDataset, labels: Labels, modules: list[Module],
                   groups: dict[str, list[Module]], device: torch.device) -> dict:
    count = lambda ms: sum(len(m.columns) for m in ms)
    all_modules = groups.get("all", modules)
    header = {
        "dataset": loaded.name, "dataset_source": loaded.source, "dataset_fingerprint": loaded.fingerprint,
        "num_rows": loaded.dataset.num_rows, "num_runs": cfg.runs, "num_classes": len(labels.class_names),
        "std_ddof": STD_DDOF, "class_names": labels.class_names,
        "num_all_layers": count(all_modules),
        "num_visual_layers": count(layer_groups(modules, ("visual",))["visual"]),
        "num_text_layers": count(layer_groups(modules, ("text",))["text"]),
        "optimizations": {"fast_svd": "exact: Gram eigenvalues / QR core", "gpu_normalization": True,
                          "mixed_precision": str(amp_dtype(cfg, device)) if amp_dtype(cfg, device) else False,
                          "batch_size": cfg.batch_size, "num_workers": cfg.num_workers,
                          "sample_layers": cfg.sample_layers, "ensemble_training": not cfg.sequential_runs},
        "device": str(device), "config": dataclasses.asdict(cfg), "versions": library_versions(),
        "script_sha256": script_sha256(), "complete": False,
    }
    if labels.mapping is not None:
        header["label_mapping"] = labels.mapping
    if loaded.answer is not None:
        header["answer"] = loaded.answer
    header["groups"] = list(groups)
    header["group_patterns"] = {g: group_pattern(g, cfg.custom_groups) for g in groups}
    header["group_factors"] = {g: group_factor(g)[1] or "both" for g in groups}
    for g in groups:
        header[group_result_key(g)[0]] = []
    if cfg.layer_map:
        header["layer_map"] = []
    if cfg.block_ablation:
        header["block_ablation"] = []
    return header


def check_writable(directory: Path, flag: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise ExperimentError(f"cannot write to {flag} {directory} ({err.strerror or err}); "
                              "choose a writable directory") from None


# settings that may change between an interrupted run and its --resume without changing results
RESUME_MAY_DIFFER = {"resume", "accept_mixed_provenance", "num_workers", "cache_features", "cache_dir", "data_dir", "output_dir", "device"}


def results_shape_problem(results) -> str | None:
    """What makes a parsed results.json unusable for --resume, or None."""
    if not isinstance(results, dict):
        return f"it holds a JSON {type(results).__name__}, not an object"
    if not isinstance(results.get("groups", []), list) or not isinstance(results.get("config", {}), dict):
        return "its groups or config have the wrong type"
    for group in results.get("groups", []):
        entries = results.get(group_result_key(group)[0], []) if isinstance(group, str) else None
        if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("representation"), str)
                                                    for e in entries):
            return f"the entries of group {group!r} lack a representation name"
    return None


EXTRA_SECTIONS = ("layer_map", "block_ablation")  # results.json sections beside the layer groups' lists


def finished_entries(results: dict) -> set[str]:
    """The names of every finished entry, layer map ("layer_map <representation>") and block-ablation entry."""
    return ({e["representation"] for e in all_entries(results) + results.get("block_ablation", [])}
            | {f"layer_map {m['representation']}" for m in results.get("layer_map", [])})


def with_own_provenance(previous: dict) -> None:
    """Records written before each recorded its own provenance get their file's header values."""
    amp = previous.get("optimizations", {}).get("mixed_precision")
    header = {"script_sha256": previous.get("script_sha256"), "torch": previous.get("versions", {}).get("torch"),
              "precision": str(amp).removeprefix("torch.") if amp else "float32"}
    for record in finished_records(previous):
        record.setdefault("provenance", header)


def config_changes(old: dict, new: dict) -> list[str]:
    """The settings that differ between a run's recorded configuration and another, as 'name: old -> new',
    leaving out those a resumed run may change."""
    as_json = lambda settings: json.loads(json.dumps(settings))  # tuples as lists, as results.json holds them
    old = {**as_json(dataclasses.asdict(Config())), **as_json(old)}  # defaults: settings added since that run
    new = as_json(new)
    return [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items() if k not in RESUME_MAY_DIFFER and old.get(k) != v]


RANK_FILE = ".rank-{}.json"  # in the output directory: entries a rank > 0 finished, for rank 0 to gather


def gather_rank_files(results: dict, rank_files: list[Path]) -> None:
    """Add the entries the other ranks finished (read from their files) that results lacks."""
    for path in rank_files:
        try:
            gathered = json.loads(path.read_text())  # written atomically: whole or absent
        except (OSError, json.JSONDecodeError) as err:
            raise ExperimentError(f"{path} is unreadable ({err}); the entries it held are lost: move it away "
                                  "and run with --resume to train them again") from None
        if config_changes(gathered.pop("config", {}), results["config"]):
            continue  # left by a run with another configuration: not this run's entries
        for section, entries in gathered.items():
            done = finished_entries(results)
            results.setdefault(section, []).extend(
                e for e in entries if (f"layer_map {e['representation']}" if section == "layer_map"
                                       else e["representation"]) not in done)


def previous_results(path: Path, header: dict, cfg: Config, ranks: Ranks = Ranks()) -> dict | None:
    """The results an interrupted run left (with the entries its other ranks finished), when resuming;
    refuses a mismatched configuration, and refuses to overwrite an interrupted run unless asked to
    resume it."""
    rank_files = sorted(path.parent.glob(RANK_FILE.format("*")))
    if not path.exists() and not rank_files:
        return None
    try:
        previous = json.loads(path.read_text()) if path.exists() else {**header, "complete": False}
    except (OSError, json.JSONDecodeError) as err:
        raise ExperimentError(f"{path} is unreadable ({err}); move it away to start afresh") from None
    problem = results_shape_problem(previous)
    if problem:
        raise ExperimentError(f"{path} is not a results file of this script ({problem}); move it away to start afresh")
    if previous.get("complete") is False:
        gather_rank_files(previous, rank_files)  # what its other ranks had finished
    if not previous.get("groups") or not finished_entries(previous):
        return None  # nothing finished: nothing to keep or to resume
    if not (cfg.resume or ranks.restarted):
        if previous.get("complete") is False:
            raise ExperimentError(f"{path} holds an interrupted run: continue it with --resume, "
                                  "or move it away / choose another --output-dir to start afresh")
        return None
    changed = config_changes(previous.get("config", {}), header["config"])
    if previous.get("dataset_fingerprint") != header["dataset_fingerprint"]:
        changed.append("the dataset's data")
    if changed:
        raise ExperimentError(f"--resume: {path} was made with another configuration ({'; '.join(changed)}); "
                              "rerun with its flags or choose another --output-dir")
    with_own_provenance(previous)
    mixed = list(dict.fromkeys(d for r in finished_records(previous) for d in provenance_differences(r, header["provenance"])))
    if mixed and not cfg.accept_mixed_provenance:
        raise ExperimentError(f"--resume: the finished entries in {path} were made with another {'; '.join(mixed)}; "
                              "resume with that script, device and torch, or pass --accept-mixed-provenance to keep "
                              "them (marked in results.txt)")
    return previous


def write_reports(out_dir: Path, results: dict) -> str:
    """results.txt and the plots, from whatever entries have finished; returns the table."""
    table = comparison_table(results)
    (out_dir / "results.txt").write_text(table + "\n")
    plot_summary(results, out_dir / "summary.png")
    if "all" in results["groups"] and len(results["groups"]) > 1:
        plot_retention(results, out_dir / "retention.png")
    best = best_entry(results)
    for old in out_dir.glob("confusion_*.png"):
        old.unlink()
    if best is not None:  # every entry had a failed run: no confusion matrix worth showing
        plot_confusion(results, best, out_dir / f"confusion_{best['representation']}.png")
    if results.get("layer_map"):
        plot_layer_map(results, out_dir / "layer_map.png")
    return table


@dataclass
class Experiment:
    """Everything resolved and checked before any feature is computed."""

    loaded: LoadedDataset
    labels: Labels
    splits: dict[str, np.ndarray]
    modules: list[Module]
    groups: dict[str, list[Module]]
    blocks: dict[str, list[Module]]
    out_dir: Path
    warnings: list[str]


def output_directory(cfg: Config) -> Path:
    return Path(cfg.output_dir) / f"visual_ablation_{dataset_short_name(cfg.dataset)}"


LOCK_FILE = ".lock"


@contextmanager
def exclusive_output_dir(out_dir: Path):
    """Hold an exclusive lock on the experiment directory for the whole run: two runs writing one
    directory would leave one run's results.json beside the other's plots.  The kernel releases
    the lock when its holder dies, so the lock of a dead process is simply taken over."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "a process that is starting"
            raise ExperimentError(f"{out_dir} is in use by another run ({holder}); wait for it to finish, "
                                  "or choose another --output-dir") from None
        lock.truncate(0)
        lock.write(f"pid {os.getpid()}: {' '.join(sys.argv)}\n")
        lock.flush()
        yield


def warn(warnings: list[str], message: str) -> None:
    """A warning printed now and kept for results.json."""
    warnings.append(message)
    tqdm.write(f"WARNING: {message}")


def checked_splits(cfg: Config, labels: Labels, warnings: list[str]) -> dict[str, np.ndarray]:
    """The split of the labelled rows, refused (or warned of) when a split lacks a class."""
    if len(labels.class_names) < 2:
        raise ExperimentError(f"label column {cfg.label_column!r} holds a single class; a classifier needs two or more")
    if labels.unlabeled:
        warn(warnings, f"left out {labels.unlabeled} rows without a label in {cfg.label_column!r} (--drop-unlabeled)")
    splits = labeled_splits(labels)
    missing = missing_classes(labels, splits)
    if missing:
        detail = "; ".join(f"{split} lacks {', '.join(names[:5])}" for split, names in missing.items())
        if not cfg.allow_missing_classes:
            raise ExperimentError(f"the split is too small to hold every class ({detail}); use more adapters "
                                  "per class, or pass --allow-missing-classes to run anyway")
        warn(warnings, f"split lacks classes: {detail}; metrics on those splits are not comparable")
    return splits


def checked_groups(cfg: Config, modules: list[Module]) -> dict[str, list[Module]]:
    """The layer groups that select something; at least one of them able to feed a requested representation."""
    groups = {g: ms for g, ms in layer_groups(modules, cfg.group_names, cfg.custom_groups).items() if ms}
    if not groups:
        raise ExperimentError(f"the layer groups {', '.join(cfg.group_names)} select no LoRA layers in this dataset")
    for g in cfg.group_names:
        if g not in groups:
            tqdm.write(f"notice: layer group {g!r} selects no layers in this dataset; skipped")
    if not any(feature_units(ms, rep) for ms in groups.values() for rep in cfg.representations):
        raise ExperimentError(f"{', '.join(cfg.representations)} need down/up pairs of a module, and no group has "
                              "any; add a representation of single tensors to --representations")
    return groups


def not_applicable(cfg: Config, groups: dict[str, list[Module]]) -> list[str]:
    """The (representation, group) entries that cannot be computed, each said in a line: a pair
    representation on a group where no module holds both factors.  They are skipped, not refused."""
    return [f"{rep} on {g}: no module of the group holds both factors, which {rep} describes together"
            for rep in cfg.representations for g, ms in groups.items() if not feature_units(ms, rep)]


def checked_layer_map(cfg: Config, modules: list[Module]) -> None:
    for rep in cfg.layer_map:
        if not mapped_modules(modules, rep):
            raise ExperimentError(f"--layer-map {rep} needs down/up pairs of a module, and this dataset has none; "
                                  f"leave {rep} out of --layer-map")


def checked_ablation_blocks(cfg: Config, groups: dict[str, list[Module]]) -> dict[str, list[Module]]:
    """The blocks --block-ablation leaves out one at a time (none without the flag)."""
    if not cfg.block_ablation:
        return {}
    if "all" not in groups:
        raise ExperimentError("--block-ablation measures each block's drop against all layers; "
                              "add all to --layer-groups")
    blocks = network_blocks(groups["all"])
    if len(blocks) < 2:
        raise ExperimentError(f"--block-ablation needs two or more blocks, and every module is in {next(iter(blocks))}; "
                              "leave out --block-ablation")
    return blocks


def prepare_experiment(cfg: Config, out_dir: Path, ranks: Ranks = Ranks()) -> Experiment:
    """Resolve and check everything that can be checked before computing: one clear error each."""
    check_writable(Path(cfg.cache_dir), "--cache-dir")
    loaded = load_experiment_dataset(cfg, ranks)
    warnings = list(loaded.warnings)
    labels = encode_labels(loaded.dataset, cfg.label_column, cfg.drop_unlabeled)
    splits = checked_splits(cfg, labels, warnings)
    modules = sample_modules(lora_modules(loaded.dataset.column_names), cfg.sample_layers, cfg.seed)
    if any(r in PAIR_REPRESENTATIONS for r in cfg.representations):
        lora_scales(loaded.dataset.data.table)  # checked now, read during extraction
    groups = checked_groups(cfg, modules)
    checked_layer_map(cfg, modules)
    blocks = checked_ablation_blocks(cfg, groups)
    return Experiment(loaded, labels, splits, modules, groups, blocks, out_dir, warnings)


def save_results(path: Path, results: dict) -> None:
    """results.json, atomically; a failed write (disk full) is a user error: the previous file stays whole."""
    try:
        write_json_atomic(path, results)
    except OSError as err:
        raise ExperimentError(f"cannot write {path} ({err.strerror or err}); free space on that disk, then run "
                              "the same command with --resume: entries already in results.json and cached "
                              "features are kept") from None


def failed_to_train_warning(results: dict, cfg: Config) -> str | None:
    """One line naming every entry with runs that failed to train, or None."""
    failed = [f"{e['representation']} (runs {', '.join(map(str, e['failed_to_train_runs']))})"
              for e in all_entries(results) + results.get("block_ablation", []) if e["failed_to_train_runs"]]
    for layer_map in results.get("layer_map", []):
        modules = sum(1 for e in layer_map["modules"] if e["failed_to_train_runs"])
        if modules:
            failed.append(f"layer map {layer_map['representation']} ({modules} of {layer_map['num_modules']} modules)")
    if not failed:
        return None
    return (f"{len(failed)} entries have runs that failed to train although others learned from the same features "
            f"(kept in the means, as the published protocol does; see the per-run values in results.txt): "
            f"{'; '.join(failed)}; rerun with --min-epochs {max(2 * cfg.patience, 2 * cfg.min_epochs)} to train past them")


def edge_setting_warning(results: dict) -> str | None:
    """One line naming the entries whose chosen setting (L2, k) sits at an edge of its grid."""
    named = [e["representation"] for e in all_entries(results) + results.get("block_ablation", [])
             if any(edge for _, edge in chosen_settings(e))]
    shown = ", ".join(named[:3]) + (f" and {len(named) - 3} more" if len(named) > 3 else "")
    return (f"the validation split chose a setting at an edge of its grid in {len(named)} entries "
            f"({shown}; marked {EDGE_MARK} in results.txt): the best may lie beyond it") if named else None


def token_seen(path: Path, token: str) -> bool:
    try:
        return path.read_text() == token
    except OSError:
        return False


def unshared_directory(directories: dict[str, Path], ranks: Ranks) -> ExperimentError | None:
    """A directory that is not the same storage for every rank, found by rank 0 writing a file there
    that every rank must read back."""
    if ranks.world == 1:
        return None
    token = [os.urandom(8).hex()]
    torch.distributed.broadcast_object_list(token, src=0)
    name = f".shared-check-{token[0]}"
    if ranks.rank == 0:
        for directory in directories.values():
            (directory / name).write_text(token[0])
    barrier(ranks)
    unseen = [(flag, d) for flag, d in directories.items() if not token_seen(d / name, token[0])]
    barrier(ranks)
    if ranks.rank == 0:
        for directory in directories.values():
            (directory / name).unlink(missing_ok=True)
    if not unseen:
        return None
    flag, directory = unseen[0]
    return ExperimentError(f"{flag} {directory} is not shared between the processes: a process on {platform.node()} "
                           "does not see a file rank 0 wrote there; put it on storage every node mounts")


def differing_data(fingerprint: str, ranks: Ranks) -> ExperimentError | None:
    """Ranks whose copies of the dataset differ in content (fingerprints are the same wherever a copy sits)."""
    if ranks.world == 1:
        return None
    prints = [None] * ranks.world
    torch.distributed.all_gather_object(prints, (platform.node(), fingerprint))
    if len({p for _, p in prints}) == 1:
        return None
    node, theirs = next((n, p) for n, p in prints if p != prints[0][1])
    return ExperimentError(f"the processes read different data: rank 0's copy of the dataset has fingerprint "
                           f"{prints[0][1]}, the copy on {node} {theirs}; give every node the same dataset")


@dataclass(frozen=True)
class Job:
    """What one rank trains at a time: a representation on a layer group or without a block (kind
    "group" / "ablation", name the group or block) with its pending classifiers, or a layer map."""

    kind: str
    representation: str
    name: str = ""
    classifiers: tuple[str, ...] = ()

    @property
    def group(self) -> str:
        """Derived: the layer group an entry of this job is named after."""
        return self.name if self.kind == "group" else f"without_{self.name}"

    def entry_names(self) -> list[str]:
        if self.kind == "map":
            return [f"layer_map {self.representation}"]
        return [entry_name(self.representation, self.group, c) for c in self.classifiers]


def assigned_jobs(jobs: list[Job], costs: list[int], ranks: Ranks) -> list[Job]:
    """This rank's jobs, in plan order: taken longest first, each by the rank with the least expected
    cost so far (every rank computes the same assignment)."""
    loads, mine = [0] * ranks.world, []
    for index in sorted(range(len(jobs)), key=lambda i: (-costs[i], i)):
        rank = loads.index(min(loads))
        loads[rank] += costs[index]
        if rank == ranks.rank:
            mine.append(index)
    return [jobs[i] for i in sorted(mine)]


def gather_ranks(results: dict, out_dir: Path, ranks: Ranks) -> None:
    if ranks.world > 1 or ranks.restarted:
        gather_rank_files(results, sorted(out_dir.glob(RANK_FILE.format("*"))))


def remove_rank_files(out_dir: Path) -> None:
    for path in out_dir.glob(RANK_FILE.format("*")):
        path.unlink(missing_ok=True)


def prepared(cfg: Config, ranks: Ranks) -> tuple[torch.device, Experiment]:
    device = resolve_device(cfg, ranks)
    check_writable(Path(cfg.output_dir), "--output-dir")
    out_dir = output_directory(cfg)
    exp = prepare_experiment(cfg, out_dir, ranks)
    out_dir.mkdir(parents=True, exist_ok=True)
    return device, exp


def job_modules(job: Job, exp: Experiment) -> list[Module]:
    if job.kind == "group":
        return exp.groups[job.name]
    if job.kind == "map":
        return mapped_modules(exp.modules, job.representation)
    return [m for m in exp.groups["all"] if m not in exp.blocks[job.name]]


def planned_jobs(cfg: Config, exp: Experiment) -> list[Job]:
    """Every job of the experiment in report order: each representation on each group, the layer maps,
    then the block ablation."""
    jobs = [Job("group", rep, g, cfg.classifiers) for rep in cfg.representations for g in exp.groups]
    jobs += [Job("map", rep) for rep in cfg.layer_map]
    blocks = exp.blocks if cfg.block_ablation else {}
    jobs += [Job("ablation", rep, block, cfg.classifiers) for rep in cfg.representations for block in blocks]
    return [job for job in jobs if feature_units(job_modules(job, exp), job.representation)]  # see not_applicable


def pending_jobs(jobs: list[Job], done: set[str]) -> list[Job]:
    """The jobs with entries not finished yet, each with only its unfinished classifiers."""
    pending = []
    for job in jobs:
        if job.kind == "map":
            pending += [job] if job.entry_names()[0] not in done else []
            continue
        left = tuple(c for c, name in zip(job.classifiers, job.entry_names()) if name not in done)
        pending += [dataclasses.replace(job, classifiers=left)] if left else []
    return pending


def job_cost(job: Job, exp: Experiment, store: FeatureStore, cfg: Config) -> int:
    """Expected training cost of a job's entries, as each classifier estimates its own."""
    if job.kind == "map":  # a level's probes on their padded columns, level by level
        trained = [(cfg.layer_map_classifier, max(features_width(store, list(p.modules), job.representation)
                                                  for p in probes), len(probes))
                   for probes in map_probes(exp.modules, job.representation).values()]
    else:
        trained = [(name, features_width(store, job_modules(job, exp), job.representation), None)
                   for name in job.classifiers]
    return sum(CLASSIFIERS[name].cost(exp.loaded.dataset.num_rows, width, len(exp.labels.class_names),
                                      run_slices(cfg, CLASSIFIERS[name], blocks), cfg)
               for name, width, blocks in trained)


def trained_entries(store: FeatureStore, exp: Experiment, cfg: Config, device: torch.device, representation: str,
                    modules: list[Module], group: str, classifiers: list[str]):
    """Train and evaluate each classifier on one selection of modules, standardised once; yields entries."""
    features = group_feature_matrix(store, modules, representation)
    data = standardise(features, exp.labels.codes, exp.splits, len(exp.labels.class_names), device,
                       feature_budget_bytes(device, cfg.max_resident_features_gb), cfg.num_workers,
                       batch=cfg.batch_size)
    for classifier in classifiers:
        name = entry_name(representation, group, classifier)
        result = train_runs(data, cfg, device, name, CLASSIFIERS[classifier])
        entry = evaluate_entry(result, data, cfg, device, name, sum(len(m.columns) for m in modules))
        stalled = stalled_run_indices(entry)
        tqdm.write(f"{name:<32} test acc {entry['test_acc_mean']:.3f} +- {entry['test_acc_std']:.3f}  "
                   f"({result.seconds:.1f}s, best epoch {entry['best_epoch_mean']:.0f})"
                   + (f"  {len(entry['failed_runs'])} runs failed" if entry["failed_runs"] else "")
                   + (f"  {len(stalled)} of {cfg.runs} runs barely fit the training split" if stalled else ""))
        yield entry


def trained_layer_map(store: FeatureStore, exp: Experiment, cfg: Config, device: torch.device, representation: str) -> dict:
    """The layer map of one representation: --layer-map-classifier on each probe's features alone (each
    module's factors and pair, each block, position and factor), every probe of a level with its runs
    (and grid settings) trained together as one stacked ensemble."""
    layer_map = {"representation": representation, "classifier": cfg.layer_map_classifier,
                 "num_modules": len(mapped_modules(exp.modules, representation)), "training_time": 0.0}
    for level, probes in map_probes(exp.modules, representation).items():
        features, widths = layer_map_matrix(store, probes, representation)
        data = standardise(features, exp.labels.codes, exp.splits, len(exp.labels.class_names), device,
                           feature_budget_bytes(device, cfg.max_resident_features_gb), cfg.num_workers,
                           block_width=features.shape[1] // len(probes), batch=cfg.batch_size)
        result = train_runs(data, cfg, device, f"layer map {representation}: {level}",
                            CLASSIFIERS[cfg.layer_map_classifier], num_blocks=len(probes))
        layer_map[level] = layer_map_entries(result, data, cfg, device, probes, widths, representation)
        layer_map["training_time"] += result.seconds
        best = sorted(layer_map[level], key=lambda e: -e["test_acc_mean"])[:3]
        tqdm.write(f"layer map {representation}: {len(probes)} {level} in {result.seconds:.1f}s; best "
                   + ", ".join(f"{e['representation'].removeprefix(representation + '_')} {e['test_acc_mean']:.3f}"
                               for e in best))
        del data, features
        release_device_memory(device)
    return layer_map


def trained_job(job: Job, store: FeatureStore, exp: Experiment, cfg: Config, device: torch.device):
    """(results.json section, entry) for each entry the job trains, as each finishes."""
    if job.kind == "map":
        yield "layer_map", trained_layer_map(store, exp, cfg, device, job.representation)
        return
    section = group_result_key(job.name)[0] if job.kind == "group" else "block_ablation"
    for entry in trained_entries(store, exp, cfg, device, job.representation, job_modules(job, exp), job.group,
                                 list(job.classifiers)):
        if job.kind == "ablation":
            entry["features"], entry["block"] = job.representation, job.name
        yield section, entry


def in_report_order(results: dict, jobs: list[Job]) -> None:
    """Every section's entries in the order of the plan, whichever rank or run finished them first."""
    position = {name: i for i, name in enumerate(n for job in jobs for n in job.entry_names())}
    key = lambda e: position.get(e["representation"] if "modules" not in e else f"layer_map {e['representation']}",
                                 len(position))
    for section, entries in results.items():
        if section.endswith("_results") or section in EXTRA_SECTIONS:
            entries.sort(key=key)


def starting_results(cfg: Config, exp: Experiment, device: torch.device, ranks: Ranks, command: str) -> dict:
    """results.json as this run starts: its header, with the entries an interrupted run (any of its
    ranks) finished when resuming; rank 0 saves it at once and says what the run is."""
    results = results_header(cfg, exp.loaded, exp.labels, exp.modules, exp.groups, device)
    results["processes"], results["command"] = ranks.world, command
    results["provenance"] = provenance(cfg, device, ranks.world)
    results["split_sizes"] = {split: len(rows) for split, rows in exp.splits.items()}
    results["not_applicable"] = not_applicable(cfg, exp.groups)
    results["chance"] = majority_share(exp.labels.codes[exp.splits["test"]])
    results["chance_uniform"] = 1 / len(exp.labels.class_names)
    results["unlabeled_rows"] = exp.labels.unlabeled
    results["warnings"] = exp.warnings
    results_path = exp.out_dir / "results.json"
    previous = agreed(lambda: previous_results(results_path, results, cfg, ranks), ranks)
    if previous is not None:
        results.update({k: v for k, v in previous.items() if k.endswith("_results") or k in EXTRA_SECTIONS})
        if ranks.rank == 0:  # with what other ranks had finished, before they write their files anew
            save_results(results_path, results)
    if ranks.rank == 0:
        print(f"dataset {exp.loaded.name}: {exp.loaded.dataset.num_rows} adapters, {results['num_classes']} classes, "
              f"{results['num_all_layers']} LoRA tensors; device {device}; {cfg.runs} runs per entry"
              + (f"; {ranks.world} processes" if ranks.world > 1 else "")
              + (f"; resuming with {len(finished_entries(results))} entries done" if previous is not None else ""))
    return results


def record_extraction(results: dict, store: FeatureStore, computed: int, seconds: float, cfg: Config) -> None:
    """What extraction did and found: its time, features computed and loaded, NaN/Inf counts."""
    results["feature_extraction"] = {"seconds": seconds, "computed": computed, "loaded_from_cache": store.loaded}
    results["nonfinite_weights"] = {"zeroed": cfg.allow_nonfinite, "counts": store.nonfinite}
    results["nonfinite_features"] = {"zeroed": cfg.allow_nonfinite, "counts": store.nonfinite_features}
    if store.nonfinite_features:
        warn(results["warnings"], f"zeroed NaN/Inf features (--allow-nonfinite) in {len(store.nonfinite_features)} "
                                  "(representation, layer) pairs; see nonfinite_features")


def run_entries(cfg: Config, exp: Experiment, device: torch.device, ranks: Ranks = Ranks(), command: str = "") -> None:
    """Extract the features, then train and evaluate every entry not yet finished (each representation
    and layer group with each classifier, then the layer maps, then the block ablation); rank 0 writes
    results.json after each entry it finishes or gathers, and the reports even when interrupted."""
    started = time.perf_counter()
    results_path = exp.out_dir / "results.json"
    results = starting_results(cfg, exp, device, ranks, command)
    done = finished_entries(results)
    plan = planned_jobs(cfg, exp)
    jobs = pending_jobs(plan, done)
    ending, table = [], None
    try:
        extraction_started = time.perf_counter()
        needed = tuple(dict.fromkeys(job.representation for job in jobs))
        store = extract_features(exp.loaded, exp.modules, dataclasses.replace(cfg, representations=needed), device, ranks)
        own_computed, computed = store.computed, summed(ranks, store.computed)
        record_extraction(results, store, computed, time.perf_counter() - extraction_started, cfg)
        mine = assigned_jobs(jobs, [job_cost(job, exp, store, cfg) for job in jobs], ranks)
        own: dict[str, list] = defaultdict(list)  # what this rank finished, for rank 0 to gather

        def finished(section: str, entry: dict) -> None:
            entry["provenance"] = results["provenance"]
            if ranks.rank > 0:
                own[section].append(entry)
                write_json_atomic(exp.out_dir / RANK_FILE.format(ranks.rank), {"config": results["config"], **own})
                return
            results[section].append(entry)
            results["feature_extraction"]["computed"] = computed + store.computed - own_computed  # with any recomputed on reading
            gather_ranks(results, exp.out_dir, ranks)
            with_statistics(results)
            save_results(results_path, results)

        for job in progress_bar(mine, desc="entries", unit="job"):
            for section, entry in trained_job(job, store, exp, cfg, device):
                finished(section, entry)
        wait_for_ranks(ranks, "finished")  # every rank's entries are in its file
        if ranks.rank == 0:
            gather_ranks(results, exp.out_dir, ranks)
            with_statistics(results)
            ending = [w for w in (failed_to_train_warning(results, cfg), edge_setting_warning(results)) if w]
            results["warnings"] += ending
            results["complete"] = True
    finally:
        if ranks.rank == 0:
            gather_ranks(results, exp.out_dir, ranks)
            in_report_order(results, plan)
            with_statistics(results)
            results["total_seconds"] = time.perf_counter() - started
            save_results(results_path, results)
            if results["complete"]:
                remove_rank_files(exp.out_dir)
                remove_wait_files(exp.out_dir)
            if finished_entries(results):
                table = write_reports(exp.out_dir, results)
    if ranks.rank > 0:
        return
    print("\n" + table)
    for warning in ending:
        print(f"\nWARNING: {warning}")
    print(f"\nwrote {results_path}, results.txt and the plots in {results['total_seconds']:.0f}s")


def run_experiment(cfg: Config, ranks: Ranks, command: str = "") -> Path:
    device, exp = agreed(lambda: prepared(cfg, ranks), ranks)
    out_dir = exp.out_dir
    raise_agreed(unshared_directory({"--cache-dir": Path(cfg.cache_dir), "--output-dir": out_dir}, ranks), ranks)
    raise_agreed(differing_data(exp.loaded.fingerprint, ranks), ranks)
    with exclusive_output_dir(out_dir) if ranks.rank == 0 else nullcontext():
        if ranks.rank == 0:
            save_code(out_dir, command)
        barrier(ranks)  # the others start once rank 0 holds the directory
        wait_setup(out_dir, ranks)
        run_entries(cfg, exp, device, ranks, command)
    return out_dir


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(argv)
    try:
        ranks = launcher_ranks()
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    command = shlex.join([Path(__file__).name, *argv])
    if ranks.world > 1:  # the cache is how ranks share features
        cfg = dataclasses.replace(cfg, cache_features=True)
    signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's SIGTERM ends the run like Ctrl-C: results kept
    if not sys.stderr.isatty():  # a redirected log: no bars of the datasets library either (see progress_bar)
        import datasets
        datasets.disable_progress_bars()
    try:
        with process_group(ranks):
            run_experiment(cfg, ranks, command)
    except ExperimentError as err:
        if err.same_on_every_rank:
            if ranks.rank == 0:
                print(f"error: {err}", file=sys.stderr)
        else:
            print(f"error: {f'rank {ranks.rank}: ' if ranks.world > 1 else ''}{err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if ranks.rank == 0:
            print(f"\ninterrupted: finished entries are in {cfg.output_dir} (results.json, \"complete\": false); "
                  "continue with the same command and --resume", file=sys.stderr)
        return 130
    return 0


# =============================================================================================
# Appendix: input plumbing
# =============================================================================================
# What turns inputs other than a published table into one, and what reads the weights out of a table.
# The experiment calls in here at three points: load_experiment_dataset builds the sanity-check dataset
# (write_sanity_check_dataset) or a folder's table (build_adapter_table), and extraction reads weights
# through WeightReader.  A researcher changing the experiment need not read further.

# --- A. writing a table ----------------------------------------------------------------------
# Arrow tables (consecutive row batches) saved as one save_to_disk dataset that is complete or absent:
# streamed to one Arrow file, so memory holds one batch, laid out by datasets beside the target, then
# renamed into place: an interrupted write leaves no half-written dataset behind.

WRITER_BATCH_BYTES = 64 << 20  # weights per Arrow batch written: bounds the memory a batch takes


def nested_list_array(matrices: np.ndarray) -> pa.Array:
    """(n, rows, cols) matrices as list<list<float32>>, the published tables' storage, without a Python loop.

    (datasets' own encoder walks every matrix row in Python, several times slower than reading.)
    """
    n, rows, cols = matrices.shape
    row_offsets = pa.array(np.arange(0, n * rows * cols + 1, cols, dtype=np.int32))
    matrix_offsets = pa.array(np.arange(0, n * rows + 1, rows, dtype=np.int32))
    return pa.ListArray.from_arrays(matrix_offsets, pa.ListArray.from_arrays(row_offsets, matrices.reshape(-1)))


def write_arrow_stream(tables, schema: pa.Schema, arrow_file: str) -> None:
    """Arrow tables written one after the other to one Arrow stream file, which datasets opens as is."""
    with pa.OSFile(arrow_file, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for table in tables:
            writer.write_table(table)


def save_batches(tables, schema: pa.Schema, path: Path, extra_files: dict[str, str] | None = None) -> None:
    """Arrow tables (consecutive row batches) saved as one dataset with save_to_disk at path,
    complete or absent: streamed to an Arrow file (memory holds one batch), copied into
    save_to_disk's layout beside the target, then renamed into place."""
    import datasets
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        arrow_file = os.path.join(scratch, "rows.arrow")
        write_arrow_stream(tables, schema, arrow_file)
        ds = datasets.Dataset.from_file(arrow_file)
        ds.save_to_disk(str(partial))
        del ds
    for name, text in (extra_files or {}).items():
        (partial / name).write_text(text)
    os.replace(partial, path)


# --- B. the generated dataset (sanity-check) -------------------------------------------------
# A table in the published format (the SD v1.5 attention LoRA shapes as nested float32 lists,
# category_label and category_name) shaped like trained LoRAs, with a known answer: each down factor
# is a random initialisation plus a small update and carries no class signal; the up factors carry
# it, in the blocks of SANITY_PLANTED only, attn1 (visual) more weakly than attn2 (text).  The same
# --sanity-rows give the same table on every machine, every split holds every class as far as its
# size allows, and it is written once, with its answer (answer.json), and reused.

SD15_BLOCKS = (  # (transformer block prefix, channels) of the Stable Diffusion v1.5 UNet
    [(f"down_blocks.{b}.attentions.{a}", ch) for b, ch in ((0, 320), (1, 640), (2, 1280)) for a in (0, 1)]
    + [("mid_block.attentions.0", 1280)]
    + [(f"up_blocks.{b}.attentions.{a}", ch) for b, ch in ((1, 1280), (2, 640), (3, 320)) for a in (0, 1, 2)]
)
TEXT_CONTEXT_DIM = 768  # CLIP text features read by attn2 to_k / to_v
CLASS_NAMES = ("airplane", "bird", "cat", "car", "dog", "fish", "fruit", "ship", "snake", "vegetable")
# The sanity-check's answer: the blocks whose up factors carry the class, and how strongly (1: strong)
SANITY_PLANTED = (("down_blocks.1.attentions.0", 1.0), ("down_blocks.2.attentions.1", 1.0),
                  ("up_blocks.1.attentions.1", 1.0), ("mid_block.attentions.0", 0.4), ("up_blocks.3.attentions.0", 0.4))


def sd15_lora_shapes(rank: int = 1, projections: tuple[str, ...] = ("to_q", "to_v")) -> dict[str, tuple[int, int]]:
    """Column name -> matrix shape for LoRA on the SD v1.5 attention projections, sorted by name."""
    shapes = {}
    for block, ch in SD15_BLOCKS:
        for attn in ("attn1", "attn2"):
            for proj in projections:
                reads_text = attn == "attn2" and proj in ("to_k", "to_v")
                in_features = TEXT_CONTEXT_DIM if reads_text else ch
                module = f"{block}.transformer_blocks.0.{attn}.{proj}"
                shapes[f"{module}.lora.down.weight"] = (rank, in_features)
                shapes[f"{module}.lora.up.weight"] = (ch, rank)
    return dict(sorted(shapes.items()))


@dataclass(frozen=True)
class SyntheticSpec:
    """A generated LoRA dataset in the published layout, shaped like trained LoRAs, with a class
    signal of known place and strength.

    A down factor is nn.Linear's random initialisation (as PEFT and diffusers start lora_A) plus an
    update of `down_update` of its size, the same for every class.  An up factor starts at zero; what
    training wrote into it is noise, and in a planted block (`planted`: block -> strength s; None:
    every block at 1; attn1 modules get `visual_share` of s) three class signals, each visible to
    different representations: a gain on its scale (norms, spectra, the update's singular values), a
    tail weight that makes its values heavier-tailed (quantiles, kurtosis, histograms) and a prototype
    direction added to its values (raw weights, the update's canonical factors).  Every up factor also
    leans one way, `shared_shift` of its noise in every class (training moves an adapter's up factors
    along a shared direction), and every adapter has its own overall update size, hiding absolute norms.
    """

    rows: int = 360
    rank: int = 1
    projections: tuple[str, ...] = ("to_q", "to_v")
    num_classes: int = 10
    seed: int = 0
    planted: tuple[tuple[str, float], ...] | None = SANITY_PLANTED
    visual_share: float = 0.5
    gain_spread: float = 0.3
    tail_spread: float = 0.5
    prototype_strength: float = 0.3
    down_update: float = 0.1
    shared_shift: float = 1.0
    array2d: bool = False

    @cached_property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return sd15_lora_shapes(self.rank, self.projections)

    def strength(self, module: str) -> float:
        """The class signal in a module's up factor: its block's planted strength, times visual_share for attn1."""
        block = module_place(module)[0]
        planted = 1.0 if self.planted is None else dict(self.planted).get(block, 0.0)
        return planted * (self.visual_share if ".attn1." in module else 1.0)

    def answer(self) -> dict:
        """Where the class signal is, for answer.json beside the data."""
        blocks = list(dict.fromkeys(module_place(name)[0] for name in self.shapes))
        return {"factor": "up", "visual_share": self.visual_share,
                "block_strength": {b: 1.0 if self.planted is None else dict(self.planted).get(b, 0.0) for b in blocks},
                "module_strength": {m: self.strength(m) for m in dict.fromkeys(n.rsplit(".lora.", 1)[0] for n in self.shapes)},
                "signals": {"gain_spread": self.gain_spread, "tail_spread": self.tail_spread,
                            "prototype_strength": self.prototype_strength},
                "down_update": self.down_update, "shared_shift": self.shared_shift}


@functools.lru_cache(maxsize=4)
def synthetic_labels(spec: SyntheticSpec) -> np.ndarray:
    """Every row's class, dealt round-robin within each split of the published split procedure,
    so that every split holds every class (as far as its size allows)."""
    labels = np.empty(spec.rows, dtype=np.int64)
    offset = np.random.default_rng(spec.seed).integers(spec.num_classes)
    try:
        parts = split_indices(spec.rows).values()
    except ExperimentError:  # too few rows to split at all: deal the classes over every row
        parts = [np.arange(spec.rows)]
    for idx in parts:
        labels[idx] = (np.arange(len(idx)) + offset) % spec.num_classes
    return labels


def synthetic_rows(spec: SyntheticSpec, start: int, stop: int) -> dict[str, np.ndarray]:
    """Rows [start, stop) of the generated dataset, deterministic for a given (seed, start, stop)."""
    block = np.random.default_rng([spec.seed, start, stop])
    n = stop - start
    labels = synthetic_labels(spec)[start:stop]
    update_size = np.exp(0.15 * block.standard_normal(n))[:, None, None]  # each adapter's own training length
    columns: dict[str, np.ndarray] = {}
    for t, (name, shape) in enumerate(spec.shapes.items()):
        noise = np.random.default_rng([spec.seed, start, stop, t])
        if name.endswith(".lora.down.weight"):
            bound = 1 / np.sqrt(shape[1])  # nn.Linear's initialisation, then a small update
            init = noise.uniform(-bound, bound, (n, *shape))
            columns[name] = (init + spec.down_update * bound * noise.standard_normal((n, *shape))).astype(np.float32)
            continue
        share = spec.strength(name.rsplit(".lora.", 1)[0])
        structure = np.random.default_rng([spec.seed, t])  # the module's class signal: the same in every row block
        gains = np.exp(share * spec.gain_spread * structure.standard_normal(spec.num_classes))
        tails = share * spec.tail_spread * structure.random(spec.num_classes)
        prototypes = structure.standard_normal((spec.num_classes, *shape))
        heavy = noise.standard_normal((n, *shape)) * np.exp(tails[labels][:, None, None] * noise.standard_normal((n, *shape)))
        values = heavy + spec.shared_shift + share * spec.prototype_strength * prototypes[labels]
        scale = gains[labels][:, None, None] * update_size * np.exp(0.1 * noise.standard_normal((n, 1, 1)))
        columns[name] = (values * scale / np.sqrt(shape[0])).astype(np.float32)
    columns["category_label"] = labels.astype(np.int64)
    columns["category_name"] = np.array([CLASS_NAMES[i % len(CLASS_NAMES)] for i in labels])
    return columns


def synthetic_features(spec: SyntheticSpec):
    from datasets import Array2D, Features, Sequence, Value
    tensor = (lambda s: Array2D(s, "float32")) if spec.array2d else (lambda s: Sequence(Sequence(Value("float32"))))
    feats = {name: tensor(shape) for name, shape in spec.shapes.items()}
    feats.update(category_label=Value("int64"), category_name=Value("string"))
    return Features(feats)


def synthetic_table(spec: SyntheticSpec, start: int, stop: int, schema: pa.Schema) -> pa.Table:
    """Rows [start, stop) of the generated dataset as an Arrow table in its schema."""
    columns = synthetic_rows(spec, start, stop)
    arrays = []
    for field in schema:
        values = columns[field.name]
        if values.ndim == 3:
            storage = nested_list_array(values)
            arrays.append(pa.ExtensionArray.from_storage(field.type, storage) if spec.array2d else storage)
        else:
            arrays.append(pa.array(values, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def synthetic_tables(spec: SyntheticSpec, schema: pa.Schema):
    """The generated dataset as Arrow tables of WRITER_BATCH_BYTES of weights each."""
    floats_per_row = sum(r * c for r, c in spec.shapes.values())
    rows = max(1, WRITER_BATCH_BYTES // (4 * floats_per_row))
    return (synthetic_table(spec, start, min(start + rows, spec.rows), schema) for start in range(0, spec.rows, rows))


def write_synthetic_dataset(spec: SyntheticSpec, path: Path) -> Path:
    """Write the dataset with save_to_disk in batches, so memory stays bounded, with its answer.json;
    reuse it if present."""
    with building(path):
        if not (path / "state.json").exists():
            schema = synthetic_features(spec).arrow_schema
            save_batches(synthetic_tables(spec, schema), schema, path,
                         {"answer.json": json.dumps(spec.answer(), indent=1)})
    return path


def write_sanity_check_dataset(data_dir: Path, rows: int) -> Path:
    """The sanity-check in a directory named for its generator's code and settings, so that a table
    written by another version of the script is never taken for this one's."""
    spec = SyntheticSpec(rows=rows)
    code = f"{inspect.getsource(SyntheticSpec)} {code_fingerprint(synthetic_rows)}"
    version = hashlib.sha256(f"{spec!r} {code}".encode()).hexdigest()[:8]
    return write_synthetic_dataset(spec, data_dir / f"{SANITY_CHECK}-{rows}-{version}")


# --- C. adapter folders: one vocabulary of tensor names, then one table row per adapter ------
# A folder of .safetensors adapters becomes one table in the published format: the tensor names of
# diffusers, PEFT and kohya map to the same canonical column, each adapter's alpha / rank becomes its
# lora_scale, labels come from --labels, metadata.json or the parent folder (the source is reported),
# and adapters whose tensors differ from the others stop the build or are skipped and named.  The table
# is cached by the files' names, sizes and mtimes, so it is built once.
#
# PATH/<adapter>/pytorch_lora_weights.safetensors   diffusers (optional metadata.json beside it)
# PATH/<adapter>/adapter_model.safetensors          PEFT, with adapter_config.json
# PATH/<name>.safetensors                           one file per adapter, as kohya-style trainers write
#                                                   (optional <name>.metadata.json beside it)
# Any of these may sit one level deeper, PATH/<label>/..., which gives the label.

FOLDER_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
TABLE_INFO_FILE = "adapter_table.json"  # label source and skipped adapters, kept beside the Arrow files
ADAPTER_TABLE_VERSION = 1  # bump when the table built from the same files would change

# kohya flattens a module path by turning every "." into "_"; these names keep their "_" when it
# is turned back (diffusers UNet, the original SD/SDXL UNet kohya uses for SDXL, CLIP text encoders,
# common language models).  A name missing here is split at each "_": still one name per module,
# consistent between kohya files, but it would not line up with the same module from another trainer.
KOHYA_COMPOUND_NAMES = frozenset({
    "down_blocks", "mid_block", "up_blocks", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "linear_1", "linear_2", "add_embedding",
    "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers",
    "skip_connection", "time_embed", "label_emb",
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "text_projection",
    "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head", "self_attention",
    "query_key_value", "dense_h_to_4h", "dense_4h_to_h", "c_attn", "c_proj", "c_fc",
})
KOHYA_LONGEST_NAME = max(name.count("_") + 1 for name in KOHYA_COMPOUND_NAMES)
KOHYA_COMPONENTS = {"lora_unet": "", "lora_te": "text_encoder.", "lora_te1": "text_encoder.", "lora_te2": "text_encoder_2."}
KOHYA_KINDS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
KOHYA_KEY = re.compile(r"(?P<component>lora_unet|lora_te[12]?)_(?P<flat>[^.]+)\.(?P<suffix>lora_down\.weight|lora_up\.weight|alpha)")

# diffusers' attention-processor era: attn1.processor.to_q_lora.down.weight (unet), self_attn.to_q_lora.down.weight (text encoder)
PROCESSOR_KEY = re.compile(r"(?P<parent>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<side>down|up)\.weight")
DOTTED_KEY = re.compile(
    r"(?P<module>.+?)\.(?:"
    r"lora\.(?P<legacy>down|up)\.weight"                 # diffusers: to_q.lora.down.weight
    r"|lora_linear_layer\.(?P<linear>down|up)\.weight"   # diffusers text encoder: q_proj.lora_linear_layer.down.weight
    r"|lora_(?P<peft>A|B)(?:\.[\w-]+)?\.weight"         # PEFT, optionally with the adapter name: lora_A.default.weight
    r"|lora_embedding_(?P<embedding>A|B)(?:\.[\w-]+)?"  # PEFT embedding layers
    r"|(?P<alpha>alpha))")
SIDES = {"down": "down", "A": "down", "up": "up", "B": "up"}
WRAPPER_PREFIXES = ("base_model.model.", "unet.")  # PeftModel's wrapper, diffusers' save_lora_weights component
PROCESSOR_TEXT_PROJECTIONS = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def unwrapped_name(name: str) -> str:
    """A tensor or module path without the wrappers a saving library puts before it."""
    for prefix in WRAPPER_PREFIXES:
        name = name.removeprefix(prefix)
    return name


def dotted_module_path(flat: str) -> str:
    """A kohya module name (dots flattened to "_") back as the dotted module path of the model."""
    tokens = flat.split("_")
    parts, i = [], 0
    while i < len(tokens):
        for width in range(min(KOHYA_LONGEST_NAME, len(tokens) - i), 0, -1):
            name = "_".join(tokens[i:i + width])
            if width == 1 or name in KOHYA_COMPOUND_NAMES:
                parts.append(name)
                i += width
                break
    return ".".join(parts)


def lora_column_name(module: str, kind: str) -> str:
    """The canonical column of a module's tensor: the published tables' `<module>.lora.down.weight`."""
    return f"{module}.alpha" if kind == "alpha" else f"{module}.lora.{kind}.weight"


def canonical_lora_key(key: str) -> tuple[str, str]:
    """(canonical name, kind) of a tensor key from any trainer; kind is down, up, alpha or other.

    Every naming becomes the published tables' `<module>.lora.{down,up}.weight` (alpha scalars:
    `<module>.alpha`), the module path dotted and without the `unet.` / `base_model.model.`
    wrappers; text-encoder modules keep `text_encoder.` (or `text_encoder_2.`) in front so they
    never mix with UNet modules.  A key that is no LoRA down/up/alpha tensor comes back, without
    those wrappers, as kind other.
    """
    kohya = KOHYA_KEY.fullmatch(key)
    if kohya:
        module = KOHYA_COMPONENTS[kohya["component"]] + dotted_module_path(kohya["flat"])
        kind = KOHYA_KINDS[kohya["suffix"]]
        return lora_column_name(module, kind), kind
    key = unwrapped_name(key)
    processor = PROCESSOR_KEY.fullmatch(key)
    if processor:
        parent, proj = processor["parent"], processor["proj"]
        if parent.startswith("text_encoder"):
            module = f"{parent}.{PROCESSOR_TEXT_PROJECTIONS[proj]}"
        else:
            module = f"{parent}.to_out.0" if proj == "to_out" else f"{parent}.{proj}"
        return lora_column_name(module, processor["side"]), processor["side"]
    dotted = DOTTED_KEY.fullmatch(key)
    if dotted:
        side = dotted["legacy"] or dotted["linear"] or dotted["peft"] or dotted["embedding"]
        kind = SIDES[side] if side else "alpha"
        return lora_column_name(dotted["module"], kind), kind
    return key, "other"


# --- C.1 what one adapter holds --------------------------------------------------------------

@dataclass(frozen=True)
class AdapterFile:
    """One adapter found in a folder: its weights file and its name, the path relative to the folder."""

    weights: Path
    name: str  # its sub-folder for the diffusers / PEFT layouts, its file for one-file adapters

    @property
    def has_own_folder(self) -> bool:
        """Whether the adapter is a folder (diffusers / PEFT layout) rather than one loose file."""
        return self.weights.name in FOLDER_WEIGHT_NAMES

    @property
    def metadata_path(self) -> Path:
        """Where its label metadata would be: metadata.json in its folder, <name>.metadata.json beside a loose file."""
        if self.has_own_folder:
            return self.weights.parent / "metadata.json"
        return self.weights.with_name(self.weights.stem + ".metadata.json")  # a shared folder needs one per file

    @property
    def config_path(self) -> Path | None:
        """Where PEFT's adapter_config.json would be (loose files have none)."""
        return self.weights.parent / "adapter_config.json" if self.has_own_folder else None

    @property
    def label_folder(self) -> str | None:
        """The folder directly above the adapter, inside the folder of adapters."""
        parent = Path(self.name).parent
        return None if parent == Path(".") else parent.name


@dataclass(frozen=True)
class AdapterLayout:
    """The LoRA tensors a file holds, shared by every adapter written with the same keys and shapes."""

    tensors: tuple[tuple[str, str, tuple[int, int]], ...]  # (column, key in the file, 2-D shape), by column
    alphas: tuple[tuple[str, str], ...]                     # (module, key of its alpha scalar)
    ranks: tuple[tuple[str, int], ...]                      # (module, LoRA rank)
    ignored: tuple[str, ...]                                # keys that are no LoRA down/up/alpha tensor
    problem: str | None                                     # why these tensors cannot form a table row

    @property
    def signature(self) -> dict[str, tuple[int, int]]:
        """Column -> shape: what adapters must share to be rows of one table."""
        return {column: shape for column, _, shape in self.tensors}


@functools.lru_cache(maxsize=256)  # thousands of adapters share a handful of layouts: keep one of each
def adapter_layout(key_shapes: tuple[tuple[str, tuple[int, ...]], ...]) -> AdapterLayout:
    """The canonical tensors of a file from its keys and shapes (no tensor data needed).

    Convolution LoRA weights (rank, in, kh, kw) / (out, rank, 1, 1) are kept as the 2-D matrices
    (rank, in*kh*kw) / (out, rank) whose product is the update, as for linear layers.
    """
    tensors, alphas, ignored, problems, seen = {}, [], [], [], set()
    for key, shape in key_shapes:
        column, kind = canonical_lora_key(key)
        if kind == "other":
            ignored.append(key)
        elif column in seen:
            problems.append(f"two keys name {column}")
        elif kind == "alpha":
            alphas.append((column.removesuffix(".alpha"), key))
        elif len(shape) < 2:
            problems.append(f"{key} has shape {list(shape)}, not a matrix")
        else:
            tensors[column] = (key, (shape[0], math.prod(shape[1:])))
        seen.add(column)
    ranks = {}
    for column, (_, (rows, cols)) in sorted(tensors.items()):
        module, side = column.rsplit(".lora.", 1)
        ranks.setdefault(module, rows if side.startswith("down") else cols)
    if not tensors and not problems:
        problems.append("no LoRA down/up tensors" + (f" (keys like {ignored[0]})" if ignored else ""))
    return AdapterLayout(
        tensors=tuple((column, key, shape) for column, (key, shape) in sorted(tensors.items())),
        alphas=tuple(sorted(alphas)), ranks=tuple(sorted(ranks.items())), ignored=tuple(ignored),
        problem="; ".join(problems) or None)


def unreadable(path: Path, err: Exception) -> str:
    """Why a file cannot be read, naming a symlink loop or a dangling symlink as such."""
    try:
        os.stat(path)
    except OSError as stat_err:
        if stat_err.errno == errno.ELOOP:
            return f"{path} is a symlink loop (following it leads back to itself)"
        if os.path.islink(path):
            return f"{path} is a symlink to {os.readlink(path)}, which does not exist"
    return f"cannot read {path} ({err.strerror if isinstance(err, OSError) and err.strerror else err})"


def json_file(path: Path) -> dict | None:
    """A JSON object from a sidecar file, None when the file is absent."""
    if not os.path.lexists(path):
        return None
    try:
        value = json.loads(path.read_text())
    except OSError as err:
        raise ExperimentError(f"{unreadable(path, err)}; fix or remove it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExperimentError(f"{path} is not valid JSON ({err}); fix or remove it") from None
    if not isinstance(value, dict):
        raise ExperimentError(f"{path} holds a JSON {type(value).__name__}, not an object; fix or remove it")
    return value


def lora_configs(adapter: AdapterFile, file_metadata: dict[str, str]) -> dict[str, dict]:
    """LoRA hyper-parameters shipped with an adapter, by model component ("" applies to all).

    PEFT writes them to adapter_config.json; recent diffusers into the safetensors header under
    `lora_adapter_metadata`, each field prefixed by its component (`unet.lora_alpha`).
    """
    config = json_file(adapter.config_path) if adapter.config_path else None
    if config is not None:
        return {"": config}
    packed = file_metadata.get("lora_adapter_metadata")
    if not packed:
        return {}
    try:
        fields = json.loads(packed)
    except json.JSONDecodeError as err:
        raise ExperimentError(f"{adapter.weights}: its lora_adapter_metadata header is not JSON ({err})") from None
    if not isinstance(fields, dict):
        raise ExperimentError(f"{adapter.weights}: its lora_adapter_metadata header is not a JSON object")
    configs: dict[str, dict] = {}
    for name, value in fields.items():
        component, _, field_name = name.rpartition(".")
        configs.setdefault(component, {})[field_name] = value
    return configs


def pattern_value(patterns: dict, module: str, default):
    """PEFT's per-module override (alpha_pattern): a pattern matches the module path or its dotted tail."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
            return value
    return default


def module_scale(module: str, rank: int, alpha: float | None, configs: dict[str, dict]) -> float:
    """The factor the trainer multiplies up @ down by: alpha / rank (alpha / sqrt(rank) for rsLoRA)."""
    if alpha is not None:
        return (alpha or rank) / rank  # kohya: an alpha of 0 means no scaling
    head = module.split(".", 1)[0]
    if "" in configs:
        config, inner = configs[""], module
    elif head in configs:
        config, inner = configs[head], module.split(".", 1)[1]
    else:  # canonical UNet names carry no component: the one config that is no text encoder's
        others = [c for name, c in configs.items() if not name.startswith("text_encoder")]
        config, inner = (others[0] if len(others) == 1 else None), module
    if config is None:
        return 1.0  # nothing recorded: diffusers' trainers set lora_alpha to the rank
    alpha = pattern_value(config.get("alpha_pattern") or {}, inner, config.get("lora_alpha", rank))
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


@dataclass(frozen=True)
class ScannedAdapter:
    """An adapter's layout, scale and metadata, read without loading its weights."""

    file: AdapterFile
    layout: AdapterLayout | None
    scale: float
    metadata: dict | None  # the scalar fields of its metadata file, None without one
    problem: str | None    # why it cannot join the table, for the mismatch report


def scan_adapter(adapter: AdapterFile) -> ScannedAdapter:
    """Read an adapter's header, alpha scalars and sidecar files."""
    from safetensors import SafetensorError, safe_open
    metadata = json_file(adapter.metadata_path)
    if metadata is not None:
        metadata = {k: v for k, v in metadata.items() if v is None or isinstance(v, (str, int, float, bool))}
    try:
        # the "pt" framework reads bfloat16, which numpy has no type for (kohya often saves bf16)
        with safe_open(str(adapter.weights), framework="pt") as f:
            layout = adapter_layout(tuple((k, tuple(f.get_slice(k).get_shape())) for k in sorted(f.keys())))
            alphas = {module: float(f.get_tensor(key)) for module, key in layout.alphas}
            configs = lora_configs(adapter, f.metadata() or {})
    except (OSError, SafetensorError) as err:
        return ScannedAdapter(adapter, None, 1.0, metadata, f"unreadable: {unreadable(adapter.weights, err)}")
    scales = {module: module_scale(module, rank, alphas.get(module), configs) for module, rank in layout.ranks}
    distinct = sorted(set(np.float32(list(scales.values())).tolist()))
    problem = layout.problem
    if problem is None and len(distinct) > 1:  # the table keeps one scale per adapter
        problem = f"its modules were trained with different scales ({distinct[0]:g} .. {distinct[-1]:g})"
    return ScannedAdapter(adapter, layout, distinct[0] if distinct else 1.0, metadata, problem)


# --- C.2 finding adapters --------------------------------------------------------------------

def adapter_weight_files(folder: Path):
    """Every .safetensors file under the folder, skipping hidden folders (.cache, .git), in sorted order."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".safetensors") and not name.startswith("."):
                yield Path(root) / name


def is_adapter_folder(path: Path) -> bool:
    """Whether --dataset names a folder of LoRA files rather than a saved dataset."""
    if not path.is_dir() or (path / "state.json").exists() or (path / "dataset_dict.json").exists():
        return False
    return next(adapter_weight_files(path), None) is not None


def adapter_files(folder: Path) -> list[AdapterFile]:
    """The adapters of a folder, sorted by name; one adapter per sub-folder or per loose file."""
    adapters = {}
    for weights in adapter_weight_files(folder):
        owner = weights.parent if weights.name in FOLDER_WEIGHT_NAMES else weights
        name = owner.relative_to(folder).as_posix()
        if name in adapters:
            raise ExperimentError(
                f"{folder / name} holds both {adapters[name].weights.name} and {weights.name}; keep one per adapter folder")
        adapters[name] = AdapterFile(weights, name)
    if not adapters:
        found_bin = next(folder.rglob("*.bin"), None) is not None
        raise ExperimentError(
            f"no adapters in {folder}: expected <adapter>/pytorch_lora_weights.safetensors, "
            "<adapter>/adapter_model.safetensors or <name>.safetensors files"
            + (" (.bin files are not read: save the adapters with safetensors)" if found_bin else ""))
    return [adapters[name] for name in sorted(adapters)]


def files_fingerprint(folder: Path, adapters: list[AdapterFile], labels_csv: Path | None, options: dict) -> str:
    """Changes whenever a weights or sidecar file, the labels CSV or a build option changes."""
    parts = []
    for adapter in adapters:
        for path in (adapter.weights, adapter.metadata_path, adapter.config_path):
            if path is not None and path.exists():
                st = path.stat()
                parts.append((path.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns))
    if labels_csv is not None:
        st = labels_csv.stat()
        parts.append((str(labels_csv.resolve()), st.st_size, st.st_mtime_ns))
    identity = json.dumps([ADAPTER_TABLE_VERSION, options, parts])
    return hashlib.sha256(identity.encode()).hexdigest()[:20]


# --- C.3 which adapters go in the table ------------------------------------------------------

def mismatch_reason(reference: dict[str, tuple[int, int]], adapter: ScannedAdapter) -> str | None:
    """Why an adapter cannot share the reference's columns, or None when it can."""
    if adapter.problem:
        return adapter.problem
    theirs = adapter.layout.signature
    if theirs == reference:
        return None
    missing = sorted(set(reference) - set(theirs))
    extra = sorted(set(theirs) - set(reference))
    reshaped = sorted(c for c in set(reference) & set(theirs) if reference[c] != theirs[c])
    reasons = []
    for what, columns in (("missing", missing), ("extra", extra)):
        if columns:
            reasons.append(f"{what} {columns[0]}" + (f" and {len(columns) - 1} more" if len(columns) > 1 else ""))
    if reshaped:
        c = reshaped[0]
        reasons.append(f"{c} is {list(theirs[c])}, not {list(reference[c])}"
                       + (f", and {len(reshaped) - 1} more shapes differ" if len(reshaped) > 1 else ""))
    return "; ".join(reasons)


def describe_adapters(reasons: list[tuple[str, str]], shown: int = 3) -> str:
    """A few adapters with their reasons, and how many more there are."""
    text = ", ".join(f"{name} ({reason})" for name, reason in reasons[:shown])
    return text + (f", and {len(reasons) - shown} more" if len(reasons) > shown else "")


def matching_adapters(scanned: list[ScannedAdapter], folder: Path,
                      skip_mismatched: bool) -> tuple[list[ScannedAdapter], list[tuple[str, str]]]:
    """The adapters sharing the most common set of tensors and shapes, and (name, reason) of the others.

    Raises ExperimentError when some do not match, unless skip_mismatched.
    """
    usable = [a for a in scanned if a.problem is None]
    if not usable:
        reasons = [(a.file.name, a.problem) for a in scanned]
        raise ExperimentError(f"no adapter in {folder} holds usable LoRA tensors: {describe_adapters(reasons)}; "
                              "expected LoRA down/up weights named as diffusers, PEFT or kohya write them")
    counts = Counter(tuple(a.layout.signature.items()) for a in usable)
    reference = dict(counts.most_common(1)[0][0])
    kept, skipped = [], []
    for adapter in scanned:
        reason = mismatch_reason(reference, adapter)
        if reason is None:
            kept.append(adapter)
        else:
            skipped.append((adapter.file.name, reason))
    if skipped and not skip_mismatched:
        raise ExperimentError(
            f"{len(skipped)} of {len(scanned)} adapters do not share the tensors of the other {len(kept)}: "
            f"{describe_adapters(skipped)}; fix or remove them, or pass --skip-mismatched to leave them out")
    return kept, skipped


# --- C.4 labels ------------------------------------------------------------------------------

def typed_labels(labels: list[str]) -> list[int] | list[str]:
    """Labels as ints when every one is an integer, else as the strings (the script encodes those)."""
    if all(re.fullmatch(r"-?\d+", label) for label in labels):
        return [int(label) for label in labels]
    return labels


def csv_labels(labels_csv: Path, folder: Path, adapters: list[AdapterFile]) -> list[str]:
    """Each adapter's label from a CSV of rows `adapter path, label`.

    A path is relative to the folder or absolute, and names the adapter's folder or its weights
    file; a first row naming no adapter is taken as the header.
    """
    names = {}
    for adapter in adapters:
        names[adapter.name] = adapter.name
        names[adapter.weights.relative_to(folder).as_posix()] = adapter.name
    root = folder.resolve()
    labels, unknown = {}, []
    try:
        with open(labels_csv, newline="") as f:
            rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ExperimentError(f"cannot read --labels {labels_csv} ({err})") from None
    for i, row in enumerate(rows):
        if len(row) < 2:
            raise ExperimentError(f"--labels {labels_csv}: row {i + 1} has no label; each row is: adapter path, label")
        path = Path(row[0].strip())
        if path.is_absolute():
            path = Path(os.path.relpath(path.resolve(), root))
        name = names.get(Path(os.path.normpath(path)).as_posix())
        if name is not None:
            labels[name] = row[1].strip()
        elif i > 0:
            unknown.append(row[0])
    if unknown:
        tqdm.write(f"WARNING: --labels {labels_csv}: {len(unknown)} rows name no adapter in {folder} "
                   f"(e.g. {unknown[0]}); they are ignored")
    missing = [a.name for a in adapters if a.name not in labels]
    if missing:
        raise ExperimentError(
            f"--labels {labels_csv} has no label for {len(missing)} adapters (e.g. {missing[0]}); "
            "add a row `adapter path, label` for each")
    return [labels[a.name] for a in adapters]


def label_columns(adapters: list[ScannedAdapter], folder: Path, labels_csv: Path | None) -> tuple[list[dict], str]:
    """Each adapter's label (and metadata) columns, and the source they came from.

    Sources, first that applies: the --labels CSV when given, a metadata file beside every adapter
    (its scalar fields become columns), the name of the folder above every adapter.
    """
    files = [a.file for a in adapters]
    if labels_csv is not None:
        labels = typed_labels(csv_labels(labels_csv, folder, files))
        return [{"category_label": label} for label in labels], f"--labels {labels_csv}"
    without_metadata = [a.file for a in adapters if a.metadata is None]
    if not without_metadata:
        return [a.metadata for a in adapters], "metadata files beside the adapters"
    if len(without_metadata) < len(adapters):
        example = without_metadata[0]
        raise ExperimentError(
            f"{len(adapters) - len(without_metadata)} of {len(adapters)} adapters have a metadata file but "
            f"{example.name} has no {example.metadata_path.name}; add one beside every adapter or pass --labels FILE")
    folders = [f.label_folder for f in files]
    if None not in folders:
        return [{"category_label": label} for label in typed_labels(folders)], "the folder above each adapter"
    raise ExperimentError(
        f"no labels for the adapters in {folder} (e.g. {files[folders.index(None)].name}): put a metadata.json "
        "beside each adapter, sort them into PATH/<label>/ folders, or pass --labels FILE")


def value_feature(values: list):
    """The datasets Value type holding a metadata field: bool, int64, float64 or string."""
    from datasets import Value
    kinds = {type(v) for v in values if v is not None}
    if kinds == {bool}:
        return Value("bool")
    if kinds == {int}:
        return Value("int64")
    if kinds and kinds <= {int, float}:
        return Value("float64")
    return Value("string")


def table_features(layout: AdapterLayout, labels: list[dict], array2d: bool):
    """The table's schema: one 2-D float32 column per tensor, adapter_path, lora_scale, label fields."""
    from datasets import Array2D, Features, Sequence, Value
    features = {}
    for column, _, shape in layout.tensors:
        features[column] = Array2D(shape, "float32") if array2d else Sequence(Sequence(Value("float32")))
    features["adapter_path"] = Value("string")
    features["lora_scale"] = Value("float32")
    fields = sorted({name for row in labels for name in row} - set(features))  # the table's own columns win
    for name in fields:
        features[name] = value_feature([row.get(name) for row in labels])
    return Features(features)


# --- C.5 writing the table -------------------------------------------------------------------

def storable(value, pa_type: pa.DataType):
    """A metadata value as its column stores it: text columns take any field as its string."""
    return str(value) if value is not None and pa.types.is_string(pa_type) else value


def adapter_tensors(adapter: ScannedAdapter) -> dict[str, np.ndarray]:
    """The adapter's LoRA tensors as float32 matrices, by canonical column."""
    from safetensors import safe_open
    with safe_open(str(adapter.file.weights), framework="pt") as f:
        return {column: f.get_tensor(key).to(torch.float32).reshape(shape).numpy()
                for column, key, shape in adapter.layout.tensors}


def adapter_tensor_stream(adapters: list[ScannedAdapter], num_workers: int):
    """Each adapter's tensors in order, read by threads a few adapters ahead: memory holds a window, not the folder."""
    window = 2 * max(1, num_workers)
    with ThreadPoolExecutor(max(1, num_workers)) as pool, \
            progress_bar(total=len(adapters), desc="reading adapters", unit="adapter") as bar:
        pending = deque()
        for adapter in adapters:
            pending.append(pool.submit(adapter_tensors, adapter))
            if len(pending) >= window:
                yield pending.popleft().result()
                bar.update()
        while pending:
            yield pending.popleft().result()
            bar.update()


def batch_table(adapters: list[ScannedAdapter], labels: list[dict], tensors: list[dict[str, np.ndarray]],
                schema: pa.Schema) -> pa.Table:
    """Consecutive rows of the table as one Arrow table in its schema."""
    arrays = []
    for field in schema:
        if field.name in tensors[0]:
            storage = nested_list_array(np.stack([t[field.name] for t in tensors]))
            is_array2d = isinstance(field.type, pa.ExtensionType)
            arrays.append(pa.ExtensionArray.from_storage(field.type, storage) if is_array2d else storage)
        elif field.name == "adapter_path":
            arrays.append(pa.array([a.file.name for a in adapters], field.type))
        elif field.name == "lora_scale":
            arrays.append(pa.array([a.scale for a in adapters], field.type))
        else:
            arrays.append(pa.array([storable(row.get(field.name), field.type) for row in labels], field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def write_adapter_table(adapters: list[ScannedAdapter], labels: list[dict], features, path: Path,
                        num_workers: int, info: dict) -> None:
    """Write the table with save_to_disk at path, in batches of about WRITER_BATCH_BYTES of weights."""
    floats_per_row = sum(rows * cols for _, _, (rows, cols) in adapters[0].layout.tensors)
    rows_per_batch = max(1, WRITER_BATCH_BYTES // (4 * floats_per_row))
    schema = features.arrow_schema

    def batches(stream):
        for start in range(0, len(adapters), rows_per_batch):
            stop = min(start + rows_per_batch, len(adapters))
            yield batch_table(adapters[start:stop], labels[start:stop], list(itertools.islice(stream, stop - start)), schema)

    with closing(adapter_tensor_stream(adapters, num_workers)) as stream:
        save_batches(batches(stream), schema, path, {TABLE_INFO_FILE: json.dumps(info, indent=1)})


def skipped_description(skipped: list, shown: int) -> str:
    return (f"left out {len(skipped)} adapters that do not match the others (--skip-mismatched): "
            + describe_adapters(skipped, shown))


def warn_skipped(skipped: list) -> None:
    """One warning naming the adapters left out by --skip-mismatched (also when the table is reused)."""
    if skipped:
        tqdm.write(f"WARNING: {skipped_description(skipped, shown=5)}")


def skipped_adapter_warnings(table: Path) -> list[str]:
    """For results.json: every adapter a built table left out, each named with its reason."""
    skipped = json.loads((table / TABLE_INFO_FILE).read_text())["skipped"]
    return [skipped_description(skipped, shown=len(skipped))] if skipped else []


def warn_ignored(adapters: list[ScannedAdapter]) -> None:
    """One warning for keys that are no LoRA down/up/alpha tensor (DoRA magnitudes, biases, ...)."""
    layouts = {id(a.layout): a.layout for a in adapters}.values()
    ignored = sorted({key for layout in layouts for key in layout.ignored})
    if ignored:
        tqdm.write(f"WARNING: ignored {len(ignored)} tensor names that are no LoRA down/up weights "
                   f"(e.g. {ignored[0]})")


def build_adapter_table(folder: Path, cache_dir: Path, labels_csv: Path | None, num_workers: int,
                        skip_mismatched: bool, array2d: bool = False) -> tuple[Path, str]:
    """The folder of adapters as a save_to_disk table in the published schema, and where its labels came from.

    Built once under cache_dir/adapter_tables and reused while the files' names, sizes and mtimes
    (weights, metadata, configs, the labels CSV) and the options stay the same; an older table
    of the same folder is removed when a new one is built.  Every adapter must hold the same
    tensors with the same shapes; the others stop the build, or are left out with skip_mismatched.
    The scale alpha / rank of each adapter goes into the float column lora_scale; an adapter
    whose modules were trained with different scales counts as mismatched.
    """
    folder = Path(folder)
    labels_csv = None if labels_csv is None else Path(labels_csv)
    adapters = adapter_files(folder)
    if labels_csv is not None and not labels_csv.is_file():
        raise ExperimentError(f"--labels {labels_csv} is not a file; give a CSV of rows `adapter path, label`")
    options = {"skip_mismatched": skip_mismatched, "array2d": array2d}
    fingerprint = files_fingerprint(folder, adapters, labels_csv, options)
    stem = f"{folder.resolve().name}-{hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:8]}"
    table = Path(cache_dir) / "adapter_tables" / f"{stem}-{fingerprint}"
    with building(table):
        if (table / TABLE_INFO_FILE).exists():
            info = json.loads((table / TABLE_INFO_FILE).read_text())
            warn_skipped(info["skipped"])
            return table, info["label_source"]
        label_source = write_folder_table(adapters, folder, labels_csv, num_workers, skip_mismatched, array2d,
                                          table, fingerprint)
    for stale in table.parent.glob(f"{stem}-*"):
        if stale != table and not stale.name.endswith(".partial"):  # another's table being built is no older one
            shutil.rmtree(stale, ignore_errors=True)
    return table, label_source


def write_folder_table(adapters: list[AdapterFile], folder: Path, labels_csv: Path | None, num_workers: int,
                       skip_mismatched: bool, array2d: bool, table: Path, fingerprint: str) -> str:
    """Scan, check and label the adapters and write their table; returns where the labels came from."""
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        scanned = list(progress_bar(pool.map(scan_adapter, adapters), total=len(adapters), desc="scanning adapters",
                            unit="adapter", leave=False))
    kept, skipped = matching_adapters(scanned, folder, skip_mismatched)
    warn_skipped(skipped)
    warn_ignored(kept)
    labels, label_source = label_columns(kept, folder, labels_csv)
    features = table_features(kept[0].layout, labels, array2d)
    info = {"fingerprint": fingerprint, "folder": str(folder.resolve()), "adapters": len(kept),
            "label_source": label_source, "skipped": skipped}
    write_adapter_table(kept, labels, features, table, num_workers, info)
    return label_source


def export_dataset(table_path: Path, out_dir: Path) -> Path:
    """Save a built table with save_to_disk at out_dir for sharing, replacing an earlier export there."""
    import datasets
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "state.json").exists():
        raise ExperimentError(f"--export-dataset {out_dir} exists and holds something else; choose a new or empty folder")
    partial = out_dir.with_name(out_dir.name + ".partial")
    with building(out_dir):
        shutil.rmtree(partial, ignore_errors=True)
        datasets.load_from_disk(str(table_path)).save_to_disk(str(partial))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(partial, out_dir)
    return out_dir


# --- D. the Arrow reader ---------------------------------------------------------------------
# Weights read from a table's Arrow files without a Python object per row: a column's matrix shape is
# checked to be the same in every row (else one error naming the row), and chunks of rows are read with
# pread straight into the caller's buffer, so resident memory is bounded by the chunks in flight, not
# by the dataset.  A table held in memory, or stored in another float type, is copied from Arrow instead.

def _storage(chunk: pa.Array) -> pa.Array:
    """The list<list<float>> storage of a chunk, whether nested lists or Array2D."""
    return chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk


def column_shape(table: pa.Table, column: str) -> tuple[int, int]:
    """(rows, cols) of the matrices in a 2-D tensor column, checked to be the same in every row."""
    outer_lengths, inner_lengths = [], []
    for chunk in table.column(column).chunks:
        storage = _storage(chunk)
        if storage.null_count:
            raise ExperimentError(f"column {column} has missing values; every adapter needs every tensor")
        outer_lengths.append(pc.list_value_length(storage).to_numpy(zero_copy_only=False))
        inner_lengths.append(pc.list_value_length(storage.flatten()).to_numpy(zero_copy_only=False))
    outer = np.concatenate(outer_lengths)
    inner = np.concatenate(inner_lengths)
    if len(outer) == 0 or len(inner) == 0:
        raise ExperimentError(f"column {column} holds no matrices")
    rows, cols = int(outer[0]), int(inner[0])
    bad_outer = np.flatnonzero(outer != rows)
    if bad_outer.size:
        raise ExperimentError(
            f"column {column}: row {bad_outer[0]} has {outer[bad_outer[0]]} matrix rows, row 0 has {rows}; "
            "every adapter must have the same shape in a column")
    bad_inner = np.flatnonzero(inner != cols)
    if bad_inner.size:
        row = int(bad_inner[0] // rows)
        raise ExperimentError(
            f"column {column}: row {row} has matrices of another width than row 0 ({cols}); "
            "every adapter must have the same shape in a column")
    return rows, cols


def _list_offset(lists: pa.Array, i: int) -> int:
    """The i-th offset of a list array, read from its offsets buffer: one page touched, where the
    `offsets` accessor touches them all."""
    dtype = np.int64 if pa.types.is_large_list(lists.type) else np.int32
    width = np.dtype(dtype).itemsize
    return int(np.frombuffer(lists.buffers()[1], dtype=dtype, count=1, offset=width * (lists.offset + i))[0])


def value_pieces(table: pa.Table, column: str, start: int, stop: int) -> list[pa.Array]:
    """The flat values of rows [start, stop) of a 2-D tensor column, one zero-copy piece per Arrow
    chunk.  The slice is found from the first and last offsets of each list level (`.values`
    alone would ignore the slice; `flatten` walks every offset, touching pages as large as the
    weights themselves for an (n, 1) matrix)."""
    pieces = []
    for chunk in table.column(column).slice(start, stop - start).chunks:
        matrices = _storage(chunk)
        rows = matrices.values
        first_row, last_row = _list_offset(matrices, 0), _list_offset(matrices, len(matrices))
        first, last = _list_offset(rows, first_row), _list_offset(rows, last_row)
        pieces.append(rows.values.slice(first, last - first))
    return pieces


def read_matrices(table: pa.Table, column: str, start: int, stop: int, shape: tuple[int, int]) -> np.ndarray:
    """Rows [start, stop) of a 2-D tensor column as a float32 (n, rows, cols) array, without per-row objects."""
    pieces = [p.to_numpy(zero_copy_only=False) for p in value_pieces(table, column, start, stop)]
    flat = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
    with np.errstate(over="ignore"):  # float64 beyond float32 becomes Inf: counted and refused as such
        return flat.astype(np.float32, copy=False).reshape(stop - start, *shape)


def _pread_into(fd: int, target: np.ndarray, offset: int) -> None:
    view = memoryview(target).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise ExperimentError("a dataset file ended early: it is truncated or being rewritten; reload the dataset")
        done += n


class WeightReader:
    """Reads row chunks of 2-D tensor columns into a caller's float32 buffer.

    A dataset on disk is read with pread from its Arrow files, at the byte ranges the files' own
    metadata gives: the weights go straight into the buffer (pinned memory on CUDA) and never stay
    mapped, so resident memory is bounded by the chunks in flight, not by the dataset.  A table held
    in memory, or a column stored in another float type, is copied from its Arrow buffers instead.
    """

    def __init__(self, ds):
        if ds._indices is not None:  # the Arrow table ignores an indices mapping: materialise it
            ds = ds.flatten_indices()
        self.table = ds.data.table
        self._files: list[tuple[int, int, int, mmap.mmap]] = []  # base address, size, fd, map
        paths = [f["filename"] for f in ds.cache_files]
        if not paths:
            return
        tables = []
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)  # metadata and offsets only are touched
            buffer = pa.py_buffer(mapped)
            tables.append(pa.ipc.open_stream(buffer).read_all())
            self._files.append((buffer.address, buffer.size, fd, mapped))
        own = pa.concat_tables(tables)
        if own.num_rows == self.table.num_rows and own.schema.names == self.table.schema.names:
            self.table = own
        else:  # the Dataset transformed its files' columns: read what it shows
            self._close_files()

    def _file_range(self, values: pa.Array) -> tuple[int, int] | None:
        """(fd, byte offset) of a float32 piece that lies in one of our files, else None."""
        if values.type != pa.float32():
            return None
        address = values.buffers()[1].address + values.offset * 4
        for base, size, fd, _ in self._files:
            if base <= address < base + size:
                return fd, address - base
        return None

    def read(self, column: str, start: int, stop: int, out: np.ndarray) -> None:
        """Fill the float32 array `out` (stop - start rows of the column's matrices) with those rows."""
        pieces = value_pieces(self.table, column, start, stop)
        located = [self._file_range(values) for values in pieces]
        if None in located:  # held in memory, or not float32
            out[...] = read_matrices(self.table, column, start, stop, out.shape[1:])
            return
        flat, pos = out.reshape(-1), 0
        for values, (fd, offset) in zip(pieces, located):
            _pread_into(fd, flat[pos:pos + len(values)], offset)
            pos += len(values)
        self._release_pages()

    def column_shape(self, column: str) -> tuple[int, int]:
        """column_shape, then the file pages its check touched (every row's list offsets, as large as
        the weights for an (n, 1) matrix) are dropped from this process: they stay in the OS cache."""
        shape = column_shape(self.table, column)
        self._release_pages()
        return shape

    def _release_pages(self) -> None:
        """Drop the pages of our maps from this process (they stay in the OS page cache): locating
        a chunk reads a few list offsets, and each fault maps a window of pages around them."""
        for _, _, _, mapped in self._files:
            mapped.madvise(mmap.MADV_DONTNEED)

    @cached_property
    def scales(self) -> np.ndarray | None:
        return lora_scales(self.table)

    def _close_files(self) -> None:
        for _, _, fd, mapped in self._files:
            try:
                mapped.close()
            except BufferError:  # a caller still holds an Arrow view of it: the OS unmaps it at exit
                pass
            os.close(fd)
        self._files = []


if __name__ == "__main__":
    sys.exit(main())
