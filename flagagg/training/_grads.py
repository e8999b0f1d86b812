"""Every worker's minibatch gradient, for one run or several runs in lockstep.

A round needs the gradient of each of the p workers' mean losses at the
shared parameters. :func:`torch.func.vmap` of :func:`torch.func.grad` does
that generically, but on a CPU core it turns every convolution into a
grouped one and pays functorch's dispatch on every call; for the small
models of the simulator that is most of a round's time.

:class:`GradientEngine` computes the same gradients for the models
:func:`~flagagg.training._models.make_model` builds from Linear, Conv1d,
ReLU and Flatten layers (``logreg``, ``mlp``, ``cnn1d``) with a hand-written
forward and backward pass made of matrix products: the workers share the
parameters, so a round is one batch of ``p * B`` samples, and each worker's
weight gradient is the product of its own samples' output gradients and
layer inputs (the per-example gradient identity, Goodfellow 2015).
Convolutions are im2col products in a channels-last layout, so that no
activation is transposed. Every array carries a leading run axis: R runs
that share a model but not their parameters or data (the seeds, rules or
learning rates of a grid cell) step in lockstep with the same number of
operations as one run. The result equals vmap's up to the order of
floating-point sums (tests compare them); other models (``cnn``, with
max-pooling) keep the vmap path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GradientEngine"]


class GradientEngine:
    """Per-worker gradients of a Sequential of Linear/Conv1d/ReLU/Flatten layers.

    Parameters
    ----------
    model : torch.nn.Module
        The model (its parameters are not used: they come flat per call).
    shapes : list of (str, torch.Size, int)
        Name, shape and size of every parameter, in flat-vector order.

    Attributes
    ----------
    supported : bool
        Whether the model has a layer this engine does not handle; callers
        then use :func:`torch.func.vmap` instead.
    """

    def __init__(self, model, shapes):
        self.shapes = list(shapes)
        self.plan = _plan(model)
        self.supported = self.plan is not None
        self._tap_cache = {}
        # per-call scratch arrays, kept between calls: a round allocates the
        # same few 0.1-1 MB arrays every time, and fresh ones cost page faults
        # (about 120 a call) and zero-filling; the padding of a kept padded
        # activation is written once and stays zero
        self._scratch = {}

    def _buffer(self, key, shape, like, zero):
        """A scratch array for ``key``, zero-filled when new (``zero``: every call)."""
        shape = tuple(int(d) for d in shape)
        buf = self._scratch.get(key)
        if (buf is None or tuple(buf.shape) != shape or buf.dtype != like.dtype
                or buf.device != like.device):
            buf = like.new_zeros(shape)
            self._scratch[key] = buf
        elif zero:
            buf.zero_()
        return buf

    def _taps(self, L, k, s, device):
        """Padded input position read by tap j of window l, at ``l * k + j``."""
        key = (L, k, s, str(device))
        if key not in self._tap_cache:
            where = torch.arange(L)[:, None] * s + torch.arange(k)[None, :]
            self._tap_cache[key] = where.reshape(-1).to(device)
        return self._tap_cache[key]

    def __call__(self, flats, xb, yb):
        """Gradients of R runs' p workers.

        Parameters
        ----------
        flats : torch.Tensor of shape (R, n)
            Each run's parameters.
        xb : torch.Tensor of shape (R, p, B, *input_shape)
            Each run's workers' minibatches.
        yb : torch.Tensor of int64, shape (R, p, B)
            Their labels.

        Returns
        -------
        G : torch.Tensor of shape (R, p, n)
            ``G[r, w]`` is the gradient of worker w's mean cross-entropy
            loss of run r at ``flats[r]``.
        """
        R, p, B = (int(s) for s in yb.shape)
        N = p * B
        params, start = {}, 0
        for name, shape, size in self.shapes:
            params[name] = flats[:, start : start + size].reshape(R, *shape)
            start += size
        a = xb.reshape(R, N, *xb.shape[3:])
        if self.plan[0][0] == "conv":
            # (R, N, C, L) -> channels-last (R, N, L, C): convolutions become
            # products over the last axis without transposing activations
            a = a.transpose(2, 3)
        tape = []
        padded = None  # a ReLU output already written into the next convolution's padding
        for at, step in enumerate(self.plan):
            kind = step[0]
            if kind == "conv":
                _, name, k, s, pad = step
                w, b = params[f"{name}.weight"], params.get(f"{name}.bias")
                Co, C = w.shape[1], w.shape[2]
                L_in = a.shape[2]
                # im2col with (window position, tap, channel) order, so that the
                # input gradient's col2im below is a single index_add
                ap = padded if padded is not None else F.pad(a, (0, 0, pad, pad))
                padded = None
                cols = ap.unfold(2, k, s).transpose(3, 4)
                L = cols.shape[2]                                       # (R, N, L, k, C)
                cols = cols.reshape(R, N * L, k * C)
                wm = w.transpose(2, 3).reshape(R, Co, k * C)
                z = (torch.baddbmm(b[:, None, :], cols, wm.transpose(1, 2)) if b is not None
                     else torch.bmm(cols, wm.transpose(1, 2)))           # (R, N*L, Co)
                tape.append(("conv", name, cols, wm, (N, L, L_in, C, k, s, pad), b is not None))
                a = z.view(R, N, L, Co)
            elif kind == "linear":
                _, name, perm = step
                w, b = params[f"{name}.weight"], params.get(f"{name}.bias")
                if perm is not None:
                    # the weight of a linear layer after a convolution reads the
                    # channels-first flattening; permute it to channels-last
                    C, L = perm
                    w = w.reshape(R, -1, C, L).transpose(2, 3).reshape(R, -1, C * L)
                z = (torch.baddbmm(b[:, None, :], a, w.transpose(1, 2)) if b is not None
                     else torch.bmm(a, w.transpose(1, 2)))
                tape.append(("linear", name, a, w, perm, b is not None))
                a = z
            elif kind == "relu":
                nxt = self.plan[at + 1] if at + 1 < len(self.plan) else None
                if nxt is not None and nxt[0] == "conv" and nxt[4] > 0:
                    # write the activation straight into the next layer's padded
                    # input: one copy fewer than padding it there
                    pad = nxt[4]
                    L = a.shape[2]
                    # only the interior is written, so the padding stays zero
                    padded = self._buffer(("padded", at), (R, N, L + 2 * pad, a.shape[3]), a,
                                          zero=False)
                    a = torch.clamp_min(a, 0, out=padded[:, :, pad : pad + L])
                else:
                    a = torch.relu_(a)
                tape.append(("relu", a))
            else:  # flatten
                tape.append(("flatten", a.shape))
                a = a.reshape(R, N, -1)

        # cross-entropy, mean over each worker's B samples
        logits = a
        grad = torch.softmax(logits, dim=-1)
        minus_one = self._scratch.get(("minus_one", R, N, grad.dtype, grad.device))
        if minus_one is None:
            minus_one = torch.full((R, N, 1), -1.0, dtype=grad.dtype, device=grad.device)
            self._scratch[("minus_one", R, N, grad.dtype, grad.device)] = minus_one
        grad.scatter_add_(-1, yb.reshape(R, N, 1), minus_one)
        grad = grad.div_(B)

        out = {}
        # no gradient flows below the first layer with parameters
        first_param = next(i for i, e in enumerate(tape) if e[0] in ("conv", "linear"))
        for i in range(len(tape) - 1, first_param - 1, -1):
            entry = tape[i]
            kind = entry[0]
            first = i == first_param
            if kind == "relu":
                grad = torch.ops.aten.threshold_backward(grad, entry[1], 0.0)
            elif kind == "flatten":
                grad = grad.reshape(entry[1])
            elif kind == "linear":
                _, name, x, w, perm, has_b = entry
                K = grad.shape[-1]
                go = grad.reshape(R * p, B, K)
                gw = torch.bmm(go.transpose(1, 2), x.reshape(R * p, B, -1))  # (R*p, K, in)
                if perm is not None:
                    C, L = perm
                    gw = gw.reshape(R * p, K, L, C).transpose(2, 3)
                out[f"{name}.weight"] = gw.reshape(R, p, -1)
                if has_b:
                    out[f"{name}.bias"] = go.sum(1).reshape(R, p, K)
                if not first:
                    grad = torch.bmm(grad, w)
            else:  # conv
                _, name, cols, wm, (N_, L, L_in, C, k, s, pad), has_b = entry
                Co = wm.shape[1]
                go = grad.reshape(R * p, B * L, Co)
                gw = torch.bmm(go.transpose(1, 2), cols.reshape(R * p, B * L, k * C))
                out[f"{name}.weight"] = gw.reshape(R, p, Co, k, C).transpose(3, 4)
                if has_b:
                    out[f"{name}.bias"] = go.sum(1).reshape(R, p, Co)
                if not first:
                    dcols = torch.bmm(grad.reshape(R, N * L, Co), wm).view(R, N, L * k, C)
                    # col2im: tap j of window l read padded input position l*s + j
                    dpad = self._buffer(("dpad", i), (R, N, L_in + 2 * pad, C), grad, zero=True)
                    dpad.index_add_(2, self._taps(L, k, s, grad.device), dcols)
                    grad = dpad[:, :, pad : pad + L_in, :]
        return torch.cat([out[name].reshape(R, p, size) for name, _, size in self.shapes],
                         dim=2)


def _plan(model):
    """The layer steps of ``model`` for :class:`GradientEngine`, or None if unsupported."""
    if not isinstance(model, nn.Sequential):
        return None
    plan, conv_shape, seen_flatten = [], None, False
    for name, module in model.named_children():
        if isinstance(module, nn.Conv1d):
            if (seen_flatten or module.groups != 1 or module.dilation != (1,)
                    or isinstance(module.padding, str) or module.padding_mode != "zeros"):
                return None
            plan.append(("conv", name, module.kernel_size[0], module.stride[0],
                         module.padding[0]))
            conv_shape = module.out_channels
        elif isinstance(module, nn.Linear):
            perm = None
            if conv_shape is not None and plan and plan[-1][0] == "flatten":
                # channels and length of the flattened convolution output
                perm = (conv_shape, module.in_features // conv_shape)
            plan.append(("linear", name, perm))
            conv_shape = None
        elif isinstance(module, nn.ReLU):
            plan.append(("relu",))
        elif isinstance(module, nn.Flatten):
            if module.start_dim != 1 or module.end_dim != -1:
                return None
            plan.append(("flatten",))
            seen_flatten = True
        else:
            return None
    if not plan or plan[-1][0] != "linear":
        return None
    if plan[0][0] == "relu":
        return None
    return plan
