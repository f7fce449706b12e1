"""A small architecture of "your own", for the `<module>:<callable>` form of a pretrained baseline's arch."""

from torch import nn


def tiny_rgb_net(classes: int = 5) -> nn.Module:
    """3-channel input, two conv stages, a pooled classifier: named children like a torchvision model."""
    net = nn.Module()
    net.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    net.stage1 = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
    net.stage2 = nn.Sequential(nn.Conv2d(12, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
    net.avgpool = nn.AdaptiveAvgPool2d(1)
    net.flatten = nn.Flatten()
    net.fc = nn.Linear(16, classes)
    net.forward = lambda x: net.fc(net.flatten(net.avgpool(net.stage2(net.stage1(net.stem(x))))))
    return net
