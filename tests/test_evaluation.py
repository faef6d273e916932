import pytest
import torch

from model import Net
from s5.data import MEAN, STD
from s5.device import set_seed
from s5.evaluation import ShiftAveraged, confusion_matrix, misclassified, predict_loader
from s5.plots import plot_confusion_matrix, plot_misclassified
from utils import get_MNISTdataset_with_loader


@pytest.fixture(scope="module")
def test_loader(mnist_root):
    return get_MNISTdataset_with_loader("test", {"batch_size": 1000}, data_dir=mnist_root, device="cpu")


@pytest.mark.slow
def test_confusion_matrix_totals(test_loader, tmp_path):
    set_seed(0)
    model = Net()
    predictions = predict_loader(model, test_loader, "cpu")  # a device as a string, as notebooks write it
    cm = confusion_matrix(predictions)
    assert cm.shape == (10, 10) and cm.sum() == 10_000
    assert cm.sum(1).tolist() == torch.bincount(test_loader.labels, minlength=10).tolist()
    assert torch.equal(cm.diagonal().sum(), (predictions.log_probs.argmax(1) == predictions.labels).sum())
    fig = plot_confusion_matrix(cm, tmp_path / "cm.png")
    assert f"{int(cm.trace())}/10000" in fig.axes[0].get_title() and (tmp_path / "cm.png").exists()


@pytest.mark.slow
def test_misclassified_are_worst_first(test_loader, tmp_path):
    set_seed(0)
    model = Net()
    mistakes = misclassified(predict_loader(model, test_loader, torch.device("cpu"), keep_images=True), k=10)
    assert len(mistakes) == 10
    probs = [m["probability"] for m in mistakes]
    assert probs == sorted(probs, reverse=True)
    for m in mistakes:
        assert m["true"] != m["predicted"] and m["image"].shape == (1, 28, 28)
        out = model(m["image"].unsqueeze(0)).exp()
        assert out.argmax().item() == m["predicted"]
    with pytest.raises(ValueError, match="keep_images=True"):
        misclassified(predict_loader(model, test_loader, "cpu"))
    fig = plot_misclassified(mistakes, tmp_path / "m.png")
    titled = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titled == [f"true {m['true']}\npred {m['predicted']} ({m['probability']:.0%})" for m in mistakes]
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_misclassified_refuses_a_negative_k(test_loader):
    set_seed(0)
    predictions = predict_loader(Net(), test_loader, "cpu", keep_images=True)
    with pytest.raises(ValueError, match="k: -1 is out of range"):
        misclassified(predictions, k=-1)  # was every mistake but one
    assert misclassified(predictions, k=0) == []


def test_shift_averaging_is_the_mean_probability_over_the_image_and_its_four_one_pixel_shifts():
    set_seed(0)
    model = Net().eval()
    x = torch.randn(4, 1, 28, 28)
    background = -MEAN / STD
    views = []
    for dx, dy in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)):
        shifted = torch.full_like(x, background)  # a view shifted by (dx, dy): pixel (i, j) is x's (i + dy, j + dx)
        shifted[..., max(0, -dy):28 - max(0, dy), max(0, -dx):28 - max(0, dx)] = \
            x[..., max(0, dy):28 - max(0, -dy), max(0, dx):28 - max(0, -dx)]
        views.append(model(shifted).exp())
    with torch.no_grad():
        averaged = ShiftAveraged(model)(x)
        torch.testing.assert_close(averaged.exp(), torch.stack(views).mean(0).detach(), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(averaged, model(x), atol=1e-3)  # the shifts do change the answer
        channels_last = ShiftAveraged(model)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(channels_last, averaged, atol=1e-5, rtol=1e-4)
    assert ShiftAveraged(model)(x[:0]).shape == (0, 10)  # a process's empty share of a last batch
