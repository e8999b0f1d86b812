"""PyTorch models of the simulated cluster: logistic regression, MLP, small CNNs."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["MODELS", "init_parameters", "make_model"]

# The names are read by the configuration, which loads without torch: torch
# is imported inside the functions that build and initialise models.
MODELS = ("logreg", "mlp", "cnn", "cnn1d")


def make_model(name, input_shape, n_classes, *, hidden=64, channels=(16, 32)):
    """Build a classifier.

    Parameters
    ----------
    name : {"logreg", "mlp", "cnn", "cnn1d"}
        ``"logreg"``: softmax regression; ``"mlp"``: one hidden ReLU layer;
        ``"cnn"``: two 3x3 convolution + ReLU + 2x2 max-pool blocks and a
        linear layer (image data only); ``"cnn1d"``: one 1-D convolution of
        stride 2 and padding 1 + ReLU per entry of ``channels`` (kernel 5,
        then 3) and a linear layer (sequence data, ``(channels, length)``;
        with ``channels=(25, 25, 25)`` it has the shape of the MNIST-1D
        paper's CNN, Greydanus 2020).
    input_shape : tuple of int
        Shape of one input, ``(d,)``, ``(channels, length)`` or
        ``(channels, height, width)``.
    n_classes : int
        Number of outputs.
    hidden : int, default=64
        Width of the MLP's hidden layer.
    channels : tuple of int, default=(16, 32)
        Channels of the CNN's convolutions (two for ``"cnn"``, one or more
        for ``"cnn1d"``).

    Returns
    -------
    model : torch.nn.Module
        Its parameters still need :func:`init_parameters`.
    """
    from torch import nn

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
    if name == "cnn1d":
        return _cnn1d(input_shape, n_classes, channels)
    raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")


def _cnn1d(input_shape, n_classes, channels):
    from torch import nn

    if len(input_shape) != 2:
        raise ValueError(
            f"model 'cnn1d' needs sequences of shape (channels, length): got inputs of shape "
            f"{tuple(input_shape)}; use 'cnn' for images, 'logreg' or 'mlp' for tabular data"
        )
    if len(channels) < 1:
        raise ValueError("model 'cnn1d' needs at least one entry in channels")
    c, length = input_shape
    layers = []
    for i, out in enumerate(channels):
        kernel = 5 if i == 0 else 3
        layers += [nn.Conv1d(c, int(out), kernel, stride=2, padding=1), nn.ReLU()]
        length = (length + 2 - kernel) // 2 + 1
        c = int(out)
        if length < 1:
            raise ValueError(
                f"model 'cnn1d': inputs of length {input_shape[1]} are too short for "
                f"{len(channels)} convolutions of stride 2; use fewer channels entries"
            )
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * length, n_classes))


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
    import torch
    from torch import nn

    rng = np.random.default_rng(rng)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                for param in (module.weight, module.bias):
                    if param is not None:
                        values = rng.uniform(-bound, bound, size=tuple(param.shape))
                        param.copy_(torch.from_numpy(values))
    return model
