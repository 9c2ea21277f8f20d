"""Which parts of the network carry the label: the linear probe, the layer map and the block ablation."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

import visual_ablation_experiment_optimized as vae
from helpers import CPU, PNG_SIGNATURE, balanced_labels, cli_args, results_of, save_dataset, user_error

INFORMATIVE_BLOCK = "down_blocks.1.attentions.0"
BLOCKS = ("down_blocks.0.attentions.0", INFORMATIVE_BLOCK, "mid_block.attentions.0", "up_blocks.1.attentions.0")
POSITIONS = ("transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn2.to_v")


def gaussian_classes(rows=600, features=8, classes=3, separation=0.8, seed=0):
    """Standardised features of classes with Gaussian centres: a problem a linear model solves well."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(classes, size=rows)
    x = (rng.standard_normal((rows, features)) + separation * rng.standard_normal((classes, features))[labels])
    return vae.standardise(x.astype(np.float32), labels, vae.split_indices(rows), classes, CPU)


def one_strength(monkeypatch, l2):
    monkeypatch.setattr(vae.CLASSIFIERS["linear"], "grid", (l2,))


KNN = vae.CLASSIFIERS["knn"]


# --- the linear probe -------------------------------------------------------------------------

def test_linear_probe_predicts_as_scikit_learns_logistic_regression_of_the_same_l2_strength(monkeypatch):
    data = gaussian_classes()
    l2 = 1e-2
    one_strength(monkeypatch, l2)
    cfg = vae.Config(num_runs=2, batch_size=64, max_epochs=200, patience=15, device="cpu")
    result = vae.train_runs(data, cfg, CPU, "linear", vae.CLASSIFIERS["linear"])
    ours = vae.predictions(result.logits(data, None), data, "test")

    theirs = torch.from_numpy(sklearn_probe(data, l2).predict(data.features.x["test"].numpy()))
    y_test = data.y["test"]
    for run in range(2):
        assert (ours[run] == theirs).float().mean().item() >= 0.95
        assert (ours[run] == y_test).float().mean().item() == pytest.approx((theirs == y_test).float().mean().item(), abs=0.03)


def sklearn_probe(data, l2: float) -> LogisticRegression:
    """scikit-learn's multinomial logistic regression at our L2 strength: C = 1 / (l2 * training rows)."""
    x_train, y_train = data.features.x["train"].numpy(), data.y["train"].numpy()
    return LogisticRegression(C=1 / (l2 * len(y_train)), tol=1e-10, max_iter=10_000).fit(x_train, y_train)


def centred(weights: np.ndarray) -> np.ndarray:
    """Softmax logits are unchanged by adding one vector to every class: compare weights less their class mean."""
    return weights - weights.mean(0, keepdims=True)


@pytest.mark.parametrize("l2", [1e-1, 1e-2])
def test_linear_probe_training_reaches_scikit_learns_optimum_at_the_same_l2_strength(l2):
    """The probe's own stacked model and Adam step, full batch until converged, land on the weights and
    intercepts scikit-learn finds: the penalty is l2/2 * |w|^2 on the mean loss, and the intercept is free."""
    data = gaussian_classes()
    cfg = vae.Config(num_runs=1, device="cpu")
    model = vae.StackedModels(vae.CLASSIFIERS["linear"], vae.Slices(seeds=[0], setting=[l2], units=[0]), data, cfg, CPU)
    x, y = data.features.x["train"], data.y["train"]
    for _ in range(3000):
        loss = torch.nn.functional.cross_entropy(model.forward(x, None)[0], y)
        model.step(loss.view(1), torch.tensor([vae.LINEAR_LR]))
    reference = sklearn_probe(data, l2)
    weights = model.params["w0"][0].detach().numpy().T
    intercepts = model.params["b0"][0, 0].detach().numpy()
    np.testing.assert_allclose(centred(weights), centred(reference.coef_), atol=2e-3)
    np.testing.assert_allclose(centred(intercepts), centred(reference.intercept_), atol=2e-3)


def test_linear_probe_chooses_each_runs_l2_strength_by_validation_accuracy():
    data = gaussian_classes()
    cfg = vae.Config(num_runs=2, batch_size=64, max_epochs=30, patience=5, device="cpu")
    model = vae.CLASSIFIERS["linear"]
    every = model.fit(data, cfg, vae.run_slices(cfg, model), CPU, "grid")
    chosen = vae.best_of_grid(every)
    grid = len(vae.LINEAR_L2_GRID)
    assert len(every.histories) == 2 * grid and len(chosen.histories) == 2
    for run, history in enumerate(chosen.histories):
        candidates = every.histories[run * grid:(run + 1) * grid]
        assert history.best_val_acc == max(h.best_val_acc for h in candidates)
        assert history.seed == vae.run_seed(cfg, run)


def test_linear_probe_penalises_weights_but_not_intercepts():
    linear = vae.CLASSIFIERS["linear"]
    assert linear.penalised("w0") and not linear.penalised("b0")
    assert linear.dropout_shape(vae.Config()) is None


def test_linear_probe_reaches_the_known_signal_where_chance_is_a_third():
    data = gaussian_classes(separation=2.0)
    cfg = vae.Config(num_runs=2, batch_size=64, max_epochs=60, patience=10, device="cpu")
    result = vae.train_runs(data, cfg, CPU, "linear", vae.CLASSIFIERS["linear"])
    accuracy = (vae.predictions(result.logits(data, None), data, "test") == data.y["test"]).float().mean(1)
    assert accuracy.min() >= 0.9


# --- stacked slices that read one block of columns each ----------------------------------------

# --- k-nearest neighbours ----------------------------------------------------------------------

def split_arrays(data, split):
    return data.features.x[split].numpy(), data.y[split].numpy()


@pytest.mark.parametrize("k", [1, 5, 15])
def test_knn_predicts_as_scikit_learns_kneighbors_classifier(monkeypatch, k):
    data = gaussian_classes(classes=2)  # two classes and an odd k: no vote ties, whose breaking differs
    monkeypatch.setattr(KNN, "grid", (k,))
    result = vae.train_runs(data, vae.Config(num_runs=2, device="cpu"), CPU, "knn", KNN)
    theirs = KNeighborsClassifier(k).fit(*split_arrays(data, "train"))
    for split in ("train", "val", "test"):
        ours = vae.predictions(result.logits(data, None), data, split)
        expected = torch.from_numpy(theirs.predict(split_arrays(data, split)[0]))
        assert torch.equal(ours[0], expected) and torch.equal(ours[1], expected)


def test_knn_chooses_each_runs_k_by_validation_accuracy_ties_going_to_more_neighbours():
    data = gaussian_classes(classes=2, separation=0.5, seed=3)
    x_val, y_val = split_arrays(data, "val")
    accuracy = {k: (KNeighborsClassifier(k).fit(*split_arrays(data, "train")).predict(x_val) == y_val).mean()
                for k in vae.KNN_K_GRID}
    best = max(vae.KNN_K_GRID, key=lambda k: (accuracy[k], k))
    result = vae.train_runs(data, vae.Config(num_runs=3, device="cpu"), CPU, "knn", KNN)
    assert [h.setting for h in result.histories] == [best] * 3
    assert [h.best_val_acc for h in result.histories] == pytest.approx([accuracy[best]] * 3)


def test_knn_breaks_a_tied_vote_by_each_runs_own_order_of_the_classes():
    data = gaussian_classes(rows=300, classes=2, separation=0.0, seed=5)
    scores = KNN.scores(KNN.parameters(data, vae.Slices(seeds=list(range(8)), setting=[2] * 8, units=list(range(8))), CPU),
                        {}, None, data, None)(data.features.x["test"])
    counts = scores.floor()
    tied = (counts[0, :, 0] == counts[0, :, 1])
    assert tied.any() and (counts[0, ~tied].argmax(-1) == scores[:, ~tied].argmax(-1)).all()  # ties alone move
    winners = scores[:, tied].argmax(-1)
    assert (winners == winners[:, :1]).all()  # one order per run
    assert set(winners[:, 0].tolist()) == {0, 1}  # and not the same class for every run


def test_knn_distances_are_chunked_so_50k_training_rows_never_form_a_full_matrix(monkeypatch):
    rng = np.random.default_rng(0)
    train_rows, queries = 50_000, 400
    x = rng.standard_normal((train_rows + queries, 8)).astype(np.float32)
    y = rng.integers(3, size=train_rows + queries)
    rest = np.arange(train_rows, train_rows + queries)
    data = vae.standardise(x, y, {"train": np.arange(train_rows), "val": rest, "test": rest}, 3, CPU)
    sizes, real_addmm = [], torch.addmm

    def recorded_addmm(*args, **kwargs):
        out = real_addmm(*args, **kwargs)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(vae.torch, "addmm", recorded_addmm)
    labels = vae.nearest_training_labels(data, data.features.x["val"], [None], 5)
    assert len(sizes) > 1 and max(sizes) <= vae.KNN_DISTANCE_ELEMENTS  # 50k x 400 would be 1.2 times the bound
    theirs = KNeighborsClassifier(5).fit(*split_arrays(data, "train"))
    _, index = theirs.kneighbors(data.features.x["val"].numpy())
    assert torch.equal(labels[0], data.y["train"][torch.from_numpy(index)])


def test_a_slice_with_a_block_reads_only_its_modules_columns_both_when_gathered_and_when_shared():
    torch.manual_seed(0)
    width, blocks = 3, torch.tensor([2, 0, 2, 1])
    params, _ = vae.CLASSIFIERS["linear"].init([1, 2, 3, 4], width, 5, vae.Config(), CPU)
    x = torch.randn(7, 3 * width)
    shared = vae.CLASSIFIERS["linear"].forward(params, {}, x, None, None, blocks)
    idx = torch.arange(7).expand(4, -1)
    gathered = vae.CLASSIFIERS["linear"].forward(params, {}, vae.slice_rows(x, idx, blocks, width), None, None)
    torch.testing.assert_close(shared, gathered)
    for s, block in enumerate(blocks.tolist()):
        alone = x[:, block * width:(block + 1) * width] @ params["w0"][s] + params["b0"][s]
        torch.testing.assert_close(shared[s], alone)


def test_each_slice_gathers_its_own_rows_and_with_a_block_only_its_modules_columns():
    torch.manual_seed(0)
    width, x = 3, torch.randn(7, 4 * 3)
    idx, blocks = torch.randint(0, 7, (5, 6)), torch.tensor([3, 0, 2, 3, 1])
    gathered, whole = vae.slice_rows(x, idx, blocks, width), vae.slice_rows(x, idx, None, None)
    for s, block in enumerate(blocks.tolist()):
        for j, row in enumerate(idx[s].tolist()):
            assert torch.equal(gathered[s, j], x[row, block * width:(block + 1) * width])
            assert torch.equal(whole[s, j], x[row])


# --- blocks of the network --------------------------------------------------------------------

@pytest.mark.parametrize("name, block, position", [
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.1.attentions.0",
     "transformer_blocks.0.attn1.to_q"),
    ("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0", "mid_block.attentions.0",
     "transformer_blocks.0.attn2.to_out.0"),
    ("model.layers.12.self_attn.q_proj", "model.layers.12", "self_attn.q_proj"),
    ("text_encoder.text_model.encoder.layers.3.mlp.fc1", "text_encoder.text_model.encoder.layers.3", "mlp.fc1"),
])
def test_a_module_belongs_to_its_attention_block_or_else_to_its_last_numbered_path(name, block, position):
    assert vae.module_place(name) == (block, position)


def test_blocks_come_in_network_order_down_mid_up_and_numbers_as_numbers():
    names = ["up_blocks.1.attentions.0", "mid_block.attentions.0", "down_blocks.10.attentions.0",
             "down_blocks.2.attentions.1"]
    assert sorted(names, key=vae.block_order_key) == [
        "down_blocks.2.attentions.1", "down_blocks.10.attentions.0", "mid_block.attentions.0", "up_blocks.1.attentions.0"]


def test_positions_order_projections_q_k_v_out_and_lose_their_shared_prefix():
    positions = ["transformer_blocks.0.attn1.to_out.0", "transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn2.to_k"]
    ordered = sorted(positions, key=vae.position_order_key)
    assert vae.position_labels(ordered) == ["attn1.to_q", "attn1.to_out.0", "attn2.to_k"]


# --- the layer map and block ablation, from the command line -----------------------------------

@pytest.fixture(scope="module")
def one_block_carries_the_class(tmp_path_factory):
    """Eight modules in four SD blocks; only the down factors of one block's modules shift with the class."""
    rows = 150
    labels = balanced_labels(rows, 2)
    rng = np.random.default_rng(0)
    columns = {}
    for block in BLOCKS:
        for position in POSITIONS:
            module = f"{block}.{position}"
            down = rng.standard_normal((rows, 1, 8))
            if block == INFORMATIVE_BLOCK:
                down += 1.5 * labels[:, None, None]
            columns[f"{module}.lora.down.weight"] = down.astype(np.float32)
            columns[f"{module}.lora.up.weight"] = rng.standard_normal((rows, 8, 1)).astype(np.float32)
    columns["category_label"] = labels
    return save_dataset(tmp_path_factory.mktemp("blocks") / "blocks", columns)


@pytest.fixture(scope="module")
def mapped(script, one_block_carries_the_class, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("mapped")
    argv = cli_args(tmp_path, one_block_carries_the_class, "--num-runs", "3", "--max-epochs", "20", "--patience", "8",
                    "--classifiers", "mlp,linear,knn", "--layer-map", "simple_stats", "--block-ablation")
    assert vae.main(argv) == 0
    return tmp_path, results_of(tmp_path, "blocks")


@pytest.fixture(scope="module")
def mapped_by_knn(script, one_block_carries_the_class, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("mapped_by_knn")
    argv = cli_args(tmp_path, one_block_carries_the_class, "--num-runs", "3", "--classifiers", "knn",
                    "--layer-map", "simple_stats", "--layer-map-classifier", "knn")
    assert vae.main(argv) == 0
    return results_of(tmp_path, "blocks")


def carries_the_class(probe: dict) -> bool:
    """The fixture's answer: the down factors of one block's modules (their pairs hold them too)."""
    return probe["block"] == INFORMATIVE_BLOCK and probe["factor"] in ("down", "pair")


def test_layer_map_probes_each_modules_down_up_and_pair_and_ranks_those_carrying_the_class_first(mapped):
    _, results = mapped
    (layer_map,) = results["layer_map"]
    assert layer_map["representation"] == "simple_stats" and layer_map["num_modules"] == 8
    assert sorted((e["module"], e["factor"]) for e in layer_map["modules"]) == sorted(
        (f"{block}.{position}", factor) for block in BLOCKS for position in POSITIONS for factor in ("down", "up", "pair"))
    informative = [e for e in layer_map["modules"] if carries_the_class(e)]
    others = [e for e in layer_map["modules"] if not carries_the_class(e)]
    assert min(e["test_acc_mean"] for e in informative) > max(e["test_acc_mean"] for e in others)


def test_layer_map_probes_each_block_position_and_factor_alone_as_a_family_of_its_own(mapped):
    _, results = mapped
    (layer_map,) = results["layer_map"]
    assert [name for name, _ in vae.level_ranking(layer_map, "blocks")][0] == INFORMATIVE_BLOCK
    assert {e["block"] for e in layer_map["blocks"]} == set(BLOCKS)
    assert {e["position"] for e in layer_map["positions"]} == set(POSITIONS)
    assert [name for name, _ in vae.level_ranking(layer_map, "factors")] == ["down", "up"]
    assert all(e["above_chance_p_holm"] >= e["above_chance_p"] for level in vae.MAP_LEVELS for e in layer_map[level])
    table = (mapped[0] / "out" / "visual_ablation_blocks" / "results.txt").read_text()
    assert f"blocks ranked (all): {INFORMATIVE_BLOCK}" in table and "factors ranked (all): down" in table


def test_layer_map_entries_hold_every_runs_accuracy_and_the_chosen_l2(mapped):
    _, results = mapped
    entry = results["layer_map"][0]["modules"][0]
    assert len(entry["test_acc_all_runs"]) == 3 and entry["classifier"] == "linear"
    assert {row["l2"] for row in entry["per_run_results"]} <= set(vae.LINEAR_L2_GRID)
    assert entry["position"] in POSITIONS and entry["block"] in BLOCKS


def test_knn_layer_map_ranks_the_block_that_carries_the_class_first(mapped_by_knn):
    (layer_map,) = mapped_by_knn["layer_map"]
    assert layer_map["classifier"] == "knn" and vae.level_ranking(layer_map, "blocks")[0][0] == INFORMATIVE_BLOCK
    assert all(e["above_chance"] for e in layer_map["modules"] if carries_the_class(e))


def test_knn_entries_record_each_runs_k_and_no_stall(mapped_by_knn):
    for entry in [*mapped_by_knn["all_layers_results"], *mapped_by_knn["layer_map"][0]["modules"]]:
        assert entry["classifier"] == "knn" and not entry["no_signal"]
        assert all(row["k"] in vae.KNN_K_GRID and row["stalled"] is None for row in entry["per_run_results"])


def test_block_ablation_drops_most_without_the_block_that_carries_the_class(mapped):
    _, results = mapped
    for classifier in ("mlp", "linear", "knn"):
        entries = [e for e in results["block_ablation"] if e["classifier"] == classifier]
        assert {e["block"] for e in entries} == set(BLOCKS)
        largest = max(entries, key=lambda e: e["drop_mean"])
        assert largest["block"] == INFORMATIVE_BLOCK
        assert largest["drop_low"] <= largest["drop_mean"] <= largest["drop_high"]


def test_every_group_entry_names_its_classifier_and_mlp_keeps_the_published_names(mapped):
    _, results = mapped
    names = {(e["representation"], e["classifier"]) for e in results["all_layers_results"]}
    assert names == {("simple_stats_all_layers", "mlp"), ("simple_stats_all_layers_linear", "linear"),
                     ("simple_stats_all_layers_knn", "knn")}
    assert {e["classifier"] for e in results["visual_only_results"]} == {"mlp", "linear", "knn"}


def test_table_has_a_row_per_classifier_the_layer_map_and_the_block_ablation(mapped):
    tmp_path, _ = mapped
    table = (tmp_path / "out" / "visual_ablation_blocks" / "results.txt").read_text()
    assert "simple_stats (linear)" in table and "simple_stats (knn)" in table
    assert "Layer map of simple_stats" in table and f"blocks ranked (all): {INFORMATIVE_BLOCK}" in table
    assert "Block ablation" in table


def test_layer_map_plot_is_a_valid_png(mapped):
    tmp_path, _ = mapped
    assert (tmp_path / "out" / "visual_ablation_blocks" / "layer_map.png").read_bytes().startswith(PNG_SIGNATURE)


def test_resume_keeps_finished_layer_maps_and_ablation_entries(mapped, one_block_carries_the_class, monkeypatch):
    tmp_path, before = mapped
    argv = cli_args(tmp_path, one_block_carries_the_class, "--num-runs", "3", "--max-epochs", "20", "--patience", "8",
                    "--classifiers", "mlp,linear,knn", "--layer-map", "simple_stats", "--block-ablation", "--resume")
    monkeypatch.setattr(vae, "train_runs", lambda *args, **kwargs: pytest.fail("a finished entry was trained again"))
    assert vae.main(argv) == 0
    after = results_of(tmp_path, "blocks")
    assert after["layer_map"] == before["layer_map"] and after["block_ablation"] == before["block_ablation"]


def test_block_ablation_without_all_layers_is_refused(one_block_carries_the_class, tmp_path, capsys):
    line = user_error(capsys, cli_args(tmp_path, one_block_carries_the_class, "--layer-groups", "visual",
                                       "--block-ablation"))
    assert "--block-ablation" in line and "all" in line


def test_l2_ties_on_validation_go_to_the_stronger_penalty():
    linear = vae.CLASSIFIERS["linear"]
    cfg = vae.Config(num_runs=1)
    slices = vae.run_slices(cfg, linear)
    histories = [vae.RunHistory(seed=42, setting=l2, best_val_acc=acc) for l2, acc in zip(slices.setting, [0.7, 0.8, 0.8, 0.6, 0.5])]
    params = {"w0": torch.arange(len(histories), dtype=torch.float32).view(-1, 1, 1)}
    result = vae.EnsembleResult(linear, slices, histories, params, {}, seconds=1.0)
    chosen = vae.best_of_grid(result)
    assert chosen.histories[0].setting == vae.LINEAR_L2_GRID[2] and chosen.best_params["w0"].item() == 2.0



def test_a_failed_slice_is_chosen_only_when_all_failed_and_a_run_is_timed_over_its_whole_grid():
    linear = vae.CLASSIFIERS["linear"]
    slices = vae.run_slices(vae.Config(num_runs=1), linear)
    histories = [vae.RunHistory(seed=42, setting=l2, best_val_acc=acc, seconds=1.0)
                 for l2, acc in zip(slices.setting, [0.7, 0.9, 0.8, 0.6, 0.5])]
    histories[1].failed = "training loss became non-finite at epoch 3"
    result = vae.EnsembleResult(linear, slices, histories, {"w0": torch.zeros(5, 1, 1)}, {}, seconds=5.0)
    chosen = vae.best_of_grid(result).histories[0]
    assert chosen.setting == vae.LINEAR_L2_GRID[2] and chosen.seconds == 5.0
    for history in histories:
        history.failed = "training loss became non-finite at epoch 1"
    assert vae.best_of_grid(result).histories[0].setting == vae.LINEAR_L2_GRID[1]
# --- adding a classifier ----------------------------------------------------------------------------

def readme_classifier_snippet() -> str:
    """The classifier README's "Reading and changing the script" shows how to add."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("**Adding a classifier**")[1]
    return section.split("```python\n")[1].split("```")[0]


def test_a_classifier_added_as_readme_shows_runs_end_to_end_through_the_command_line(
        one_block_carries_the_class, tmp_path, monkeypatch):
    namespace = dict(vars(vae))
    exec(readme_classifier_snippet(), namespace)
    toy = namespace["NearestClassMean"]()
    monkeypatch.setitem(vae.CLASSIFIERS, toy.name, toy)
    argv = cli_args(tmp_path, one_block_carries_the_class, "--num-runs", "2", "--classifiers", "mlp,ncm",
                    "--layer-map", "simple_stats", "--layer-map-classifier", "ncm", "--block-ablation")
    assert vae.main(argv) == 0
    results = results_of(tmp_path, "blocks")
    probe = vae.find_entry(results, "all", "simple_stats", "ncm")
    assert probe["classifier"] == "ncm" and probe["test_acc_mean"] > 0.9  # the class shifts one block's means
    assert {e["block"] for e in results["block_ablation"] if e["classifier"] == "ncm"} == set(BLOCKS)
    assert vae.level_ranking(results["layer_map"][0], "blocks")[0][0] == INFORMATIVE_BLOCK
    assert "simple_stats (ncm)" in (tmp_path / "out" / "visual_ablation_blocks" / "results.txt").read_text()


# --- factor groups -----------------------------------------------------------------------------------

def test_a_factor_group_keeps_that_factors_tensor_of_every_module_it_selects():
    modules = vae.lora_modules([f"{block}.{position}.lora.{factor}.weight"
                                for block in BLOCKS for position in POSITIONS for factor in ("down", "up")])
    groups = vae.layer_groups(modules, ("up", "visual:down", "all"))
    assert all(m.columns == (m.up,) for m in groups["up"]) and len(groups["up"]) == 8
    assert [m.name for m in groups["visual:down"]] == [m.name for m in modules if ".attn1." in m.name]
    assert all(len(m.columns) == 1 and m.columns[0].endswith(".lora.down.weight") for m in groups["visual:down"])
    assert all(len(m.columns) == 2 for m in groups["all"])


def test_factor_groups_run_like_any_group_and_skip_the_pair_representations_with_a_line(
        one_block_carries_the_class, tmp_path):
    argv = cli_args(tmp_path, one_block_carries_the_class, "--representations", "simple_stats,delta_spectral",
                    "--layer-groups", "all,down,up,visual:down", "--classifiers", "linear", "--num-runs", "3")
    assert vae.main(argv) == 0
    results = results_of(tmp_path, "blocks")
    down, up = (vae.find_entry(results, g, "simple_stats", "linear") for g in ("down", "up"))
    assert down["num_layers"] == up["num_layers"] == 8 and results["group_factors"]["visual:down"] == "down"
    assert down["test_acc_mean"] > up["test_acc_mean"] + 0.2  # the fixture's class is in the down factors
    assert [e["representation"] for e in results["visual_down_results"]] == ["simple_stats_visual_down_linear"]
    assert vae.find_entry(results, "up", "delta_spectral", "linear") is None
    table = (tmp_path / "out" / "visual_ablation_blocks" / "results.txt").read_text()
    assert "not computed: delta_spectral on up: no module of the group holds both factors" in table
    assert (tmp_path / "out" / "visual_ablation_blocks" / "summary.png").read_bytes().startswith(PNG_SIGNATURE)


def test_layer_groups_accept_factors_alone_and_after_a_module_group(capsys):
    assert vae.parse_config(["--layer-groups", "all,up,text:down"]).layer_groups == ("all", "up", "text:down")
    assert vae.parse_config(["--group", "attn:up=to_q"]).custom_groups == (("attn:up", "to_q"),)
    with pytest.raises(SystemExit):
        vae.parse_config(["--layer-groups", "visual:sideways"])


# --- the sanity-check's known answer -------------------------------------------------------------------

@pytest.fixture(scope="module")
def sanity_check(tmp_path_factory):
    """The built-in sanity-check, probed by the linear probe on the factor groups and mapped."""
    tmp_path = tmp_path_factory.mktemp("sanity")
    argv = ["--dataset", "sanity-check", "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out"),
            "--device", "cpu", "--num-runs", "2", "--representations", "simple_stats,delta_spectral,delta_canonical",
            "--classifiers", "linear", "--layer-groups", "all,up,down", "--layer-map", "delta_spectral"]
    assert vae.main(argv) == 0
    return tmp_path, results_of(tmp_path, "sanity-check")


def test_the_sanity_check_writes_its_answer_beside_the_data_and_reports_it(sanity_check):
    tmp_path, results = sanity_check
    (data,) = (path for path in (tmp_path / "data").iterdir() if path.is_dir())
    answer = json.loads((data / "answer.json").read_text())
    assert answer == results["answer"] and answer["factor"] == "up"
    assert {b for b, s in answer["block_strength"].items() if s > 0} == {b for b, _ in vae.SANITY_PLANTED}
    assert 0 < answer["visual_share"] < 1
    assert "The answer (answer.json): the class is in the up factors of" in \
        (tmp_path / "out" / "visual_ablation_sanity-check" / "results.txt").read_text()


def test_on_the_sanity_check_the_layer_map_ranks_the_planted_blocks_above_the_others(sanity_check):
    _, results = sanity_check
    (layer_map,) = results["layer_map"]
    planted = dict(vae.SANITY_PLANTED)
    ranked = [name for name, _ in vae.level_ranking(layer_map, "blocks")]
    assert set(ranked[:len(planted)]) == set(planted)
    strong = [b for b, s in planted.items() if s == max(planted.values())]
    assert set(ranked[:len(strong)]) == set(strong)
    assert all(not e["above_chance"] for e in layer_map["blocks"] if e["block"] not in planted)
    positions = dict(vae.level_ranking(layer_map, "positions"))
    assert min(e["test_acc_mean"] for p, e in positions.items() if ".attn2." in p) > \
        max(e["test_acc_mean"] for p, e in positions.items() if ".attn1." in p)  # visual weaker than text


def test_on_the_sanity_check_the_up_group_beats_the_down_group_and_the_delta_representations_find_the_class(sanity_check):
    _, results = sanity_check
    up, down = (vae.find_entry(results, g, "simple_stats", "linear") for g in ("up", "down"))
    assert up["test_acc_mean"] > down["test_acc_mean"] + 0.3 and up["above_chance"] and not down["above_chance"]
    for rep in ("delta_spectral", "delta_canonical"):
        entry = vae.find_entry(results, "all", rep, "linear")
        assert entry["above_chance_p"] < 1e-3, rep
