"""Adapter folders: LoRA files written by diffusers, PEFT and kohya-style trainers become one table
in the published schema, with the same column names whichever trainer wrote them.

The key names below are the ones each library writes (sources, as read for this test):
- diffusers, the DreamBooth LoRA script: `convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))`
  saved by `save_lora_weights` to pytorch_lora_weights.safetensors.  `PEFT_TO_DIFFUSERS` in
  diffusers src/diffusers/utils/state_dict_utils.py renames only to_q/to_k/to_v/to_out.0 to
  `lora.down`/`lora.up` (other modules keep `lora_A`/`lora_B`, text-encoder projections become
  `lora_linear_layer.down`/`.up`); `save_lora_weights` (src/diffusers/loaders/lora_pipeline.py)
  prefixes each component's keys with its name, `unet.` / `text_encoder.`.  The older attention
  processors wrote `attn1.processor.to_q_lora.down.weight` (`UNET_TO_DIFFUSERS` and
  `KEYS_TO_ALWAYS_REPLACE` in the same state_dict_utils.py); recent diffusers keep PEFT's
  `lora_A`/`lora_B` and store the LoraConfig in the safetensors header under
  `lora_adapter_metadata`, fields prefixed by component (src/diffusers/loaders/lora_base.py).
- PEFT, `PeftModel.save_pretrained`: adapter_model.safetensors holding
  `get_peft_model_state_dict` (src/peft/utils/save_and_load.py): the model's parameter names
  under `base_model.model.` with the adapter name removed (`lora_A.weight`; a raw
  `state_dict()` keeps it, `lora_A.default.weight`), and adapter_config.json with `r`,
  `lora_alpha`, `use_rslora`, `alpha_pattern`.
- kohya-ss sd-scripts networks/lora.py: `lora_name = prefix + "." + module path` with every "."
  replaced by "_", prefix `lora_unet` / `lora_te` (`lora_te1`/`lora_te2` for SDXL), tensors
  `<lora_name>.lora_down.weight`, `.lora_up.weight` and the `alpha` buffer (0 or missing means
  alpha = rank); one .safetensors file per adapter.
"""

import csv
import json
import math
import os

import datasets
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch_file

import visual_ablation_experiment_optimized as vae
from visual_ablation_experiment_optimized import ExperimentError

RANK = 2
UNET_MODULES = {  # module -> (in_features, out_features): tiny stand-ins for the SD v1.5 UNet's 320..1280 channels
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (8, 8),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (12, 8),  # reads the (here 12-d) text context
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0": (8, 8),
    "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj": (8, 16),
    "up_blocks.1.attentions.2.proj_in": (8, 8),
}
EXPECTED_COLUMNS = sorted(f"{m}.lora.{side}.weight" for m in UNET_MODULES for side in ("down", "up"))
CONVENTIONS = ("diffusers", "diffusers_peft", "peft", "kohya")


def lora_weights(seed, modules=UNET_MODULES, rank=RANK):
    """module -> (down (rank, in), up (out, rank)) float32 matrices."""
    rng = np.random.default_rng(seed)
    return {m: (rng.standard_normal((rank, i)).astype(np.float32), rng.standard_normal((o, rank)).astype(np.float32))
            for m, (i, o) in modules.items()}


def diffusers_state_dict(weights):
    """As diffusers' DreamBooth LoRA script saves the UNet (see the module docstring)."""
    renamed = ("to_q", "to_k", "to_v", "to_out.0")
    keys = {}
    for module, (down, up) in weights.items():
        if module.endswith(renamed):
            keys[f"unet.{module}.lora.down.weight"], keys[f"unet.{module}.lora.up.weight"] = down, up
        else:
            keys[f"unet.{module}.lora_A.weight"], keys[f"unet.{module}.lora_B.weight"] = down, up
    return keys


def diffusers_peft_state_dict(weights):
    """As recent diffusers save a UNet adapter: PEFT names under the component prefix."""
    return {k: v for m, (down, up) in weights.items()
            for k, v in ((f"unet.{m}.lora_A.weight", down), (f"unet.{m}.lora_B.weight", up))}


def peft_state_dict(weights):
    """As PeftModel.save_pretrained writes adapter_model.safetensors."""
    return {k: v for m, (down, up) in weights.items()
            for k, v in ((f"base_model.model.{m}.lora_A.weight", down), (f"base_model.model.{m}.lora_B.weight", up))}


def kohya_state_dict(weights, alpha):
    """As sd-scripts' LoRANetwork saves a UNet LoRA, alpha stored per module."""
    keys = {}
    for module, (down, up) in weights.items():
        name = "lora_unet_" + module.replace(".", "_")
        keys[f"{name}.lora_down.weight"], keys[f"{name}.lora_up.weight"] = down, up
        keys[f"{name}.alpha"] = np.array(alpha, dtype=np.float32)
    return keys


def write_adapter(root, convention, name, weights, label=None, alpha=RANK, metadata=None):
    """One adapter laid out as its trainer writes it, under root/<label>/ when a label is given."""
    base = root / label if label is not None else root
    if convention == "kohya":
        path = base / f"{name}.safetensors"
        tensors = kohya_state_dict(weights, alpha)
        metadata_path = base / f"{name}.metadata.json"
    else:
        folder = base / name
        filename = "adapter_model.safetensors" if convention == "peft" else "pytorch_lora_weights.safetensors"
        path = folder / filename
        tensors = {"diffusers": diffusers_state_dict, "diffusers_peft": diffusers_peft_state_dict,
                   "peft": peft_state_dict}[convention](weights)
        metadata_path = folder / "metadata.json"
        if convention == "peft":
            folder.mkdir(parents=True, exist_ok=True)
            config = {"peft_type": "LORA", "r": RANK, "lora_alpha": alpha,
                      "target_modules": ["to_q", "to_k", "to_out.0", "proj", "proj_in"]}
            (folder / "adapter_config.json").write_text(json.dumps(config))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    if metadata is not None:
        metadata_path.write_text(json.dumps(metadata))
    return path


def labelled_folder(root, convention, labels=("cat", "cat", "dog", "dog"), **kwargs):
    """Adapters a0, a1, ... with weights seeded by their index, sorted into one folder per label."""
    for i, label in enumerate(labels):
        write_adapter(root, convention, f"a{i}", lora_weights(i), label=label, **kwargs)
    return root


def build(folder, tmp_path, labels_csv=None, skip_mismatched=False, array2d=False):
    """Build the folder's table; (the loaded table, the label source)."""
    path, source = vae.build_adapter_table(folder, tmp_path / "cache", labels_csv, num_workers=2,
                                          skip_mismatched=skip_mismatched, array2d=array2d)
    return datasets.load_from_disk(str(path)), source


def column_values(ds, column):
    return np.asarray(ds[column][:], dtype=np.float32)


# --- one vocabulary of tensor names -------------------------------------------------------------

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
OUT = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
FF = "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj"
TEXT_Q = "text_model.encoder.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("key, expected", [
    (f"{Q}.lora.down.weight", (f"{Q}.lora.down.weight", "down")),  # the published tables
    (f"unet.{Q}.lora.up.weight", (f"{Q}.lora.up.weight", "up")),  # diffusers save_lora_weights
    (f"unet.{FF}.lora_A.weight", (f"{FF}.lora.down.weight", "down")),  # diffusers keeps PEFT names off attention
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight", (f"{Q}.lora.down.weight", "down")),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight", (f"{OUT}.lora.up.weight", "up")),
    (f"base_model.model.{Q}.lora_A.weight", (f"{Q}.lora.down.weight", "down")),  # PEFT save_pretrained
    (f"base_model.model.{Q}.lora_B.default.weight", (f"{Q}.lora.up.weight", "up")),  # PEFT state_dict with adapter name
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight", (f"{Q}.lora.down.weight", "down")),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight", (f"{OUT}.lora.up.weight", "up")),
    ("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_0_proj.alpha", (f"{FF}.alpha", "alpha")),
    ("lora_unet_up_blocks_1_attentions_2_proj_in.lora_down.weight", ("up_blocks.1.attentions.2.proj_in.lora.down.weight", "down")),
])
def test_every_naming_convention_maps_to_the_published_column_name(key, expected):
    assert vae.canonical_lora_key(key) == expected


@pytest.mark.parametrize("key", [
    f"text_encoder.{TEXT_Q}.lora_linear_layer.down.weight",  # diffusers (PEFT_TO_DIFFUSERS)
    f"text_encoder.{TEXT_Q}.lora_A.weight",                  # recent diffusers
    "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight",  # diffusers' attention-processor era
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",  # kohya SD 1.x
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",  # kohya SDXL, first text encoder
])
def test_text_encoder_keys_keep_a_text_encoder_prefix(key):
    assert vae.canonical_lora_key(key) == (f"text_encoder.{TEXT_Q}.lora.down.weight", "down")


def test_second_sdxl_text_encoder_stays_apart_from_the_first():
    name, _ = vae.canonical_lora_key("lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight")
    assert name == "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora.up.weight"


def test_language_model_keys_keep_their_module_path():
    name, kind = vae.canonical_lora_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    assert (name, kind) == ("model.layers.0.self_attn.q_proj.lora.down.weight", "down")
    assert vae.canonical_lora_key("base_model.model.model.layers.3.mlp.gate_proj.lora_B.weight")[0] == \
        "model.layers.3.mlp.gate_proj.lora.up.weight"


def test_canonical_names_are_the_ones_the_script_finds_as_lora_columns():
    keys = list(kohya_state_dict(lora_weights(0), alpha=RANK))
    columns = [name for name, kind in map(vae.canonical_lora_key, keys) if kind in ("down", "up")]
    assert all(vae.LORA_COLUMN.fullmatch(c) for c in columns)
    assert sorted(columns) == EXPECTED_COLUMNS


def test_keys_that_are_no_lora_weights_are_reported_as_other():
    assert vae.canonical_lora_key("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector")[1] == "other"
    assert vae.canonical_lora_key("lora_unet_mid_block_attentions_0_proj_in.hada_w1_a")[1] == "other"


def test_convolution_loras_become_the_matrices_whose_product_is_the_update():
    layout = vae.adapter_layout((("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight", (2, 4, 3, 3)),
                                ("lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight", (6, 2, 1, 1))))
    assert layout.signature == {"down_blocks.0.resnets.0.conv1.lora.down.weight": (2, 36),
                                "down_blocks.0.resnets.0.conv1.lora.up.weight": (6, 2)}


def test_two_keys_for_the_same_tensor_make_the_layout_unusable():
    layout = vae.adapter_layout(((f"unet.{Q}.lora.down.weight", (2, 8)), (f"unet.{Q}.lora_A.weight", (2, 8))))
    assert "two keys name" in layout.problem


# --- the same weights give the same table, whichever trainer wrote them -------------------------

@pytest.fixture(scope="module")
def convention_tables(tmp_path_factory):
    """The same four adapters written in each convention, built into a table each."""
    tables = {}
    for convention in CONVENTIONS:
        root = tmp_path_factory.mktemp(convention)
        tables[convention] = build(labelled_folder(root / "adapters", convention), root)[0]
    return tables


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_every_convention_gives_the_published_columns(convention_tables, convention):
    columns = convention_tables[convention].column_names
    assert sorted(c for c in columns if vae.LORA_COLUMN.fullmatch(c)) == EXPECTED_COLUMNS
    assert set(columns) - set(EXPECTED_COLUMNS) == {"adapter_path", "lora_scale", "category_label"}


@pytest.mark.parametrize("convention", CONVENTIONS[1:])
def test_every_convention_gives_the_same_values_as_diffusers(convention_tables, convention):
    expected, table = convention_tables["diffusers"], convention_tables[convention]
    assert table.num_rows == expected.num_rows == 4
    for column in EXPECTED_COLUMNS:
        np.testing.assert_array_equal(column_values(table, column), column_values(expected, column))
    assert table["category_label"][:] == expected["category_label"][:]
    assert table["lora_scale"][:] == expected["lora_scale"][:] == [1.0] * 4


def test_rows_hold_each_adapters_own_weights_in_name_order(convention_tables):
    table = convention_tables["kohya"]
    assert table["adapter_path"][:] == ["cat/a0.safetensors", "cat/a1.safetensors", "dog/a2.safetensors", "dog/a3.safetensors"]
    down, up = lora_weights(2)[Q]
    np.testing.assert_array_equal(column_values(table, f"{Q}.lora.down.weight")[2], down)
    np.testing.assert_array_equal(column_values(table, f"{Q}.lora.up.weight")[2], up)


def test_table_loads_and_splits_into_modules_like_a_published_dataset(tmp_path):
    path, _ = vae.build_adapter_table(labelled_folder(tmp_path / "adapters", "diffusers"), tmp_path / "cache", None, 2, False)
    ds = vae.load_local_dataset(path)
    modules = vae.lora_modules(ds.column_names)
    assert [m.name for m in modules] == sorted(UNET_MODULES)
    assert all(m.down and m.up for m in modules)
    assert vae.encode_labels(ds, "category_label").class_names == ["cat", "dog"]


def test_array2d_tables_hold_the_same_values(tmp_path):
    folder = labelled_folder(tmp_path / "adapters", "diffusers")
    nested, _ = build(folder, tmp_path)
    fixed, _ = build(folder, tmp_path, array2d=True)
    assert isinstance(fixed.features[f"{Q}.lora.down.weight"], datasets.Array2D)
    for column in EXPECTED_COLUMNS:
        np.testing.assert_array_equal(column_values(fixed, column), column_values(nested, column))


def test_bfloat16_adapters_are_read_as_float32(tmp_path):
    weights = lora_weights(0)
    tensors = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in kohya_state_dict(weights, RANK).items()}
    (tmp_path / "adapters" / "cat").mkdir(parents=True)
    save_torch_file(tensors, str(tmp_path / "adapters" / "cat" / "a0.safetensors"))
    table, _ = build(tmp_path / "adapters", tmp_path)
    expected = torch.from_numpy(weights[Q][0]).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(column_values(table, f"{Q}.lora.down.weight")[0], expected)


def test_tensors_that_are_no_lora_weights_are_left_out_with_a_warning(tmp_path, capsys):
    for i in range(2):
        path = write_adapter(tmp_path / "adapters", "peft", f"a{i}", lora_weights(i), label="cat")
        tensors = peft_state_dict(lora_weights(i))
        tensors[f"base_model.model.{Q}.lora_magnitude_vector"] = np.ones(8, np.float32)  # DoRA
        save_file(tensors, str(path))
    table, _ = build(tmp_path / "adapters", tmp_path)
    assert sorted(c for c in table.column_names if "lora" in c and c != "lora_scale") == EXPECTED_COLUMNS
    assert "lora_magnitude_vector" in capsys.readouterr().out


# --- scale --------------------------------------------------------------------------------------

def write_with_header_metadata(root, alpha):
    """A recent diffusers file: the LoraConfig packed into the safetensors header, prefixed by component."""
    path = write_adapter(root, "diffusers_peft", "a0", lora_weights(0), label="cat")
    header = {"lora_adapter_metadata": json.dumps({"unet.r": RANK, "unet.lora_alpha": alpha})}
    save_file(diffusers_peft_state_dict(lora_weights(0)), str(path), metadata=header)


@pytest.mark.parametrize("write, expected", [
    (lambda root: write_adapter(root, "diffusers", "a0", lora_weights(0), label="cat"), 1.0),
    (lambda root: write_adapter(root, "kohya", "a0", lora_weights(0), label="cat", alpha=1.0), 0.5),
    (lambda root: write_adapter(root, "kohya", "a0", lora_weights(0), label="cat", alpha=0.0), 1.0),
    (lambda root: write_adapter(root, "peft", "a0", lora_weights(0), label="cat", alpha=8), 4.0),
    (lambda root: write_with_header_metadata(root, alpha=4), 2.0),
], ids=["diffusers-none-recorded", "kohya-alpha", "kohya-alpha-zero", "peft-config", "diffusers-header"])
def test_lora_scale_is_alpha_over_rank(tmp_path, write, expected):
    write(tmp_path / "adapters")
    table, _ = build(tmp_path / "adapters", tmp_path)
    assert table["lora_scale"][:] == [expected]


def test_rslora_scale_is_alpha_over_the_root_of_the_rank(tmp_path):
    path = write_adapter(tmp_path / "adapters", "peft", "a0", lora_weights(0), label="cat", alpha=8)
    config = json.loads((path.parent / "adapter_config.json").read_text())
    (path.parent / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    table, _ = build(tmp_path / "adapters", tmp_path)
    assert table["lora_scale"][0] == pytest.approx(8 / math.sqrt(RANK))


def test_scale_leaves_the_stored_weights_as_trained(tmp_path):
    write_adapter(tmp_path / "adapters", "kohya", "a0", lora_weights(0), label="cat", alpha=1.0)
    table, _ = build(tmp_path / "adapters", tmp_path)
    np.testing.assert_array_equal(column_values(table, f"{Q}.lora.up.weight")[0], lora_weights(0)[Q][1])


def test_adapter_whose_modules_have_different_scales_is_mismatched(tmp_path):
    path = write_adapter(tmp_path / "adapters", "peft", "a0", lora_weights(0), label="cat", alpha=RANK)
    config = json.loads((path.parent / "adapter_config.json").read_text())
    (path.parent / "adapter_config.json").write_text(json.dumps({**config, "alpha_pattern": {"to_q": 8}}))
    with pytest.raises(ExperimentError, match="cat/a0.*different scales"):
        build(tmp_path / "adapters", tmp_path)


# --- labels -------------------------------------------------------------------------------------

@pytest.mark.parametrize("convention", ["diffusers", "kohya"])
def test_metadata_beside_the_weights_gives_labels_and_scalar_columns(tmp_path, convention):
    for i in range(3):
        metadata = {"category_label": i % 2, "category_name": ["cat", "dog"][i % 2], "num_images": 10 + i,
                    "step_loss": 0.5, "rank": RANK, "tags": ["not", "a", "scalar"]}
        write_adapter(tmp_path / "adapters", convention, f"a{i}", lora_weights(i), metadata=metadata)
    table, source = build(tmp_path / "adapters", tmp_path)
    assert "metadata" in source
    assert table["category_label"][:] == [0, 1, 0]
    assert table["category_name"][:] == ["cat", "dog", "cat"]
    assert table["num_images"][:] == [10, 11, 12]
    assert table.features["step_loss"].dtype == "float64"
    assert "tags" not in table.column_names


def test_folder_above_each_adapter_gives_its_label(tmp_path):
    table, source = build(labelled_folder(tmp_path / "adapters", "peft"), tmp_path)
    assert source == "the folder above each adapter"
    assert table["category_label"][:] == ["cat", "cat", "dog", "dog"]


def test_integer_folder_names_give_integer_labels(tmp_path):
    table, _ = build(labelled_folder(tmp_path / "adapters", "kohya", labels=("0", "1", "1")), tmp_path)
    assert table.features["category_label"].dtype == "int64"
    assert table["category_label"][:] == [0, 1, 1]


def test_labels_csv_names_adapters_by_folder_file_or_absolute_path_and_wins_over_folders(tmp_path):
    folder = labelled_folder(tmp_path / "adapters", "diffusers", labels=("x", "x", "x"))
    labels_csv = tmp_path / "labels.csv"
    with open(labels_csv, "w", newline="") as f:
        csv.writer(f).writerows([
            ["adapter", "label"],
            ["x/a0", "cat"],
            ["x/a1/pytorch_lora_weights.safetensors", "dog"],
            [str((folder / "x" / "a2").resolve()), "cat"],
        ])
    table, source = build(folder, tmp_path, labels_csv=labels_csv)
    assert source == f"--labels {labels_csv}"
    assert table["category_label"][:] == ["cat", "dog", "cat"]


def test_labels_csv_missing_an_adapter_names_it(tmp_path):
    folder = labelled_folder(tmp_path / "adapters", "kohya")
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("cat/a0.safetensors,cat\ncat/a1.safetensors,cat\ndog/a2.safetensors,dog\n")
    with pytest.raises(ExperimentError, match="no label for 1 adapters.*dog/a3.safetensors"):
        build(folder, tmp_path, labels_csv=labels_csv)


def test_metadata_beside_only_some_adapters_is_an_error(tmp_path):
    write_adapter(tmp_path / "adapters", "diffusers", "a0", lora_weights(0), label="cat", metadata={"category_label": 0})
    write_adapter(tmp_path / "adapters", "diffusers", "a1", lora_weights(1), label="cat")
    with pytest.raises(ExperimentError, match="cat/a1 has no metadata.json"):
        build(tmp_path / "adapters", tmp_path)


def test_adapters_without_any_label_source_are_an_error(tmp_path):
    for i in range(2):
        write_adapter(tmp_path / "adapters", "kohya", f"a{i}", lora_weights(i))
    with pytest.raises(ExperimentError, match="no labels.*--labels FILE"):
        build(tmp_path / "adapters", tmp_path)


# --- adapters that do not match -----------------------------------------------------------------

def folder_with_one_odd_adapter(root):
    labelled_folder(root, "diffusers", labels=("cat", "cat", "dog"))
    fewer = {m: w for m, w in lora_weights(9).items() if m != Q}
    write_adapter(root, "diffusers", "odd", fewer, label="dog")
    return root


def test_mismatched_adapter_stops_the_build_naming_it_and_its_missing_tensor(tmp_path):
    expected = rf"1 of 4 adapters.*dog/odd \(missing {Q}\.lora\.down\.weight and 1 more\).*--skip-mismatched"
    with pytest.raises(ExperimentError, match=expected):
        build(folder_with_one_odd_adapter(tmp_path / "adapters"), tmp_path)


def test_skip_mismatched_leaves_the_adapter_out_with_a_warning(tmp_path, capsys):
    table, _ = build(folder_with_one_odd_adapter(tmp_path / "adapters"), tmp_path, skip_mismatched=True)
    assert table["adapter_path"][:] == ["cat/a0", "cat/a1", "dog/a2"]
    assert "dog/odd" in capsys.readouterr().out


def test_adapters_left_out_by_skip_mismatched_are_named_for_results_json(tmp_path):
    table, _ = vae.build_adapter_table(folder_with_one_odd_adapter(tmp_path / "adapters"), tmp_path / "cache", None, 2,
                                       skip_mismatched=True)
    [warning] = vae.skipped_adapter_warnings(table)
    assert "left out 1 adapters" in warning and "dog/odd (missing" in warning


def test_adapter_with_other_shapes_is_mismatched(tmp_path):
    labelled_folder(tmp_path / "adapters", "kohya", labels=("cat", "dog"))
    write_adapter(tmp_path / "adapters", "kohya", "rank4", lora_weights(5, rank=4), label="dog")
    with pytest.raises(ExperimentError, match=r"dog/rank4.safetensors \(.* is \[4, 8\], not \[2, 8\]"):
        build(tmp_path / "adapters", tmp_path)


def test_unreadable_file_is_mismatched(tmp_path):
    labelled_folder(tmp_path / "adapters", "kohya", labels=("cat", "dog"))
    (tmp_path / "adapters" / "dog" / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ExperimentError, match=r"dog/broken.safetensors \(unreadable"):
        build(tmp_path / "adapters", tmp_path)


# --- cache and export ---------------------------------------------------------------------------

def test_second_build_reuses_the_table(tmp_path, monkeypatch):
    folder = labelled_folder(tmp_path / "adapters", "diffusers")
    first, source = vae.build_adapter_table(folder, tmp_path / "cache", None, 2, False)

    def rebuild(*args, **kwargs):
        raise AssertionError("the table was built again")
    monkeypatch.setattr(vae, "write_adapter_table", rebuild)

    assert vae.build_adapter_table(folder, tmp_path / "cache", None, 2, False) == (first, source)


def test_changed_file_rebuilds_the_table_and_removes_the_old_one(tmp_path):
    folder = labelled_folder(tmp_path / "adapters", "diffusers")
    first, _ = vae.build_adapter_table(folder, tmp_path / "cache", None, 2, False)
    weights_file = write_adapter(folder, "diffusers", "a0", lora_weights(42), label="cat")
    later = os.stat(weights_file).st_mtime_ns + 10**9  # a rewrite within the clock's resolution must still count
    os.utime(weights_file, ns=(later, later))

    second, _ = vae.build_adapter_table(folder, tmp_path / "cache", None, 2, False)

    assert second != first and not first.exists()
    table = datasets.load_from_disk(str(second))
    np.testing.assert_array_equal(column_values(table, f"{Q}.lora.down.weight")[0], lora_weights(42)[Q][0])


def test_export_writes_a_loadable_save_to_disk_folder(tmp_path):
    path, _ = vae.build_adapter_table(labelled_folder(tmp_path / "adapters", "kohya"), tmp_path / "cache", None, 2, False)
    out = vae.export_dataset(path, tmp_path / "shared")
    vae.export_dataset(path, tmp_path / "shared")  # exporting again replaces the earlier export
    exported, built = datasets.load_from_disk(str(out)), datasets.load_from_disk(str(path))
    assert exported.column_names == built.column_names
    for column in EXPECTED_COLUMNS:
        np.testing.assert_array_equal(column_values(exported, column), column_values(built, column))


def test_export_refuses_a_folder_holding_something_else(tmp_path):
    path, _ = vae.build_adapter_table(labelled_folder(tmp_path / "adapters", "kohya"), tmp_path / "cache", None, 2, False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ExperimentError, match="holds something else"):
        vae.export_dataset(path, tmp_path / "busy")


# --- finding adapters ---------------------------------------------------------------------------

def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "adapters").mkdir()
    with pytest.raises(ExperimentError, match="no adapters in"):
        build(tmp_path / "adapters", tmp_path)


def test_folder_of_pickled_adapters_says_to_use_safetensors(tmp_path):
    (tmp_path / "adapters" / "a0").mkdir(parents=True)
    (tmp_path / "adapters" / "a0" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ExperimentError, match="save the adapters with safetensors"):
        build(tmp_path / "adapters", tmp_path)


def test_adapter_folders_are_told_apart_from_saved_datasets(tmp_path):
    adapters = labelled_folder(tmp_path / "adapters", "peft")
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"x": [1, 2]}).save_to_disk(str(saved))
    (tmp_path / "empty").mkdir()
    assert vae.is_adapter_folder(adapters)
    assert not vae.is_adapter_folder(saved)
    assert not vae.is_adapter_folder(tmp_path / "empty")
    assert not vae.is_adapter_folder(adapters / "cat" / "a0" / "adapter_model.safetensors")


LANGUAGE_MODEL_MODULES = {  # a PEFT adapter on two decoder layers of a language model: attention and MLP
    f"model.layers.{layer}.{block}.{proj}": (16, 16)
    for layer in (0, 1)
    for block, projs in (("self_attn", ("q_proj", "v_proj")), ("mlp", ("up_proj", "down_proj")))
    for proj in projs
}


def test_cli_evaluates_custom_groups_on_a_folder_of_language_model_adapters(tmp_path, capsys):
    root = tmp_path / "adapters"
    for i in range(48):
        label = ("short", "long")[i % 2]
        gain = 1.0 if label == "short" else 2.0  # a class signal simple statistics see at once
        weights = {m: (down * gain, up) for m, (down, up) in lora_weights(i, LANGUAGE_MODEL_MODULES).items()}
        write_adapter(root, "peft", f"adapter{i:02d}", weights, label=label)
    out = tmp_path / "out"
    code = vae.main(["--dataset", str(root), "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"),
                     "--representations", "simple_stats", "--layer-groups", "all",
                     "--group", "attn=q_proj|v_proj", "--group", "mlp=up_proj|down_proj",
                     "--num-runs", "2", "--max-epochs", "40", "--patience", "10", "--hidden-dim", "16", "--lr", "1e-2",
                     "--batch-size", "16", "--num-workers", "0", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    run_dir = out / "visual_ablation_adapters"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["groups"] == ["all", "attn", "mlp"]
    assert results["label_mapping"] == {"long": 0, "short": 1}
    assert [e["num_layers"] for e in results["attn_results"] + results["mlp_results"]] == [8, 8]
    assert results["all_layers_results"][0]["test_acc_mean"] > 0.8
    table = (run_dir / "results.txt").read_text()
    assert "attn" in table and "mlp" in table
    confusion = list(run_dir.glob("confusion_*.png"))
    assert len(confusion) == 1  # the best entry's, named for it
    for png in [run_dir / "summary.png", run_dir / "retention.png", *confusion]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
