"""Benchmark: how much faster the optimised script is than the original way, measured on one machine.

For each dataset layout the benchmark generates a synthetic LoRA dataset once (with the
script's own generator, saved with save_to_disk under --workdir and reused), then measures,
side by side on the same data:

1. Feature extraction of the ten original representations (delta_spectral is ours only and
   is left out), all layers: the script's `extract_features` (cache off) plus building
   flat_vec for all layers (the script reads the raw weights on demand instead of storing
   them), against a reference extractor written below the way the original worked -- for
   every representation, for every layer column, re-read the column from the Dataset, then
   loop over the samples in Python: `torch.svd_lowrank` per matrix, numpy FFT on the CPU,
   `torch.histc`, `torch.quantile`.  The reference is slow, so it is timed on a sample
   (--reference-columns 8 columns spread evenly over the sorted column list, the first
   --reference-rows 100 rows) and scaled linearly to all columns x all rows; the scaling is
   printed.  Both extractors' features are compared value by value on that sample.
2. Throughput: dataset weight bytes / extraction seconds, and that rate as a fraction of the
   machine's plain memory-copy rate measured in the same run: `np.copyto` of a float32 buffer
   of min(dataset weight bytes, 256 MiB), repeated until the dataset's byte count has been
   copied, best of three passes (bytes copied per second, each byte read once and written once;
   host memory, also with --device cuda).
3. Peak resident memory: `extract_features` run again in a fresh subprocess (`--_extract-only`),
   which reports VmHWM from /proc/self/status at the end and VmRSS just before extraction
   (after imports and opening the dataset).  At small sizes the interpreter's own few hundred
   MB dominate the fraction; rss_growth_fraction leaves them out.
4. Training: the 10 runs as one batched ensemble against 10 runs one at a time
   (`sequential_runs=True`), same features (`stats`, all layers, by default), default MLP,
   default max_epochs / patience.
5. Cached rerun: extraction with the feature cache into a fresh directory, then again.
6. Layer map: a linear probe on each probe's features alone at every level (each module's down
   tensor, up tensor and pair, each block, position and factor; the same representation as 4, a
   level's probes, runs and L2 strengths stacked as one ensemble), against 4's ensemble training of
   the all-layers MLP entry; the target is a map cheaper than five such entries.

Timings on a machine shared with other work are noisy: the load average at the start is
recorded with the results.  With more torch threads than idle cores, OpenMP threads spin at
every barrier and small tensor ops slow down several-fold (3 s with 1 thread against 10-22 s
with 2, measured on a 2-core VM at load 4): pass --threads 1 there.

Run it (from the repository root):
    python tests/benchmark.py                                # published 500 rows + heavy 250 rows, CPU, a few minutes
    python tests/benchmark.py --rows 120 --layout published  # smoke test
    python tests/benchmark.py --threads 1                    # on a CPU shared with other work
    python tests/benchmark.py --rows 5000 --layout both --device cuda --workdir /scratch/bench

Layouts: published = rank 1, to_q/to_v (128 tensors, 99,648 floats per row, as the
published tables); heavy = rank 4, to_q/to_k/to_v/to_out.0 (256 tensors, 797,184 floats per row).

Output: progress on stderr, a fixed-width table on stdout, and per layout one line
`BENCH_JSON {...}` (also written to <workdir>/benchmark_results.json).  Its keys:
    layout, rows, device         what was measured
    dataset_bytes                float32 bytes of all LoRA weights (rows x floats per row x 4)
    extraction_speedup           scaled reference seconds / our seconds, where ours = extract_features
                                 (cache off) + building flat_vec for all layers with group_feature_matrix
                                 (the script reads flat_vec from the dataset on demand instead of storing it)
    ours_gb_per_s                dataset_bytes / our extraction seconds / 1e9
    copy_gb_per_s                plain memory-copy rate of the same machine, same run
    bandwidth_fraction           ours_gb_per_s / copy_gb_per_s
    peak_rss_fraction            peak RSS (VmHWM) of the extraction subprocess / dataset_bytes
    rss_growth_fraction          (peak RSS - RSS just before extraction) / dataset_bytes
    ensemble_speedup             sequential training seconds / ensemble training seconds
    ensemble_test_acc, sequential_test_acc   mean test accuracy over the runs of each mode
    cache_speedup                first cached extraction seconds / second (all loaded from cache)
    layer_map_cost_ratio         layer map training seconds / all-layers MLP ensemble training seconds
    seconds                      every raw timing, in seconds
    reference                    how the reference was sampled and scaled, its seconds per
                                 representation, the part of the sample's seconds spent re-reading
                                 columns (sample_read_seconds), and the share of its feature values
                                 that agree with ours (rtol 1e-3, atol 1e-6)
    memory, training, cache      the raw numbers behind the ratios
    machine                      cpu count, usable cpus, torch threads, platform, versions, load average
    load_average_at_layout_start the machine's 1/5/15-minute load when this layout began

After the layouts, one line `COMPONENTS_JSON {...}` and a table time the building blocks against
what the original used, with each one's largest relative error against float64 numpy: singular
values of 2000 rank-4 factors (a per-matrix `svd_lowrank` loop, batched `svdvals`, ours from the
Gram matrix), the spectrum of 200 rank-4 updates `up @ down` (formed and decomposed, ours from the
Gram matrices of both factors, r x r), and sorting 2000 rows of 320 values (`torch.sort`, ours).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import visual_ablation_experiment_optimized as vae  # noqa: E402

# =============================================================================================
# Configuration
# =============================================================================================

LAYOUTS = {
    "published": {"rank": 1, "projections": ("to_q", "to_v")},
    "heavy": {"rank": 4, "projections": ("to_q", "to_k", "to_v", "to_out.0")},
}
DEFAULT_ROWS = {"published": 500, "heavy": 250}
ORIGINAL_REPRESENTATIONS = (
    "simple_stats", "rank_based", "stats", "spectral", "matrix_norms", "distribution",
    "frequency", "flat_vec", "info_theoretic", "ensemble",
)
LABEL_COLUMN = "category_label"
COPY_BUFFER_BYTES = 256 << 20
AGREEMENT_RTOL, AGREEMENT_ATOL = 1e-3, 1e-6


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark the optimised ablation script against the original's way of working.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", type=int, default=None,
                   help="rows of every generated dataset; unset: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_ROWS.items()))
    p.add_argument("--layout", choices=("published", "heavy", "both"), default="both")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--workdir", type=Path, default=ROOT / "benchmark-results",
                   help="where datasets are generated (once, then reused) and results written")
    p.add_argument("--num-workers", type=int, default=vae.Config().num_workers,
                   help="num_workers of our extraction")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for everything measured (default: torch's own choice); "
                        "1 gives stable timings on a CPU shared with other work")
    p.add_argument("--runs", type=int, default=10, help="training runs of each mode")
    p.add_argument("--training-representation", default="stats", choices=ORIGINAL_REPRESENTATIONS,
                   help="features the training comparison uses (all layers)")
    p.add_argument("--reference-columns", type=int, default=8,
                   help="layer columns the reference extractor is timed on, spread over the layout")
    p.add_argument("--reference-rows", type=int, default=100,
                   help="rows the reference extractor is timed on (the first ones)")
    p.add_argument("--extraction-only", action="store_true",
                   help="only extraction: throughput, peak memory and the reference's scaled time, on a table "
                        "written once as one Arrow file (for tables larger than RAM: --rows 92000 --layout published)")
    p.add_argument("--_extract-only", dest="extract_only", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def benchmark_config(args: argparse.Namespace) -> vae.Config:
    """The script's configuration for our side: the ten original representations, cache off (its
    scratch files under the workdir), defaults elsewhere."""
    return vae.Config(representations=ORIGINAL_REPRESENTATIONS, cache_features=False,
                      cache_dir=str(args.workdir / "feature-scratch"), num_workers=args.num_workers,
                      device=args.device, num_runs=args.runs)


# =============================================================================================
# Machine, timers, memory
# =============================================================================================

def synchronise(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer read afterwards covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(fn(), seconds), with the device synchronised on both sides."""
    synchronise(device)
    started = time.perf_counter()
    out = fn()
    synchronise(device)
    return out, time.perf_counter() - started


def process_memory() -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS), RssAnon and RssFile of this process in bytes; getrusage where /proc is missing."""
    status = Path("/proc/self/status")
    if status.exists():
        wanted = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
        values = {}
        for line in status.read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in wanted:
                values[key] = int(rest.split()[0]) * 1024
        return values
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return {"VmHWM": peak, "VmRSS": peak}


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor()


def machine_info(device: torch.device) -> dict:
    import datasets
    info = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "datasets": datasets.__version__,
        "numpy": np.__version__,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def memory_copy_rate(total_bytes: int) -> tuple[float, int]:
    """Bytes per second of np.copyto on a float32 buffer of min(total_bytes, 256 MiB), repeated
    until total_bytes are copied; best of three passes.  Returns (rate, buffer bytes)."""
    buffer_bytes = max(4, min(total_bytes, COPY_BUFFER_BYTES)) // 4 * 4
    source = np.ones(buffer_bytes // 4, dtype=np.float32)
    target = np.empty_like(source)
    np.copyto(target, source)  # touch every page before timing
    repeats = max(1, round(total_bytes / buffer_bytes))
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeats):
            np.copyto(target, source)
        best = min(best, time.perf_counter() - started)
    return repeats * buffer_bytes / best, buffer_bytes


# =============================================================================================
# Data
# =============================================================================================

def layout_spec(layout: str, rows: int) -> vae.SyntheticSpec:
    return vae.SyntheticSpec(rows=rows, **LAYOUTS[layout])


def ensure_dataset(spec: vae.SyntheticSpec, workdir: Path, layout: str) -> tuple[Path, bool, float]:
    """The generated dataset's path, whether an earlier run had written it, and the seconds this call took."""
    path = workdir / f"{layout}-{spec.rows}"
    reused = path.exists()
    started = time.perf_counter()
    vae.write_synthetic_dataset(spec, path)
    return path, reused, time.perf_counter() - started


def ensure_arrow_file(spec: vae.SyntheticSpec, workdir: Path, layout: str) -> tuple[Path, bool, float]:
    """The generated table as one Arrow file, written once (a table larger than the disk's free half
    cannot also be copied into save_to_disk's layout); its path, whether it existed, the seconds taken."""
    path = workdir / f"{layout}-{spec.rows}.arrow"
    reused = path.exists()
    started = time.perf_counter()
    if not reused:
        partial = path.with_name(path.name + ".partial")
        schema = vae.synthetic_features(spec).arrow_schema
        vae.write_arrow_stream(vae.synthetic_tables(spec, schema), schema, str(partial))
        os.replace(partial, path)
    return path, reused, time.perf_counter() - started


def load_dataset(path: Path) -> vae.LoadedDataset:
    """A generated table: a save_to_disk directory, or one Arrow file."""
    import datasets
    ds = datasets.Dataset.from_file(str(path)) if path.suffix == ".arrow" else vae.load_local_dataset(path)
    return vae.LoadedDataset(ds, path.name, f"benchmark {path.name}", vae.dataset_fingerprint(ds))


def ram_bytes() -> int | None:
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        return None
    line = next(l for l in meminfo.read_text().splitlines() if l.startswith("MemTotal:"))
    return int(line.split()[1]) * 1024


def weight_columns(modules) -> list[str]:
    return [c for m in modules for c in m.columns]


def dataset_weight_bytes(spec: vae.SyntheticSpec) -> int:
    return spec.rows * sum(r * c for r, c in spec.shapes.values()) * 4


# =============================================================================================
# Reference extractor: the original's way (per representation, per column, per sample)
# =============================================================================================

EPS = 1e-8
TOP_K = 10
RANK_QUANTILES = (0.01, 0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95, 0.99)
DISTRIBUTION_QUANTILES = (0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95)
HISTOGRAM_BINS = 50


def ref_singular_values(m: torch.Tensor) -> torch.Tensor:
    """The top min(10, rows, cols) singular values from a randomized low-rank SVD, as the original did."""
    k = min(TOP_K, *m.shape)
    _, s, _ = torch.svd_lowrank(m, q=k)
    return s


def ref_skew_kurtosis(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = (flat - flat.mean()) / (flat.std() + EPS)
    return (z ** 3).mean(), (z ** 4).mean()


def ref_simple_stats(m: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.norm(m), m.mean(), m.std(), m.max(), m.min()])


def ref_rank_based(m: torch.Tensor) -> torch.Tensor:
    q = torch.quantile(m.flatten(), torch.tensor(RANK_QUANTILES, device=m.device))
    return torch.cat([q, (q[5] - q[3])[None], (q[8] - q[0])[None]])


def ref_stats(m: torch.Tensor) -> torch.Tensor:
    flat = m.flatten()
    skew, kurt = ref_skew_kurtosis(flat)
    return torch.stack([flat.mean(), flat.std(), flat.median(), flat.min(), flat.max(), skew, kurt])


def ref_spectral(m: torch.Tensor) -> torch.Tensor:
    s = ref_singular_values(m)
    top = torch.zeros(TOP_K, device=m.device)
    top[:len(s)] = s
    normalised = top / (top.sum() + EPS)
    gaps = (top[:-1] - top[1:]) / (top[:-1] + EPS)
    entropy = -(normalised * torch.log(normalised + EPS)).sum()
    condition = s[0] / (s[-1] + EPS)  # over the true values: README's deliberate change from the original
    return torch.cat([top, normalised, gaps, entropy[None], condition[None], s.sum()[None]])


def ref_matrix_norms(m: torch.Tensor) -> torch.Tensor:
    s = ref_singular_values(m)
    fro, nuclear, spectral_norm = torch.norm(m), s.sum(), s[0]
    absolute = m.abs()
    return torch.stack([fro, nuclear, spectral_norm, absolute.sum(0).max(), absolute.sum(1).max(),
                        nuclear / (fro + EPS), spectral_norm / (fro + EPS)])


def ref_distribution(m: torch.Tensor) -> torch.Tensor:
    flat = m.flatten()
    q = torch.quantile(flat, torch.tensor(DISTRIBUTION_QUANTILES, device=m.device))
    mean, std = flat.mean(), flat.std()
    skew, kurt = ref_skew_kurtosis(flat)
    extra = torch.stack([q[4] - q[2], (flat - mean).abs().mean(), std / (mean.abs() + EPS), skew, kurt])
    return torch.cat([q, extra])


def ref_frequency(m: torch.Tensor) -> torch.Tensor:
    """Through numpy on the CPU, as the original did."""
    magnitude = np.abs(np.fft.fft2(m.cpu().numpy())).flatten()
    top = np.zeros(TOP_K)
    largest = np.sort(magnitude)[::-1][:TOP_K]
    top[:len(largest)] = largest
    energy_share = np.sum(top ** 2) / (np.sum(magnitude ** 2) + EPS)
    values = np.concatenate([top, [magnitude.mean(), magnitude.std(ddof=1), magnitude.max(), energy_share]])
    return torch.tensor(values, dtype=torch.float32, device=m.device)


def ref_flat_vec(m: torch.Tensor) -> torch.Tensor:
    return m.flatten()


def ref_info_theoretic(m: torch.Tensor) -> torch.Tensor:
    flat = m.flatten()
    hist = torch.histc(flat, bins=HISTOGRAM_BINS, min=flat.min().item(), max=flat.max().item())
    p = hist / hist.sum()
    p = p[p > 0]
    entropy = -(p * torch.log(p)).sum()
    return torch.stack([entropy, entropy / math.log(HISTOGRAM_BINS)])


def ref_ensemble(m: torch.Tensor) -> torch.Tensor:
    parts = (ref_spectral, ref_matrix_norms, ref_distribution, ref_frequency, ref_info_theoretic)
    return torch.cat([part(m) for part in parts])


REFERENCE_REPRESENTATIONS = {
    "simple_stats": ref_simple_stats, "rank_based": ref_rank_based, "stats": ref_stats,
    "spectral": ref_spectral, "matrix_norms": ref_matrix_norms, "distribution": ref_distribution,
    "frequency": ref_frequency, "flat_vec": ref_flat_vec, "info_theoretic": ref_info_theoretic,
    "ensemble": ref_ensemble,
}
assert tuple(REFERENCE_REPRESENTATIONS) == ORIGINAL_REPRESENTATIONS


def reference_representation(torch_view, columns: list[str], per_matrix, device: torch.device):
    """One representation of the columns, ({column: (rows, F)}, seconds spent reading): each column
    re-read from the Dataset, then one matrix at a time."""
    out, read_seconds = {}, 0.0
    for col in columns:
        matrices, seconds = timed(lambda: torch_view[col][:].to(device), device)
        read_seconds += seconds
        out[col] = torch.stack([per_matrix(matrices[i]) for i in range(len(matrices))]).cpu().numpy()
    return out, read_seconds


def reference_extract(ds, columns: list[str], device: torch.device):
    """Features {(column, representation): (rows, F)}, seconds per representation and the part of
    them spent reading, the original's way: every representation re-reads every column from the
    Dataset and loops over the samples."""
    torch_view = ds.with_format("torch")
    features, seconds, read_seconds = {}, {}, 0.0
    for rep, per_matrix in REFERENCE_REPRESENTATIONS.items():
        (by_column, read), seconds[rep] = timed(
            lambda: reference_representation(torch_view, columns, per_matrix, device), device)
        read_seconds += read
        features.update({(col, rep): values for col, values in by_column.items()})
    return features, seconds, read_seconds


def spread_sample(items: list[str], count: int) -> list[str]:
    """count items evenly spread over the list (first and last included)."""
    positions = np.unique(np.linspace(0, len(items) - 1, min(count, len(items))).round().astype(int))
    return [items[i] for i in positions]


def our_column_features(store, column: str, representation: str) -> np.ndarray:
    """One column's features from our store, through group_feature_matrix (flat_vec is read on demand)."""
    return vae.group_feature_matrix(store, [vae.Module(column, (column,))], representation)


def feature_agreement(reference: dict, store, rows: int) -> dict[str, float]:
    """Per representation, the share of the reference's feature values that match ours on the sampled rows."""
    matches, totals = {}, {}
    for (col, rep), ref_values in reference.items():
        ours = our_column_features(store, col, rep)[:rows]
        close = np.isclose(ref_values, ours, rtol=AGREEMENT_RTOL, atol=AGREEMENT_ATOL)
        matches[rep] = matches.get(rep, 0) + int(close.sum())
        totals[rep] = totals.get(rep, 0) + close.size
    return {rep: matches[rep] / totals[rep] for rep in totals}


def time_reference(loaded: vae.LoadedDataset, columns: list[str], args, device: torch.device) -> dict:
    """Time the reference on a sample of columns x rows and scale it linearly to the whole table."""
    sample_columns = spread_sample(columns, args.reference_columns)
    sample_rows = min(args.reference_rows, loaded.dataset.num_rows)
    sample = loaded.dataset.select(range(sample_rows))  # the saved dataset's first rows, read as the original read
    reference_extract(sample.select(range(min(2, sample_rows))), sample_columns[:1], device)  # warm-up
    features, per_rep, read_seconds = reference_extract(sample, sample_columns, device)
    sample_seconds = sum(per_rep.values())
    column_scale = len(columns) / len(sample_columns)
    row_scale = loaded.dataset.num_rows / sample_rows
    return {
        "features": features,
        "sample_rows": sample_rows,
        "sample_columns": sample_columns,
        "column_scale": column_scale,
        "row_scale": row_scale,
        "sample_seconds": sample_seconds,
        "sample_read_seconds": read_seconds,
        "scaled_seconds": sample_seconds * column_scale * row_scale,
        "scaled_seconds_per_representation": {r: s * column_scale * row_scale for r, s in per_rep.items()},
    }


def sample_size_ratio(spec: vae.SyntheticSpec, sample_columns: list[str]) -> float:
    """Mean floats of a sampled column / mean floats of any column: 1.0 means the sample is representative in size."""
    floats = {name: rows * cols for name, (rows, cols) in spec.shapes.items()}
    sampled_mean = sum(floats[name] for name in sample_columns) / len(sample_columns)
    return sampled_mean / (sum(floats.values()) / len(floats))


# =============================================================================================
# Our extractor: in process (time), in a subprocess (peak memory), cached (rerun)
# =============================================================================================

def time_ours(loaded: vae.LoadedDataset, modules, cfg: vae.Config, device: torch.device):
    """(store, extraction seconds, flat_vec seconds) of our side, cache off, after one untimed full
    pass (which warms the page cache, the allocator and libraries' lazy initialisation).  The script reads flat_vec (the raw weights) from the dataset when a group needs it instead of
    storing it, so building it for all layers is timed too: the reference produces it as well."""
    vae.extract_features(loaded, modules, cfg, device)
    store, extraction_seconds = timed(lambda: vae.extract_features(loaded, modules, cfg, device), device)
    _, flat_vec_seconds = timed(lambda: vae.group_feature_matrix(store, modules, "flat_vec"), device)
    return store, extraction_seconds, flat_vec_seconds


def extract_only(path: Path, args) -> None:
    """Internal mode for the memory measurement: extract once in this fresh process and print EXTRACT_JSON."""
    loaded = load_dataset(path)
    modules = vae.lora_modules(loaded.dataset.column_names)
    cfg = benchmark_config(args)
    device = vae.resolve_device(cfg)
    before = process_memory()
    store, seconds = timed(lambda: vae.extract_features(loaded, modules, cfg, device), device)
    after = process_memory()
    report = {"seconds": seconds, "computed": store.computed, "rss_before": before.get("VmRSS"),
              "peak_before": before.get("VmHWM"), "peak_rss": after.get("VmHWM"), "rss_after": after.get("VmRSS"),
              "rss_anon_after": after.get("RssAnon"), "rss_file_after": after.get("RssFile")}
    if device.type == "cuda":
        report["cuda_peak_allocated"] = torch.cuda.max_memory_allocated(device)
    print("EXTRACT_JSON " + json.dumps(report), flush=True)


def measure_peak_memory(path: Path, args) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--_extract-only", str(path),
               "--device", args.device, "--num-workers", str(args.num_workers), "--workdir", str(args.workdir)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("EXTRACT_JSON ")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stderr[-4000:])
        raise RuntimeError(f"extraction subprocess failed with exit code {done.returncode}")
    return json.loads(lines[-1].removeprefix("EXTRACT_JSON "))


def cached_rerun(loaded: vae.LoadedDataset, modules, cfg: vae.Config, device: torch.device, workdir: Path) -> dict:
    """First and second extraction into a fresh cache directory (removed afterwards)."""
    cache_dir = Path(tempfile.mkdtemp(prefix="feature-cache-", dir=workdir))
    try:
        cached_cfg = dataclasses.replace(cfg, cache_features=True, cache_dir=str(cache_dir))
        first, first_seconds = timed(lambda: vae.extract_features(loaded, modules, cached_cfg, device), device)
        cache_bytes = sum(f.stat().st_size for f in cache_dir.iterdir())
        second, second_seconds = timed(lambda: vae.extract_features(loaded, modules, cached_cfg, device), device)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return {"first_seconds": first_seconds, "second_seconds": second_seconds,
            "first_computed": first.computed, "second_loaded": second.loaded, "second_computed": second.computed,
            "cache_bytes": cache_bytes}


# =============================================================================================
# Training: batched ensemble vs one run at a time
# =============================================================================================

def compare_training(loaded: vae.LoadedDataset, modules, store, cfg: vae.Config, device: torch.device,
                     representation: str) -> dict:
    ds = loaded.dataset
    labels = vae.encode_labels(ds, LABEL_COLUMN)
    splits = vae.split_indices(ds.num_rows)
    features = vae.group_feature_matrix(store, modules, representation)
    data = vae.standardise(features, labels.codes, splits, len(labels.class_names), device)
    name = f"{representation}_all_layers"
    out = {"representation": name, "feature_dim": data.feature_dim, "runs": cfg.runs}
    modes = (("ensemble", False), ("sequential", True))
    for mode, sequential in modes:  # warm-up: a few epochs of each mode touch the memory both will use
        vae.train_runs(data, dataclasses.replace(cfg, sequential_runs=sequential, max_epochs=2), device, f"warm-up {mode}", vae.CLASSIFIERS["mlp"])
    for mode, sequential in modes:
        mode_cfg = dataclasses.replace(cfg, sequential_runs=sequential)
        result, seconds = timed(lambda: vae.train_runs(data, mode_cfg, device, f"{name} {mode}", vae.CLASSIFIERS["mlp"]), device)
        entry = vae.evaluate_entry(result, data, mode_cfg, device, name, len(weight_columns(modules)))
        out[mode] = {"seconds": seconds, "test_acc_mean": entry["test_acc_mean"], "test_acc_std": entry["test_acc_std"],
                     "best_epoch_mean": entry["best_epoch_mean"],
                     "epochs_trained": sum(len(h.val_acc) for h in result.histories)}
    return out


def time_layer_map(loaded: vae.LoadedDataset, modules, store, cfg: vae.Config, device: torch.device,
                   representation: str) -> dict:
    """The layer map's training: a linear probe per probe of every level (each module's factors and pair,
    each block, position and factor), a level's runs and L2 strengths stacked into one ensemble."""
    labels = vae.encode_labels(loaded.dataset, LABEL_COLUMN)
    levels, seconds, models, epochs = vae.map_probes(modules, representation), 0.0, 0, 0
    for probes in levels.values():
        features, _ = vae.layer_map_matrix(store, probes, representation)
        data = vae.standardise(features, labels.codes, vae.split_indices(loaded.dataset.num_rows),
                               len(labels.class_names), device, block_width=features.shape[1] // len(probes))
        result, level_seconds = timed(lambda: vae.train_runs(data, cfg, device, "layer map", vae.CLASSIFIERS["linear"],
                                                             num_blocks=len(probes)), device)
        seconds += level_seconds
        models += len(probes) * cfg.runs * len(vae.LINEAR_L2_GRID)
        epochs += sum(len(h.val_acc) for h in result.histories)
    return {"representation": representation, "probes": {level: len(p) for level, p in levels.items()},
            "seconds": seconds, "models": models, "epochs_trained": epochs}


# =============================================================================================
# One layout, end to end
# =============================================================================================

def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def benchmark_layout(layout: str, rows: int, args, machine: dict) -> dict:
    spec = layout_spec(layout, rows)
    path, reused, write_seconds = ensure_dataset(spec, args.workdir, layout)
    loaded = load_dataset(path)
    modules = vae.lora_modules(loaded.dataset.column_names)
    columns = weight_columns(modules)
    dataset_bytes = dataset_weight_bytes(spec)
    cfg = benchmark_config(args)
    device = vae.resolve_device(cfg)
    load_average = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    log(f"[{layout}] {rows} rows, {len(columns)} tensor columns, {dataset_bytes / 1e6:.1f} MB of weights at {path}")

    log(f"[{layout}] peak memory: our extraction in a fresh subprocess")
    memory = measure_peak_memory(path, args)
    log(f"[{layout}] our extraction, timed")
    store, extraction_seconds, flat_vec_seconds = time_ours(loaded, modules, cfg, device)
    ours_seconds = extraction_seconds + flat_vec_seconds
    log(f"[{layout}] reference extraction on {min(args.reference_columns, len(columns))} columns x "
        f"{min(args.reference_rows, rows)} rows")
    reference = time_reference(loaded, columns, args, device)
    agreement = feature_agreement(reference.pop("features"), store, reference["sample_rows"])
    log(f"[{layout}] reference: {reference['sample_seconds']:.2f} s on the sample, scaled x{reference['column_scale']:.2f} "
        f"(columns) x{reference['row_scale']:.2f} (rows) = {reference['scaled_seconds']:.1f} s")
    copy_rate, copy_buffer = memory_copy_rate(dataset_bytes)
    log(f"[{layout}] training: {args.runs} runs as one ensemble, then one at a time")
    training = compare_training(loaded, modules, store, cfg, device, args.training_representation)
    log(f"[{layout}] layer map of {args.training_representation}: every level's linear probes, stacked")
    layer_map = time_layer_map(loaded, modules, store, cfg, device, args.training_representation)
    log(f"[{layout}] cached extraction, first and second run")
    cache = cached_rerun(loaded, modules, cfg, device, args.workdir)

    ours_rate = dataset_bytes / ours_seconds
    return {
        "layout": layout, "rows": rows, "device": str(device), "num_tensor_columns": len(columns),
        "dataset_bytes": dataset_bytes, "dataset_path": path.name, "dataset_reused": reused,
        "extraction_speedup": reference["scaled_seconds"] / ours_seconds,
        "ours_gb_per_s": ours_rate / 1e9,
        "copy_gb_per_s": copy_rate / 1e9,
        "bandwidth_fraction": ours_rate / copy_rate,
        "peak_rss_fraction": memory["peak_rss"] / dataset_bytes,
        "rss_growth_fraction": (memory["peak_rss"] - memory["rss_before"]) / dataset_bytes,
        "ensemble_speedup": training["sequential"]["seconds"] / training["ensemble"]["seconds"],
        "ensemble_test_acc": training["ensemble"]["test_acc_mean"],
        "sequential_test_acc": training["sequential"]["test_acc_mean"],
        "cache_speedup": cache["first_seconds"] / cache["second_seconds"],
        "layer_map_cost_ratio": layer_map["seconds"] / training["ensemble"]["seconds"],
        "seconds": {
            "dataset_write": write_seconds, "ours_extraction": ours_seconds,
            "ours_extract_features": extraction_seconds, "ours_flat_vec_all_layers": flat_vec_seconds,
            "ours_extraction_subprocess": memory["seconds"], "reference_sample": reference["sample_seconds"],
            "reference_scaled": reference["scaled_seconds"], "memory_copy_of_dataset_bytes": dataset_bytes / copy_rate,
            "ensemble_training": training["ensemble"]["seconds"], "sequential_training": training["sequential"]["seconds"],
            "cache_first": cache["first_seconds"], "cache_second": cache["second_seconds"],
            "layer_map_training": layer_map["seconds"],
        },
        "reference": {**reference, "sample_size_ratio": sample_size_ratio(spec, reference["sample_columns"]),
                      "scaling": "sample seconds x (all columns / sampled columns) x (all rows / sampled rows)",
                      "feature_agreement": agreement},
        "memory": {**memory, "method": "VmHWM / VmRSS of a fresh extraction subprocess"},
        "copy": {"method": "np.copyto of a float32 buffer, repeated to the dataset's byte count, best of 3",
                 "buffer_bytes": copy_buffer},
        "training": training,
        "layer_map": layer_map,
        "cache": cache,
        "config": {"representations": list(ORIGINAL_REPRESENTATIONS), "num_workers": args.num_workers,
                   "runs": args.runs, "hidden_dim": cfg.hidden_dim, "max_epochs": cfg.max_epochs,
                   "patience": cfg.patience, "batch_size": cfg.batch_size},
        "machine": machine, "load_average_at_layout_start": load_average,
    }


# =============================================================================================
# Report and main
# =============================================================================================

TABLE_ROWS = (  # (label, function of a result -> text)
    ("rows", lambda r: f"{r['rows']}"),
    ("weights MB", lambda r: f"{r['dataset_bytes'] / 1e6:.1f}"),
    ("ours extraction s", lambda r: f"{r['seconds']['ours_extraction']:.2f}"),
    ("  extract_features s", lambda r: f"{r['seconds']['ours_extract_features']:.2f}"),
    ("  flat_vec all layers s", lambda r: f"{r['seconds']['ours_flat_vec_all_layers']:.2f}"),
    ("reference s (scaled)", lambda r: f"{r['seconds']['reference_scaled']:.1f}"),
    ("  reference sample s", lambda r: f"{r['seconds']['reference_sample']:.2f}"),
    ("  of which reading",
     lambda r: f"{r['reference']['sample_read_seconds'] / r['reference']['sample_seconds']:.0%}"),
    ("  reference scale", lambda r: f"x{r['reference']['column_scale']:.1f} x{r['reference']['row_scale']:.2f}"),
    ("extraction_speedup", lambda r: f"{r['extraction_speedup']:.1f}x"),
    ("reference agreement min", lambda r: f"{min(r['reference']['feature_agreement'].values()):.3f}"),
    ("ours GB/s", lambda r: f"{r['ours_gb_per_s']:.3f}"),
    ("memory copy GB/s", lambda r: f"{r['copy_gb_per_s']:.2f}"),
    ("bandwidth_fraction", lambda r: f"{r['bandwidth_fraction']:.4f}"),
    ("RSS before extraction MB", lambda r: f"{r['memory']['rss_before'] / 1e6:.0f}"),
    ("peak RSS MB", lambda r: f"{r['memory']['peak_rss'] / 1e6:.0f}"),
    ("peak_rss_fraction", lambda r: f"{r['peak_rss_fraction']:.2f}"),
    ("rss_growth_fraction", lambda r: f"{r['rss_growth_fraction']:.2f}"),
    ("ensemble training s", lambda r: f"{r['seconds']['ensemble_training']:.1f}"),
    ("sequential training s", lambda r: f"{r['seconds']['sequential_training']:.1f}"),
    ("ensemble_speedup", lambda r: f"{r['ensemble_speedup']:.2f}x"),
    ("ensemble_test_acc", lambda r: f"{r['ensemble_test_acc']:.3f}"),
    ("sequential_test_acc", lambda r: f"{r['sequential_test_acc']:.3f}"),
    ("cache first s", lambda r: f"{r['seconds']['cache_first']:.2f}"),
    ("cache second s", lambda r: f"{r['seconds']['cache_second']:.3f}"),
    ("cache_speedup", lambda r: f"{r['cache_speedup']:.1f}x"),
    ("layer map training s", lambda r: f"{r['seconds']['layer_map_training']:.1f}"),
    ("layer_map_cost_ratio", lambda r: f"{r['layer_map_cost_ratio']:.2f}x"),
)


def extraction_only_layout(layout: str, rows: int, args, machine: dict) -> dict:
    """Extraction alone on a table that may be larger than RAM (the 100k scale: --rows 92000
    --layout published): the table is written once as one Arrow file, our extraction runs in a fresh
    process (throughput, peak RSS), and the reference is timed on its sample and scaled."""
    spec = layout_spec(layout, rows)
    path, reused, write_seconds = ensure_arrow_file(spec, args.workdir, layout)
    loaded = load_dataset(path)
    columns = weight_columns(vae.lora_modules(loaded.dataset.column_names))
    dataset_bytes = dataset_weight_bytes(spec)
    log(f"[{layout}] {rows} rows, {dataset_bytes / 1e9:.1f} GB of weights in a {path.stat().st_size / 1e9:.1f} GB "
        f"Arrow file at {path}; our extraction in a fresh subprocess")
    memory = measure_peak_memory(path, args)
    log(f"[{layout}] reference extraction on {min(args.reference_columns, len(columns))} columns x "
        f"{min(args.reference_rows, rows)} rows")
    reference = time_reference(loaded, columns, args, vae.resolve_device(benchmark_config(args)))
    reference.pop("features")
    # flat_vec is not extracted by ours (it is read when a group needs it): compared without it
    reference_seconds = reference["scaled_seconds"] - reference["scaled_seconds_per_representation"]["flat_vec"]
    return {
        "mode": "extraction_only", "layout": layout, "rows": rows, "device": args.device,
        "dataset_bytes": dataset_bytes, "file_bytes": path.stat().st_size, "ram_bytes": ram_bytes(),
        "dataset_reused": reused, "extraction_seconds": memory["seconds"],
        "ours_gb_per_s": dataset_bytes / memory["seconds"] / 1e9,
        "extraction_speedup_without_flat_vec": reference_seconds / memory["seconds"],
        "peak_rss_fraction": memory["peak_rss"] / dataset_bytes,
        "rss_growth_fraction": (memory["peak_rss"] - memory["rss_before"]) / dataset_bytes,
        "seconds": {"dataset_write": write_seconds, "ours_extraction": memory["seconds"],
                    "reference_scaled_without_flat_vec": reference_seconds},
        "memory": memory, "reference": reference, "machine": machine,
        "load_average_at_layout_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def extraction_only_table(results: list[dict]) -> str:
    lines = [f"{'layout':<10} {'rows':>7} {'weights GB':>10} {'RAM GB':>7} {'seconds':>8} {'GB/s':>6} "
             f"{'peak RSS GB':>11} {'peak/data':>9} {'vs reference':>12}"]
    for r in results:
        lines.append(f"{r['layout']:<10} {r['rows']:>7} {r['dataset_bytes'] / 1e9:>10.1f} {(r['ram_bytes'] or 0) / 1e9:>7.1f} "
                     f"{r['extraction_seconds']:>8.1f} {r['ours_gb_per_s']:>6.2f} {r['memory']['peak_rss'] / 1e9:>11.2f} "
                     f"{r['peak_rss_fraction']:>9.3f} {r['extraction_speedup_without_flat_vec']:>11.0f}x")
    return "\n".join(lines)


def results_table(results: list[dict]) -> str:
    header = f"{'metric':<26}" + "".join(f"{r['layout']:>16}" for r in results)
    lines = [header, "-" * len(header)]
    lines += [f"{label:<26}" + "".join(f"{cell(r):>16}" for r in results) for label, cell in TABLE_ROWS]
    return "\n".join(lines)


def agreement_table(results: list[dict]) -> str:
    """Share of reference feature values matching ours (rtol 1e-3, atol 1e-6), and the reference's scaled seconds."""
    header = f"{'representation':<26}" + "".join(f"{r['layout'] + ' agree':>16}{'ref s':>10}" for r in results)
    lines = [header, "-" * len(header)]
    for rep in ORIGINAL_REPRESENTATIONS:
        cells = "".join(f"{r['reference']['feature_agreement'][rep]:>16.3f}"
                        f"{r['reference']['scaled_seconds_per_representation'][rep]:>10.1f}" for r in results)
        lines.append(f"{rep:<26}{cells}")
    return "\n".join(lines)


# --- components: the building blocks, each against what the original used ---------------------

def best_seconds(fn, device: torch.device, repeats: int = 3) -> float:
    fn()  # warm-up
    return min(timed(fn, device)[1] for _ in range(repeats))


def max_relative_error(values: torch.Tensor, exact: np.ndarray) -> float:
    exact = np.asarray(exact, dtype=np.float64)
    return float(np.max(np.abs(values.double().cpu().numpy() - exact) / np.maximum(np.abs(exact), 1e-30)))


def component_timings(device: torch.device) -> dict:
    """Seconds (best of 3) and accuracy of the pieces the guide's claims are about, on SD-sized matrices:
    singular values of 2000 rank-4 factors (4 x 320), the weight update's spectrum for 200 rank-4
    modules (320 x 4 @ 4 x 320), and sorting 2000 rows of 320 values."""
    generator = torch.Generator().manual_seed(0)
    factors = torch.randn(2000, 4, 320, generator=generator).to(device)
    exact = np.linalg.svd(factors.double().cpu().numpy(), compute_uv=False)
    down = torch.randn(200, 4, 320, generator=generator).to(device)
    up = torch.randn(200, 320, 4, generator=generator).to(device)
    exact_delta = np.linalg.svd((up.double() @ down.double()).cpu().numpy(), compute_uv=False)[:, :4]
    rows = torch.randn(2000, 320, generator=generator).to(device)
    pair = lambda: vae.PairBatch(vae.MatrixBatch(down), vae.MatrixBatch(up)).delta_singular_values
    lowrank = lambda: torch.stack([torch.svd_lowrank(m, q=4)[1] for m in factors])
    return {
        "singular_values_svd_lowrank_loop": {"seconds": best_seconds(lowrank, device),
                                             "max_relative_error": max_relative_error(lowrank(), exact)},
        "singular_values_batched_svdvals": {"seconds": best_seconds(lambda: torch.linalg.svdvals(factors), device),
                                            "max_relative_error": max_relative_error(torch.linalg.svdvals(factors), exact)},
        "singular_values_ours_gram": {"seconds": best_seconds(lambda: vae.singular_values(factors), device),
                                      "max_relative_error": max_relative_error(vae.singular_values(factors), exact)},
        "delta_spectrum_formed_product": {"seconds": best_seconds(lambda: torch.linalg.svdvals(up @ down)[:, :4], device),
                                          "max_relative_error": max_relative_error(torch.linalg.svdvals(up @ down)[:, :4], exact_delta)},
        "delta_spectrum_ours_gram_core": {"seconds": best_seconds(pair, device),
                                        "max_relative_error": max_relative_error(pair(), exact_delta)},
        "sort_rows_torch_sort": {"seconds": best_seconds(lambda: rows.sort(dim=1).values, device)},
        "sort_rows_ours": {"seconds": best_seconds(lambda: vae.sort_rows(rows), device)},
    }


def components_table(components: dict) -> str:
    lines = [f"{'component':<36} {'ms':>10} {'max rel. error':>15}", "-" * 63]
    for name, measured in components.items():
        error = measured.get("max_relative_error")
        lines.append(f"{name:<36} {1e3 * measured['seconds']:>10.2f} {'' if error is None else f'{error:.1e}':>15}")
    return "\n".join(lines)


def layouts_to_run(args) -> list[tuple[str, int]]:
    names = ("published", "heavy") if args.layout == "both" else (args.layout,)
    return [(name, args.rows or DEFAULT_ROWS[name]) for name in names]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.extract_only is not None:
        extract_only(args.extract_only, args)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but no CUDA device is available", file=sys.stderr)
        return 2
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    machine = machine_info(torch.device(args.device))
    if args.extraction_only:
        results = [extraction_only_layout(layout, rows, args, machine) for layout, rows in layouts_to_run(args)]
        for result in results:
            print("BENCH_JSON " + json.dumps(result), flush=True)
        (args.workdir / "benchmark_extraction_only.json").write_text(json.dumps(results, indent=2))
        print(extraction_only_table(results))
        return 0
    results = []
    for layout, rows in layouts_to_run(args):
        result = benchmark_layout(layout, rows, args, machine)
        results.append(result)
        print("BENCH_JSON " + json.dumps(result), flush=True)
        (args.workdir / "benchmark_results.json").write_text(json.dumps(results, indent=2))
    print()
    print(f"machine: {machine['cpu_model']}, {machine['cpus_usable']} usable CPUs, torch {machine['torch']} "
          f"({machine['torch_threads']} threads), device {args.device}, load average at start {machine['load_average']}")
    print(results_table(results))
    print()
    print(agreement_table(results))
    components = component_timings(torch.device(args.device))
    print("COMPONENTS_JSON " + json.dumps(components), flush=True)
    print()
    print(components_table(components))
    return 0


if __name__ == "__main__":
    sys.exit(main())
