import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from s5.data import MEAN, STD
from s5.plots import plot_training, post_accuracyplots, post_display


def test_post_display_grid(tmp_path):
    images = (torch.rand(20, 1, 28, 28) - MEAN) / STD
    labels = torch.arange(20) % 10
    fig = post_display([(images, labels)], save_path=tmp_path / "grid.png")
    assert isinstance(fig, Figure) and len(fig.axes) == 16
    assert [ax.get_title() for ax in fig.axes] == [str(i % 10) for i in range(16)]
    shown = fig.axes[0].get_images()[0].get_array()
    torch.testing.assert_close(torch.as_tensor(shown.data), (images[0, 0] * STD + MEAN).clamp(0, 1))
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_post_display_small_batch():
    fig = post_display([(torch.zeros(3, 1, 28, 28), torch.tensor([1, 2, 3]))])
    assert sum(1 for ax in fig.axes if ax.get_images()) == 3


def test_post_accuracyplots(tmp_path):
    fig = post_accuracyplots([0.5, 0.3], [0.2, 0.1], [90.0, 95.0], [97.0, 98.0], tmp_path / "acc.png")
    assert [ax.get_title() for ax in fig.axes] == ["Training Loss", "Training Accuracy", "Test Loss", "Test Accuracy"]
    assert list(fig.axes[3].get_lines()[0].get_ydata()) == [97.0, 98.0]
    assert (tmp_path / "acc.png").stat().st_size > 1000


def test_post_accuracyplots_has_whole_epoch_ticks():
    fig = post_accuracyplots([0.5, 0.3], [0.2, 0.1], [90.0, 95.0], [97.0, 98.0])
    ticks = fig.axes[0].get_xticks()
    assert isinstance(fig.axes[0].xaxis.get_major_locator(), MaxNLocator)
    assert all(float(t).is_integer() for t in ticks)  # no 1.2, 1.4, ... between two epochs


def test_plot_training_draws_steps_tests_and_the_learning_rate(tmp_path):
    steps = {"step_epoch": [0.5, 1.0, 1.5, 2.0], "step_lr": [0.1, 0.2, 0.1, 0.0],
             "step_train_loss": [2.0, 1.0, 0.5, 0.4], "step_train_acc": [30.0, 80.0, 95.0, 97.0]}
    fig = plot_training(steps, [0.9, 0.3], [85.0, 96.0], save_path=tmp_path / "curves.png")
    loss, acc, lr = fig.axes
    assert [ax.get_title() for ax in fig.axes] == ["Loss", "Accuracy", "Learning rate"]
    assert list(acc.get_lines()[0].get_xdata()) == [0.5, 1.0, 1.5, 2.0]  # fractional epochs
    assert list(acc.get_lines()[1].get_xdata()) == [1, 2] and list(acc.get_lines()[1].get_ydata()) == [85.0, 96.0]
    assert list(lr.get_lines()[0].get_ydata()) == [0.1, 0.2, 0.1, 0.0]
    assert (tmp_path / "curves.png").stat().st_size > 1000
