"""models.py: every backbone splits into features + a linear head, adapted as documented."""

import pytest
import torch
import torchvision

from stamp_min import UserError
from stamp_min.models import build_model


@pytest.mark.parametrize("name, c, size", [("cnn", 1, 8), ("cnn", 3, 32), ("resnet18", 3, 32), ("swin_t", 3, 32), ("resnet18", 1, 8)])
def test_head_of_features_is_the_model(name, c, size):
    torch.manual_seed(0)
    m = build_model(name, 7, c, size).eval()
    x = torch.randint(0, 256, (3, c, size, size), dtype=torch.uint8)
    with torch.no_grad():
        z = m.features(x)
        assert z.shape == (3, m.head.in_features)
        assert torch.equal(m.head(z), m(x))
        assert m(x).shape == (3, 7)
        # uint8 images and the same images on the 0..1 scale are the same input
        assert torch.allclose(m(x), m(x.float() / 255), atol=1e-5)
    assert isinstance(m.get_submodule(m.early_block), torch.nn.Module)


def test_normalisation_uses_the_dataset_statistics():
    m = build_model("cnn", 2, 1, 8, mean=(0.2,), std=(0.5,)).eval()
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(m.features(x), m.body((x - 0.2) / 0.5))
    assert "mean" not in m.state_dict()          # not a weight: never sent, never averaged


def test_resnet18_is_torchvisions_with_the_cifar_stem():
    m = build_model("resnet18", 100, 3, 32)
    ref = torchvision.models.resnet18(num_classes=100)
    assert m.body.conv1.kernel_size == (3, 3) and m.body.conv1.stride == (1, 1)
    assert isinstance(m.body.maxpool, torch.nn.Identity)
    ours = sum(p.numel() for p in m.parameters())
    theirs = sum(p.numel() for p in ref.parameters())
    assert theirs - ours == 64 * 3 * (7 * 7 - 3 * 3)         # only the stem differs
    seen = {}
    m.get_submodule("body.layer1").register_forward_hook(lambda mod, i, o: seen.update(shape=o.shape))
    m.eval()(torch.zeros(1, 3, 32, 32))
    assert seen["shape"] == (1, 64, 32, 32)                  # no resolution lost in the stem


def test_swin_stem_follows_in_channels_and_layout_is_nhwc():
    m = build_model("swin_t", 5, 1, 32).eval()
    assert m.body.features[0][0].in_channels == 1 and m.early_layout == "nhwc"
    seen = {}
    m.get_submodule(m.early_block).register_forward_hook(lambda mod, i, o: seen.update(shape=o.shape))
    m(torch.zeros(1, 1, 32, 32))
    assert seen["shape"] == (1, 8, 8, 96)


def test_unknown_model():
    with pytest.raises(UserError, match="model='vit'"):
        build_model("vit", 10, 3, 32)
