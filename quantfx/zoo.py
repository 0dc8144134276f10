"""Small float test models (plain torch.nn, traceable by torch.fx) used by tests, benchmarks and examples."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _randomize_bn(module: nn.Module, seed: int = 1234) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so Conv+BN folding is really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
    return module


def conv_bn_relu(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU):
    """Conv (no bias, 'same' padding for odd k) -> BatchNorm2d -> activation."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), act())


class LeNet(nn.Module):
    """LeNet-5 with BatchNorm for 1x28x28 inputs."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(in_channels, 6, 5, padding=2), nn.BatchNorm2d(6), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(6, 16, 5), nn.BatchNorm2d(16), nn.ReLU()
        self.fc1, self.relu3 = nn.Linear(400, 120), nn.ReLU()
        self.fc2, self.relu4 = nn.Linear(120, 84), nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)
        _randomize_bn(self)

    def forward(self, x):
        x = F.max_pool2d(self.relu1(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(self.relu2(self.bn2(self.conv2(x))), 2)
        x = torch.flatten(x, 1)
        return self.fc3(self.relu4(self.fc2(self.relu3(self.fc1(x)))))


def downsample(cin: int, cout: int, stride: int):
    """The strided 1x1 conv-bn shortcut, or None when the shapes already match."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-bn, residual add, ReLU; strided 1x1 downsample when needed."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = downsample(cin, cout, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)  # the same ReLU called twice, as torchvision does


class Bottleneck(nn.Module):
    """ResNet bottleneck block (1x1, 3x3, 1x1, expansion 4)."""

    def __init__(self, cin, width, stride=1):
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = downsample(cin, cout, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Configurable ResNet: CIFAR stem (3x3) or ImageNet stem (7x7 stride 2 + max-pool)."""

    def __init__(self, block, layers, widths, num_classes=10, imagenet_stem=False):
        super().__init__()
        expansion = 4 if block is Bottleneck else 1
        stem = widths[0]
        if imagenet_stem:
            self.stem = nn.Sequential(nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = conv_bn_relu(3, stem)
        blocks, cin = [], stem
        for i, (n, w) in enumerate(zip(layers, widths)):
            for j in range(n):
                blocks.append(block(cin, w, 2 if j == 0 and i > 0 else 1))
                cin = w * expansion
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        _randomize_bn(self)

    def forward(self, x):
        x = self.pool(self.layers(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


def ResNetSmall(num_classes=10):
    """CIFAR-style ResNet: one basic block per stage, widths 16/32/64, for 3x32x32 inputs."""
    return ResNet(BasicBlock, [1, 1, 1], [16, 32, 64], num_classes)


def resnet18_like(num_classes=1000):
    """torchvision resnet18 topology (basic blocks [2,2,2,2], widths 64..512), for 3x224x224 inputs."""
    return ResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], num_classes, imagenet_stem=True)


def resnet50_like(num_classes=1000):
    """torchvision resnet50 topology (bottlenecks [3,4,6,3]), for 3x224x224 inputs."""
    return ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], num_classes, imagenet_stem=True)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project; residual when shapes allow."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            conv_bn_relu(cin, hidden, 1, act=nn.ReLU6),
            conv_bn_relu(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.block(x)
        return x + out if self.use_res else out


class MobileNetV2Small(nn.Module):
    """MobileNetV2-style net with consecutive inverted residuals (an add feeds an add), for 3x32x32."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = conv_bn_relu(3, 16, 3, 2, act=nn.ReLU6)
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 1, 4), InvertedResidual(16, 16, 1, 4), InvertedResidual(16, 24, 2, 4),
            InvertedResidual(24, 24, 1, 4), InvertedResidual(24, 24, 1, 4))
        self.head = conv_bn_relu(24, 64, 1, act=nn.ReLU6)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(64, num_classes)
        _randomize_bn(self)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(self.dropout(x.mean((2, 3))))


class MobileNetV2(nn.Module):
    """torchvision mobilenet_v2 topology (width 1.0: the (t, c, n, s) table of the paper), for 3x224x224 inputs."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, num_classes=1000):
        super().__init__()
        layers, cin = [conv_bn_relu(3, 32, 3, 2, act=nn.ReLU6)], 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t) if t != 1 else
                              nn.Sequential(conv_bn_relu(cin, cin, 3, s, groups=cin, act=nn.ReLU6),
                                            nn.Conv2d(cin, c, 1, bias=False), nn.BatchNorm2d(c)))
                cin = c
        layers.append(conv_bn_relu(cin, 1280, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, num_classes)
        _randomize_bn(self)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


def mobilenetv2_like(num_classes=1000):
    """torchvision mobilenet_v2 topology, for 3x224x224 inputs."""
    return MobileNetV2(num_classes)


class UNetSmall(nn.Module):
    """Two-level UNet with transposed-conv upsampling and skip concatenations, for 3x32x32."""

    def __init__(self, in_channels=3, num_classes=2):
        super().__init__()

        def double(cin, cout):
            return nn.Sequential(conv_bn_relu(cin, cout), conv_bn_relu(cout, cout))
        self.enc1, self.enc2 = double(in_channels, 16), double(16, 32)
        self.bottleneck = double(32, 64)
        self.up2, self.dec2 = nn.ConvTranspose2d(64, 32, 2, stride=2), double(64, 32)
        self.up1, self.dec1 = nn.ConvTranspose2d(32, 16, 2, stride=2), double(32, 16)
        self.out = nn.Conv2d(16, num_classes, 1)
        _randomize_bn(self)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        b = self.bottleneck(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.out(d1)


class DenseLayer(nn.Module):
    """BN-ReLU-conv3x3 producing ``growth`` new channels."""

    def __init__(self, cin, growth):
        super().__init__()
        self.bn, self.relu = nn.BatchNorm2d(cin), nn.ReLU()
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv(self.relu(self.bn(x)))


class DenseBlockNet(nn.Module):
    """DenseNet-style block: each layer's output concatenated onto the running features (a cat of a cat)."""

    def __init__(self, num_classes=10, growth=8, n_layers=4):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.layers = nn.ModuleList(DenseLayer(16 + i * growth, growth) for i in range(n_layers))
        c = 16 + n_layers * growth
        self.transition = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False),
                                        nn.AvgPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c // 2, num_classes)
        _randomize_bn(self)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        x = self.pool(self.transition(x))
        return self.fc(torch.flatten(x, 1))


class DenseNetLayer(nn.Module):
    """torchvision's dense layer: BN-ReLU-conv1x1 (``bn_size * growth`` channels)-BN-ReLU-conv3x3 (``growth``), on
    the concatenation of every earlier feature map of its block."""

    def __init__(self, cin: int, growth: int, bn_size: int = 4):
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU()
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(bn_size * growth), nn.ReLU()
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1)
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class DenseNet(nn.Module):
    """Configurable DenseNet (BN-ReLU-conv ordering): dense blocks of ``blocks`` layers, transitions
    BN-ReLU-conv1x1 (half the channels)-avgpool 2, final BN-ReLU, global pool, linear. ``imagenet_stem``: conv 7x7
    stride 2, BN, ReLU, max-pool 3 stride 2 (torchvision's); else one 3x3 conv."""

    def __init__(self, blocks=(6, 12, 24, 16), growth: int = 32, stem: int = 64, bn_size: int = 4,
                 num_classes: int = 1000, imagenet_stem: bool = True):
        super().__init__()
        if imagenet_stem:
            self.stem = nn.Sequential(nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Conv2d(3, stem, 3, padding=1, bias=False)
        self.blocks, self.transitions = nn.ModuleList(), nn.ModuleList()
        c = stem
        for i, n in enumerate(blocks):
            self.blocks.append(nn.ModuleList(DenseNetLayer(c + j * growth, growth, bn_size) for j in range(n)))
            c += n * growth
            if i < len(blocks) - 1:
                self.transitions.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False),
                                                      nn.AvgPool2d(2)))
                c //= 2
        self.norm, self.relu = nn.BatchNorm2d(c), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(c, num_classes)
        _randomize_bn(self)

    def forward(self, x):
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            features = [x]
            for layer in block:
                features.append(layer(features))
            x = torch.cat(features, 1)
            if i < len(self.transitions):
                x = self.transitions[i](x)
        return self.fc(torch.flatten(self.pool(self.relu(self.norm(x))), 1))


def densenet121_like(num_classes=1000):
    """torchvision densenet121 topology (growth 32, blocks (6, 12, 24, 16), bn_size 4, 64 stem channels,
    BN-ReLU-conv ordering), for 3x224x224 inputs."""
    return DenseNet((6, 12, 24, 16), growth=32, stem=64, bn_size=4, num_classes=num_classes)


class InceptionBlockNet(nn.Module):
    """Stem plus one four-branch Inception block concatenated along channels, for 3x32x32."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = conv_bn_relu(3, 32)
        self.b1 = conv_bn_relu(32, 16, 1)
        self.b2 = nn.Sequential(conv_bn_relu(32, 16, 1), conv_bn_relu(16, 24, 3))
        self.b3 = nn.Sequential(conv_bn_relu(32, 8, 1), conv_bn_relu(8, 8, 5))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn_relu(32, 8, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(56, num_classes)
        _randomize_bn(self)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)
        return self.fc(torch.flatten(self.pool(x), 1))


class ShuffleNetBlockNet(nn.Module):
    """ShuffleNetV2 unit: chunk, branch, cat, channel shuffle via view/transpose/view, for 3x32x32."""

    def __init__(self, num_classes=10, groups=2):
        super().__init__()
        self.groups = groups
        self.stem = conv_bn_relu(3, 32)
        self.branch = nn.Sequential(
            conv_bn_relu(16, 16, 1),
            nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16),
            conv_bn_relu(16, 16, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)
        _randomize_bn(self)

    def forward(self, x):
        x = self.stem(x)
        x1, x2 = x.chunk(2, dim=1)
        x = torch.cat((x1, self.branch(x2)), 1)
        b, c, h, w = x.size()
        x = x.view(b, self.groups, c // self.groups, h, w)
        x = torch.transpose(x, 1, 2).contiguous()
        x = x.view(b, -1, h, w)
        return self.fc(torch.flatten(self.pool(x), 1))


class MLP(nn.Module):
    """Flatten then a Linear-ReLU stack."""

    def __init__(self, in_features=64, hidden=(128, 64), num_classes=10):
        super().__init__()
        layers, c = [nn.Flatten()], in_features
        for h in hidden:
            layers += [nn.Linear(c, h), nn.ReLU()]
            c = h
        layers.append(nn.Linear(c, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class DeepChain(nn.Module):
    """A generated chain of conv-bn-relu layers with a residual add every 4 layers (scaling benchmarks)."""

    def __init__(self, num_layers: int, channels: int = 8, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.layers = nn.ModuleList(conv_bn_relu(channels, channels) for _ in range(num_layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _randomize_bn(self)

    def forward(self, x):
        x = self.stem(x)
        skip = x
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i % 4 == 3:
                x = x + skip
                skip = x
        return self.fc(torch.flatten(self.pool(x), 1))


def deep_chain(num_layers: int, channels: int = 8) -> DeepChain:
    """DeepChain(num_layers): input 3x16x16."""
    return DeepChain(num_layers, channels)


#: name -> (constructor, input shape with batch 1)
TEST_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "lenet": (LeNet, (1, 1, 28, 28)),
    "resnet": (ResNetSmall, (1, 3, 32, 32)),
    "mobilenetv2": (MobileNetV2Small, (1, 3, 32, 32)),
    "unet": (UNetSmall, (1, 3, 32, 32)),
    "densenet": (DenseBlockNet, (1, 3, 32, 32)),
    "inception": (InceptionBlockNet, (1, 3, 32, 32)),
    "shufflenet": (ShuffleNetBlockNet, (1, 3, 32, 32)),
    "mlp": (MLP, (1, 64)),
}


def example_input(name: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A deterministic standard-normal input for TEST_MODELS[name] with the given batch size."""
    shape = TEST_MODELS[name][1]
    return torch.randn((batch,) + tuple(shape[1:]), generator=torch.Generator().manual_seed(seed))
