"""Data: resolving and loading a dataset, the published split, labels, LoRA layers and their groups,
reading weight matrices from Arrow tables, and the generated dataset."""

import math
import shutil

import datasets
import numpy as np
import pyarrow as pa
import pytest
from datasets import Array2D, Dataset, DatasetDict, Features

import visual_ablation_experiment_optimized as vae

SD15_COLUMNS = list(vae.sd15_lora_shapes())
SD15_MODULES = vae.lora_modules(SD15_COLUMNS)


def matrices(n, rows, cols, seed=0):
    return np.random.default_rng(seed).standard_normal((n, rows, cols)).astype(np.float32)


def nested_dataset(weights, column="w"):
    return Dataset.from_dict({column: weights})


def array2d_dataset(weights, column="w"):
    features = Features({column: Array2D(weights.shape[1:], "float32")})
    return Dataset.from_dict({column: weights}, features=features)


STORAGES = {"nested_lists": nested_dataset, "array2d": array2d_dataset}


def small_adapter_dataset(rows=10):
    """A few adapters with one LoRA module and a label, enough for the loaders."""
    w = matrices(rows, 1, 8)
    return Dataset.from_dict({
        "blk.attn1.to_q.lora.down.weight": w,
        "blk.attn1.to_q.lora.up.weight": w.transpose(0, 2, 1).copy(),
        "category_label": np.arange(rows) % 3,
    })


def lora_columns(ds):
    return [c for m in vae.lora_modules(ds.column_names) for c in m.columns]


def all_columns(ds):
    """Every LoRA column of a dataset as a (rows, r, c) array."""
    return {c: read_column(ds.data.table, c) for c in lora_columns(ds)}


def read_column(table, column):
    return vae.read_matrices(table, column, 0, table.num_rows, vae.column_shape(table, column))


# --- split ------------------------------------------------------------------------------------

def test_split_is_disjoint_and_covers_every_row():
    split = vae.split_indices(200)
    together = np.concatenate([split["train"], split["val"], split["test"]])
    assert sorted(together.tolist()) == list(range(200))


def test_split_sizes_are_about_70_10_20():
    split = vae.split_indices(1000)
    assert len(split["train"]) == 700
    assert abs(len(split["val"]) - 100) <= 2
    assert abs(len(split["test"]) - 200) <= 2


def test_split_equals_the_published_two_step_train_test_split():
    ids = np.array([f"adapter-{i:04d}" for i in range(137)])
    ds = Dataset.from_dict({"id": ids, "category_label": np.arange(137) % 10})
    first = ds.train_test_split(test_size=0.3, seed=42)
    second = first["test"].train_test_split(test_size=0.67, seed=42)

    split = vae.split_indices(len(ds))

    assert ids[split["train"]].tolist() == first["train"]["id"]
    assert ids[split["val"]].tolist() == second["train"]["id"]
    assert ids[split["test"]].tolist() == second["test"]["id"]


@pytest.mark.parametrize("rows", [1, 2])
def test_split_of_too_few_rows_is_a_user_error(rows):
    with pytest.raises(vae.ExperimentError, match="too few"):
        vae.split_indices(rows)


# --- LoRA columns -----------------------------------------------------------------------------

def test_lora_columns_are_found_with_or_without_unet_prefix():
    columns = ["unet.a.attn1.to_q.lora.down.weight", "unet.a.attn1.to_q.lora.up.weight",
               "b.attn2.to_v.lora.down.weight", "b.attn2.to_v.lora.up.weight"]
    names = [m.name for m in vae.lora_modules(columns)]
    assert names == ["b.attn2.to_v", "unet.a.attn1.to_q"]


def test_columns_that_are_not_lora_tensors_are_ignored():
    columns = ["category_label", "folder", "x.lora.down.bias", "x.lora.down.weight.extra", "lora.up.weight",
               "m.attn1.to_q.lora.down.weight"]
    modules = vae.lora_modules(columns)
    assert [c for m in modules for c in m.columns] == ["m.attn1.to_q.lora.down.weight"]


def test_lora_modules_are_sorted_by_name():
    columns = ["z.attn1.to_v.lora.up.weight", "a.attn2.to_q.lora.down.weight", "m.attn1.to_k.lora.down.weight"]
    names = [m.name for m in vae.lora_modules(columns)]
    assert names == sorted(names) == ["a.attn2.to_q", "m.attn1.to_k", "z.attn1.to_v"]


def test_down_and_up_tensors_of_a_module_are_paired():
    columns = ["blk.attn1.to_q.lora.up.weight", "other", "blk.attn1.to_q.lora.down.weight"]
    [module] = vae.lora_modules(columns)
    assert module.name == "blk.attn1.to_q"
    assert module.down == "blk.attn1.to_q.lora.down.weight"
    assert module.up == "blk.attn1.to_q.lora.up.weight"


def test_table_without_lora_columns_is_a_user_error_listing_its_columns():
    with pytest.raises(vae.ExperimentError, match="category_label"):
        vae.lora_modules(["category_label", "folder", "num_images"])


# --- layer groups -----------------------------------------------------------------------------

def test_sd15_layout_has_128_tensors_in_64_modules():
    assert len(SD15_COLUMNS) == 128
    assert len(SD15_MODULES) == 64
    assert all(m.down and m.up for m in SD15_MODULES)


def test_all_group_keeps_every_module():
    groups = vae.layer_groups(SD15_MODULES, ("all", "visual", "text"))
    assert groups["all"] == SD15_MODULES


def test_visual_group_keeps_only_self_attention_layers():
    visual = vae.layer_groups(SD15_MODULES, ("all", "visual", "text"))["visual"]
    assert len(visual) == 32
    assert sum(len(m.columns) for m in visual) == 64
    assert all(".attn1." in c for m in visual for c in m.columns)


def test_text_group_keeps_only_cross_attention_layers():
    text = vae.layer_groups(SD15_MODULES, ("all", "visual", "text"))["text"]
    assert len(text) == 32
    assert sum(len(m.columns) for m in text) == 64
    assert all(".attn2." in c for m in text for c in m.columns)


# --- sampling ---------------------------------------------------------------------------------

def test_sampling_is_deterministic_for_a_seed():
    assert vae.sample_modules(SD15_MODULES, 0.5, seed=7) == vae.sample_modules(SD15_MODULES, 0.5, seed=7)


def test_sampling_differs_for_another_seed():
    assert vae.sample_modules(SD15_MODULES, 0.5, seed=7) != vae.sample_modules(SD15_MODULES, 0.5, seed=8)


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.3, 0.5, 0.77])
def test_sampling_keeps_the_rounded_fraction_of_modules(fraction):
    assert len(vae.sample_modules(SD15_MODULES, fraction, seed=1)) == round(fraction * len(SD15_MODULES))


def test_sampling_the_whole_fraction_keeps_every_module():
    assert vae.sample_modules(SD15_MODULES, 1.0, seed=1) == SD15_MODULES


def test_sampling_keeps_down_and_up_of_a_module_together():
    sample = vae.sample_modules(SD15_MODULES, 0.3, seed=3)
    columns = {c for m in sample for c in m.columns}
    downs = {c.removesuffix(".lora.down.weight") for c in columns if c.endswith(".lora.down.weight")}
    ups = {c.removesuffix(".lora.up.weight") for c in columns if c.endswith(".lora.up.weight")}
    assert downs == ups and len(columns) == 2 * len(sample)


def test_sampled_visual_group_is_the_visual_part_of_the_sampled_all_group():
    sample = vae.sample_modules(SD15_MODULES, 0.5, seed=11)
    groups = vae.layer_groups(sample, ("all", "visual"))
    assert groups["visual"] == [m for m in groups["all"] if ".attn1." in m.name]
    assert groups["all"] == sample


# --- reading matrices -------------------------------------------------------------------------

@pytest.mark.parametrize("storage", STORAGES)
def test_column_shape_is_the_matrix_shape(storage):
    table = STORAGES[storage](matrices(5, 3, 7)).data.table
    assert vae.column_shape(table, "w") == (3, 7)


@pytest.mark.parametrize("storage", STORAGES)
def test_read_matrices_returns_the_stored_float32_values(storage):
    weights = matrices(6, 2, 9)
    table = STORAGES[storage](weights).data.table
    got = vae.read_matrices(table, "w", 0, 6, (2, 9))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, weights)


@pytest.mark.parametrize("storage", STORAGES)
def test_read_matrices_of_a_slice_across_arrow_chunks(storage):
    first, second = matrices(5, 2, 4, seed=1), matrices(5, 2, 4, seed=2)
    table = pa.concat_tables([STORAGES[storage](first).data.table, STORAGES[storage](second).data.table])
    assert table.column("w").num_chunks == 2

    got = vae.read_matrices(table, "w", 3, 8, vae.column_shape(table, "w"))

    np.testing.assert_array_equal(got, np.concatenate([first, second])[3:8])


@pytest.mark.parametrize("storage", STORAGES)
def test_read_matrices_of_a_dataset_saved_in_shards(storage, tmp_path):
    weights = matrices(12, 3, 5)
    STORAGES[storage](weights).save_to_disk(str(tmp_path / "ds"), num_shards=3)
    table = datasets.load_from_disk(str(tmp_path / "ds")).data.table
    assert table.column("w").num_chunks >= 3

    got = vae.read_matrices(table, "w", 2, 11, vae.column_shape(table, "w"))

    np.testing.assert_array_equal(got, weights[2:11])


def test_matrices_with_fewer_rows_in_one_adapter_are_a_user_error():
    column = "blk.attn1.to_q.lora.down.weight"
    table = Dataset.from_dict({column: [[[1.0, 2.0], [3.0, 4.0]], [[1.0, 2.0]], [[5.0, 6.0], [7.0, 8.0]]]}).data.table
    with pytest.raises(vae.ExperimentError, match=rf"{column}.*row 1"):
        vae.column_shape(table, column)


def test_matrices_of_another_width_in_one_adapter_are_a_user_error():
    column = "blk.attn1.to_q.lora.up.weight"
    table = Dataset.from_dict({column: [[[1.0, 2.0]], [[3.0, 4.0]], [[5.0, 6.0, 7.0]]]}).data.table
    with pytest.raises(vae.ExperimentError, match=rf"{column}.*row 2"):
        vae.column_shape(table, column)


def test_shape_error_names_the_row_counted_across_chunks():
    good = Dataset.from_dict({"w": [[[1.0, 2.0]]] * 3}).data.table
    bad = Dataset.from_dict({"w": [[[1.0, 2.0]], [[1.0, 2.0, 3.0]]]}).data.table
    with pytest.raises(vae.ExperimentError, match=r"\bw\b.*row 4"):
        vae.column_shape(pa.concat_tables([good, bad]), "w")


# --- loading ----------------------------------------------------------------------------------

def test_loads_a_saved_dataset_directory(tmp_path):
    small_adapter_dataset(10).save_to_disk(str(tmp_path / "adapters"))
    ds = vae.load_local_dataset(tmp_path / "adapters")
    assert ds.num_rows == 10 and "category_label" in ds.column_names


def test_loads_the_train_split_of_a_saved_dataset_dict(tmp_path):
    DatasetDict({"train": small_adapter_dataset(10), "test": small_adapter_dataset(4)}).save_to_disk(str(tmp_path / "dd"))
    assert vae.load_local_dataset(tmp_path / "dd").num_rows == 10


def test_dataset_dict_without_train_split_is_a_user_error(tmp_path):
    DatasetDict({"validation": small_adapter_dataset(4)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(vae.ExperimentError, match="train"):
        vae.load_local_dataset(tmp_path / "dd")


def test_loads_a_parquet_file(tmp_path):
    small_adapter_dataset(10).to_parquet(str(tmp_path / "adapters.parquet"))
    ds = vae.load_local_dataset(tmp_path / "adapters.parquet")
    assert ds.num_rows == 10
    np.testing.assert_array_equal(read_column(ds.data.table, "blk.attn1.to_q.lora.down.weight"),
                                  small_adapter_dataset(10)["blk.attn1.to_q.lora.down.weight"][:])


def test_loads_a_directory_of_parquet_files(tmp_path):
    (tmp_path / "shards").mkdir()
    small_adapter_dataset(10).to_parquet(str(tmp_path / "shards" / "part-0.parquet"))
    small_adapter_dataset(6).to_parquet(str(tmp_path / "shards" / "part-1.parquet"))
    assert vae.load_local_dataset(tmp_path / "shards").num_rows == 16


def test_directory_without_a_dataset_is_a_user_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no adapters here")
    with pytest.raises(vae.ExperimentError, match="no dataset"):
        vae.load_local_dataset(tmp_path)


@pytest.mark.parametrize("suffix", ["", "/"])
def test_local_dataset_is_named_for_its_last_path_component(tmp_path, suffix):
    small_adapter_dataset(10).save_to_disk(str(tmp_path / "my-adapters"))
    loaded = vae.load_experiment_dataset(vae.Config(dataset=str(tmp_path / "my-adapters") + suffix))
    assert loaded.name == "my-adapters"
    assert loaded.dataset.num_rows == 10


def test_unknown_dataset_word_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(vae.ExperimentError, match="nonsense"):
        vae.load_experiment_dataset(vae.Config(dataset="nonsense"))


@pytest.mark.parametrize("spec", ["someone/lora-weights", "1k"])
def test_unreachable_hub_is_a_user_error_suggesting_the_sanity_check(spec, tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(vae.ExperimentError, match="--dataset sanity-check"):
        vae.load_experiment_dataset(vae.Config(dataset=spec))


# --- labels -----------------------------------------------------------------------------------

def test_integer_labels_0_to_k_minus_1_are_kept_without_a_mapping():
    labels = vae.encode_labels(Dataset.from_dict({"category_label": [2, 0, 1, 2, 3]}), "category_label")
    assert labels.codes.tolist() == [2, 0, 1, 2, 3]
    assert labels.mapping is None


def test_string_labels_are_encoded_with_a_mapping():
    raw = ["dog", "cat", "dog", "bird", "cat"]
    labels = vae.encode_labels(Dataset.from_dict({"kind": raw}), "kind")
    assert sorted(labels.mapping.values()) == [0, 1, 2]
    assert labels.codes.tolist() == [labels.mapping[r] for r in raw]


def test_integer_labels_with_gaps_are_encoded_with_a_mapping():
    labels = vae.encode_labels(Dataset.from_dict({"category_label": [5, 1, 9, 1]}), "category_label")
    assert labels.mapping is not None
    assert sorted(set(labels.codes.tolist())) == [0, 1, 2]


def test_missing_label_column_is_a_user_error():
    with pytest.raises(vae.ExperimentError, match="category_label"):
        vae.encode_labels(Dataset.from_dict({"label": [0, 1]}), "category_label")


# --- the generated dataset --------------------------------------------------------------------

@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """SyntheticSpec(rows=30) written twice in different directories, and once as Array2D."""
    root = tmp_path_factory.mktemp("generated")
    spec = vae.SyntheticSpec(rows=30)
    paths = {
        "first": vae.write_synthetic_dataset(spec, root / "first" / "ds"),
        "second": vae.write_synthetic_dataset(spec, root / "second" / "ds"),
        "array2d": vae.write_synthetic_dataset(vae.SyntheticSpec(rows=30, array2d=True), root / "array2d" / "ds"),
    }
    return {k: datasets.load_from_disk(str(p)) for k, p in paths.items()}


def test_generated_dataset_has_the_sd15_lora_columns_and_shapes(generated):
    ds = generated["first"]
    lora = lora_columns(ds)
    assert len(lora) == 128
    assert {c: vae.column_shape(ds.data.table, c) for c in lora} == vae.sd15_lora_shapes()


def test_generated_dataset_has_integer_category_labels(generated):
    ds = generated["first"]
    assert ds.num_rows == 30
    labels = np.asarray(ds["category_label"][:])
    assert labels.dtype.kind == "i" and labels.min() >= 0 and labels.max() <= 9


def test_generated_dataset_is_the_same_when_written_twice(generated):
    first, second = all_columns(generated["first"]), all_columns(generated["second"])
    assert first.keys() == second.keys() and len(first) == 128
    for column in first:
        np.testing.assert_array_equal(first[column], second[column], err_msg=column)
    assert generated["first"]["category_label"][:] == generated["second"]["category_label"][:]


def test_generated_array2d_dataset_holds_the_same_values(generated):
    ds = generated["array2d"]
    lora = lora_columns(ds)
    assert all(isinstance(ds.features[c], Array2D) for c in lora)
    nested, array2d = all_columns(generated["first"]), all_columns(ds)
    for column in nested:
        np.testing.assert_array_equal(array2d[column], nested[column], err_msg=column)


def test_generated_rank_4_dataset_with_four_projections_has_256_tensors(tmp_path):
    projections = ("to_q", "to_k", "to_v", "to_out.0")
    # a few rows are enough for shapes, and keep the write fast
    path = vae.write_synthetic_dataset(vae.SyntheticSpec(rows=4, rank=4, projections=projections), tmp_path / "ds")
    ds = datasets.load_from_disk(str(path))
    lora = lora_columns(ds)
    shapes = {c: vae.column_shape(ds.data.table, c) for c in lora}

    assert len(lora) == 256
    assert shapes == vae.sd15_lora_shapes(4, projections)
    block = "down_blocks.1.attentions.0.transformer_blocks.0"
    assert shapes[f"{block}.attn2.to_k.lora.down.weight"] == (4, 768)
    assert shapes[f"{block}.attn2.to_v.lora.down.weight"] == (4, 768)
    assert shapes[f"{block}.attn2.to_q.lora.down.weight"] == (4, 640)
    assert shapes[f"{block}.attn1.to_k.lora.down.weight"] == (4, 640)
    assert shapes[f"{block}.attn2.to_out.0.lora.up.weight"] == (640, 4)


def test_visual_flat_vec_is_taken_from_the_all_layers_matrix_without_reading_again(tiny_dataset_path, tmp_path,
                                                                                   monkeypatch):
    import torch
    ds = vae.load_local_dataset(tiny_dataset_path)
    loaded = vae.LoadedDataset(ds, "tiny", "test", vae.dataset_fingerprint(ds))
    modules = vae.lora_modules(ds.column_names)
    cfg = vae.Config(representations=("flat_vec",), cache_dir=str(tmp_path), num_workers=0)
    store = vae.extract_features(loaded, modules, cfg, torch.device("cpu"))
    groups = vae.layer_groups(modules, ("all", "visual"))
    all_layers = vae.group_feature_matrix(store, groups["all"], "flat_vec")
    reads = []
    monkeypatch.setattr(store.reader, "read", lambda *args: reads.append(args))
    visual = vae.group_feature_matrix(store, groups["visual"], "flat_vec")
    assert reads == [] and all_layers is not None
    columns = [c for m in groups["visual"] for c in m.columns]
    expected = np.concatenate([vae.read_matrices(ds.data.table, c, 0, ds.num_rows, vae.column_shape(ds.data.table, c))
                               .reshape(ds.num_rows, -1) for c in columns], axis=1)
    np.testing.assert_array_equal(visual, expected)


@pytest.fixture(scope="module")
def canonical_store(tiny_dataset_path, tmp_path_factory):
    import torch
    ds = vae.load_local_dataset(tiny_dataset_path)
    loaded = vae.LoadedDataset(ds, "tiny", "test", vae.dataset_fingerprint(ds))
    modules = vae.lora_modules(ds.column_names)
    cfg = vae.Config(representations=("delta_canonical", "spectral"), cache_dir=str(tmp_path_factory.mktemp("cache")),
                     num_workers=0)
    return vae.extract_features(loaded, modules, cfg, torch.device("cpu")), modules


@pytest.mark.parametrize("representation", ["delta_canonical", "spectral"])
def test_stored_features_larger_than_the_memory_limit_are_assembled_in_a_memory_mapped_file(canonical_store,
                                                                                          representation):
    store, modules = canonical_store
    in_memory = vae.group_feature_matrix(store, modules, representation)
    mapped = vae.group_feature_matrix(store, modules, representation, memory_limit=1)
    assert isinstance(mapped, np.memmap) and not isinstance(in_memory, np.memmap)
    expected = np.concatenate([store.get(u, representation) for u in vae.feature_units(modules, representation)], axis=1)
    np.testing.assert_array_equal(mapped, expected)
    np.testing.assert_array_equal(in_memory, expected)


def test_delta_canonical_of_a_group_is_as_wide_as_its_weights(canonical_store):
    store, modules = canonical_store
    width = sum(math.prod(store.shapes[c]) for m in modules for c in m.columns)
    assert vae.group_feature_matrix(store, modules, "delta_canonical").shape[1] == width


# --- the dataset's fingerprint: its content, wherever it sits -----------------------------------------

def copy_without_times(source, target):
    shutil.copytree(source, target, copy_function=shutil.copy)  # new mtimes, as a plain cp to another node gives


def fingerprint_of(path, memo_dir=None):
    return vae.dataset_fingerprint(datasets.load_from_disk(str(path)), memo_dir)


def test_copies_of_a_dataset_anywhere_have_its_fingerprint(tiny_dataset_path, tmp_path):
    copy_without_times(tiny_dataset_path, tmp_path / "elsewhere" / "copy")
    assert fingerprint_of(tmp_path / "elsewhere" / "copy") == fingerprint_of(tiny_dataset_path)


def test_a_file_rewritten_in_place_changes_the_fingerprint_though_its_size_stays(tiny_dataset_path, tmp_path):
    copy_without_times(tiny_dataset_path, tmp_path / "data")
    before = fingerprint_of(tmp_path / "data", tmp_path / "cache")
    arrow = next((tmp_path / "data").glob("*.arrow"))
    content = bytearray(arrow.read_bytes())
    content[len(content) // 2] ^= 0xFF  # one byte of the weights
    arrow.write_bytes(bytes(content))
    assert fingerprint_of(tmp_path / "data", tmp_path / "cache") != before


def test_an_unchanged_file_is_hashed_once_and_remembered(tiny_dataset_path, tmp_path, monkeypatch):
    first = fingerprint_of(tiny_dataset_path, tmp_path / "cache")
    monkeypatch.setattr(vae, "file_sha256", lambda path: pytest.fail(f"{path} hashed again"))
    assert fingerprint_of(tiny_dataset_path, tmp_path / "cache") == first


def test_the_sanity_check_is_written_under_a_name_its_generator_and_settings_decide(tmp_path, monkeypatch):
    first = vae.write_sanity_check_dataset(tmp_path, rows=60)
    assert first.name.startswith("sanity-check-60-") and (first / "answer.json").exists()
    assert vae.write_sanity_check_dataset(tmp_path, rows=60) == first  # reused
    real = vae.synthetic_rows
    monkeypatch.setattr(vae, "synthetic_rows", lambda spec, start, stop: real(spec, start, stop))  # edited code
    assert vae.write_sanity_check_dataset(tmp_path, rows=60).name != first.name  # never the stale table
