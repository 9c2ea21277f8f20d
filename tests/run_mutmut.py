"""Mutation testing with mutmut over the code whose mistakes would print wrong numbers: the statistics,
the metrics, the stall rule, resume, and the training configuration.  mutmut makes small changes to
each function listed below, one at a time, runs the tests that call that function, and counts the
changes no test noticed ("survived").  Run from the repository root, in the tests' environment plus
`pip install mutmut`:

    python tests/run_mutmut.py                  # every listed function (819 changes: hours on 2 cores)
    python tests/run_mutmut.py holm t_interval  # some of them
    python tests/run_mutmut.py --continue DIR   # go on with a run cut short, in the folder it printed

It works on a copy in a temporary folder, so the checkout is never changed, and prints the kill rate
per function, the overall rate, and the diff of every survivor.  A survivor is either a missing test
(write one) or a change that cannot alter behaviour (an equivalent mutant; say so if you keep it).
"""

import ast
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tokenize
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE = "visual_ablation_experiment_optimized"
FUNCTIONS = [
    # statistics over runs
    "mean_std", "t_quantile", "t_interval", "paired_t_p", "fieller_interval", "above_chance_p", "holm",
    "majority_share", "paired_accuracies", "retention_interval", "paired_drop", "successful_runs",
    "learned", "training_outcome", "with_training_outcomes", "holm_corrected",
    # metrics
    "confusion_matrices", "classification_metrics",
    # the stall rule and early stopping
    "stalled_runs", "plateau_update", "epoch_end",
    # resume
    "previous_results", "config_changes", "finished_entries", "results_shape_problem",
    # training configuration
    "run_slices", "dropout_scales", "uniform_like_linear", "init_layer_stack", "best_of_grid",
]
# The tests that exercise those functions.  Left out: tests that read the script's own source (a
# representation's cache key) or trace it (torch.compile), which see mutmut's rewritten functions, and
# tests that start the script as a process of its own, where mutmut cannot switch a change on.
TESTS = ["tests/test_statistics.py", "tests/test_reports.py", "tests/test_trust.py", "tests/test_probes.py",
         "tests/test_training.py", "tests/test_reliability.py"]
LEFT_OUT = "not changes_the_cache_key and not recomputes_only and not compile"
PYTEST_ARGS = ["-p", "no:cacheprovider", "-m", "not subprocess", "-k", LEFT_OUT]
COSTS = "mutmut-test-costs.json"  # written by tests/mutmut_plugin.py, the cheapest tests first
# A timeout is counted as killed (a change that makes the tests hang is noticed).  mutmut's limit is 30 x
# (the tests' own time + this constant) of CPU seconds; the constant covers the fixtures' set-up, which
# mutmut does not time, so that a slow fixture is not mistaken for a hang.
TIMEOUT_CONSTANT = 10
STATUS = {1: "killed", 3: "killed", 0: "survived", 33: "no tests", 5: "no tests", 36: "timeout",
          -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout"}


def setup_cfg() -> str:
    lines = lambda items: "".join(f"\n    {item}" for item in items)
    return (f"[mutmut]\nsource_paths = {MODULE}.py\nprocess_isolation = forkserver\n"
            f"timeout_constant = {TIMEOUT_CONSTANT}\nalso_copy ={lines(['README.md', 'conftest.py', COSTS])}\n"
            f"pytest_add_cli_args_test_selection ={lines(TESTS)}\n"
            f"pytest_add_cli_args ={lines(PYTEST_ARGS)}\n")


def only_these_mutated(source: str, functions: list[str]) -> str:
    """The script with every other function marked `# pragma: no mutate block`: mutmut leaves those
    as they are instead of routing each call through its switch, so the tests run at their usual speed."""
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    comments = {tok.start[0]: tok.start[1] for tok in tokens if tok.type == tokenize.COMMENT}
    defs = {node.lineno for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in functions}
    headers, depth, inside = [], 0, False  # the line of the colon that ends each such signature
    for tok in tokens:
        if tok.type == tokenize.NAME and tok.string == "def" and tok.start[0] in defs:
            inside, depth = True, 0
        elif inside and tok.type == tokenize.OP:
            depth += (tok.string in "([{") - (tok.string in ")]}")
            if tok.string == ":" and depth == 0:
                headers.append(tok.start[0])
                inside = False
    lines = source.splitlines(keepends=True)
    for header in headers:
        line = lines[header - 1]
        if header in comments:
            at = comments[header]
            lines[header - 1] = line[:at] + "# pragma: no mutate block, " + line[at + 1:].lstrip()
        else:
            lines[header - 1] = line.rstrip("\n") + "  # pragma: no mutate block\n"
    return "".join(lines)


def function_of(mutant: str) -> str:
    return mutant.split(".", 1)[1].split("__mutmut_")[0].removeprefix("x_")


def prepared_copy(functions: list[str]) -> Path:
    """A temporary folder holding the script (only `functions` mutable), the tests, README, mutmut's
    settings and the tests' costs, timed here once."""
    work = Path(tempfile.mkdtemp(prefix="mutmut-"))
    (work / f"{MODULE}.py").write_text(only_these_mutated((ROOT / f"{MODULE}.py").read_text(), functions))
    shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "README.md", work)  # a test runs README's classifier snippet
    shutil.copy(ROOT / "tests" / "mutmut_plugin.py", work / "conftest.py")
    (work / "setup.cfg").write_text(setup_cfg())
    (work / "functions.json").write_text(json.dumps(functions))
    print("timing the tests once, to run the cheapest first", flush=True)
    subprocess.run([sys.executable, "-m", "pytest", "-q", "--rootdir=.", *PYTEST_ARGS, *TESTS], cwd=work,
                   env={**os.environ, "MUTMUT_RECORD_TEST_COSTS": "1"}, stdout=subprocess.DEVNULL, check=True)
    return work


def run_mutmut(work: Path, functions: list[str]) -> None:
    """mutmut over every mutant of the copy (only the functions' are there); those already checked in this
    folder keep their result, which mutmut does only when no mutant is named.  Each of mutmut's workers
    (one per core) gets one thread: more threads than cores spin at every barrier."""
    print(f"mutmut over {len(functions)} functions in {work} (log: {work / 'mutmut.log'}; "
          f"to go on after an interruption: python tests/run_mutmut.py --continue {work})", flush=True)
    with open(work / "mutmut.log", "a") as log:
        subprocess.run(["mutmut", "run"], cwd=work, stdout=log, stderr=subprocess.STDOUT,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})


def report(work: Path, functions: list[str]) -> None:
    codes = json.loads((work / "mutants" / f"{MODULE}.py.meta").read_text())["exit_code_by_key"]
    ours = {m: code for m, code in codes.items() if function_of(m) in functions}
    results = {m: STATUS.get(code, "suspicious") for m, code in ours.items() if code is not None}
    if not results:
        sys.exit(f"mutmut checked nothing; see {work / 'mutmut.log'}")
    per_function = {f: Counter(results.get(m, "not checked yet") for m in ours if function_of(m) == f) for f in functions}
    for name, counts in per_function.items():
        checked = sum(n for status, n in counts.items() if status != "not checked yet")
        print(f"{name:<24} {counts['killed']:>4} of {checked:>4} killed  {dict(counts)}")
    total = Counter(results.values())
    print(f"\nkill rate: {total['killed']} of {len(results)} = {total['killed'] / len(results):.1%}  {dict(total)}"
          f"; {len(ours) - len(results)} of {len(ours)} not checked yet")
    for mutant in sorted(m for m, s in results.items() if s != "killed"):
        shown = subprocess.run(["mutmut", "show", mutant], cwd=work, capture_output=True, text=True).stdout
        print("\n" + shown.strip())


def main(args: list[str]) -> int:
    if args[:1] == ["--continue"]:
        work = Path(args[1])
        functions = json.loads((work / "functions.json").read_text())
    else:
        functions = args or FUNCTIONS
        unknown = [f for f in functions if f not in FUNCTIONS]
        if unknown:
            sys.exit(f"not in the list of functions: {', '.join(unknown)}")
        work = prepared_copy(functions)
    run_mutmut(work, functions)
    report(work, functions)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
