"""PyTorch models of the simulated cluster: logistic regression, MLP, small CNN."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

__all__ = ["MODELS", "init_parameters", "make_model"]

MODELS = ("logreg", "mlp", "cnn")


def make_model(name, input_shape, n_classes, *, hidden=64, channels=(16, 32)):
    """Build a classifier.

    Parameters
    ----------
    name : {"logreg", "mlp", "cnn"}
        ``"logreg"``: softmax regression; ``"mlp"``: one hidden ReLU layer;
        ``"cnn"``: two 3x3 convolution + ReLU + 2x2 max-pool blocks and a
        linear layer (image data only).
    input_shape : tuple of int
        Shape of one input, ``(d,)`` or ``(channels, height, width)``.
    n_classes : int
        Number of outputs.
    hidden : int, default=64
        Width of the MLP's hidden layer.
    channels : tuple of two int, default=(16, 32)
        Channels of the CNN's convolutions.

    Returns
    -------
    model : torch.nn.Module
        Its parameters still need :func:`init_parameters`.
    """
    d = math.prod(input_shape)
    if name == "logreg":
        return nn.Sequential(nn.Flatten(), nn.Linear(d, n_classes))
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(),
                             nn.Linear(hidden, n_classes))
    if name == "cnn":
        if len(input_shape) != 3 or min(input_shape[1:]) < 4:
            raise ValueError(
                f"model 'cnn' needs images of shape (channels, height >= 4, width >= 4): "
                f"got inputs of shape {tuple(input_shape)}; use 'logreg' or 'mlp' for them"
            )
        c, h, w = input_shape
        c1, c2 = channels
        return nn.Sequential(
            nn.Conv2d(c, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(c2 * (h // 4) * (w // 4), n_classes),
        )
    raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")


def init_parameters(model, rng):
    """Draw every weight and bias from U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    This is PyTorch's default initialisation of linear and convolution
    layers, drawn from a NumPy generator instead of torch's global one so that
    a seed fixes it regardless of what else used torch's RNG.

    Parameters
    ----------
    model : torch.nn.Module
        Model built by :func:`make_model`; changed in place.
    rng : numpy.random.Generator or int
        Source of randomness.

    Returns
    -------
    model : torch.nn.Module
    """
    rng = np.random.default_rng(rng)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                for param in (module.weight, module.bias):
                    if param is not None:
                        values = rng.uniform(-bound, bound, size=tuple(param.shape))
                        param.copy_(torch.from_numpy(values))
    return model
