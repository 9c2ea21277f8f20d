"""Adapter folders: the published table built from a folder of LoRA files (diffusers, PEFT, kohya).

Scratch module for issue 5, to be pasted into visual_ablation_experiment_optimized.py as one
section of "Data", after the local loaders; the import of the script below goes away then.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from visual_ablation_experiment_optimized import ExperimentError

# --- adapter folders: one vocabulary of tensor names, then one table row per adapter ---------
#
# PATH/<adapter>/pytorch_lora_weights.safetensors   diffusers (optional metadata.json beside it)
# PATH/<adapter>/adapter_model.safetensors          PEFT, with adapter_config.json
# PATH/<name>.safetensors                           one file per adapter, as kohya-style trainers write
#                                                   (optional <name>.metadata.json beside it)
# Any of these may sit one level deeper, PATH/<label>/..., which gives the label.

FOLDER_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
TABLE_INFO_FILE = "adapter_table.json"  # label source and skipped adapters, kept beside the Arrow files
ADAPTER_TABLE_VERSION = 1  # bump when the table built from the same files would change
WRITER_BATCH_BYTES = 64 << 20  # rows buffered before an Arrow batch is written: bounds memory per batch

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
    for prefix in WRAPPER_PREFIXES:
        key = key.removeprefix(prefix)
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


# --- what one adapter holds ---------------------------------------------------------------------

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


def json_file(path: Path) -> dict | None:
    """A JSON object from a sidecar file, None when the file is absent."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None
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
        return ScannedAdapter(adapter, None, 1.0, metadata, f"unreadable: {err}")
    scales = {module: module_scale(module, rank, alphas.get(module), configs) for module, rank in layout.ranks}
    distinct = sorted(set(np.float32(list(scales.values())).tolist()))
    problem = layout.problem
    if problem is None and len(distinct) > 1:  # the table keeps one scale per adapter
        problem = f"its modules were trained with different scales ({distinct[0]:g} .. {distinct[-1]:g})"
    return ScannedAdapter(adapter, layout, distinct[0] if distinct else 1.0, metadata, problem)


# --- finding adapters ---------------------------------------------------------------------------

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


# --- which adapters go in the table -------------------------------------------------------------

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


# --- labels -------------------------------------------------------------------------------------

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


def typed_value(value, feature):
    """A metadata value converted to its column's type (fields missing in a file stay None)."""
    if value is None:
        return None
    if feature.dtype == "string":
        return str(value)
    return float(value) if feature.dtype == "float64" else value


# --- writing the table --------------------------------------------------------------------------

def adapter_row(adapter: ScannedAdapter, labels: dict, features) -> dict:
    """One table row: the adapter's tensors as float32 matrices, its name, scale and labels."""
    from safetensors import safe_open
    row = {}
    with safe_open(str(adapter.file.weights), framework="pt") as f:
        for column, key, shape in adapter.layout.tensors:
            row[column] = f.get_tensor(key).to(torch.float32).reshape(shape).numpy()
    row["adapter_path"] = adapter.file.name
    row["lora_scale"] = adapter.scale
    for name, feature in features.items():
        if name not in row:
            row[name] = typed_value(labels.get(name), feature)
    return row


def adapter_rows(adapters: list[ScannedAdapter], labels: list[dict], features, num_workers: int):
    """Rows in order, read by threads a few adapters ahead, so memory holds a window, not the folder."""
    window = 2 * max(1, num_workers)
    with ThreadPoolExecutor(max(1, num_workers)) as pool, \
            tqdm(total=len(adapters), desc="reading adapters", unit="adapter") as bar:
        pending = deque()
        for adapter, label in zip(adapters, labels):
            pending.append(pool.submit(adapter_row, adapter, label, features))
            if len(pending) >= window:
                yield pending.popleft().result()
                bar.update()
        while pending:
            yield pending.popleft().result()
            bar.update()


def write_adapter_table(adapters: list[ScannedAdapter], labels: list[dict], features, path: Path,
                        num_workers: int, info: dict) -> None:
    """Write the table with save_to_disk at path (complete or absent: built aside, then renamed)."""
    import datasets
    floats_per_row = sum(rows * cols for _, _, (rows, cols) in adapters[0].layout.tensors)
    rows_per_batch = max(1, WRITER_BATCH_BYTES // (4 * floats_per_row))
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        ds = datasets.Dataset.from_generator(
            functools.partial(adapter_rows, adapters, labels, features, num_workers), features=features,
            cache_dir=scratch, fingerprint=info["fingerprint"], writer_batch_size=rows_per_batch)
        ds.save_to_disk(str(partial))
        del ds
    (partial / TABLE_INFO_FILE).write_text(json.dumps(info, indent=1))
    os.replace(partial, path)


def warn_skipped(skipped: list) -> None:
    """One warning naming the adapters left out by --skip-mismatched (also when the table is reused)."""
    if skipped:
        tqdm.write(f"WARNING: left out {len(skipped)} adapters that do not match the others "
                   f"(--skip-mismatched): {describe_adapters(skipped, shown=5)}")


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
    if (table / TABLE_INFO_FILE).exists():
        info = json.loads((table / TABLE_INFO_FILE).read_text())
        warn_skipped(info["skipped"])
        return table, info["label_source"]

    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        scanned = list(tqdm(pool.map(scan_adapter, adapters), total=len(adapters), desc="scanning adapters",
                            unit="adapter", leave=False))
    kept, skipped = matching_adapters(scanned, folder, skip_mismatched)
    warn_skipped(skipped)
    warn_ignored(kept)
    labels, label_source = label_columns(kept, folder, labels_csv)
    features = table_features(kept[0].layout, labels, array2d)
    info = {"fingerprint": fingerprint, "folder": str(folder.resolve()), "adapters": len(kept),
            "label_source": label_source, "skipped": skipped}
    write_adapter_table(kept, labels, features, table, num_workers, info)
    for stale in table.parent.glob(f"{stem}-*"):
        if stale != table:
            shutil.rmtree(stale, ignore_errors=True)
    return table, label_source


def export_dataset(table_path: Path, out_dir: Path) -> Path:
    """Save a built table with save_to_disk at out_dir for sharing, replacing an earlier export there."""
    import datasets
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "state.json").exists():
        raise ExperimentError(f"--export-dataset {out_dir} exists and holds something else; choose a new or empty folder")
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    datasets.load_from_disk(str(table_path)).save_to_disk(str(partial))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(partial, out_dir)
    return out_dir
