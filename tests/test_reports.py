"""Reports a researcher can publish: results.json, results.txt and the plots must not mislead."""

import os
import warnings

import matplotlib

matplotlib.use("Agg")  # headless, as the script draws
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from helpers import PNG_SIGNATURE  # noqa: E402



def make_entry(name, accs, failed=(), stalled=None, num_classes=4, with_median=True):
    """An entry as evaluate_entry writes it, from each run's test accuracy (failed runs' values are junk)."""
    ok = [k for k in range(len(accs)) if k not in failed]
    kept = np.array([accs[k] for k in ok])
    confusion = np.eye(num_classes, dtype=int) * 5 + 1
    entry = {"representation": name, "test_acc_all_runs": list(accs), "failed_runs": list(failed),
             "num_successful_runs": len(ok),
             "test_acc_mean": float(kept.mean()) if ok else None, "test_acc_std": float(kept.std()) if ok else None,
             "test_confusion_matrices": [confusion.tolist() for _ in accs],
             "per_run_results": [{"run": k, "test_acc": a, "failed": "loss non-finite" if k in failed else None}
                                 for k, a in enumerate(accs)]}
    if with_median and ok:
        entry["test_acc_median"] = float(np.median(kept))
    if stalled is not None:
        entry["stalled_runs"] = list(stalled)
    return entry


def make_results(all_layers, visual, num_classes=4, class_names=None):
    """results.json with entries for all layers and the visual group, representations named by the entries."""
    reps = [e["representation"].removesuffix("_all_layers") for e in all_layers]
    return {"dataset": "tiny", "num_runs": len(all_layers[0]["test_acc_all_runs"]),
            "num_classes": num_classes, "groups": ["all", "visual"],
            "class_names": class_names or [f"class{i}" for i in range(num_classes)],
            "config": {"representations": reps}, "complete": True,
            "all_layers_results": all_layers, "visual_only_results": visual}


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

def test_table_shows_the_median_beside_mean_and_std(script, results):
    row = next(line for line in script.comparison_table(results).splitlines() if line.startswith("spectral "))
    assert "0.840 +- 0.086 (0.850)" in row


def test_table_computes_the_median_over_successful_runs_when_results_json_lacks_it(script):
    old = make_entry("spectral_all_layers", [0.5, 0.6, 0.99, 0.7], failed=[2], with_median=False)
    assert script.median_accuracy(old) == pytest.approx(0.6)


def test_table_lists_each_run_marking_stalled_runs_and_naming_failed_ones(script, results):
    lines = script.comparison_table(results).splitlines()
    spectral = next(line for line in lines if line.startswith("spectral_all_layers"))
    stats_visual = next(line for line in lines if line.startswith("stats_visual_only"))
    assert spectral.split()[1:] == ["0.900", "0.800", "0.850", "0.700*", "0.950"]
    assert stats_visual.split()[1:] == ["0.290", "0.270", "0.300", "failed", "0.260"]


def test_table_explains_stalled_runs_in_a_footnote(script, results):
    table = script.comparison_table(results)
    assert "* stalled run:" in table and "--min-epochs N" in table


def test_table_has_no_stalled_footnote_without_stalled_runs(script, results):
    results["all_layers_results"][0]["stalled_runs"] = []
    assert "stalled run" not in script.comparison_table(results)


def test_table_marks_the_retention_of_a_representation_near_chance_on_all_layers(script, results):
    lines = script.comparison_table(results).splitlines()
    spectral = next(line for line in lines if line.startswith("spectral "))
    stats = next(line for line in lines if line.startswith("stats "))
    assert stats.rstrip().endswith("%~") and spectral.rstrip().endswith("%")
    assert any(line.startswith("~ all-layers accuracy near chance: retention not meaningful") for line in lines)


def test_table_says_all_runs_failed_instead_of_a_number(script, results):
    results["visual_only_results"][0] = make_entry("spectral_visual_only", [0.1] * 5, failed=range(5))
    row = next(line for line in script.comparison_table(results).splitlines() if line.startswith("spectral "))
    assert "all runs failed" in row and "nan" not in row


@pytest.mark.parametrize("accs, failed, expected", [
    ([0.18] * 5, (), False),                     # chance 0.10: needs 0.28
    ([0.30, 0.31, 0.29], (), True),              # just past chance + 0.2 * (1 - chance), tightly
    ([0.05, 0.55, 0.05, 0.55], (), False),       # mean 0.30 but the spread reaches chance
    ([0.90], (), True),                          # one run: the mean alone decides
    ([0.90, 0.01, 0.90], (1,), True),            # a failed run's value is not counted
    ([0.90, 0.90], (0, 1), False),               # no successful run: nothing is above chance
])
def test_clearly_above_chance_needs_a_fifth_of_the_way_to_perfect_and_a_lower_bound_past_chance(
        script, accs, failed, expected):
    entry = make_entry("spectral_all_layers", accs, failed=failed, num_classes=10)
    assert script.clearly_above_chance(entry, num_classes=10) is expected


# --- plots ---------------------------------------------------------------------------------------

def test_summary_says_error_bars_are_one_std_over_the_runs(script, results):
    assert "±1 std over 5 runs" in script.figure_summary(results).get_suptitle().replace("\n", " ")


def test_summary_draws_a_dot_per_successful_run_and_stalled_runs_apart(script, results):
    fig = script.figure_summary(results)
    single, stalled = scatter_points(fig, "single run"), scatter_points(fig, "stalled run (never learned)")
    assert len(single) == 5 * 4 - 1 - 1  # 4 entries of 5 runs, less one stalled and one failed
    assert stalled[:, 1].tolist() == [0.70]
    assert "stalled run (never learned)" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_summary_notes_an_entry_whose_runs_all_failed_at_its_bar(script, results):
    results["visual_only_results"][0] = make_entry("spectral_visual_only", [0.1] * 5, failed=range(5))
    assert figure_texts(script.figure_summary(results)).count("all runs failed") == 1


def test_retention_warns_that_the_bootstrap_is_unreliable_with_few_runs(script, results):
    results["num_runs"] = 3
    assert "unreliable with 3 runs" in script.figure_retention(results).get_suptitle().replace("\n", " ")


def test_retention_trusts_the_bootstrap_with_five_runs(script, results):
    assert "unreliable" not in script.figure_retention(results).get_suptitle()


def test_retention_hatches_representations_near_chance_on_all_layers_and_says_why(script, results):
    fig = script.figure_retention(results)
    bars = [p for p in fig.axes[0].patches if p.get_height() == p.get_height()]  # drawn bars, not NaN slots
    assert [bool(bar.get_hatch()) for bar in bars] == [False, True]  # spectral, stats
    assert "all-layers accuracy near chance: retention not meaningful" in [t.replace("\n", " ") for t in figure_texts(fig)]


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
