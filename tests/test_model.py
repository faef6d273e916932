import pytest
import torch
from torchsummary import summary

from model import Net


def test_parameter_count():
    assert sum(p.numel() for p in Net().parameters()) == 593_200


@pytest.mark.parametrize("batch", [1, 2, 7, 64])
def test_output_is_log_probabilities(batch):
    out = Net()(torch.randn(batch, 1, 28, 28))
    assert out.shape == (batch, 10)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(batch))


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    net, x = Net().eval(), torch.randn(4, 1, 28, 28)
    ref = net(x)
    net_cl = net.to(memory_format=torch.channels_last)
    torch.testing.assert_close(net_cl(x.contiguous(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 3, 28, 28), (1, 1, 32, 32), (1, 28, 28), (28, 28), (2, 1, 28)])
def test_wrong_shape_names_expected_shape(shape):
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        Net()(torch.randn(*shape))


def test_missing_batch_dim_hint():
    with pytest.raises(ValueError, match="unsqueeze"):
        Net()(torch.randn(1, 28, 28))


def test_torchsummary_rows_match_original(capsys):
    summary(Net(), (1, 28, 28), device="cpu")
    text = capsys.readouterr().out
    rows = [line.split() for line in text.splitlines() if line.strip().startswith(("Conv2d", "Linear"))]
    shapes_params = [(" ".join(r[1:-1]), r[-1]) for r in rows]
    assert shapes_params == [
        ("[-1, 32, 26, 26]", "320"), ("[-1, 64, 24, 24]", "18,496"), ("[-1, 128, 10, 10]", "73,856"),
        ("[-1, 256, 8, 8]", "295,168"), ("[-1, 50]", "204,850"), ("[-1, 10]", "510"),
    ]
    assert "Total params: 593,200" in text
