"""The S5 network: four 3x3 convolutions and two linear layers for 28x28 MNIST digits.

Importable on its own (`from model import Net`); it needs only torch.

How far each layer sees (no padding, stride 1 convs, 2x2 max-pools). ``receptive_field(Net())``
(s5/receptive_field.py, also in utils.py) derives the same table from the layers themselves.

    layer        output (C x H x W)   jump   receptive field
    input        1 x 28 x 28          1      1
    conv1 3x3    32 x 26 x 26         1      3
    conv2 3x3    64 x 24 x 24         1      5
    max-pool 2   64 x 12 x 12         2      6
    conv3 3x3    128 x 10 x 10        2      10
    conv4 3x3    256 x 8 x 8          2      14
    max-pool 2   256 x 4 x 4          4      16
    fc1          50                   -      whole image (flattened 4096)
    fc2          10                   -      log-probabilities of the 10 digits
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_SHAPE = (1, 28, 28)


class Net(nn.Module):
    """593,200 parameters; returns log-softmax scores of shape (N, 10)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.conv3 = nn.Conv2d(64, 128, kernel_size=3)
        self.conv4 = nn.Conv2d(128, 256, kernel_size=3)
        self.fc1 = nn.Linear(4096, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x):
        check_input(x)
        # Pools are functional, as in the original, so torchsummary shows the same six rows. Pooling
        # before the ReLU (the original's order) gives the same result with a 4x smaller ReLU.
        x = F.relu(self.conv1(x))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = F.relu(self.conv3(x))
        x = F.relu(F.max_pool2d(self.conv4(x), 2))
        x = torch.flatten(x, 1)  # flatten, not view: works for channels_last tensors too
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


def check_input(x):
    """Raise a ValueError naming the expected (N, 1, 28, 28) when `x` cannot be fed to Net."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"Net expects a torch.Tensor of shape (N, 1, 28, 28), got {type(x).__name__}")
    if x.dim() != 4 or tuple(x.shape[1:]) != INPUT_SHAPE:
        hint = " (add a batch dimension: x.unsqueeze(0))" if tuple(x.shape) == INPUT_SHAPE else ""
        raise ValueError(
            f"Net expects input of shape (N, 1, 28, 28), got {tuple(x.shape)}{hint}"
        )
