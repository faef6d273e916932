import torch

from model import Net
from s5.receptive_field import receptive_field


def test_receptive_field_of_net(capsys):
    rows = receptive_field(Net())
    assert [r["rf"] for r in rows] == [3, 5, 6, 10, 14, 16]
    assert [r["jump"] for r in rows] == [1, 1, 2, 2, 2, 4]
    assert [r["out"][1:] for r in rows] == [(26, 26), (24, 24), (12, 12), (10, 10), (8, 8), (4, 4)]
    assert [r["layer"] for r in rows] == ["conv1", "conv2", "max-pool", "conv3", "conv4", "max-pool"]
    assert "conv4" in capsys.readouterr().out


def test_receptive_field_is_computed_not_hard_coded():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 5, stride=2, padding=2), torch.nn.MaxPool2d(3, 1),
                                torch.nn.Conv2d(4, 4, 3, dilation=2))
    rows = receptive_field(model, verbose=False)
    assert [(r["rf"], r["jump"]) for r in rows] == [(5, 2), (9, 2), (17, 2)]
    assert [r["layer"] for r in rows] == ["0", "max-pool", "2"]  # a Conv2d by its name, a pool by its kind
