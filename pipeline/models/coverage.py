"""Small plain-torch versions of the architectures users bring, for the pruning/export coverage suite.

Each is a few thousand to a few tens of thousands of parameters, runs on 28x28 inputs with 1 or 3
channels and takes ``num_classes``, ``in_channels`` and ``image_size`` like the rest of the zoo. They
use the building blocks the real models use (and that trip pruners and exporters):

  * ``ViTMHA``: torch's own ``nn.TransformerEncoderLayer`` (``nn.MultiheadAttention``, no ``qkv`` Linear),
    class token and position embedding as bare parameters.
  * ``ConvNeXtSmall``: depthwise 7x7 convs, ``LayerNorm2d``, layer scale (a bare (C, 1, 1) parameter),
    stochastic depth, and torchvision's classifier ``Sequential(LayerNorm2d, Flatten, Linear)``.
  * ``MobileNetV3Small``: inverted residuals with squeeze-excitation, Hardswish/SiLU, stochastic depth,
    and a classifier with a hidden Linear.
  * ``RegNetSmall``: RegNetY blocks with group convs of a fixed group width and SE.
  * ``DenseNetSmall``: dense blocks whose layers concatenate their input with their output.
  * ``YoloC2fSmall``: a YOLOv8-style backbone of C2f blocks (``chunk`` into two halves, bottlenecks on
    the second, concat of everything) with a linear head for classification.

Shapes are never stored for ``forward`` (reshapes use -1 or the tensor's own sizes), so any width may
shrink under pruning and the batch stays dynamic in ONNX.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class DropPath(nn.Module):
    """Stochastic depth: in training, drop the whole residual branch of a sample with probability p."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (torchvision's ConvNeXt form)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: type | None = nn.ReLU):
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------------------- ViT (torch MHA)
class ViTMHA(nn.Module):
    """Patch embedding, class token + position embedding, ``nn.TransformerEncoder`` of pre-norm
    ``nn.TransformerEncoderLayer``s (torch's ``nn.MultiheadAttention`` inside), LayerNorm, linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, patch_size: int = 7,
                 dim: int = 32, depth: int = 2, heads: int = 4, mlp_ratio: float = 2.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        n_tokens = (image_size // patch_size) ** 2 + 1
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n_tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        # enable_nested_tensor only helps padded batches and warns with norm_first
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.classifier(self.norm(self.encoder(x))[:, 0])


# --------------------------------------------------------------------------------------------------- ConvNeXt
class ConvNeXtBlock(nn.Module):
    """depthwise 7x7 → LayerNorm (channels last) → Linear 4x → GELU → Linear → layer scale → drop path + input."""

    def __init__(self, dim: int, layer_scale: float = 1e-1, drop_path: float = 0.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), layer_scale))
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.fc2(self.act(self.fc1(self.norm(y)))).permute(0, 3, 1, 2)
        return x + self.drop_path(self.layer_scale * y)


class ConvNeXtSmall(nn.Module):
    """4x4 patchify stem + LayerNorm2d, two stages of ConvNeXt blocks with a LayerNorm2d + 2x2 conv
    downsample between them, global average pool, ``classifier = Sequential(LayerNorm2d, Flatten, Linear)``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                 widths: tuple[int, int] = (16, 32), depths: tuple[int, int] = (2, 1), drop_path: float = 0.1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 4, 4), LayerNorm2d(widths[0]))
        self.stage1 = nn.Sequential(*[ConvNeXtBlock(widths[0], drop_path=drop_path) for _ in range(depths[0])])
        self.downsample = nn.Sequential(LayerNorm2d(widths[0]), nn.Conv2d(widths[0], widths[1], 2, 2))
        self.stage2 = nn.Sequential(*[ConvNeXtBlock(widths[1], drop_path=drop_path) for _ in range(depths[1])])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(widths[1]), nn.Flatten(1), nn.Linear(widths[1], num_classes))

    def forward(self, x):
        x = self.stage2(self.downsample(self.stage1(self.stem(x))))
        return self.classifier(self.pool(x))


# ------------------------------------------------------------------------------------ MobileNetV3 / EfficientNet
class SqueezeExcite(nn.Module):
    """Global pool → 1x1 reduce → act → 1x1 expand → gate → scale the input channels."""

    def __init__(self, channels: int, reduced: int, act: type = nn.ReLU, gate: type = nn.Hardsigmoid):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = act()
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.gate = gate()

    def forward(self, x):
        s = self.gate(self.expand(self.act(self.reduce(F.adaptive_avg_pool2d(x, 1)))))
        return x * s


class MBConv(nn.Module):
    """1x1 expand → kxk depthwise → SE → 1x1 project; residual (with stochastic depth) when shapes match."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, act: type, se: bool,
                 drop_path: float = 0.0):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(cin, hidden, 1, act=act))
        layers.append(_conv_bn(hidden, hidden, k, stride, groups=hidden, act=act))
        if se:
            layers.append(SqueezeExcite(hidden, max(4, hidden // 4)))
        layers.append(_conv_bn(hidden, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        y = self.block(x)
        return x + self.drop_path(y) if self.use_residual else y


class MobileNetV3Small(nn.Module):
    """Hardswish stem, MBConv blocks mixing ReLU/Hardswish/SiLU and SE, 1x1 head conv, pool, and
    ``classifier = Sequential(Linear(c, hidden), Hardswish, Dropout, Linear(hidden, classes))``."""

    # (kernel, expansion, out channels, SE, activation, stride)
    SETTINGS = ((3, 1, 16, True, nn.ReLU, 2), (3, 4, 24, False, nn.ReLU, 2), (3, 3, 24, False, nn.ReLU, 1),
                (5, 4, 32, True, nn.Hardswish, 1), (3, 4, 32, True, nn.SiLU, 1))

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, stem_width: int = 16,
                 last_width: int = 96, hidden: int = 128, drop_path: float = 0.1):
        super().__init__()
        self.stem = _conv_bn(in_channels, stem_width, 3, 1, act=nn.Hardswish)
        blocks, cin = [], stem_width
        for k, t, c, se, act, s in self.SETTINGS:
            blocks.append(MBConv(cin, c, k, s, t, act, se, drop_path))
            cin = c
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_bn(cin, last_width, 1, act=nn.Hardswish)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last_width, hidden), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(self.pool(self.head(self.blocks(self.stem(x)))).flatten(1))


# ----------------------------------------------------------------------------------------------------- RegNet
class RegNetYBlock(nn.Module):
    """1x1 → 3x3 group conv (fixed group width) → SE → 1x1, plus a projected shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, group_width: int):
        super().__init__()
        if cout % group_width:
            raise ValueError(f"width {cout} is not a multiple of group_width {group_width}")
        self.a = _conv_bn(cin, cout, 1)
        self.b = _conv_bn(cout, cout, 3, stride, groups=cout // group_width)
        self.se = SqueezeExcite(cout, max(4, cin // 4), act=nn.ReLU, gate=nn.Sigmoid)
        self.c = _conv_bn(cout, cout, 1, act=None)
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout
                         else _conv_bn(cin, cout, 1, stride, act=None))
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.shortcut(x) + self.c(self.se(self.b(self.a(x)))))


class RegNetSmall(nn.Module):
    """Stem, two stages of RegNetY blocks with group convs (group width 8), pool, linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                 widths: tuple[int, int] = (16, 32), depths: tuple[int, int] = (1, 2), group_width: int = 8):
        super().__init__()
        self.stem = _conv_bn(in_channels, 16, 3, 2)
        blocks, cin = [], 16
        for w, d in zip(widths, depths, strict=True):
            for i in range(d):
                blocks.append(RegNetYBlock(cin, w, 2 if i == 0 else 1, group_width))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.blocks(self.stem(x))).flatten(1))


# --------------------------------------------------------------------------------------------------- DenseNet
class DenseLayer(nn.Module):
    """BN-ReLU-1x1 (bottleneck) → BN-ReLU-3x3 (growth); the output is concat(input, new features)."""

    def __init__(self, cin: int, growth: int, bottleneck: int = 2):
        super().__init__()
        self.net = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, bottleneck * growth, 1, bias=False),
                                 nn.BatchNorm2d(bottleneck * growth), nn.ReLU(),
                                 nn.Conv2d(bottleneck * growth, growth, 3, padding=1, bias=False))

    def forward(self, x):
        return torch.cat([x, self.net(x)], dim=1)


class DenseNetSmall(nn.Module):
    """Stem conv, dense blocks separated by BN-ReLU-1x1-avgpool transitions, final BN-ReLU, pool, linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, stem_width: int = 16,
                 growth: int = 8, layers: tuple[int, int] = (3, 3)):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, stem_width, 3, 2, 1, bias=False)]
        c = stem_width
        for i, n in enumerate(layers):
            for _ in range(n):
                mods.append(DenseLayer(c, growth))
                c += growth
            if i < len(layers) - 1:
                mods += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
                c //= 2
        mods += [nn.BatchNorm2d(c), nn.ReLU()]
        self.features = nn.Sequential(*mods)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


# ------------------------------------------------------------------------------------------------- YOLO C2f
class ConvBNSiLU(nn.Module):
    """Ultralytics' ``Conv``: conv (no bias) → BN → SiLU."""

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool = True):
        super().__init__()
        self.cv1 = ConvBNSiLU(c, c, 3)
        self.cv2 = ConvBNSiLU(c, c, 3)
        self.add = shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """YOLOv8's C2f: cv1 to 2c channels, chunk into two halves, n bottlenecks chained on the second half,
    concat of both halves and every bottleneck output, cv2 back to c2 channels.

    torch-pruning 1.6.1 mis-indexes the chunk (the halves are used apart): the pruner names cv1.conv
    and fails. ``split_free()`` returns the same function computed by two 1x1 convs (cv0 and cv1 each
    produce one half, as torch-pruning's own YOLOv8 example rewrites it), which prunes."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = ConvBNSiLU(c1, 2 * self.c, 1)
        self.cv2 = ConvBNSiLU((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))

    def split_free(self) -> "C2fTwoConvs":
        return C2fTwoConvs(self)


class C2fTwoConvs(nn.Module):
    """C2f with its chunked cv1 split into two convs (cv0: first half, cv1: second half): same outputs."""

    def __init__(self, c2f: C2f):
        super().__init__()
        c, conv = c2f.c, c2f.cv1
        self.cv0 = ConvBNSiLU(conv.conv.in_channels, c, 1)
        self.cv1 = ConvBNSiLU(conv.conv.in_channels, c, 1)
        with torch.no_grad():
            for half, part in ((self.cv0, slice(0, c)), (self.cv1, slice(c, 2 * c))):
                half.conv.weight.copy_(conv.conv.weight[part])
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    getattr(half.bn, attr).copy_(getattr(conv.bn, attr)[part])
                half.bn.eps = conv.bn.eps
        self.cv2, self.m = c2f.cv2, c2f.m

    def forward(self, x):
        y = [self.cv0(x), self.cv1(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class YoloC2fSmall(nn.Module):
    """Conv s2 → C2f → Conv s2 → C2f (a YOLOv8-n backbone in miniature), pool, linear head.
    ``split_free=True`` builds the C2f blocks with two convs instead of a chunk (see C2f)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                 widths: tuple[int, int] = (16, 32), n: int = 1, split_free: bool = False):
        super().__init__()
        blocks = [C2f(widths[0], widths[0], n), C2f(widths[1], widths[1], n)]
        if split_free:
            blocks = [b.split_free() for b in blocks]
        self.backbone = nn.Sequential(ConvBNSiLU(in_channels, widths[0], 3, 2), blocks[0],
                                      ConvBNSiLU(widths[0], widths[1], 3, 2), blocks[1])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(widths[1], num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.backbone(x)).flatten(1))


COVERAGE = {
    "vit_mha": ViTMHA,
    "convnext_small": ConvNeXtSmall,
    "mobilenetv3_small": MobileNetV3Small,
    "regnet_small": RegNetSmall,
    "densenet_small": DenseNetSmall,
    "yolo_c2f_small": YoloC2fSmall,
}
