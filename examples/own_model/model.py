"""My own steering model, and the two lines that make it a steerloop policy.

steerloop loads it by its spec, ``examples/own_model/model.py:load``, with the weights as
a keyword argument: ``--policy-kwargs '{"weights": "tiny.safetensors"}'``.
"""

import torch
from safetensors.torch import load_file
from torch import nn

from steerloop import ModelPolicy

INPUT = (32, 64)  # [px] (height, width) the network sees, whatever the camera resolution


class TinyNet(nn.Module):
    """Two convolutions and a linear head: (N, 3, 32, 64) RGB in [0, 1] -> (N,) steering."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d((2, 4)), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(16 * 2 * 4, 32), nn.ReLU(), nn.Linear(32, 1), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).squeeze(1)


def as_policy(net: nn.Module) -> ModelPolicy:
    """The preprocessing my network was trained with: resize, RGB scaled to [0, 1]."""
    return ModelPolicy(net, resize=INPUT, colour="rgb", scale=1 / 255)


def load(weights: str) -> ModelPolicy:
    """The factory steerloop calls (``model.py:load``)."""
    net = TinyNet()
    net.load_state_dict(load_file(weights))
    return as_policy(net)
