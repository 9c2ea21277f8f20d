"""Deliberate defects the test suite must catch: each is made to the script in turn, the tests named for
it are run, and it must make them fail ("killed").  Run from the repository root:

    python tests/mutations.py

The script is restored afterwards.  Add a line here for every defect a test is written to catch.
"""

import subprocess
import sys
from pathlib import Path

P = Path(__file__).resolve().parents[1] / "visual_ablation_experiment_optimized.py"
MUTATIONS = [
 ("stall early branch dropped", "learned < STALL_MARGIN or (epoch <= STALL_EARLY_EPOCHS and learned < STALL_EARLY_MARGIN)", "learned < STALL_MARGIN", "tests/test_trust.py -k stall"),
 ("stall 5 -> 2", "STALL_MARGIN, STALL_EARLY_MARGIN, STALL_EARLY_EPOCHS = 0.1, 0.5, 5", "STALL_MARGIN, STALL_EARLY_MARGIN, STALL_EARLY_EPOCHS = 0.1, 0.5, 2", "tests/test_trust.py -k stall"),
 ("intervals 95 -> 50", "CONFIDENCE = 0.95", "CONFIDENCE = 0.50", "tests/test_statistics.py"),
 ("drop unpaired", "    drops = base_acc - acc\n", "    drops = base_acc - np.random.default_rng(0).permutation(acc)\n", "tests/test_statistics.py tests/test_reports.py"),
 ("macro f1 as precision", '"f1": macro(f1)}', '"f1": macro(precision)}', "tests/test_reports.py -k scikit"),
 ("confusion transposed", "y[None] * num_classes + pred", "pred * num_classes + y[None]", "tests/test_reports.py -k scikit"),
 ("no mixed precision", "    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16", "    return None", "tests/test_training.py -k precision"),
 ("l2 ties to weaker", "(result.histories[i].best_val_acc, result.slices.setting[i])", "(result.histories[i].best_val_acc, -result.slices.setting[i])", "tests/test_probes.py -k ties"),
 ("intercept penalised", '        return name.startswith("w")', "        return True", "tests/test_probes.py -k optimum"),
 ("l2 x10", 'self.per_slice = {"l2": torch.tensor(slices.setting, device=device)', 'self.per_slice = {"l2": 10 * torch.tensor(slices.setting, device=device)', "tests/test_probes.py -k optimum"),
 ("l2 removed", "        if penalised:\n            torch._foreach_addcmul_", "        if False:\n            torch._foreach_addcmul_", "tests/test_probes.py -k optimum"),
 ("dropout halved", "return (draws >= p).float().mul_(1.0 / (1.0 - p))", "return (draws >= p / 2).float().mul_(1.0 / (1.0 - p / 2))", "tests/test_training.py -k dropout"),
 ("init /10", "    bound = 1.0 / math.sqrt(fan_in)\n", "    bound = 0.1 / math.sqrt(fan_in)\n", "tests/test_training.py -k nn_linear"),
 ("knn farthest neighbours", "nearest = candidates.topk(min(k, candidates.shape[1]), dim=1, largest=False)", "nearest = candidates.topk(min(k, candidates.shape[1]), dim=1, largest=True)", "tests/test_probes.py -k knn"),
 ("knn tie order outvotes", '"tie_order": torch.stack(tie_order).float().to(device) / data.num_classes}', '"tie_order": torch.stack(tie_order).float().to(device)}', "tests/test_probes.py -k knn"),
 ("knn ties to fewer neighbours", "(result.histories[i].best_val_acc, result.slices.setting[i])", "(result.histories[i].best_val_acc, -result.slices.setting[i])", "tests/test_probes.py -k knn"),
 ("memorising counts as learning", 'return (trained(entry) and entry.get("above_chance", True)', 'return (trained(entry) and True', "tests/test_trust.py -k remembered"),
 ("table drop inverted", "return f\"{base_acc - acc:>+8.3f} {100 * acc / max(base_acc, EPS):>9.1f}%{mark}\"", "return f\"{acc - base_acc:>+8.3f} {100 * base_acc / max(acc, EPS):>9.1f}%{mark}\"", "tests/test_reports.py"),
 ("summary 2 std", "return mean, (std, std) if math.isfinite(std) else None", "return mean, (2 * std, 2 * std) if math.isfinite(std) else None", "tests/test_reports.py -k summary"),
 ("summary median", "        mean, std = entry_accuracy(results, g, *row)\n", "        mean, std = entry_accuracy(results, g, *row)\n        mean = median_accuracy(find_entry(results, g, *row))\n", "tests/test_reports.py -k summary"),
 ("fingerprint ignores size and mtime", 'keys = [f"{os.path.realpath(f)}:{st.st_size}:{st.st_mtime_ns}" for f, st in zip(files, map(os.stat, files))]', 'keys = [f"{os.path.realpath(f)}" for f, st in zip(files, map(os.stat, files))]', "tests/test_data.py -k fingerprint or rewritten"),
 ("one generator per slice assumed in order", "shared = None if rows == list(range(len(rows))) else", "shared = None if len(used) == len(rows) else", "tests/test_training.py -k sharing_a_seed"),
 ("resume ignores changed data", '        changed.append("the dataset\'s data")', "        pass", "tests/test_reliability.py -k rewritten"),
]


def killed(old: str, new: str, tests: str) -> tuple[bool, str]:
    """Whether the tests fail on the script with old replaced by new, and pytest's closing line."""
    P.write_text(ORIGINAL.replace(old, new))
    paths, _, selection = tests.partition(" -k ")
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *paths.split()]
    done = subprocess.run(command + (["-k", selection] if selection else []), capture_output=True, text=True, cwd=P.parent)
    lines = done.stdout.strip().splitlines()
    return done.returncode != 0, lines[-1] if lines else ""


ORIGINAL = P.read_text()
if __name__ == "__main__":
    survived = []
    try:
        for name, old, new, tests in MUTATIONS:
            assert ORIGINAL.count(old) == 1, f"{name}: the text to change is not found once; update this list"
            dead, summary = killed(old, new, tests)
            print(f"{'killed' if dead else 'SURVIVED'}: {name} ({summary})", flush=True)
            survived += [] if dead else [name]
    finally:
        P.write_text(ORIGINAL)
    print(f"{len(MUTATIONS) - len(survived)} of {len(MUTATIONS)} killed" + (f"; survived: {', '.join(survived)}" if survived else ""))
    sys.exit(1 if survived else 0)
