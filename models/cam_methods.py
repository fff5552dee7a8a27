"""Attribution maths on captured token activations. No model knowledge lives here.

Every function takes activations and the gradients of a target with respect to them, with
any leading batch dimensions, and returns one non-negative relevance value per token.
"""

from __future__ import annotations

import torch


def grad_cam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., 2017) for transformer tokens.

    Channel weights are the gradients averaged over tokens; the map is the ReLU of the
    weighted sum of channels.

    Args:
        activations: (..., tokens, channels) patch tokens of one layer.
        gradients: same shape, d target / d activations.
    Returns:
        (..., tokens) relevance, >= 0.
    """
    channel_weights = gradients.mean(dim=-2, keepdim=True)  # (..., 1, channels)
    return torch.relu((channel_weights * activations).sum(dim=-1))


def hires_cam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """HiResCAM (Draelos & Carin, 2020): element-wise gradient x activation, summed over channels.

    Unlike Grad-CAM it keeps each token's own gradient, so it stays faithful to the model
    where token gradients disagree with their average.

    Args:
        activations: (..., tokens, channels) patch tokens of one layer.
        gradients: same shape.
    Returns:
        (..., tokens) relevance, >= 0.
    """
    return torch.relu((gradients * activations).sum(dim=-1))


def gradient_attention(attention: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Gradient-weighted attention (as LAVIS explains BLIP's image-text matching).

    Args:
        attention: (..., heads, keys) attention probabilities of one query row.
        gradients: same shape.
    Returns:
        (..., keys) relevance: ReLU(gradient x attention) averaged over heads, >= 0.
    """
    return torch.relu(gradients * attention).mean(dim=-2)


def softmax_gradient_attention(attention: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Gradient x attention that also reads the gradient through the softmax.

    A row's attention sums to one, so a key gains attention only by taking it from the others.
    The gradient at key k's score (before the softmax) says so: A_k (g_k - g_mean), where g_mean
    = sum_j A_j g_j is the gradient of what the row reads on average. It credits the keys that
    serve the target better than the row's average, and drops what every key the row reads
    serves alike (on the BLIP shapes demo: where the next object is, which the neighbour the row
    also reads tells). Its ReLU zeroes every key below the mean, though, and leaves their order
    to ties; the mean with plain gradient x attention orders them.

    Args:
        attention: (..., heads, keys) attention probabilities of one query row, over all its keys.
        gradients: same shape, d target / d probabilities.
    Returns:
        (..., keys) relevance: (ReLU(A g) + ReLU(A (g - g_mean))) / 2, averaged over heads, >= 0.
    """
    mean_gradient = (attention * gradients).sum(dim=-1, keepdim=True)
    score_gradient = attention * (gradients - mean_gradient)
    return (gradient_attention(attention, gradients) + torch.relu(score_gradient).mean(dim=-2)) / 2


VISION_LAYER_METHODS = {"gradcam": grad_cam, "hirescam": hires_cam}
