"""ArcFace loss against an independent numpy computation (angles via arccos)."""
import numpy as np
import pytest
import torch

from steps.model import ArcFace


def numpy_arcface(emb, weight, labels, s, m):
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    w = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    cos = np.clip(e @ w.T, -1.0, 1.0)
    theta = np.arccos(cos)
    rows = np.arange(len(labels))
    t = theta[rows, labels]
    # cos(theta+m) while theta+m stays below pi; past it the linear fallback
    target = np.where(t + m < np.pi, np.cos(t + m), cos[rows, labels] - m * np.sin(m))
    logits = s * cos
    logits[rows, labels] = s * target
    logits -= logits.max(1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return -logp[rows, labels].mean(), logits


@pytest.mark.parametrize("s,m", [(30.0, 0.5), (64.0, 0.3), (10.0, 0.0)])
def test_loss_matches_numpy(s, m):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(8, 16))
    labels = rng.integers(0, 10, size=8)
    head = ArcFace(16, 10, scale=s, margin=m).double()
    weight = head.weight.detach().numpy()
    # rows 0 and 1 point almost away from their class centre: exercises the fallback branch
    emb[0] = -weight[labels[0]] + 1e-3 * rng.normal(size=16)
    emb[1] = -weight[labels[1]]
    # row 2 sits on its class centre: theta = 0
    emb[2] = 3 * weight[labels[2]]
    expected, _ = numpy_arcface(emb, weight, labels, s, m)
    got = head(torch.from_numpy(emb), torch.from_numpy(labels))
    assert got.item() == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_margin_only_touches_the_target_logit():
    rng = np.random.default_rng(1)
    emb, labels = rng.normal(size=(5, 8)), rng.integers(0, 10, size=5)
    head = ArcFace(8, 10, scale=30.0, margin=0.5).double()
    logits = head.logits(torch.from_numpy(emb), torch.from_numpy(labels)).detach().numpy()
    cos = head.cosine(torch.from_numpy(emb)).detach().numpy()
    rows = np.arange(5)
    mask = np.ones_like(cos, bool)
    mask[rows, labels] = False
    np.testing.assert_allclose(logits[mask], 30.0 * cos[mask], rtol=1e-12)
    theta = np.arccos(cos[rows, labels])
    np.testing.assert_allclose(logits[rows, labels], 30.0 * np.cos(theta + 0.5), rtol=1e-6, atol=1e-9)


def test_gradients_stay_finite_at_zero_and_pi():
    head = ArcFace(4, 3, scale=30.0, margin=0.5)
    w = head.weight.detach()
    emb = torch.stack([w[0], -w[1], w[2] + 1e-4]).clone().requires_grad_(True)
    loss = head(emb, torch.tensor([0, 1, 2]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()
