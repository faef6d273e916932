import pytest
import torch
from matplotlib.figure import Figure

import utils
from model import Net


def test_post_display_grid(tmp_path):
    images = (torch.rand(20, 1, 28, 28) - utils.MEAN) / utils.STD
    labels = torch.arange(20) % 10
    fig = utils.post_display([(images, labels)], save_path=tmp_path / "grid.png")
    assert isinstance(fig, Figure) and len(fig.axes) == 16
    assert [ax.get_title() for ax in fig.axes] == [str(i % 10) for i in range(16)]
    shown = fig.axes[0].get_images()[0].get_array()
    torch.testing.assert_close(torch.as_tensor(shown.data), (images[0, 0] * utils.STD + utils.MEAN).clamp(0, 1))
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_post_display_small_batch():
    fig = utils.post_display([(torch.zeros(3, 1, 28, 28), torch.tensor([1, 2, 3]))])
    assert sum(1 for ax in fig.axes if ax.get_images()) == 3


def test_post_accuracyplots(tmp_path):
    fig = utils.post_accuracyplots([0.5, 0.3], [0.2, 0.1], [90.0, 95.0], [97.0, 98.0], tmp_path / "acc.png")
    assert [ax.get_title() for ax in fig.axes] == ["Training Loss", "Training Accuracy", "Test Loss", "Test Accuracy"]
    assert list(fig.axes[3].get_lines()[0].get_ydata()) == [97.0, 98.0]
    assert (tmp_path / "acc.png").stat().st_size > 1000


def test_receptive_field_of_net(capsys):
    rows = utils.receptive_field(Net())
    assert [r["rf"] for r in rows] == [3, 5, 6, 10, 14, 16]
    assert [r["jump"] for r in rows] == [1, 1, 2, 2, 2, 4]
    assert [r["out"][1:] for r in rows] == [(26, 26), (24, 24), (12, 12), (10, 10), (8, 8), (4, 4)]
    assert [r["layer"] for r in rows] == ["conv1", "conv2", "max-pool", "conv3", "conv4", "max-pool"]
    assert "conv4" in capsys.readouterr().out


def test_receptive_field_is_computed_not_hard_coded():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 5, stride=2, padding=2), torch.nn.MaxPool2d(3, 1),
                                torch.nn.Conv2d(4, 4, 3, dilation=2))
    rows = utils.receptive_field(model, verbose=False)
    assert [(r["rf"], r["jump"]) for r in rows] == [(5, 2), (9, 2), (17, 2)]


@pytest.fixture(scope="module")
def test_loader(mnist_root):
    return utils.get_MNISTdataset_with_loader("test", {"batch_size": 1000}, data_dir=mnist_root, device="cpu")


def test_confusion_matrix_totals(test_loader, tmp_path):
    utils.set_seed(0)
    model = Net()
    cm = utils.confusion_matrix(model, test_loader, torch.device("cpu"))
    assert cm.shape == (10, 10) and cm.sum() == 10_000
    assert cm.sum(1).tolist() == torch.bincount(test_loader.labels, minlength=10).tolist()
    shared = utils.predict_loader(model, test_loader, torch.device("cpu"), keep_images=True)
    assert torch.equal(utils.confusion_matrix(model, None, None, predictions=shared), cm)  # no second pass needed
    fig = utils.plot_confusion_matrix(cm, tmp_path / "cm.png")
    assert f"{int(cm.trace())}/10000" in fig.axes[0].get_title() and (tmp_path / "cm.png").exists()


def test_misclassified_are_worst_first(test_loader, tmp_path):
    utils.set_seed(0)
    model = Net()
    mistakes = utils.misclassified(model, test_loader, torch.device("cpu"), k=10)
    assert len(mistakes) == 10
    probs = [m["probability"] for m in mistakes]
    assert probs == sorted(probs, reverse=True)
    for m in mistakes:
        assert m["true"] != m["predicted"] and m["image"].shape == (1, 28, 28)
        out = model(m["image"].unsqueeze(0)).exp()
        assert out.argmax().item() == m["predicted"]
    shared = utils.predict_loader(model, test_loader, torch.device("cpu"), keep_images=True)
    again = utils.misclassified(model, None, None, k=10, predictions=shared)
    assert [(m["true"], m["predicted"]) for m in again] == [(m["true"], m["predicted"]) for m in mistakes]
    fig = utils.plot_misclassified(mistakes, tmp_path / "m.png")
    assert "true" in fig.axes[0].get_title()
