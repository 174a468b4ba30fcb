"""A ResNet-18-style CIFAR network (3x32x32 inputs), defined here so the benchmark needs no torchvision.

Layout of the usual CIFAR ResNet-18 (He et al. 2016; the variant used by most robustness papers):
a 3x3 stem (no max-pool), four stages of two BasicBlocks with 64/128/256/512 channels, strides
1/2/2/2, global average pooling and one linear layer: 11.2 M parameters, ~0.56 GFLOPs per image.
The benchmark uses it with random weights in eval mode: speed does not depend on the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        blocks, channels = [], width
        for stage, stride in enumerate((1, 2, 2, 2)):
            outputs = width * 2 ** stage
            blocks += [BasicBlock(channels, outputs, stride), BasicBlock(outputs, outputs, 1)]
            channels = outputs
        self.layers = nn.Sequential(*blocks)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet18(num_classes: int = 10, seed: int = 0) -> ResNet18:
    """Random-init ResNet-18 in eval mode (deterministic weights for a given seed)."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = ResNet18(num_classes)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()
