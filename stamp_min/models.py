"""Backbones with a feature/head split (DESIGN: models.py).

Every model built here is a `Classifier`:

    x (B, C, H, W) --normalise--> body --> z = features(x) (B, D) --head (Linear D->K)--> logits (B, K)

so that `model.head(model.features(x)) == model(x)`. The embedding z is what the prototypical
coreset (METHOD §1.5) averages into class prototypes; the head is one linear layer over all K
classes (class-incremental: argmax over every logit, no task id; METHOD §1.1).

Images arrive as they are stored in `data.Dataset`: uint8 in 0..255 (or float in 0..1). The
model itself scales and standardises them with the dataset's mean/std, so raw images can be kept
in a replay buffer and fed to the model without a separate transform.

`model.early_block` names the submodule after which MixStyle is inserted (METHOD §1.5: "after
an early block"); `model.early_layout` says whether that block's output is (B, C, H, W)
("nchw") or channels-last (B, H, W, C) ("nhwc", the Swin transformer).

Backbones:
- "cnn": the small 2-conv network the authors' code runs (conv5x5-pool-conv5x5-pool-fc512).
- "resnet18": torchvision's ResNet-18 adapted to 32x32 inputs (3x3 stride-1 stem, no max-pool),
  the usual CIFAR adaptation. The paper names ResNet-18.
- "swin_t": torchvision's Swin-T (named by the paper), stem adapted to `in_channels`.
"""

import torch
import torch.nn as nn

from . import UserError

MODELS = ("cnn", "resnet18", "swin_t")


class Classifier(nn.Module):
    def __init__(self, body, dim, num_classes, mean, std, early_block, early_layout="nchw"):
        super().__init__()
        # not persistent: the normalisation constants are not model weights, so they never
        # appear in a state_dict, an update Δ, or the bytes a client sends.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.body = body                       # (B, C, H, W) -> (B, dim)
        self.head = nn.Linear(dim, num_classes)
        self.early_block = early_block         # name of a submodule, for MixStyle
        self.early_layout = early_layout

    def features(self, x):
        """The embedding z = f(x), (B, C, H, W) -> (B, D)."""
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return self.body((x - self.mean) / self.std)

    def forward(self, x):
        return self.head(self.features(x))


def _cnn(in_channels, image_size, hidden=512):
    side = image_size // 4                     # two 2x2 max-pools
    body = nn.Sequential(
        nn.Sequential(nn.Conv2d(in_channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2)),  # early block
        nn.Sequential(nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Flatten(),
        nn.Linear(64 * side * side, hidden),
        nn.ReLU(),
    )
    return body, hidden, "body.0", "nchw"


def _resnet18(in_channels, image_size):
    import torchvision
    net = torchvision.models.resnet18(weights=None)
    # CIFAR-style stem: a 32x32 image would be 8x8 after the ImageNet stem's stride 4.
    net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()                     # the head lives in Classifier
    return net, 512, "body.layer1", "nchw"


def _swin_t(in_channels, image_size):
    import torchvision
    net = torchvision.models.swin_t(weights=None)
    if in_channels != 3:
        net.features[0][0] = nn.Conv2d(in_channels, 96, kernel_size=4, stride=4)
    net.head = nn.Identity()
    return net, 768, "body.features.1", "nhwc"


def build_model(name, num_classes, in_channels, image_size, mean=None, std=None):
    """A `Classifier` with backbone `name` for images (in_channels, image_size, image_size).

    mean/std: per-channel normalisation constants (the dataset's); default 0.5 / 0.5.
    """
    builders = {"cnn": _cnn, "resnet18": _resnet18, "swin_t": _swin_t}
    if name not in builders:
        raise UserError(f"model={name!r} is unknown; allowed: {', '.join(MODELS)}")
    if name == "cnn" and image_size < 4:
        raise UserError(f"image_size={image_size} is too small for the cnn; allowed: >= 4")
    mean = mean if mean is not None else (0.5,) * in_channels
    std = std if std is not None else (0.5,) * in_channels
    body, dim, early, layout = builders[name](in_channels, image_size)
    return Classifier(body, dim, num_classes, mean, std, early, layout)


def num_params(model):
    return sum(p.numel() for p in model.parameters())
