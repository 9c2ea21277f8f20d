"""Reports a researcher can publish: results.json, results.txt and the plots must not mislead."""

import os
import warnings

import matplotlib

matplotlib.use("Agg")  # headless, as the script draws
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from scipy import stats  # noqa: E402

from helpers import PNG_SIGNATURE  # noqa: E402



TEST_ROWS = 100


def independent_above_chance_p(accs, chance):
    """The documented test, computed here from the accuracies: exact binomial per run, (n/k) x k-th smallest p."""
    p = np.sort(stats.binom.sf(np.round(np.asarray(accs) * TEST_ROWS) - 1, TEST_ROWS, chance))
    k = -(-len(p) // 2)
    return min(1.0, len(p) / k * p[k - 1])


def t_interval(values):
    values = np.asarray(values, dtype=np.float64)
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return [values.mean() - half, values.mean() + half]


def make_entry(name, accs, failed=(), stalled=(), num_classes=4, with_median=True, classifier="mlp"):
    """An entry as evaluate_entry writes it, from each run's test accuracy (failed runs' values are junk),
    its statistics computed here independently of the script."""
    ok = [k for k in range(len(accs)) if k not in failed]
    kept = np.array([accs[k] for k in ok])
    confusion = np.eye(num_classes, dtype=int) * 5 + 1
    p = independent_above_chance_p(kept, 1 / num_classes) if ok else None
    entry = {"representation": name, "classifier": classifier, "test_acc_all_runs": list(accs), "failed_runs": list(failed),
             "num_successful_runs": len(ok),
             "test_acc_mean": float(kept.mean()) if ok else None,
             "test_acc_std": float(kept.std(ddof=1)) if len(ok) > 1 else None,
             "test_acc_ci95": t_interval(kept) if len(ok) > 1 else None,
             "above_chance_p": p, "above_chance": p is not None and p < 0.05,
             "test_confusion_matrices": [confusion.tolist() for _ in accs],
             "per_run_results": [{"run": k, "test_acc": a, "failed": "loss non-finite" if k in failed else None,
                                  "stalled": k in stalled} for k, a in enumerate(accs)]}
    if with_median and ok:
        entry["test_acc_median"] = float(np.median(kept))
    return entry


def make_results(all_layers, visual, num_classes=4, class_names=None):
    """results.json with entries for all layers and the visual group, representations named by the entries."""
    reps = [e["representation"].removesuffix("_all_layers") for e in all_layers]
    results = {"dataset": "tiny", "num_runs": len(all_layers[0]["test_acc_all_runs"]),
               "num_classes": num_classes, "groups": ["all", "visual"], "std_ddof": 1,
               "chance": 1 / num_classes, "chance_uniform": 1 / num_classes,
               "class_names": class_names or [f"class{i}" for i in range(num_classes)],
               "config": {"representations": reps}, "complete": True,
               "all_layers_results": all_layers, "visual_only_results": visual}
    return statistics_of(results)


def statistics_of(results):
    import visual_ablation_experiment_optimized as vae
    vae.with_statistics(results)
    return results


@pytest.fixture
def results():
    """Two representations over 5 runs of 4 classes: one learns well, one stays near chance."""
    return make_results(
        [make_entry("spectral_all_layers", [0.90, 0.80, 0.85, 0.70, 0.95], stalled=[3]),
         make_entry("stats_all_layers", [0.30, 0.28, 0.33, 0.27, 0.31])],
        [make_entry("spectral_visual_only", [0.80, 0.70, 0.75, 0.60, 0.85]),
         make_entry("stats_visual_only", [0.29, 0.27, 0.30, 0.99, 0.26], failed=[3])])


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def figure_texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(Text)]


def title(fig) -> Text:
    return next(t for t in fig.findobj(Text) if t.get_text() == fig.get_suptitle())


def scatter_points(fig, label) -> np.ndarray:
    ax = fig.axes[0]
    found = [c.get_offsets() for c in ax.collections if c.get_label() == label]
    return np.concatenate(found) if found else np.empty((0, 2))


# --- results.json --------------------------------------------------------------------------------

def test_results_json_gets_the_permissions_of_a_normally_created_file(script, tmp_path):
    previous = os.umask(0o022)
    try:
        script.write_json_atomic(tmp_path / "results.json", {"complete": True})
        (tmp_path / "results.txt").write_text("table\n")
    finally:
        os.umask(previous)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "results.txt").stat().st_mode & 0o777 == 0o644


# --- results.txt ---------------------------------------------------------------------------------

def test_table_shows_the_median_beside_mean_and_sample_std(script, results):
    row = next(line for line in script.comparison_table(results).splitlines() if line.startswith("spectral "))
    accs = [0.90, 0.80, 0.85, 0.70, 0.95]
    assert f"{np.mean(accs):.3f} +- {np.std(accs, ddof=1):.3f} ({np.median(accs):.3f})" in row


def test_table_computes_the_median_over_successful_runs_when_results_json_lacks_it(script):
    old = make_entry("spectral_all_layers", [0.5, 0.6, 0.99, 0.7], failed=[2], with_median=False)
    assert script.median_accuracy(old) == pytest.approx(0.6)


def run_line(table, name):
    return next(line for line in table.splitlines() if line.startswith(name + " "))


def test_table_lists_each_run_marking_runs_that_failed_to_train_and_naming_failed_ones(script, results):
    table = script.comparison_table(results)
    assert run_line(table, "spectral_all_layers").split()[1:6] == ["0.900", "0.800", "0.850", "0.700*", "0.950"]
    assert run_line(table, "stats_visual_only").split()[1:6] == ["0.290", "0.270", "0.300", "failed", "0.260"]


def test_table_gives_each_entrys_t_interval_and_test_against_chance_as_results_json_holds_them(script, results):
    table = script.comparison_table(results)
    for entry in results["all_layers_results"] + results["visual_only_results"]:
        low, high = entry["test_acc_ci95"]
        verdict = "above chance" if entry["above_chance"] else "not above chance"
        assert f"[{low:.3f}, {high:.3f}]  p {entry['above_chance_p']:.2g}: {verdict}" in run_line(table, entry["representation"])


def test_table_explains_runs_that_failed_to_train_in_a_footnote(script, results):
    table = script.comparison_table(results)
    assert "* failed to train:" in table and "--min-epochs N" in table


def test_table_has_no_failed_to_train_footnote_without_such_runs(script, results):
    results["all_layers_results"][0]["per_run_results"][3]["stalled"] = False
    assert "failed to train" not in script.comparison_table(statistics_of(results))


def test_table_marks_an_entry_without_signal_and_gives_no_rerun_advice(script, results):
    results["all_layers_results"][1] = make_entry("stats_all_layers", [0.25] * 5, stalled=range(5))
    table = script.comparison_table(statistics_of(results))
    assert results["all_layers_results"][1]["no_signal"] and not results["all_layers_results"][1]["failed_to_train_runs"]
    assert "(0.250)#" in next(line for line in table.splitlines() if line.startswith("stats "))
    assert "# no signal:" in table and "failed to train" in table  # spectral's run 3 still failed to train


def test_table_marks_the_retention_of_a_representation_not_above_chance_on_all_layers(script, results):
    lines = script.comparison_table(results).splitlines()
    spectral = next(line for line in lines if line.startswith("spectral "))
    stats_row = next(line for line in lines if line.startswith("stats "))
    assert not results["all_layers_results"][1]["above_chance"] and results["all_layers_results"][0]["above_chance"]
    assert stats_row.rstrip().endswith("%~") and spectral.rstrip().endswith("%")
    assert "~ all-layers accuracy not above chance: retention not meaningful" in lines


def test_table_gives_drop_and_retention_intervals_computed_from_the_paired_runs(script, results):
    table = script.comparison_table(results)
    base, group = np.array([0.90, 0.80, 0.85, 0.70, 0.95]), np.array([0.80, 0.70, 0.75, 0.60, 0.85])
    drop = t_interval(base - group)
    line = next(line for line in table.splitlines() if line.startswith("spectral ") and "visual" in line.split())
    assert f"[{drop[0]:+.3f}, {drop[1]:+.3f}]" in line  # every run drops 0.10: a zero-width interval
    assert f"{100 * group.mean() / base.mean():.1f}%" in line


def test_table_says_all_runs_failed_instead_of_a_number(script, results):
    results["visual_only_results"][0] = make_entry("spectral_visual_only", [0.1] * 5, failed=range(5))
    row = next(line for line in script.comparison_table(statistics_of(results)).splitlines() if line.startswith("spectral "))
    assert "all runs failed" in row and "nan" not in row


def test_table_states_the_majority_class_as_chance_and_one_over_k_beside_it_when_they_differ(script, results):
    results["chance"] = 0.6
    header = script.comparison_table(results).splitlines()[0]
    assert "chance 0.600 (the test split's majority class), 1/K 0.250" in header


def test_table_lists_the_linear_probes_l2_strengths_and_marks_those_at_the_grids_edge(script, results):
    probe = make_entry("spectral_all_layers_linear", [0.9, 0.8, 0.85, 0.7, 0.95], classifier="linear")
    for run, l2 in zip(probe["per_run_results"], [1e-5, 1e-3, 1e-3, 1e-2, 1e-1]):
        run["l2"] = l2
    results["all_layers_results"].append(probe)
    results["config"]["classifiers"] = ["mlp", "linear"]
    table = script.comparison_table(statistics_of(results))
    section = table.split("L2 strength each linear run chose")[1]
    assert run_line(section, "spectral_all_layers_linear").split()[1:] == ["1e-05!", "1e-03", "1e-03", "1e-02", "1e-01!"]
    assert "spectral_all_layers_linear" in script.edge_setting_warning(results)


# --- plots ---------------------------------------------------------------------------------------

def error_bars(ax) -> list[tuple[float, float, float]]:
    """(x, low end, high end) of every vertical error bar drawn."""
    found = []
    for container in ax.containers:
        if hasattr(container, "has_yerr") and container.has_yerr:
            for segment in container.lines[2][0].get_segments():
                found.append((segment[0][0], segment[0][1], segment[1][1]))
    return found


def test_summary_bars_are_means_with_error_bars_of_one_sample_std(script, results):
    fig = script.figure_summary(results)
    assert "±1 sample std over 5 runs" in fig.get_suptitle().replace("\n", " ")
    bars = [p for p in fig.axes[0].patches if np.isfinite(p.get_height())]
    spectral = [0.90, 0.80, 0.85, 0.70, 0.95]
    first = bars[0]
    assert first.get_height() == pytest.approx(np.mean(spectral))
    x = first.get_x() + first.get_width() / 2
    _, low, high = next(e for e in error_bars(fig.axes[0]) if e[0] == pytest.approx(x))
    assert (high - low) / 2 == pytest.approx(np.std(spectral, ddof=1))


def test_summary_draws_a_dot_per_successful_run_and_runs_that_failed_to_train_apart(script, results):
    fig = script.figure_summary(results)
    single, failed = scatter_points(fig, "single run"), scatter_points(fig, "run that failed to train")
    assert len(single) == 5 * 4 - 1 - 1  # 4 entries of 5 runs, less one that failed to train and one failed
    assert failed[:, 1].tolist() == [0.70]
    assert "run that failed to train" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_summary_notes_an_entry_whose_runs_all_failed_at_its_bar(script, results):
    results["visual_only_results"][0] = make_entry("spectral_visual_only", [0.1] * 5, failed=range(5))
    assert figure_texts(script.figure_summary(statistics_of(results))).count("all runs failed") == 1


def test_retention_error_bars_are_fiellers_interval_whose_ends_the_paired_t_test_just_rejects(script, results):
    results["visual_only_results"][0] = make_entry("spectral_visual_only", [0.80, 0.75, 0.70, 0.65, 0.90])
    fig = script.figure_retention(statistics_of(results))
    assert "Fieller" in fig.get_suptitle()
    base, group = np.array([0.90, 0.80, 0.85, 0.70, 0.95]), np.array([0.80, 0.75, 0.70, 0.65, 0.90])
    bar = next(p for p in fig.axes[0].patches if np.isfinite(p.get_height()))
    assert bar.get_height() == pytest.approx(group.mean() / base.mean())
    _, low, high = next(e for e in error_bars(fig.axes[0]) if e[0] == pytest.approx(bar.get_x() + bar.get_width() / 2))
    for end in (low, high):  # at each end the paired t-test of group - r * base has p = 0.05
        assert stats.ttest_1samp(group - end * base, 0).pvalue == pytest.approx(0.05, abs=1e-6)


def test_retention_hatches_representations_not_above_chance_on_all_layers_and_says_why(script, results):
    fig = script.figure_retention(results)
    bars = [p for p in fig.axes[0].patches if p.get_height() == p.get_height()]  # drawn bars, not NaN slots
    assert [bool(bar.get_hatch()) for bar in bars] == [False, True]  # spectral, stats
    assert "all-layers accuracy not above chance: retention not meaningful" in [t.replace("\n", " ") for t in figure_texts(fig)]


def test_best_entry_skips_entries_with_a_failed_run(script, results):
    results["visual_only_results"][1] = make_entry("stats_visual_only", [0.99, 0.99, 0.99, 0.99, 0.1], failed=[4])
    assert script.best_entry(results)["representation"] == "spectral_all_layers"


def test_best_entry_is_none_when_every_entry_has_a_failed_run(script, results):
    for key in ("all_layers_results", "visual_only_results"):
        for entry in results[key]:
            entry["failed_runs"] = [0]
    assert script.best_entry(results) is None


def test_reports_without_a_best_entry_skip_the_confusion_plot(script, results, tmp_path):
    for key in ("all_layers_results", "visual_only_results"):
        for entry in results[key]:
            entry["failed_runs"] = [0]
    (tmp_path / "confusion_old.png").write_bytes(PNG_SIGNATURE)
    script.write_reports(tmp_path, results)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.txt", "retention.png", "summary.png"]


def test_every_report_plot_is_a_valid_png(script, results, tmp_path):
    script.write_reports(tmp_path, results)
    plots = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in plots] == ["confusion_spectral_all_layers.png", "retention.png", "summary.png"]
    for png in plots:
        assert png.read_bytes()[:8] == PNG_SIGNATURE


def long_named_results():
    """A long dataset name (a local path) and many long class names."""
    entry = make_entry("spectral_all_layers", [0.9, 0.8, 0.85], num_classes=12)
    results = make_results([entry], [], num_classes=12, class_names=[f"class {i} " * 4 for i in range(12)])
    results["dataset"] = "my_adapters_collected_from_the_hub_in_march_with_extra_styles_" * 3
    return results


@pytest.mark.parametrize("kind", ["summary", "retention", "confusion"])
def test_titles_lie_inside_their_figures(script, kind):
    results = long_named_results()
    if kind == "confusion":
        entry = {**results["all_layers_results"][0], "representation": "spectral_" + "a_long_custom_group_name_" * 6}
        fig = script.figure_confusion(results, entry)
    else:
        fig = getattr(script, f"figure_{kind}")(results)
    fig.canvas.draw()
    box = title(fig).get_window_extent()
    assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1
    assert fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1


def test_class_names_the_font_cannot_draw_show_their_index(script):
    names = ["cat", "\u732b\u306e\u7d75", "\U0001f3a8\U0001f408"]  # CJK and emoji: no glyphs in DejaVu Sans
    results = make_results([make_entry("spectral_all_layers", [0.9, 0.8], num_classes=3)], [],
                           num_classes=3, class_names=names)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig = script.figure_confusion(results, results["all_layers_results"][0])
        fig.canvas.draw()
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["cat", "1", "2"]
    assert not [w for w in caught if "Glyph" in str(w.message)]


def test_drawable_tells_names_the_font_has_glyphs_for(script):
    assert script.drawable("Van Gogh ±")
    assert not script.drawable("\u732b")


def test_a_linear_probes_retention_pairs_its_own_runs_not_the_mlps(script):
    mlp, linear = ([0.90, 0.80, 0.85, 0.70, 0.95], [0.80, 0.70, 0.75, 0.60, 0.85]), ([0.60, 0.62, 0.58, 0.61, 0.59], [0.30, 0.33, 0.29, 0.31, 0.32])
    results = make_results([make_entry("spectral_all_layers", mlp[0]), make_entry("spectral_all_layers_linear", linear[0], classifier="linear")],
                           [make_entry("spectral_visual_only", mlp[1]), make_entry("spectral_visual_only_linear", linear[1], classifier="linear")])
    assert script.retention_interval(results, "visual", "spectral", "linear")[0] == pytest.approx(np.mean(linear[1]) / np.mean(linear[0]))


def test_the_tables_drop_and_retention_are_all_layers_minus_group_and_group_over_all_layers(script, results):
    row = next(line for line in script.comparison_table(results).splitlines() if line.startswith("spectral "))
    base, group = np.mean([0.90, 0.80, 0.85, 0.70, 0.95]), np.mean([0.80, 0.70, 0.75, 0.60, 0.85])
    assert f"{base - group:+.3f}" in row.split() and f"{100 * group / base:.1f}%" in row.split()


def test_macro_metrics_and_confusion_matrices_agree_with_scikit_learn(script):
    from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score
    import torch
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=200)
    pred = np.where(rng.random((3, 200)) < 0.6, y, rng.integers(0, 5, size=(3, 200)))  # class 4 only predicted
    pred[0][pred[0] == 2] = 3  # run 0 never predicts class 2
    confusion = script.confusion_matrices(torch.from_numpy(pred), torch.from_numpy(y), 5)  # the runs together
    metrics = script.classification_metrics(confusion)
    for run in range(3):
        assert confusion[run].numpy().tolist() == confusion_matrix(y, pred[run], labels=range(5)).tolist()
        for name, reference in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score)):
            assert metrics[name][run].item() == pytest.approx(reference(y, pred[run], average="macro", zero_division=0)), name
        assert metrics["acc"][run].item() == pytest.approx((y == pred[run]).mean())


def test_macro_metrics_agree_with_scikit_learn_on_small_splits_with_rare_and_absent_classes(script):
    """Twelve rows, 20 seeds: classes seen once, predicted once, never predicted, or in neither truth nor
    prediction (classes 4 and 5 of 6, left out of the macro average as scikit-learn leaves them out)."""
    from sklearn.metrics import f1_score, precision_score, recall_score
    import torch
    for seed in range(20):
        rng = np.random.default_rng(seed)
        y, pred = rng.integers(0, 4, size=12), rng.integers(0, 5, size=12)
        confusion = script.confusion_matrices(torch.from_numpy(pred[None]), torch.from_numpy(y), 6)
        metrics = {k: v.item() for k, v in script.classification_metrics(confusion).items()}
        for name, reference in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score)):
            assert metrics[name] == pytest.approx(reference(y, pred, average="macro", zero_division=0)), (name, seed)
