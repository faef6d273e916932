import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

import utils
from model import Net


def test_get_correct_pred_count():
    pred = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert utils.GetCorrectPredCount(pred, torch.tensor([1, 1, 1])) == 2
    assert isinstance(utils.GetCorrectPredCount(pred, torch.tensor([0, 0, 0])), int)


def test_get_optimizer_and_unknown_name():
    opt = utils.get_optimizer(Net(), "SGD", 0.02, 0.8)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["lr"] == 0.02 and opt.param_groups[0]["momentum"] == 0.8
    assert isinstance(utils.get_optimizer(Net(), "Adam", 1e-3, 0), torch.optim.Adam)
    with pytest.raises(ValueError, match="SGD, Adam"):
        utils.get_optimizer(Net(), "RMSprop", 0.1, 0.9)


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


def test_recipes():
    seed = utils.get_recipe("seed")
    assert (seed.epochs, seed.batch_size, seed.lr, seed.momentum, seed.step_size, seed.gamma) == \
        (20, 512, 0.01, 0.9, 15, 0.1)
    assert utils.get_recipe("fast", epochs=7, lr=None).epochs == 7
    with pytest.raises(ValueError, match="seed, fast"):
        utils.get_recipe("slow")


def test_onecycle_is_stepped_per_batch_by_fit():
    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)]  # any iterable of batches will do
    recipe = utils.get_recipe("fast", epochs=2)
    opt, sched, crit = utils.build_training(model, recipe, len(batches))
    hist = utils.fit(model, torch.device("cpu"), batches, batches, opt, sched, crit, 2, progress=False)
    assert sched.last_epoch == 8 and hist["epoch"] == [1, 2]
    assert hist["lr"][0] == pytest.approx(recipe.lr / 25)  # OneCycleLR starts at max_lr / div_factor
    ref_opt, ref_sched, _ = utils.build_training(Net(), recipe, len(batches))
    for _ in batches:
        ref_opt.step()
        ref_sched.step()
    assert hist["lr"][1] == pytest.approx(ref_opt.param_groups[0]["lr"])  # epoch 2 starts 4 batch-steps in


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
    opt = utils.get_optimizer(model, "SGD", 0.01, 0.9)
    batch_stream = (b for b in batches)  # any iterable works, even one without len()
    utils.train(model, torch.device("cpu"), batch_stream, opt, F.nll_loss, train_losses, train_acc, progress=False)
    assert len(train_losses) == 1 and train_losses[0] > 0 and 0 <= train_acc[0] <= 100


def test_diverging_loss_raises():
    model = Net()
    x = torch.randn(8, 1, 28, 28) * 1e3
    batches = [(x, torch.randint(0, 10, (8,)))] * 5
    opt = utils.get_optimizer(model, "SGD", 1e6, 0.9)
    with pytest.raises(utils.TrainingDivergedError, match="lower the learning rate"):
        utils.train(model, torch.device("cpu"), batches, opt, F.nll_loss, [], [], progress=False)


def test_amp_dtype_choice():
    assert utils.amp_dtype_for("cpu", False) is None
    assert utils.amp_dtype_for("cpu", True) is torch.bfloat16
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert utils.amp_dtype_for("cpu") is (torch.bfloat16 if native else None)


@pytest.mark.parametrize("capability, bf16, default, forced", [
    ((9, 0), True, None, torch.bfloat16),       # H100: TF32 convolutions, autocast measured slower
    ((8, 0), True, None, torch.bfloat16),       # A100
    ((7, 5), False, torch.float16, torch.float16),  # T4: no TF32, no bf16: fp16 with a GradScaler
])
def test_amp_dtype_choice_on_cuda(monkeypatch, capability, bf16, default, forced):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert utils.amp_dtype_for("cuda") is default
    assert utils.amp_dtype_for("cuda", True) is forced
    assert utils.amp_dtype_for("cuda", False) is None


def test_set_seed_reproduces_weights():
    utils.set_seed(5)
    a = Net().conv1.weight.clone()
    utils.set_seed(5)
    assert torch.equal(a, Net().conv1.weight)


def test_one_real_epoch_reaches_95_percent(mnist_root):
    """Full training set, batch 64, the default SGD settings (lr 0.01, momentum 0.9), fixed seed."""
    utils.set_seed(1)
    device = torch.device("cpu")
    model = Net().to(memory_format=torch.channels_last)
    train_loader = utils.get_MNISTdataset_with_loader("train", {"batch_size": 64, "shuffle": True},
                                                      data_dir=mnist_root, device=device)
    test_loader = utils.get_MNISTdataset_with_loader("test", {"batch_size": 1000}, data_dir=mnist_root,
                                                     device=device)
    assert len(train_loader.dataset) == 60_000
    opt = utils.get_optimizer(model, "SGD", 0.01, 0.9)
    sched = utils.get_scheduler(opt, 15, 0.1)
    hist = utils.fit(model, device, train_loader, test_loader, opt, sched, utils.get_loss("nll_loss"), 1,
                     amp_dtype=utils.amp_dtype_for(device), progress=False)
    assert hist["test_acc"][0] >= 95.0


REALLOCATE = """
import resource, sys, torch
sys.path.insert(0, sys.argv[2])
import utils
if sys.argv[1] == "keep":
    assert utils.keep_freed_memory()
for _ in range(3):
    torch.ones(64 << 20, dtype=torch.uint8)  # a training step's worth of buffers; the heap grows to fit
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(64 << 20, dtype=torch.uint8)  # freed and allocated again, as step after step
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc; a no-op elsewhere")
def test_keep_freed_memory_reuses_big_buffers_instead_of_faulting_them_in_again():
    def page_faults(mode):
        run = subprocess.run([sys.executable, "-c", REALLOCATE, mode, str(REPO)], capture_output=True, text=True,
                             check=True)
        return int(run.stdout.split()[-1])

    default, kept = page_faults("default"), page_faults("keep")
    assert default > 10 * 16, default  # fresh pages every time (16 is 64 MB in 2 MB huge pages)
    assert kept < default / 4, (kept, default)  # at most a late heap extension or two
