"""Training: the batched ensemble is the original's MLP, optimiser, schedule and early stopping,
run for several seeds at once, and the one-run-at-a-time path gives the same runs."""

import dataclasses
import math
import time

import numpy as np
import pytest
import torch

import visual_ablation_experiment_optimized as vae

CPU = torch.device("cpu")
MLP = vae.CLASSIFIERS["mlp"]


def mlp_params(seeds, in_dim, hidden, num_classes=3):
    return MLP.init(seeds, in_dim, num_classes, vae.Config(hidden_dim=hidden), CPU)[0]


def reference_mlp(params, run, in_dim, hidden, classes):
    """The original's classifier as nn.Modules, holding run `run` of the stacked parameters."""
    layers = []
    dims = [in_dim] + [hidden] * vae.NUM_HIDDEN
    for i in range(vae.NUM_HIDDEN):
        linear = torch.nn.Linear(dims[i], hidden)
        linear.weight.data = params[f"w{i}"][run].T.clone()
        linear.bias.data = params[f"b{i}"][run, 0].clone()
        norm = torch.nn.BatchNorm1d(hidden)
        norm.weight.data = params[f"gamma{i}"][run, 0].clone()
        norm.bias.data = params[f"beta{i}"][run, 0].clone()
        layers += [linear, norm, torch.nn.ReLU(), torch.nn.Dropout(0.0)]
    head = torch.nn.Linear(hidden, classes)
    head.weight.data = params[f"w{vae.NUM_HIDDEN}"][run].T.clone()
    head.bias.data = params[f"b{vae.NUM_HIDDEN}"][run, 0].clone()
    return torch.nn.Sequential(*layers, head)


def fresh_buffers(runs, hidden):
    return {**{f"mean{i}": torch.zeros(runs, 1, hidden) for i in range(vae.NUM_HIDDEN)},
            **{f"var{i}": torch.ones(runs, 1, hidden) for i in range(vae.NUM_HIDDEN)}}


def test_each_run_is_initialised_as_nn_linear_with_its_own_seed():
    params = mlp_params([7, 8], in_dim=5, hidden=4)
    again = mlp_params([8], in_dim=5, hidden=4)
    assert torch.equal(params["w0"][1], again["w0"][0])  # a run's weights depend on its seed alone
    assert not torch.equal(params["w0"][0], params["w0"][1])
    assert params["w0"].abs().max() <= 1 / math.sqrt(5) and params["w1"].abs().max() <= 1 / math.sqrt(4)


def test_forward_in_training_mode_equals_the_original_mlp_and_updates_running_statistics_like_batchnorm():
    torch.manual_seed(0)
    params = mlp_params([1, 2], in_dim=6, hidden=8)
    buffers = fresh_buffers(2, 8)
    x = torch.randn(2, 16, 6)
    ours = MLP.forward(params, buffers, x, torch.ones(2, 16, vae.NUM_HIDDEN, 8), None)
    for run in range(2):
        model = reference_mlp(params, run, 6, 8, 3).train()
        torch.testing.assert_close(ours[run], model(x[run]))
        norms = [m for m in model if isinstance(m, torch.nn.BatchNorm1d)]
        for i, norm in enumerate(norms):
            torch.testing.assert_close(buffers[f"mean{i}"][run, 0], norm.running_mean)
            torch.testing.assert_close(buffers[f"var{i}"][run, 0], norm.running_var)


def test_forward_in_evaluation_mode_uses_running_statistics_and_accepts_rows_shared_by_all_runs():
    torch.manual_seed(0)
    params = mlp_params([1, 2, 3], in_dim=6, hidden=8)
    buffers = {k: v + torch.rand_like(v) for k, v in fresh_buffers(3, 8).items()}
    x = torch.randn(10, 6)
    shared = MLP.forward(params, buffers, x, None, None)
    stacked = MLP.forward(params, buffers, x.expand(3, -1, -1), None, None)
    torch.testing.assert_close(shared, stacked)
    for run in range(3):
        model = reference_mlp(params, run, 6, 8, 3).eval()
        for i, norm in enumerate(m for m in model if isinstance(m, torch.nn.BatchNorm1d)):
            norm.running_mean.copy_(buffers[f"mean{i}"][run, 0])
            norm.running_var.copy_(buffers[f"var{i}"][run, 0])
        torch.testing.assert_close(shared[run], model(x))


def test_adam_step_equals_torch_adam_with_a_learning_rate_per_run():
    torch.manual_seed(0)
    params = {"w0": torch.randn(2, 5, 4, requires_grad=True)}
    state = {"w0": {"m": torch.zeros(2, 5, 4), "v": torch.zeros(2, 5, 4)}}
    rates = (1e-3, 5e-4)
    reference = [torch.nn.Parameter(params["w0"][r].detach().clone()) for r in range(2)]
    optimisers = [torch.optim.Adam([p], lr=lr, weight_decay=1e-4) for p, lr in zip(reference, rates)]
    for step in range(1, 6):
        grad = torch.randn(2, 5, 4)
        params["w0"].grad = grad.clone()
        vae.adam_step(params, state, torch.tensor(rates), step, {"w0": torch.tensor(1e-4)}, None)
        for run, optimiser in enumerate(optimisers):
            reference[run].grad = grad[run].clone()
            optimiser.step()
    for run in range(2):
        torch.testing.assert_close(params["w0"][run], reference[run].detach(), rtol=0, atol=1e-7)


def test_adam_step_with_non_finite_gradients_under_loss_scaling_changes_nothing():
    params = {"w0": torch.ones(1, 2, 2, requires_grad=True)}
    state = {"w0": {"m": torch.full((1, 2, 2), 0.1), "v": torch.full((1, 2, 2), 0.2)}}
    params["w0"].grad = torch.tensor([[[float("inf"), 1.0], [1.0, 1.0]]])
    vae.adam_step(params, state, torch.tensor([1e-3]), 1, {"w0": torch.tensor(1e-4)}, torch.tensor(False))
    assert torch.equal(params["w0"].detach(), torch.ones(1, 2, 2))
    assert torch.equal(state["w0"]["m"], torch.full((1, 2, 2), 0.1))
    assert torch.equal(state["w0"]["v"], torch.full((1, 2, 2), 0.2))


def test_float16_loss_scaling_and_skipped_steps_follow_one_grad_scaler_and_adam_per_run():
    """Our scaler and step against torch.amp.GradScaler driving torch.optim.Adam, one of each per run:
    the same scale after every step (halved on overflow, doubled after 2000 finite steps) and the same
    weights; an overflowing step of one run changes nothing of that run, is not counted as its Adam
    step, and leaves the other run's step alone."""
    torch.manual_seed(0)
    runs, overflow_at = 2, [{3, 4, 10}, {7}]  # steps at which each run's gradients overflow
    start = torch.randn(runs, 3, 2)
    params = {"w0": start.clone().requires_grad_(True)}
    state = {"w0": {"m": torch.zeros(runs, 3, 2), "v": torch.zeros(runs, 3, 2)}}
    ours, steps = vae.LossScaler(runs, CPU, enabled=True), torch.zeros(runs)
    weights = [torch.nn.Parameter(start[r].clone()) for r in range(runs)]
    optimisers = [torch.optim.Adam([w], lr=1e-3) for w in weights]
    theirs = [torch.amp.GradScaler("cpu", init_scale=vae.LOSS_SCALE_INIT, growth_interval=vae.LOSS_SCALE_GROWTH_INTERVAL)
              for _ in range(runs)]
    for step in range(vae.LOSS_SCALE_GROWTH_INTERVAL + 20):
        targets = torch.randn(runs, 3, 2)
        for r in range(runs):
            if step in overflow_at[r]:
                targets[r, 0, 0] = float("inf")
        losses = (params["w0"] * targets).sum((1, 2))
        (losses * ours.scale).sum().backward()
        finite = ours.unscale([params["w0"].grad])
        steps = steps + finite.float()
        vae.adam_step(params, state, torch.full((runs,), 1e-3), steps, {}, finite)
        for r in range(runs):
            theirs[r].scale((weights[r] * targets[r]).sum()).backward()
            theirs[r].step(optimisers[r])
            theirs[r].update()
            optimisers[r].zero_grad()
        assert ours.scale.tolist() == [t.get_scale() for t in theirs], step
    for r in range(runs):
        torch.testing.assert_close(params["w0"][r].detach(), weights[r].detach(), rtol=0, atol=1e-6)
        assert optimisers[r].state[weights[r]]["step"].item() == steps[r].item()
    assert steps.tolist() == [vae.LOSS_SCALE_GROWTH_INTERVAL + 20 - 3, vae.LOSS_SCALE_GROWTH_INTERVAL + 20 - 1]


def test_learning_rate_schedule_follows_reduce_lr_on_plateau_in_max_mode():
    accuracies = [0.1, 0.2, 0.2] + [0.2] * 25 + [0.5] + [0.5] * 12
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimiser = torch.optim.Adam([parameter], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimiser, mode="max", factor=0.5, patience=10)
    history = vae.RunHistory(seed=0, lr=1e-3)
    for accuracy in accuracies:
        scheduler.step(accuracy)
        vae.plateau_update(history, accuracy)
        assert history.lr == pytest.approx(optimiser.param_groups[0]["lr"])
    assert history.lr < 1e-3  # the plateau did lower it


@pytest.fixture(scope="module")
def small_problem():
    """400 rows of 12 features, 4 classes, a signal an MLP learns in a few epochs."""
    rng = np.random.default_rng(0)
    labels = rng.integers(4, size=400)
    features = (rng.standard_normal((400, 12)) + 1.5 * rng.standard_normal((4, 12))[labels]).astype(np.float32)
    splits = vae.split_indices(400)
    data = vae.standardise(features, labels, splits, 4, CPU)
    cfg = vae.Config(num_runs=3, hidden_dim=32, batch_size=64, max_epochs=40, patience=5, device="cpu")
    return data, cfg


def test_best_epoch_weights_are_a_copy_that_reproduces_the_best_validation_accuracy(small_problem):
    data, cfg = small_problem
    result = vae.train_runs(data, cfg, CPU, "test", MLP)
    with torch.no_grad():
        val_acc = (vae.predictions(result.logits(data, None), data, "val") == data.y["val"]).float().mean(1)
    for run, history in enumerate(result.histories):
        assert val_acc[run].item() == pytest.approx(history.best_val_acc)
        assert history.val_acc[history.best_epoch - 1] == history.best_val_acc
        assert len(history.val_acc) == history.best_epoch + cfg.patience or len(history.val_acc) == cfg.max_epochs


def test_runs_are_seeded_from_the_base_seed_plus_their_index(small_problem):
    data, cfg = small_problem
    result = vae.train_runs(data, dataclasses.replace(cfg, seed=100, max_epochs=1), CPU, "test", MLP)
    assert [h.seed for h in result.histories] == [100, 101, 102]


def test_batched_ensemble_trains_the_same_runs_as_one_at_a_time(small_problem):
    data, cfg = small_problem
    together = vae.train_runs(data, cfg, CPU, "together", MLP)
    apart = vae.train_runs(data, dataclasses.replace(cfg, sequential_runs=True), CPU, "apart", MLP)
    for a, b in zip(together.histories, apart.histories):
        assert a.seed == b.seed
        # the same seeds, batches and dropout draws; only float rounding of batched products differs
        assert a.val_acc[:3] == pytest.approx(b.val_acc[:3], abs=0.02)
        assert a.best_val_acc == pytest.approx(b.best_val_acc, abs=0.05)


def test_runs_stop_on_their_own_patience_and_keep_their_own_history(small_problem):
    data, cfg = small_problem
    result = vae.train_runs(data, dataclasses.replace(cfg, patience=2, max_epochs=60), CPU, "test", MLP)
    for history in result.histories:
        assert history.epochs_since_best == 2 or len(history.val_acc) == 60
        assert len(history.train_loss) == len(history.val_acc)


def test_mixed_precision_is_used_on_cuda_only_and_can_be_turned_off():
    cfg = vae.Config()
    assert vae.amp_dtype(cfg, CPU) is None
    assert vae.amp_dtype(dataclasses.replace(cfg, no_amp=True), torch.device("cuda")) is None


# --- torch.compile ----------------------------------------------------------------------------------

def forward_and_gradients(forward, classifier, slices, batch=16, features=10, hidden=8, classes=3, seed=0):
    """Logits of a stacked forward in training mode and the gradients of their sum."""
    torch.manual_seed(seed)
    model = vae.CLASSIFIERS[classifier]
    params, buffers = model.init(list(range(slices)), features, classes, vae.Config(hidden_dim=hidden), CPU)
    for p in params.values():
        p.requires_grad_(True)
    x = torch.randn(slices, batch, features)
    shape = model.dropout_shape(vae.Config(hidden_dim=hidden))
    scales = (torch.rand(slices, batch, *shape) > 0.3).float() / 0.7 if shape else None
    out = forward(params, buffers, x, scales, None)
    out.sum().backward()
    return out.detach(), {k: p.grad for k, p in params.items()}


@pytest.mark.parametrize("classifier", ["mlp", "linear"])
def test_compiled_forward_and_backward_equal_eager_ones_as_slices_drop_out(classifier):
    compiled = vae.CompiledForward(vae.CLASSIFIERS[classifier], backend="aot_eager")
    for slices in (3, 2, 1):  # 3 slices = 3 hidden layers, then fewer: the sizes part
        want, want_grads = forward_and_gradients(vae.CLASSIFIERS[classifier].forward, classifier, slices)
        got, got_grads = forward_and_gradients(compiled, classifier, slices)
        torch.testing.assert_close(got, want)
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name])


def test_slices_dropping_out_or_a_short_batch_do_not_recompile_until_one_is_left():
    compiled = vae.CompiledForward(MLP, backend="aot_eager")
    forward_and_gradients(compiled, "mlp", slices=3)
    first = compiled.clock.compilations
    forward_and_gradients(compiled, "mlp", slices=2)  # 2 runs left (was the size of the hidden-layer axis)
    forward_and_gradients(compiled, "mlp", slices=2, batch=5)  # the epoch's short last batch
    forward_and_gradients(compiled, "mlp", slices=4, features=12)  # the next entry's features
    assert compiled.clock.compilations == first
    forward_and_gradients(compiled, "mlp", slices=1)  # torch specialises a size of 1: one more compilation
    assert compiled.clock.compilations == first + 1


def test_compile_time_is_reported_apart_from_training_time(small_problem, monkeypatch):
    data, cfg = small_problem

    def slow_backend(graph, example_inputs):
        time.sleep(0.5)  # a compilation that takes a while
        return graph.forward

    monkeypatch.setattr(vae, "_compiled_forward", lambda *key: vae.CompiledForward(MLP, slow_backend))
    started = time.perf_counter()
    result = vae.train_runs(data, dataclasses.replace(cfg, max_epochs=2, compile="on"), CPU, "compiled", MLP)
    elapsed = time.perf_counter() - started

    assert result.compile_seconds >= 0.5
    assert result.seconds + result.compile_seconds <= elapsed
    assert result.seconds < elapsed - 0.5


# --- what the published protocol fixes: dropout, initialisation, mixed precision -------------------------

def test_dropout_drops_each_unit_with_the_configured_rate_and_rescales_the_rest():
    cfg = vae.Config(dropout=0.5, hidden_dim=512)
    scales = vae.dropout_scales([torch.Generator().manual_seed(s) for s in (1, 2)], 200, MLP.dropout_shape(cfg), cfg.dropout, CPU)
    assert scales.shape == (2, 200, vae.NUM_HIDDEN, 512)
    assert set(scales.unique().tolist()) == {0.0, 2.0}
    assert (scales == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    low = vae.dropout_scales([torch.Generator().manual_seed(1)], 200, MLP.dropout_shape(cfg), 0.2, CPU)
    assert (low == 0).float().mean().item() == pytest.approx(0.2, abs=0.01) and low.max().item() == pytest.approx(1.25)

def test_slices_sharing_a_seed_draw_what_generators_of_their_own_would_as_slices_stop():
    """The layer map stacks one run of every module and L2 strength: those slices share one generator, and
    every epoch's order and every step's dropout are still those of a generator per slice."""
    seeds = [7, 8, 7, 9, 8, 7]
    streams, own = vae.SeedStreams(seeds, CPU), [torch.Generator().manual_seed(s) for s in seeds]
    active, drawn = list(range(len(seeds))), []
    for stopping in ([], [0, 4, 5], [2], []):  # leaves slices 1, 2, 3: seeds 8, 7, 9, out of first-seen order
        generators, shared = streams.drawing(active)
        drawn.append(len(generators))
        per_slice = lambda draws: vae.for_slices(draws, shared)
        assert torch.equal(per_slice(vae.epoch_order(40, generators, CPU)),
                           vae.epoch_order(40, [own[r] for r in active], CPU))
        for _ in range(2):  # steps
            assert torch.equal(per_slice(vae.dropout_scales(generators, 16, (3, 4), 0.5, CPU)),
                               vae.dropout_scales([own[r] for r in active], 16, (3, 4), 0.5, CPU))
        active = [r for r in active if r not in stopping]
    assert drawn == [3, 3, 3, 2]



def test_layers_start_as_nn_linear_does_uniform_within_one_over_the_root_of_fan_in():
    fan_in = 400
    params = mlp_params([0, 1], fan_in, 64)
    reference = torch.nn.Linear(fan_in, 64)
    bound = 1 / fan_in ** 0.5
    for name in ("w0", "b0"):
        values = params[name]
        assert values.abs().max().item() <= bound and values.abs().max().item() > 0.99 * bound
    assert params["w0"].std().item() == pytest.approx(reference.weight.std().item(), rel=0.02)  # bound / sqrt(3)
    assert not torch.equal(params["w0"][0], params["w0"][1])  # each run from its own seed


def test_mixed_precision_on_cuda_is_bfloat16_where_supported_else_float16(monkeypatch):
    cuda, cfg = torch.device("cuda"), vae.Config()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert vae.amp_dtype(cfg, cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert vae.amp_dtype(cfg, cuda) == torch.float16


def test_training_runs_the_forward_in_the_mixed_precision_chosen_for_the_device(small_problem, monkeypatch):
    data, cfg = small_problem
    monkeypatch.setattr(vae, "amp_dtype", lambda cfg, device: torch.bfloat16)  # as on a CUDA device
    seen = []
    real = MLP.forward

    def recording(params, buffers, x, scales, amp, blocks=None):
        seen.append(amp)
        return real(params, buffers, x, scales, amp, blocks)

    monkeypatch.setattr(MLP, "forward", recording)
    vae.train_runs(data, dataclasses.replace(cfg, max_epochs=1), CPU, "amp", MLP)
    assert seen and set(seen) == {torch.bfloat16}


def test_the_forward_in_bfloat16_computes_in_bfloat16():
    params, buffers = MLP.init([0], 12, 3, vae.Config(hidden_dim=16), CPU)
    x = torch.randn(1, 32, 12)
    full = MLP.forward(params, buffers, x, None, None)
    half = MLP.forward(params, buffers, x, None, torch.bfloat16)
    assert half.dtype == torch.float32 and not torch.allclose(full, half, atol=1e-5)
    assert torch.allclose(full, half, atol=0.1)


# --- one epoch's bookkeeping (epoch_end) ---------------------------------------------------------

def run_epochs(val_accs, losses, patience=3, min_epochs=0):
    """One slice through epoch_end, epoch by epoch, until it stops: (its history, epochs it trained)."""
    history, cfg = vae.RunHistory(seed=0), vae.Config(patience=patience, min_epochs=min_epochs)
    for epoch, (acc, loss) in enumerate(zip(val_accs, losses)):
        _, keep = vae.epoch_end([history], [0], [acc], [loss], epoch, cfg)
        if not keep:
            return history, epoch + 1
    return history, len(val_accs)


def test_an_epoch_records_its_loss_and_a_tie_is_not_an_improvement():
    history, _ = run_epochs([0.5, 0.7, 0.7, 0.6], [1.0, 0.8, 0.7, 0.65], patience=10)
    assert history.train_loss == [1.0, 0.8, 0.7, 0.65] and history.val_acc == [0.5, 0.7, 0.7, 0.6]
    assert history.best_epoch == 2 and history.best_val_acc == 0.7 and history.epochs_since_best == 2


def test_a_run_stops_after_patience_epochs_without_improvement_but_not_before_min_epochs():
    flat = [0.5] * 20
    assert run_epochs(flat, [1.0] * 20, patience=3)[1] == 4  # the first epoch improves on nothing, three more don't
    assert run_epochs(flat, [1.0] * 20, patience=3, min_epochs=7)[1] == 7


def test_a_non_finite_loss_fails_the_run_naming_its_epoch_counted_from_one():
    history, epochs = run_epochs([0.5, 0.6, 0.7], [1.0, float("nan"), 0.5], patience=10)
    assert epochs == 2 and history.failed == "training loss became non-finite at epoch 2"


def test_the_learning_rate_halves_as_torchs_reduce_lr_on_plateau_would_from_a_validation_accuracy_of_zero_on():
    optimiser = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(optimiser, mode="max", factor=0.5, patience=10, threshold=1e-4)
    history = vae.RunHistory(seed=0, lr=1.0)
    for acc in [0.0] * 14 + [0.5, 0.5, 0.50001] + [0.6] * 13:
        reference.step(acc)
        vae.plateau_update(history, acc)
        assert history.lr == optimiser.param_groups[0]["lr"]
