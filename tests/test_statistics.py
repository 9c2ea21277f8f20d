"""Statistics a reviewer accepts: sample spreads, intervals that cover what they claim, a stated test
against chance whose false-positive rate holds, and families corrected.  The simulations are seeded."""

import math

import numpy as np
import pytest
from scipy import stats

import visual_ablation_experiment_optimized as vae
from helpers import cli_args, results_of

REPEATS = 3000


def coverage(interval, draw, truth, runs, seed) -> float:
    """Share of REPEATS simulated experiments of `runs` runs whose interval holds the true value."""
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(REPEATS):
        low, high = interval(*draw(rng, runs))
        hits += low <= truth <= high
    return hits / REPEATS


def accuracies(rng, runs):
    return (rng.normal(0.70, 0.05, runs),)


def paired_runs(rng, runs):
    """(group, all layers) accuracies of runs sharing a seed: correlated, as paired runs are."""
    shared = rng.normal(0, 0.04, runs)
    return 0.70 + 0.8 * shared + rng.normal(0, 0.02, runs), 0.80 + shared + rng.normal(0, 0.02, runs)


@pytest.mark.parametrize("runs", [3, 5, 10])
def test_the_t_interval_of_a_mean_covers_at_least_93_percent(runs):
    assert coverage(vae.t_interval, accuracies, 0.70, runs, seed=runs) >= 0.93


@pytest.mark.parametrize("runs", [3, 5, 10])
def test_the_paired_t_interval_of_a_drop_covers_at_least_93_percent(runs):
    drop = lambda group, base: vae.t_interval(base - group)
    assert coverage(drop, paired_runs, 0.10, runs, seed=runs) >= 0.93


@pytest.mark.parametrize("runs", [3, 5, 10])
def test_fiellers_interval_of_a_retention_covers_at_least_93_percent(runs):
    assert coverage(vae.fieller_interval, paired_runs, 0.70 / 0.80, runs, seed=runs) >= 0.93


def test_the_t_interval_is_the_textbook_one():
    values = [0.61, 0.70, 0.66, 0.72]
    expected = stats.t.interval(0.95, 3, np.mean(values), stats.sem(values))
    assert vae.t_interval(values) == pytest.approx(list(expected))


@pytest.mark.parametrize("group, base", [([0.62, 0.70, 0.66, 0.71, 0.60], [0.80, 0.84, 0.79, 0.88, 0.77]),
                                         ([0.60, 0.64], [0.80, 0.82])], ids=["five pairs", "two pairs"])
def test_fiellers_interval_ends_where_the_paired_t_test_of_a_minus_r_b_just_rejects(group, base):
    group, base = np.array(group), np.array(base)
    low, high = vae.fieller_interval(group, base)
    assert low < group.mean() / base.mean() < high
    for end in (low, high):
        assert stats.ttest_1samp(group - end * base, 0).pvalue == pytest.approx(0.05, abs=1e-9)


def test_intervals_stop_where_the_quantity_cannot_go():
    assert vae.t_interval([0.99, 0.90, 1.0], bounds=(0.0, 1.0))[1] == 1.0
    assert vae.fieller_interval([0.0, 0.30, 0.02], [0.80, 0.70, 0.90])[0] == 0.0  # a ratio of accuracies


def test_fiellers_interval_goes_below_zero_where_a_value_is_negative():
    signed, base = np.array([-0.05, 0.30, 0.02]), np.array([0.80, 0.70, 0.90])
    low = vae.fieller_interval(signed, base)[0]
    assert low < 0 and stats.ttest_1samp(signed - low * base, 0).pvalue == pytest.approx(0.05, abs=1e-9)


def test_no_interval_from_fewer_than_two_runs_nor_a_ratio_to_a_mean_indistinguishable_from_zero():
    assert vae.t_interval([0.8]) is None and vae.fieller_interval([0.8], [0.9]) is None
    assert vae.fieller_interval([0.5, 0.6, 0.4], [0.01, -0.02, 0.015]) is None


@pytest.mark.filterwarnings("error")  # too few values give NaN by rule, not by numpy's warnings
def test_spread_is_the_sample_std_and_none_for_one_run():
    assert vae.mean_std([0.7, 0.8, 0.9])[1] == pytest.approx(np.std([0.7, 0.8, 0.9], ddof=1))
    mean, spread = vae.mean_std([0.7])
    assert mean == 0.7 and np.isnan(spread)
    assert all(np.isnan(vae.mean_std([])))


# --- above chance -------------------------------------------------------------------------------

def no_signal_p_values(majority_share, seed, runs=5, rows=120, experiments=2000):
    """above_chance_p of experiments whose predictions ignore the labels: each run mostly answers the
    majority class, with its own noise, and runs are correlated through a shared component."""
    rng = np.random.default_rng(seed)
    found = []
    for _ in range(experiments):
        labels = (rng.random(rows) >= majority_share).astype(int)  # class 0 holds majority_share of the population
        shared = rng.random(rows) < 0.2
        predictions = [(shared ^ (rng.random(rows) < 0.1)).astype(int) for _ in range(runs)]
        correct = [int((p == labels).sum()) for p in predictions]
        found.append(vae.above_chance_p(correct, rows, vae.majority_share(labels)))
    return np.array(found)


@pytest.mark.parametrize("majority_share", [0.5, 0.7])
def test_no_signal_is_called_above_chance_in_at_most_5_percent_of_experiments(majority_share):
    assert (no_signal_p_values(majority_share, seed=int(majority_share * 10)) < vae.ALPHA).mean() <= 0.05


def test_always_answering_the_majority_class_is_not_above_chance():
    labels = np.array([0] * 70 + [1] * 30)
    assert vae.above_chance_p([70, 70, 70], 100, vae.majority_share(labels)) > 0.4


def test_a_classifier_above_one_over_k_but_at_the_majority_share_is_not_above_chance():
    assert vae.above_chance_p([61, 60, 62], 100, 0.6) > 0.05 and vae.above_chance_p([61, 60, 62], 100, 0.5) < 0.05


def test_runs_p_values_are_combined_as_n_over_k_times_the_kth_smallest():
    correct, rows, chance = [60, 55, 70, 58, 65], 100, 0.5
    per_run = np.sort(stats.binom.sf(np.array(correct) - 1, rows, chance))
    assert vae.above_chance_p(correct, rows, chance) == pytest.approx(5 / 3 * per_run[2])


# --- families -----------------------------------------------------------------------------------

def test_holm_adjusts_step_down_and_keeps_the_order():
    assert vae.holm([0.01, 0.04, 0.03, None]) == pytest.approx([0.03, 0.06, 0.06, None])


def test_holm_never_adjusts_a_p_value_past_one():
    assert vae.holm([0.6, 0.7, 0.02]) == pytest.approx([1.0, 1.0, 0.06])


def test_a_family_member_exactly_at_alpha_is_not_significant():
    family = [{"drop_p": vae.ALPHA}, {"drop_p": None}]
    vae.holm_corrected(family, "drop_p", "drop_significant")
    assert family[0]["drop_p_holm"] == vae.ALPHA and family[0]["drop_significant"] is False
    assert family[1]["drop_p_holm"] is None and family[1]["drop_significant"] is False


def test_the_paired_t_test_needs_two_pairs_and_reads_constant_differences_exactly():
    assert vae.paired_t_p([0.1]) is None
    assert vae.paired_t_p([0.1, 0.3]) == pytest.approx(stats.ttest_1samp([0.1, 0.3], 0).pvalue)
    assert vae.paired_t_p([0.0, 0.0, 0.0]) == 1.0  # no difference at all
    assert vae.paired_t_p([0.25, 0.25, 0.25]) == 0.0  # the same difference in every run


def test_runs_are_paired_only_where_both_entries_succeeded():
    entry = {"failed_runs": [0], "test_acc_all_runs": [0.0, 0.1, 0.2, 0.3]}
    base = {"failed_runs": [2], "test_acc_all_runs": [1.0, 1.1, 1.2, 1.3]}
    acc, base_acc = vae.paired_accuracies(entry, base)
    assert acc.tolist() == [0.1, 0.3] and base_acc.tolist() == [1.1, 1.3]


@pytest.mark.filterwarnings("error")  # an empty drop is NaN by rule, not by numpy's "mean of empty slice" warning
def test_a_drop_has_no_interval_without_its_all_layers_entry_and_its_interval_stays_within_plus_minus_one():
    entry = {"failed_runs": [], "test_acc_all_runs": [0.1, 0.9]}
    no_common_run = vae.paired_drop(entry, {"failed_runs": [0, 1], "test_acc_all_runs": [0.5, 0.5]})
    assert math.isnan(no_common_run["drop_mean"]) and no_common_run["drop_ci95"] is None
    assert vae.paired_drop(entry, None) == {"drop_mean": pytest.approx(float("nan"), nan_ok=True), "drop_ci95": None,
                                            "drop_low": pytest.approx(float("nan"), nan_ok=True),
                                            "drop_high": pytest.approx(float("nan"), nan_ok=True), "drop_p": None}
    wide = vae.paired_drop(entry, {"failed_runs": [], "test_acc_all_runs": [1.0, 1.0]})
    assert wide["drop_ci95"] == [-1.0, 1.0] and wide["drop_mean"] == pytest.approx(0.5)


def planted_layer_map(seed, nulls=36, effects=4):
    """A layer map whose modules' p-values are uniform for nulls and tiny for planted effects."""
    rng = np.random.default_rng(seed)
    p = np.concatenate([rng.uniform(0, 1e-4, effects), rng.uniform(0, 1, nulls)])
    modules = [{"representation": f"spectral_m{i}", "classifier": "linear", "failed_runs": [], "test_acc_all_runs": [0.5],
                "per_run_results": [{"run": 0, "stalled": False}], "above_chance_p": float(v)} for i, v in enumerate(p)]
    return {"groups": [], "layer_map": [{"representation": "spectral", "num_modules": len(p), "modules": modules}]}


def test_a_layer_map_flags_its_planted_effects_and_keeps_the_family_wise_error_at_5_percent():
    any_null_flagged, families = 0, 2000
    for seed in range(families):
        results = planted_layer_map(seed)
        vae.with_statistics(results)
        flags = [m["above_chance"] for m in results["layer_map"][0]["modules"]]
        assert all(flags[:4])
        any_null_flagged += any(flags[4:])
    assert any_null_flagged / families <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / families)  # 5%, within the simulation's error
    uncorrected = sum(any(m["above_chance_p"] < 0.05 for m in planted_layer_map(s)["layer_map"][0]["modules"][4:])
                      for s in range(families))
    assert uncorrected / families > 0.5  # what the correction prevents


def ablation_entry(block, accs, classifier="mlp"):
    suffix = "" if classifier == "mlp" else f"_{classifier}"
    return {"representation": f"spectral_without_{block}{suffix}", "features": "spectral", "block": block,
            "classifier": classifier, "failed_runs": [], "test_acc_all_runs": accs,
            "per_run_results": [{"run": k, "stalled": False} for k in range(len(accs))]}


def test_block_ablation_drops_get_paired_t_intervals_and_holm_corrected_significance_per_representation():
    base = [0.90, 0.85, 0.88, 0.92, 0.87]
    results = {"groups": ["all"], "all_layers_results": [
        {"representation": "spectral_all_layers", "classifier": "mlp", "failed_runs": [], "test_acc_all_runs": base,
         "per_run_results": [{"run": k, "stalled": False} for k in range(5)]}],
        "block_ablation": [ablation_entry("carrier", [0.60, 0.58, 0.62, 0.61, 0.57]),
                           ablation_entry("idle", [0.91, 0.84, 0.87, 0.93, 0.86])]}
    vae.with_statistics(results)
    carrier, idle = results["block_ablation"]
    drops = np.subtract(base, carrier["test_acc_all_runs"])
    assert carrier["drop_ci95"] == pytest.approx(list(stats.t.interval(0.95, 4, drops.mean(), stats.sem(drops))))
    assert carrier["drop_p"] == pytest.approx(stats.ttest_rel(base, carrier["test_acc_all_runs"]).pvalue)
    assert carrier["drop_p_holm"] == pytest.approx(min(1, 2 * carrier["drop_p"]))
    assert carrier["drop_significant"] and not idle["drop_significant"]


# --- in results.json ----------------------------------------------------------------------------

def test_results_json_states_its_spread_and_chance_and_each_entry_its_interval_and_test(tmp_path, tiny_dataset_path):
    assert vae.main(cli_args(tmp_path, tiny_dataset_path, "--layer-groups", "all")) == 0
    results = results_of(tmp_path, "tiny")
    assert results["std_ddof"] == 1
    test_labels = [sum(row) for row in results["all_layers_results"][0]["test_confusion_matrices"][0]]
    assert results["chance"] == pytest.approx(max(test_labels) / sum(test_labels))
    assert results["chance_uniform"] == pytest.approx(1 / results["num_classes"])
    [entry] = results["all_layers_results"]
    accs = entry["test_acc_all_runs"]
    assert entry["test_acc_std"] == pytest.approx(np.std(accs, ddof=1))
    interval = stats.t.interval(0.95, len(accs) - 1, np.mean(accs), stats.sem(accs))
    assert entry["test_acc_ci95"] == pytest.approx(list(np.clip(interval, 0, 1)))  # an accuracy stays in [0, 1]
    correct = [np.trace(m) for m in entry["test_confusion_matrices"]]
    per_run = np.sort(stats.binom.sf(np.array(correct) - 1, sum(test_labels), results["chance"]))
    assert entry["above_chance_p"] == pytest.approx(min(1.0, 2 * per_run[0]))  # two runs: k = 1
    assert entry["above_chance"] == (entry["above_chance_p"] < 0.05)


def test_one_successful_run_gives_null_spread_and_interval_and_the_table_says_n_a(tmp_path, tiny_dataset_path):
    assert vae.main(cli_args(tmp_path, tiny_dataset_path, "--layer-groups", "all", "--num-runs", "1")) == 0
    [entry] = results_of(tmp_path, "tiny")["all_layers_results"]
    assert entry["test_acc_std"] is None and entry["test_acc_ci95"] is None
    table = (tmp_path / "out" / "visual_ablation_tiny" / "results.txt").read_text()
    row = next(line for line in table.splitlines() if line.startswith("simple_stats "))
    assert "+- n/a" in row and "nan" not in table


@pytest.mark.parametrize("mode", ["ensemble", "sequential"])
def test_training_time_is_measured_per_run(mode, tmp_path, tiny_dataset_path):
    """Together, each epoch's time is shared among the runs it trained; one at a time, each run has its own."""
    extra = ["--sequential-runs"] if mode == "sequential" else []
    assert vae.main(cli_args(tmp_path, tiny_dataset_path, "--layer-groups", "all", "--num-runs", "3", *extra)) == 0
    [entry] = results_of(tmp_path, "tiny")["all_layers_results"]
    times = [r["training_time"] for r in entry["per_run_results"]]
    assert sum(times) == pytest.approx(entry["training_time_total"])
    assert entry["training_time_std"] == pytest.approx(np.std(times, ddof=1))
    if mode == "sequential":
        assert entry["training_time_std"] > 0


def percentile_bootstrap(values, resamples=2000):
    """The interval the reports used before: the 2.5 and 97.5 percentiles of resampled means."""
    rng = np.random.default_rng(0)
    return np.percentile(values[rng.integers(len(values), size=(resamples, len(values)))].mean(1), [2.5, 97.5])


def simulated_figures() -> list[str]:
    """The figures OPTIMIZATION_GUIDE.md quotes, from the simulations above."""
    lines = [f"coverage of the 95% intervals, {REPEATS} simulated experiments each: runs, mean (t), drop (paired t), "
             "retention (Fieller), and a mean's former percentile bootstrap"]
    for runs in (3, 5, 10):
        lines.append(f"{runs:>2} runs: {coverage(vae.t_interval, accuracies, 0.70, runs, seed=runs):.3f} "
                     f"{coverage(lambda g, b: vae.t_interval(b - g), paired_runs, 0.10, runs, seed=runs):.3f} "
                     f"{coverage(vae.fieller_interval, paired_runs, 0.70 / 0.80, runs, seed=runs):.3f} "
                     f"{coverage(percentile_bootstrap, accuracies, 0.70, runs, seed=runs):.3f}")
    for share in (0.5, 0.7):
        rate = (no_signal_p_values(share, seed=int(share * 10)) < vae.ALPHA).mean()
        lines.append(f"no signal, majority class {share:.0%}: called above chance in {rate:.2%} of 2000 experiments")
    flagged = 0
    for seed in range(2000):
        results = planted_layer_map(seed)
        vae.with_statistics(results)
        flagged += any(m["above_chance"] for m in results["layer_map"][0]["modules"][4:])
    lines.append(f"planted family (4 effects, 36 nulls): family-wise error {flagged / 2000:.3f} over 2000 families")
    return lines


if __name__ == "__main__":  # PYTHONPATH=. python tests/test_statistics.py
    print("\n".join(simulated_figures()))
