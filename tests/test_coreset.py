"""Reference tests for stamp_min/coreset.py (METHOD §1.5): selection against independent
re-implementations, the buffer against hand-counted bytes and a save/load round trip, MixStyle
against statistics and gradients computed by hand."""

import pytest
import torch
import torch.nn as nn

from stamp_min import UserError
from stamp_min.coreset import (SELECTORS, Buffer, MixStyle, embed, mixstyle, prototypes,
                               select_k_center, select_nearest, select_prototypical, select_prototypical_l2, select_random,
                               task_key)
from stamp_min.models import build_model


def mean_dist(z, idx):
    """|| mean of the selected embeddings - prototype ||, in float64."""
    z = z.double()
    return (z[idx].mean(0) - z.mean(0)).norm().item()


# ---------------------------------------------------------------------------------------------
# prototypes and selection


def test_prototypes_match_a_loop():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(50, 7, generator=g), torch.randint(0, 5, (50,), generator=g)
    y[y == 3] = 9                                           # class ids need not be contiguous
    classes, protos = prototypes(z, y)
    assert classes.tolist() == sorted(set(y.tolist()))
    for c, p in zip(classes, protos):
        assert torch.allclose(p, z[y == c].mean(0), atol=1e-6)


def herding_reference(z, m):
    """Independent greedy herding: at each step try every remaining candidate explicitly."""
    z = z.double()
    p, picked = z.mean(0), []
    for _ in range(m):
        best, best_d = None, float("inf")
        for i in range(len(z)):
            if i in picked:
                continue
            d = (torch.stack([z[j] for j in picked + [i]]).mean(0) - p).norm().item()
            if d < best_d - 1e-12:                          # strict: the lowest index wins ties
                best, best_d = i, d
        picked.append(best)
    return picked


def test_l2_herding_is_herding_on_unit_vectors_and_can_differ():
    """iCaRL's variant: the reference greedy on z_i / ||z_i||; embeddings of very different norms
    make it pick otherwise than herding on the raw embeddings."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(30, 4, generator=g) * torch.linspace(0.1, 10, 30)[:, None]
    unit = z.double() / z.double().norm(dim=1, keepdim=True)
    assert select_prototypical_l2(z, 6).tolist() == herding_reference(unit, 6)
    assert select_prototypical_l2(z, 6).tolist() != select_prototypical(z, 6).tolist()


@pytest.mark.parametrize("seed", range(5))
def test_herding_equals_brute_force_greedy(seed):
    z = torch.randn(12, 4, generator=torch.Generator().manual_seed(seed))
    for m in (1, 3, 7, 11):
        assert select_prototypical(z, m).tolist() == herding_reference(z, m)


@pytest.mark.parametrize("seed", range(5))
def test_herding_first_pick_is_nearest_to_prototype(seed):
    z = torch.randn(40, 8, generator=torch.Generator().manual_seed(seed))
    nearest = (z - z.mean(0)).norm(dim=1).argmin().item()
    assert select_prototypical(z, 5)[0].item() == nearest
    assert select_nearest(z, 1).item() == nearest


def test_herding_beats_nearest_on_a_constructed_case():
    # 1-D, prototype 0: the two nearest (0.03, 0.10) sit on the same side, herding balances them.
    z = torch.tensor([[0.10], [0.11], [-0.12], [-0.12], [0.03]])
    assert abs(z.mean().item()) < 1e-7
    assert select_nearest(z, 2).tolist() == [4, 0]
    assert select_prototypical(z, 2).tolist() == [4, 2]
    assert mean_dist(z, select_prototypical(z, 2)) < mean_dist(z, select_nearest(z, 2)) - 0.01
    for m in range(1, len(z) + 1):                          # and never worse at any m
        assert mean_dist(z, select_prototypical(z, m)) <= mean_dist(z, select_nearest(z, m)) + 1e-12


def test_herding_beats_random_and_nearest_on_average():
    h, r, n = [], [], []
    for seed in range(20):
        z = torch.randn(100, 16, generator=torch.Generator().manual_seed(seed))
        z = z * torch.linspace(0.2, 3, 16)                 # anisotropic, like real embeddings
        h.append(mean_dist(z, select_prototypical(z, 10)))
        r.append(mean_dist(z, select_random(z, 10, seed=seed)))
        n.append(mean_dist(z, select_nearest(z, 10)))
    mean = lambda v: sum(v) / len(v)
    assert mean(h) < 0.5 * mean(r) and mean(h) < mean(n)
    assert sum(a < b for a, b in zip(h, r)) >= 18             # almost every single draw too


def test_nearest_and_random_against_references():
    z = torch.randn(30, 5, generator=torch.Generator().manual_seed(1))
    d = (z.double() - z.double().mean(0)).norm(dim=1)
    assert select_nearest(z, 6).tolist() == sorted(range(30), key=lambda i: d[i].item())[:6]
    a, b = select_random(z, 10, seed=3), select_random(z, 10, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, select_random(z, 10, seed=4))
    assert len(set(a.tolist())) == 10 and 0 <= a.min() and a.max() < 30


def test_k_center_against_its_definition():
    """Greedy k-center from its definition, written independently: the first pick is the point nearest the
    mean; each next pick maximises, over the points not picked, the distance to the nearest pick (lowest index
    on ties). On points on a line by hand, then on random points against the brute-force loop."""
    z = torch.tensor([[0.0], [1.0], [2.0], [10.0]])    # mean 3.25: 2 first; 10 is farthest; then 0 (2 away) before 1
    assert select_k_center(z, 3).tolist() == [2, 3, 0] and select_k_center(z, 1).tolist() == [2]
    z = torch.randn(40, 7, generator=torch.Generator().manual_seed(2)).double()
    centre = (z - z.mean(0)).norm(dim=1)
    picks = [min(range(40), key=lambda i: (centre[i].item(), i))]
    while len(picks) < 12:
        far = lambda i: min((z[i] - z[j]).norm().item() for j in picks)     # noqa: E731
        picks.append(max((i for i in range(40) if i not in picks), key=lambda i: (far(i), -i)))
    assert select_k_center(z, 12).tolist() == picks
    covered = lambda idx: max(min((z[i] - z[j]).norm().item() for j in idx) for i in range(40))   # noqa: E731
    assert covered(picks) < covered(list(range(12)))     # it covers the class better than the first 12 images


@pytest.mark.parametrize("rule", list(SELECTORS))
def test_one_signature_and_m_at_least_n_gives_all(rule):
    z = torch.randn(6, 3)
    for m in (6, 10):      # every image; k_center keeps its pick order (as issue 25's search ran it), the rest index order
        got = SELECTORS[rule](z, m, seed=0).tolist()
        assert (sorted(got) if rule == "k_center" else got) == list(range(6))
    idx = SELECTORS[rule](z, 4, seed=0)
    assert idx.dtype == torch.long and idx.shape == (4,) and len(set(idx.tolist())) == 4


# ---------------------------------------------------------------------------------------------
# the buffer


def digits_like(n_per_class=13, classes=range(10), seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([c for c in classes for _ in range(n_per_class)])
    x = torch.randint(0, 256, (len(y), 1, 8, 8), dtype=torch.uint8, generator=g)
    return x, y


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return build_model("cnn", num_classes=10, in_channels=1, image_size=8)


@pytest.mark.parametrize("rule", list(SELECTORS))
def test_buffer_stores_the_rule_selection_m_per_class(cnn, rule):
    x, y = digits_like()
    cnn.train()
    buf = Buffer(5, rule=rule, seed=7)
    assert buf.add_task(cnn, x, y, classes=[2, 0, 1], batch_size=16) == (0, 1, 2)
    assert cnn.training                                     # training flag restored
    cnn.eval()
    with torch.no_grad():
        z = cnn.features(x)                                 # reference features, computed here
    (key, bx, by), = list(buf)
    assert key == (0, 1, 2) and bx.dtype == torch.uint8 and by.dtype == torch.int64
    for c in key:
        rows = (y == c).nonzero().squeeze(1)
        want = x[rows[SELECTORS[rule](z[rows], 5, seed=7 + c)]]
        assert torch.equal(bx[by == c], want)               # exactly the selected raw images


def test_buffer_bounds_bytes_and_no_duplicate_class_sets(cnn):
    x, y = digits_like()
    buf = Buffer(5)
    buf.add_task(cnn, x[y < 3], y[y < 3])                   # task (0, 1, 2)
    few = (y == 3).nonzero().squeeze(1)[:2]                 # class 3 has only 2 images here
    xs, ys = torch.cat([x[few], x[(y == 4)]]), torch.cat([y[few], y[y == 4]])
    buf.add_task(cnn, xs, ys, classes=(4, 3))               # task (3, 4)
    before = [(k, bx.clone(), by.clone()) for k, bx, by in buf]
    x2, y2 = digits_like(seed=1)                            # the same tasks recur, new images
    buf.add_task(cnn, x2[y2 < 3], y2[y2 < 3], classes={0, 1, 2})
    buf.add_task(cnn, x2, y2, classes=[3, 4])
    after = list(buf)
    assert [k for k, _, _ in after] == [(0, 1, 2), (3, 4)] and len(buf) == 2
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(before, after))
    buf.add_task(cnn, x2, y2, classes=[2, 5])               # overlapping set: class 2 kept once
    counts = torch.bincount(torch.cat([by for _, _, by in buf]), minlength=10)
    assert counts.tolist() == [5, 5, 5, 2, 5, 5, 0, 0, 0, 0]
    assert (2, 5) in buf and (5, 2) in buf and [2] not in buf
    assert buf.classes() == {0, 1, 2, 3, 4, 5}
    n_images = counts.sum().item()
    assert buf.nbytes == n_images * (1 * 8 * 8 * 1 + 8)     # uint8 pixels + one int64 label each
    assert buf.nbytes == sum(bx.element_size() * bx.numel() + by.element_size() * by.numel()
                             for _, bx, by in buf)


def test_buffer_round_trip_through_torch_save(cnn, tmp_path):
    x, y = digits_like()
    buf = Buffer(4, rule="random", seed=3)
    buf.add_task(cnn, x[y < 2], y[y < 2])
    buf.add_task(cnn, x[y >= 7], y[y >= 7])
    torch.save(buf.state_dict(), tmp_path / "buffer.pt")
    back = Buffer(1)
    back.load_state_dict(torch.load(tmp_path / "buffer.pt", weights_only=True))
    assert (back.m, back.rule, back.seed, back.nbytes) == (4, "random", 3, buf.nbytes)
    for (k1, x1, y1), (k2, x2, y2) in zip(buf, back, strict=True):
        assert k1 == k2 and x1.dtype == x2.dtype and y1.dtype == y2.dtype
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_buffer_keeps_float_images_and_rejects_bad_input(cnn):
    x, y = digits_like(n_per_class=3, classes=[0, 1])
    buf = Buffer(2)
    buf.add_task(cnn, x.float() / 255, y)
    assert next(iter(buf))[1].dtype == torch.float32
    assert task_key([3, 1, 1]) == (1, 3)
    with pytest.raises(UserError, match="rule"):
        Buffer(2, rule="herd")
    with pytest.raises(UserError, match="m_per_class"):
        Buffer(0)


def test_embed_batches_equal_one_pass(cnn):
    x, _ = digits_like()
    cnn.eval()
    with torch.no_grad():
        assert torch.allclose(embed(cnn, x, batch_size=7), cnn.features(x), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# MixStyle


def by_hand_stats(x):
    """Per-instance per-channel mean and biased variance with explicit loops, float64."""
    B, C = x.shape[:2]
    mu, var = torch.zeros(B, C, dtype=torch.float64), torch.zeros(B, C, dtype=torch.float64)
    for b in range(B):
        for c in range(C):
            v = x[b, c].double().flatten()
            mu[b, c] = v.sum() / len(v)
            var[b, c] = ((v - mu[b, c]) ** 2).sum() / len(v)
    return mu, var


def test_mixstyle_identity_in_eval_mode_and_when_p_is_zero():
    x = torch.randn(4, 3, 5, 5)
    ms = MixStyle(p=1.0).eval()
    assert ms(x) is x
    assert MixStyle(p=0.0).train()(x) is x
    assert not torch.allclose(MixStyle(p=1.0).train()(x), x)


def test_mixstyle_lambda_one_returns_input():
    x = torch.randn(4, 3, 6, 5) * 3 + 1
    out = MixStyle().mix(x, torch.tensor([2, 3, 1, 0]), 1.0)
    assert torch.allclose(out, x, atol=1e-5)


@pytest.mark.parametrize("eps", [0.0, 1e-6, 1e-2])
def test_mixstyle_output_statistics_equal_mixed_statistics(eps):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 3, 4, 6, generator=g) * torch.rand(5, 3, 1, 1, generator=g) * 4
         + torch.randn(5, 3, 1, 1, generator=g)).double()
    perm, lam = torch.tensor([3, 0, 4, 1, 2]), torch.tensor([0.0, 0.3, 0.5, 0.9, 1.0])
    out = MixStyle(eps=eps).mix(x, perm, lam)
    mu, var = by_hand_stats(x)
    sig = (var + eps).sqrt()
    l = lam.double()[:, None]
    mu_mix, sig_mix = l * mu + (1 - l) * mu[perm], l * sig + (1 - l) * sig[perm]
    out_mu, out_var = by_hand_stats(out)
    assert torch.allclose(out_mu, mu_mix, atol=1e-10)
    # std of out = σ_mix · sqrt(var) / sqrt(var + eps): exactly σ_mix when eps = 0
    assert torch.allclose(out_var.sqrt(), sig_mix * (var / (var + eps)).sqrt(), atol=1e-10)


def test_mixstyle_gradients_flow_to_the_input():
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    perm, lam = torch.tensor([1, 2, 3, 0]), torch.tensor([0.2, 0.7, 0.0, 0.4])
    ms = MixStyle()
    ms.mix(x, perm, lam).sum().backward()
    # detached statistics: d out / d x = σ_mix / σ, elementwise
    mu, var = by_hand_stats(x.detach())
    sig = (var + 1e-6).sqrt()
    l = lam.double()[:, None]
    expect = (l * sig + (1 - l) * sig[perm]) / sig
    assert torch.allclose(x.grad, expect[:, :, None, None].expand_as(x), atol=1e-10)
    # undetached statistics: autograd agrees with finite differences
    full = MixStyle(detach=False)
    xx = x.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: full.mix(t, perm, lam), (xx,))


@pytest.mark.parametrize("shape", [(2, 1, 1, 1), (3, 4, 5, 7), (8, 16, 2, 2), (1, 3, 4, 4)])
def test_mixstyle_shapes_preserved_and_finite(shape):
    x = torch.randn(shape)
    out = MixStyle(p=1.0).train()(x)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()


def test_mixstyle_generator_makes_it_reproducible_and_p_is_a_probability():
    x = torch.randn(6, 3, 4, 4)
    a = MixStyle(p=1.0, generator=torch.Generator().manual_seed(5))(x)
    b = MixStyle(p=1.0, generator=torch.Generator().manual_seed(5))(x)
    assert torch.equal(a, b)
    ms = MixStyle(p=0.5, generator=torch.Generator().manual_seed(0))
    applied = sum(ms(x) is not x for _ in range(400))
    assert 150 < applied < 250                              # Binomial(400, 0.5): ±5 std


# ---------------------------------------------------------------------------------------------
# inserting MixStyle into a model


def test_mixstyle_context_manager_on_the_cnn_is_exact(cnn):
    x = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    block = cnn.get_submodule(cnn.early_block)
    cnn.train()
    plain = cnn(x)
    with mixstyle(cnn, MixStyle(p=1.0, generator=torch.Generator().manual_seed(1))) as ms:
        assert isinstance(ms, MixStyle) and len(block._forward_hooks) == 1
        hooked = cnn(x)
        cnn.eval()
        assert torch.equal(cnn(x), plain)                   # eval mode: no mixing
        cnn.train()
    # reference: run the body by hand with MixStyle after body.0, same random draws
    ref_ms = MixStyle(p=1.0, generator=torch.Generator().manual_seed(1))
    h = (x.float() / 255 - cnn.mean) / cnn.std
    h = ref_ms(cnn.body[0](h))
    for layer in cnn.body[1:]:
        h = layer(h)
    assert torch.allclose(hooked, cnn.head(h), atol=1e-6) and not torch.allclose(hooked, plain)
    assert len(block._forward_hooks) == 0 and torch.equal(cnn(x), plain)


def test_mixstyle_hook_removed_on_exception(cnn):
    block = cnn.get_submodule(cnn.early_block)
    with pytest.raises(RuntimeError):
        with mixstyle(cnn):
            raise RuntimeError("boom")
    assert len(block._forward_hooks) == 0


def test_mixstyle_off_by_hand_with_ms_eval(cnn):
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    cnn.train()
    plain = cnn(x)
    with mixstyle(cnn, MixStyle(p=1.0).eval()):
        assert torch.equal(cnn(x), plain)                   # model in train mode, ms off


class Recorder(MixStyle):
    def forward(self, x):
        self.seen = x.shape
        return super().forward(x)


def test_mixstyle_context_manager_on_resnet18():
    torch.manual_seed(0)
    net = build_model("resnet18", num_classes=10, in_channels=3, image_size=8).train()
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    plain = net(x)
    with mixstyle(net, Recorder(p=1.0, generator=torch.Generator().manual_seed(0))) as ms:
        mixed = net(x)
    assert ms.seen == (4, 64, 8, 8)                         # after layer1: (B, 64, H, W)
    assert not torch.allclose(mixed, plain)
    assert len(net.get_submodule(net.early_block)._forward_hooks) == 0
    assert torch.allclose(net(x), plain, atol=1e-5)


def test_mixstyle_nhwc_layout_is_permuted_and_back():
    class Toy(nn.Module):
        early_block, early_layout = "block", "nhwc"

        def __init__(self):
            super().__init__()
            self.block = nn.Linear(2, 3)                     # (B, H, W, 2) -> (B, H, W, 3)

        def forward(self, x):
            return self.block(x)

    toy = Toy().train()
    x = torch.randn(5, 4, 6, 2)
    with mixstyle(toy, MixStyle(p=1.0, generator=torch.Generator().manual_seed(2))):
        out = toy(x)
    ref = MixStyle(p=1.0, generator=torch.Generator().manual_seed(2))
    want = ref(toy.block(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)   # stats over (H, W)
    assert out.shape == (5, 4, 6, 3) and torch.allclose(out, want, atol=1e-6)


def test_mixstyle_context_manager_on_swin_t():
    torch.manual_seed(0)
    net = build_model("swin_t", num_classes=10, in_channels=3, image_size=32).train()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with mixstyle(net, Recorder(p=1.0)) as ms:
        out = net(x)
    assert ms.seen == (2, 96, 8, 8) and out.shape == (2, 10)   # NCHW view of a (B, 8, 8, 96) map
    assert len(net.get_submodule(net.early_block)._forward_hooks) == 0
