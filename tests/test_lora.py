"""LoRA layers (stamp_min/lora.py): exact references on tiny models."""

import math

import pytest
import torch
import torch.nn as nn

from stamp_min import UserError
from stamp_min.lora import (LoRALinear, fold_into_base, get_lora, inject_lora, lora_modules, lora_shapes,
                            merge_lora, set_lora, unmerge_lora)
from stamp_min.models import build_model


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def randomise_B(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.B.copy_(torch.randn(m.B.shape, generator=g))


def test_fresh_injection_computes_the_base_model_exactly():
    base, x = mlp(), torch.randn(7, 6)
    ref = base(x)
    names = inject_lora(base, "*", r=2, alpha=4, dropout=0.5)
    base.eval()
    assert names == ["0", "2", "4"]
    assert torch.equal(base(x), ref)                       # B = 0: bitwise the base output
    cnn = build_model("cnn", 10, 1, 8)
    xi = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    ref = cnn(xi)
    inject_lora(cnn, ["body.3", "head"], r=4, alpha=8)
    assert torch.equal(cnn(xi), ref)


def test_conventions_init_shapes_and_scale():
    layer = LoRALinear(nn.Linear(300, 20), r=8, alpha=16)
    assert layer.A.shape == (8, 300) and layer.B.shape == (20, 8)
    assert layer.scale == 2.0 and torch.count_nonzero(layer.B) == 0
    bound = 1 / math.sqrt(300)                             # Kaiming-uniform with a=√5, like nn.Linear
    assert layer.A.abs().max() <= bound and layer.A.abs().max() > 0.9 * bound


def test_forward_is_base_plus_scaled_low_rank_product():
    model = mlp().double()
    inject_lora(model, "*", r=2, alpha=3)
    randomise_B(model)
    x = torch.randn(5, 6, dtype=torch.float64)
    m = lora_modules(model)["0"]
    W = m.base.weight + m.scale * m.B @ m.A
    torch.testing.assert_close(m(x), x @ W.T + m.base.bias, rtol=0, atol=1e-12)


def test_merge_then_forward_equals_unmerged_forward():
    model = mlp()
    inject_lora(model, "*", r=2, alpha=4)
    randomise_B(model)
    x = torch.randn(9, 6)
    W0 = {n: m.base.weight.clone() for n, m in lora_modules(model).items()}
    y = model(x)
    merge_lora(model)
    assert all(m.merged for m in lora_modules(model).values())
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)
    unmerge_lora(model)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)
    for n, m in lora_modules(model).items():
        torch.testing.assert_close(m.base.weight, W0[n], rtol=0, atol=1e-6)


def test_only_A_B_and_chosen_heads_get_gradients():
    model = mlp()
    inject_lora(model, ["0", "2"], r=2, alpha=2, trainable=["4"])   # layer 4 is a plain, trainable head
    randomise_B(model)
    model(torch.randn(4, 6)).sum().backward()
    for name, p in model.named_parameters():
        learns = name.endswith((".A", ".B")) or name.startswith("4.")
        assert p.requires_grad == learns, name
        assert (p.grad is not None) == learns, name
    # a `trainable` pattern that matches an adapted layer must not unfreeze its W0
    model = mlp()
    inject_lora(model, "*", r=2, alpha=2, trainable="*")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"{i}.{f}" for i in (0, 2, 4) for f in "AB"}
    with pytest.raises(UserError):                         # the adapted layers are no nn.Linear any more
        inject_lora(model, "*", r=2, alpha=2)


def test_get_set_roundtrip_and_fold_into_base():
    model = mlp()
    inject_lora(model, "*", r=2, alpha=4)
    randomise_B(model)
    f = get_lora(model)
    g = {n: (A + 1, B - 1) for n, (A, B) in f.items()}
    set_lora(model, g)
    assert all(torch.equal(get_lora(model)[n][0], g[n][0]) for n in g)
    assert lora_shapes(model) == {"0": (5, 6, 2), "2": (4, 5, 2), "4": (3, 4, 2)}
    delta = torch.randn(5, 6)
    W = lora_modules(model)["0"].base.weight.clone()
    fold_into_base(model, {"0": delta})
    torch.testing.assert_close(lora_modules(model)["0"].base.weight, W + 2.0 * delta)
    merge_lora(model)
    with pytest.raises(RuntimeError):
        set_lora(model, g)
    with pytest.raises(KeyError):
        set_lora(mlp(), g)


def test_bad_targets_and_rank_are_user_errors():
    with pytest.raises(UserError, match="targets="):
        inject_lora(mlp(), "nothing*", r=2, alpha=2)
    with pytest.raises(UserError, match="rank=0"):
        inject_lora(mlp(), "*", r=0, alpha=2)
