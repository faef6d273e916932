import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import utils
from model import Net
from s5 import config, loop, optim
from s5.device import amp_dtype_for, set_seed
from utils import get_MNISTdataset_with_loader


def fit(model, batches, opt, sched, epochs, eval_batches=None):
    """The classic notebook's loop over utils.train/test: what a user writes around the core."""
    history = loop.new_history()
    for _ in range(epochs):
        history["lr"].append(opt.param_groups[0]["lr"])
        utils.train(model, "cpu", batches, opt, F.nll_loss, history["train_loss"], history["train_acc"],
                    scheduler=sched if optim.steps_per_batch(sched) else None, steps=history, progress=False)
        utils.test(model, "cpu", eval_batches or batches, F.nll_loss, history["test_loss"], history["test_acc"],
                   progress=False)
        if sched is not None and not optim.steps_per_batch(sched):
            sched.step()
    return history


def test_get_correct_pred_count():
    pred = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert utils.GetCorrectPredCount(pred, torch.tensor([1, 1, 1])) == 2
    assert isinstance(utils.GetCorrectPredCount(pred, torch.tensor([0, 0, 0])), int)


def test_get_optimizer_and_unknown_name():
    opt = utils.get_optimizer(Net(), "SGD", 0.02, 0.8)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["lr"] == 0.02 and opt.param_groups[0]["momentum"] == 0.8
    adam = utils.get_optimizer(Net(), "Adam", 1e-3, 0.5)
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["betas"] == (0.5, 0.999)  # momentum: beta1
    with pytest.raises(ValueError, match="SGD, Adam"):
        utils.get_optimizer(Net(), "RMSprop", 0.1, 0.9)
    with pytest.raises(ValueError, match="Nesterov momentum is SGD's"):
        utils.get_optimizer(Net(), "AdamW", 1e-3, 0.9, 0.0, True)


@pytest.mark.parametrize("optimizer,key", [("AdamW", "betas"), ("Muon", "betas"), ("SGD", "momentum")])
def test_a_one_cycle_schedule_cycles_the_recipes_momentum(optimizer, key):
    """beta1 (SGD: the momentum) starts at the recipe's momentum, is 0.1 lower at the peak learning rate and back at
    the end; torch's default cycle (0.95 -> 0.85) ignored --momentum. The fast recipes keep their 0.95 -> 0.85."""
    assert config.RECIPES["fast"].momentum == config.RECIPES["sprint"].momentum == 0.95
    for momentum, low in ((0.8, 0.7), (0.95, 0.85), (0.05, 0.0)):
        recipe = replace(config.RECIPES["fast"], optimizer=optimizer, momentum=momentum, epochs=1)
        opt, sched, _ = optim.build_training(Net(), recipe, 100)
        seen = []
        for _ in range(100):
            group = opt.param_groups[0]
            seen.append((group["lr"], group[key][0] if key == "betas" else group[key]))
            opt.step()
            sched.step()
        at_peak = max(seen)[1]  # the momentum where the learning rate peaks
        assert seen[0][1] == pytest.approx(momentum) and at_peak == pytest.approx(low, abs=1e-9)
        assert seen[-1][1] == pytest.approx(momentum, abs=1e-3)


def _steps(model, opt, grads):
    """`opt` stepped once for each gradient set in `grads` (one tensor per parameter of `model`)."""
    for step in grads:
        for p, g in zip(model.parameters(), step):
            p.grad = g.clone()
        opt.step()


def test_muon_orthogonalises_the_hidden_layers_and_leaves_the_rest_to_adamw():
    """Muon's update of a hidden layer's weight is its gradient's momentum with every singular value brought near 1
    (the raw gradient's spread over orders of magnitude), at AdamW's update size; the input and output layers and the
    biases step as torch's AdamW does; a saved optimizer state resumes bit for bit."""
    recipe = replace(config.RECIPES["fast"], optimizer="Muon")
    set_seed(0)
    model, twin = Net(), Net()
    twin.load_state_dict(model.state_dict())
    opt = optim.get_optimizer(model, recipe)
    names = {id(p): name for name, p in model.named_parameters()}
    assert [names[id(p)] for p in opt.param_groups[0]["params"]] == ["conv2.weight", "conv3.weight", "conv4.weight",
                                                                    "fc1.weight"]
    grads = [[torch.randn_like(p) * torch.logspace(0, -2, len(p)).view(-1, *[1] * (p.ndim - 1))
              for p in model.parameters()] for _ in range(3)]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    _steps(model, opt, grads[:1])
    for (name, p), grad in zip(model.named_parameters(), grads[0]):
        if name in ("conv2.weight", "conv4.weight", "fc1.weight"):
            step = (before[name] * (1 - recipe.lr * recipe.weight_decay) - p.detach()).flatten(1)
            step /= recipe.lr * 0.2 * max(step.shape) ** 0.5
            raw, singular = torch.linalg.svdvals(grad.flatten(1)), torch.linalg.svdvals(step)
            assert raw.max() / raw.min() > 30 and 0.5 < singular.min() and singular.max() < 1.3, (name, singular)
    adamw = torch.optim.AdamW(twin.parameters(), lr=recipe.lr, betas=(recipe.momentum, 0.999),
                              weight_decay=recipe.weight_decay)
    _steps(twin, adamw, grads[:1])
    _steps(model, opt, grads[1:])
    _steps(twin, adamw, grads[1:])
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        same = name in ("conv1.weight", "fc2.weight") or name.endswith("bias")
        assert torch.allclose(p, q, rtol=0, atol=1e-7) == same, name
    resumed_model = Net()
    resumed_model.load_state_dict(model.state_dict())
    resumed = optim.get_optimizer(resumed_model, recipe)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a file: no tensor shared
    _steps(model, opt, grads)
    _steps(resumed_model, resumed, grads)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))


def test_muon_on_a_notebooks_own_models():
    """A closure is evaluated and its loss returned, as torch's optimizers do; a model with nothing to step, or with
    complex parameters (which the AdamW half would square, not |g|²), is refused in one line."""
    recipe = config.RECIPES["sprint"]
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    opt, x = optim.get_optimizer(model, recipe), torch.randn(16, 4)
    before, loss_before = [p.detach().clone() for p in model.parameters()], model(x).square().mean().item()

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss
    assert opt.step(closure).item() == loss_before
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for bad, match in ((torch.nn.Module(), "empty parameter list"),
                       (torch.nn.Linear(3, 3, dtype=torch.complex64), "real parameters only")):
        with pytest.raises(ValueError, match=match):
            optim.get_optimizer(bad, recipe)


def test_muon_orthogonalises_in_bf16_only_where_the_device_has_it_natively(monkeypatch):
    """Where bf16 is emulated (CPUs without AVX512-BF16 or AMX) it took 30 times fp32's time: fp32 there."""
    g = torch.randn(64, 288)
    results = {}
    for native in (True, False):
        monkeypatch.setattr(optim, "native_bf16", lambda device, native=native: native)
        results[native] = optim.Muon.orthogonalise(g, 5)
    assert results[True].dtype == results[False].dtype == torch.float32  # the gradient's dtype, either way
    assert torch.equal(results[True], results[True].bfloat16().float())  # computed in bf16
    assert not torch.equal(results[False], results[False].bfloat16().float())  # in fp32


def test_the_notebooks_optimizer_and_scheduler_cycle_the_momentum_as_a_run_does():
    """utils.get_scheduler's one-cycle takes the optimizer's own momentum (beta1), as the notebook builds them, so
    the notebook trains a one-cycle recipe with the run's schedule (0.95 -> 0.85 for `fast`), not 0.9's."""
    fast = config.RECIPES["fast"]
    opt = utils.get_optimizer(Net(), fast.optimizer, fast.lr, fast.momentum, fast.weight_decay)
    sched = utils.get_scheduler(opt, name="OneCycleLR", max_lr=fast.lr, total_steps=100, pct_start=fast.pct_start)
    run_opt, run_sched, _ = optim.build_training(Net(), replace(fast, epochs=1), 100)
    for _ in range(100):
        assert opt.param_groups[0]["betas"] == run_opt.param_groups[0]["betas"]
        assert opt.param_groups[0]["lr"] == run_opt.param_groups[0]["lr"]
        for o, s in ((opt, sched), (run_opt, run_sched)):
            o.step()
            s.step()
    sgd = utils.get_optimizer(Net(), "SGD", 0.01, 0.8)
    utils.get_scheduler(sgd, name="OneCycleLR", max_lr=0.1, total_steps=10)
    assert sgd.param_groups[0]["momentum"] == pytest.approx(0.8)  # the optimizer's, where the cycle starts


def test_get_scheduler_verbose_prints_the_change(capsys):
    opt = utils.get_optimizer(Net(), "SGD", 0.01, 0.9)
    sched = utils.get_scheduler(opt, 2, 0.1, True)  # the original's call shape, verbose included
    for _ in range(2):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001)
    assert "Adjusting learning rate of group 0 to 1.0000e-03." in capsys.readouterr().out
    with pytest.raises(ValueError, match="StepLR, OneCycleLR"):
        utils.get_scheduler(opt, name="cosine")


def test_get_loss():
    assert utils.get_loss("nll_loss") is F.nll_loss
    with pytest.raises(ValueError, match="nll_loss, cross_entropy"):
        utils.get_loss("mse")
    with pytest.raises(ValueError, match="label_smoothing: 1.0 is out of range"):
        utils.get_loss("nll_loss", 1.0)  # the recipe refuses it too: one check


def test_onecycle_is_stepped_per_batch():
    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(24, 1, 28, 28), torch.randint(0, 10, (24,))
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 24, 4)]  # any iterable of batches will do
    recipe = config.get_recipe("fast", epochs=2)
    opt, sched, crit = optim.build_training(model, recipe, len(batches))
    hist = fit(model, batches, opt, sched, 2)
    assert sched.last_epoch == 12 and len(hist["train_loss"]) == 2
    assert hist["lr"][0] == pytest.approx(recipe.lr / 25)  # OneCycleLR starts at max_lr / div_factor
    ref_opt, ref_sched, _ = optim.build_training(Net(), recipe, len(batches))
    for _ in batches:
        ref_opt.step()
        ref_sched.step()
    assert hist["lr"][1] == pytest.approx(ref_opt.param_groups[0]["lr"])  # epoch 2 starts 6 batch-steps in


def test_train_and_test_append_true_means(capsys):
    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(10, 1, 28, 28), torch.randint(0, 10, (10,))
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]  # unequal batch sizes
    losses, acc = [], []
    utils.test(model, torch.device("cpu"), batches, F.nll_loss, losses, acc, progress=False)
    with torch.no_grad():
        out = model(x)
    assert losses == [pytest.approx(F.nll_loss(out, y).item(), rel=1e-5)]  # per-sample mean, not batch means
    assert acc == [pytest.approx(100 * utils.GetCorrectPredCount(out, y) / 10)]
    assert f"Accuracy: {utils.GetCorrectPredCount(out, y)}/10 " in capsys.readouterr().out
    train_losses, train_acc = [], []
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)  # no update: the epoch's figures are the model's own
    batch_stream = (b for b in batches)  # any iterable works, even one without len()
    utils.train(model, "cpu", batch_stream, frozen, F.nll_loss, train_losses, train_acc, progress=False)
    assert train_losses == [pytest.approx(F.nll_loss(out, y).item(), rel=1e-5)]  # per-sample, not batch means
    assert train_acc == [pytest.approx(100 * utils.GetCorrectPredCount(out, y) / 10)]


def test_diverging_loss_raises():
    model = Net()
    x = torch.randn(8, 1, 28, 28) * 1e3
    batches = [(x, torch.randint(0, 10, (8,)))] * 5
    opt = utils.get_optimizer(model, "SGD", 1e6, 0.9)
    with pytest.raises(utils.TrainingDivergedError, match="lower the learning rate"):
        utils.train(model, torch.device("cpu"), batches, opt, F.nll_loss, [], [], progress=False)


@pytest.mark.slow
def test_one_real_epoch_reaches_95_percent(mnist_root):
    """Full training set, batch 64, the default SGD settings (lr 0.01, momentum 0.9), fixed seed."""
    set_seed(1)
    device = torch.device("cpu")
    model = Net().to(memory_format=torch.channels_last)
    train_loader = get_MNISTdataset_with_loader("train", {"batch_size": 64, "shuffle": True},
                                                      data_dir=mnist_root, device=device)
    test_loader = get_MNISTdataset_with_loader("test", {"batch_size": 1000}, data_dir=mnist_root,
                                                     device=device)
    assert len(train_loader.dataset) == 60_000
    opt = utils.get_optimizer(model, "SGD", 0.01, 0.9)
    train_losses, train_acc, test_losses, test_acc = [], [], [], []
    utils.train(model, device, train_loader, opt, utils.get_loss("nll_loss"), train_losses, train_acc,
                amp_dtype=amp_dtype_for(device), progress=False)
    utils.test(model, device, test_loader, F.nll_loss, test_losses, test_acc, amp_dtype=amp_dtype_for(device),
               progress=False)
    assert test_acc[0] >= 95.0


def test_one_cycle_with_too_few_steps_is_refused():
    opt = utils.get_optimizer(Net(), "SGD", 0.01, 0.9)
    with pytest.raises(ValueError, match="needs at least 5 optimizer steps.*has 4"):
        utils.get_scheduler(opt, name="OneCycleLR", max_lr=0.1, total_steps=4)
    utils.get_scheduler(opt, name="OneCycleLR", max_lr=0.1, total_steps=5)


def test_loops_take_devices_as_pytorch_does():
    """"cpu", "cuda:0" and torch.device all work where a device is taken, as in most notebooks."""
    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    opt = utils.get_optimizer(model, "SGD", 0.01, 0.9)
    for device in ("cpu", torch.device("cpu")):
        train_losses, train_acc, test_losses, test_acc = [], [], [], []
        utils.train(model, device, batches, opt, F.nll_loss, train_losses, train_acc, progress=False)
        utils.test(model, device, batches, F.nll_loss, test_losses, test_acc, progress=False)
        assert len(train_losses) == len(test_acc) == 1
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        utils.test(model, "gpu0", batches, F.nll_loss, [], [], progress=False)


def test_empty_loaders_are_one_line_errors():
    model = Net()
    opt = utils.get_optimizer(model, "SGD", 0.01, 0.9)
    with pytest.raises(ValueError, match="gave no batches"):
        utils.train(model, "cpu", [], opt, F.nll_loss, [], [], progress=False)
    with pytest.raises(ValueError, match="gave no batches"):
        utils.test(model, "cpu", [], F.nll_loss, [], [], progress=False)


def test_train_records_a_step_row_every_refresh():
    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(25 * 4, 1, 28, 28), torch.randint(0, 10, (25 * 4,))
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 100, 4)]  # 25 batches: rows after 10, 20 and 25
    opt = utils.get_optimizer(model, "SGD", 0.01, 0.9)
    history = utils.new_history()
    for _ in range(2):
        utils.train(model, "cpu", batches, opt, F.nll_loss, history["train_loss"], history["train_acc"],
                     steps=history, progress=False)
    assert history["step_epoch"] == pytest.approx([0.4, 0.8, 1.0, 1.4, 1.8, 2.0])
    assert history["step_lr"] == [0.01] * 6
    # the rows' losses are the means of their own batches: weighted by batches they give the epoch's mean
    epoch1 = sum(loss * n for loss, n in zip(history["step_train_loss"][:3], (10, 10, 5))) / 25
    assert epoch1 == pytest.approx(history["train_loss"][0], rel=1e-6)
    assert all(0 <= a <= 100 for a in history["step_train_acc"])


def test_evaluation_of_empty_batches_is_a_one_line_error():
    empty = [(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.int64))]
    with pytest.raises(ValueError, match="gave no images"):
        utils.test(Net(), "cpu", empty, F.nll_loss, [], [], progress=False)


@pytest.mark.parametrize("kwargs, match", [
    ({"step_size": 0}, "step_size: 0 is out of range"),
    ({"name": "OneCycleLR", "max_lr": 0.1, "total_steps": 100, "pct_start": 0}, "pct_start: 0 is out of range"),
    ({"name": "OneCycleLR", "max_lr": 0.1, "total_steps": 100, "pct_start": 1.5}, "pct_start: 1.5 is out of range"),
    ({"name": "OneCycleLR", "max_lr": 0.1, "total_steps": 100, "pct_start": 1.0}, "pct_start: 1.0 is out of range"),
    ({"name": "OneCycleLR", "max_lr": 0.1, "total_steps": 0}, "total_steps: 0 is out of range"),
])
def test_get_scheduler_refuses_impossible_values(kwargs, match):
    opt = utils.get_optimizer(Net(), "SGD", 0.01, 0.9)
    with pytest.raises(ValueError, match=match):
        utils.get_scheduler(opt, **kwargs)


def test_the_step_is_the_textbook_step():
    """One Step equals zero_grad, forward, loss, backward, optimizer step, written out by hand."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    a, b = Net(), Net()
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (a, b))
    for _ in range(2):
        output, loss = loop.Step(a, opt_a, F.nll_loss)(x, y)
        opt_b.zero_grad()
        F.nll_loss(b(x), y).backward()
        opt_b.step()
    assert not loss.requires_grad and output.shape == (8, 10)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
