"""Attribution maths of models.cam_methods, checked against autograd."""

import torch

from models.cam_methods import gradient_attention, softmax_gradient_attention


def test_the_softmax_term_is_the_gradient_at_the_attention_scores():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 7, generator=generator, dtype=torch.float64, requires_grad=True)  # (rows, heads, keys)
    attention = scores.softmax(dim=-1)
    readout = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    target = torch.tanh(attention @ readout).sum()  # nonlinear in the probabilities
    at_probabilities, at_scores = torch.autograd.grad(target, (attention, scores))
    relevance = softmax_gradient_attention(attention.detach(), at_probabilities)
    expected = (gradient_attention(attention.detach(), at_probabilities) + torch.relu(at_scores).mean(dim=-2)) / 2
    torch.testing.assert_close(relevance, expected)
    assert relevance.shape == (2, 7) and (relevance >= 0).all()


def test_a_gradient_shared_by_every_key_gets_only_the_plain_half():
    attention = torch.tensor([[0.5, 0.3, 0.2]])  # one head
    shared = torch.full((1, 3), 2.0)  # each key serves the target alike: no key beats the mean
    torch.testing.assert_close(softmax_gradient_attention(attention, shared), gradient_attention(attention, shared) / 2)
