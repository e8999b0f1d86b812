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
Convolutions are im2col products in a (worker, position, sample, channel)
layout: a worker's rows are one block (its weight gradient is one product),
and one position of a worker's samples is one contiguous block, so that the
input gradient's col2im adds whole blocks (one product per tap) instead of
rows of a few channels. Every array carries a leading run axis: R runs
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
        P = R * p
        if self.plan[0][0] == "conv":
            # (R, p, B, C, L) -> (R*p, L, B, C): each worker's samples, position
            # by position, channels last. Per worker, its (position, sample)
            # rows are one block (its weight gradient is one product), and one
            # position of all its samples is one contiguous (B, C) block, so the
            # col2im below adds whole blocks instead of rows of C values
            a = xb.reshape(P, B, *xb.shape[3:]).permute(0, 3, 1, 2)
        else:
            a = xb.reshape(R, N, *xb.shape[3:])
        tape = []
        padded = None  # a ReLU output already written into the next convolution's padding
        for at, step in enumerate(self.plan):
            kind = step[0]
            if kind == "conv":
                _, name, k, s, pad = step
                w, b = params[f"{name}.weight"], params.get(f"{name}.bias")
                Co, C = w.shape[1], w.shape[2]
                L_in = a.shape[1]
                # im2col with (tap, channel) columns
                ap = padded if padded is not None else F.pad(a, (0, 0, 0, 0, pad, pad))
                padded = None
                cols = ap.unfold(1, k, s).transpose(3, 4)               # (P, L, B, k, C)
                L = cols.shape[1]
                cols = cols.reshape(P, L * B, k * C)
                wm = w.transpose(2, 3).reshape(R, Co, k * C)
                z = _each_worker(cols, wm.transpose(1, 2), p,
                                 None if b is None else b[:, None, :])
                tape.append(("conv", name, cols, w, (L, L_in, C, k, s, pad), b is not None))
                a = z.view(P, L, B, Co)
            elif kind == "linear":
                _, name, perm = step
                w, b = params[f"{name}.weight"], params.get(f"{name}.bias")
                if perm is not None:
                    # the weight of a linear layer after a convolution reads the
                    # channels-first flattening; permute it to (position, channel)
                    C, L = perm
                    w = w.reshape(R, -1, C, L).transpose(2, 3).reshape(R, -1, C * L)
                z = _each_worker(a.reshape(P, B, -1), w.transpose(1, 2), p,
                                 None if b is None else b[:, None, :])
                tape.append(("linear", name, a, w, perm, b is not None))
                a = z.view(R, N, -1)
            elif kind == "relu":
                nxt = self.plan[at + 1] if at + 1 < len(self.plan) else None
                if nxt is not None and nxt[0] == "conv" and nxt[4] > 0:
                    # write the activation straight into the next layer's padded
                    # input: one copy fewer than padding it there
                    pad = nxt[4]
                    L = a.shape[1]
                    # only the interior is written, so the padding stays zero
                    padded = self._buffer(("padded", at), (P, L + 2 * pad, *a.shape[2:]), a,
                                          zero=False)
                    a = torch.clamp_min(a, 0, out=padded[:, pad : pad + L])
                else:
                    a = torch.relu_(a)
                tape.append(("relu", a))
            else:  # flatten
                if a.dim() == 4:
                    # (R*p, L, B, C) -> (R, N, L*C): the features in (position,
                    # channel) order, as the next linear layer's permuted weight reads
                    tape.append(("flatten", a.shape, True))
                    a = a.permute(0, 2, 1, 3).reshape(R, N, -1)
                else:
                    tape.append(("flatten", a.shape, False))
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
                _, shape, positions = entry
                if positions:
                    P_, L, B_, C = shape
                    grad = grad.reshape(P_, B_, L, C).permute(0, 2, 1, 3)
                else:
                    grad = grad.reshape(shape)
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
                    grad = _each_worker(go, w, p).view(R, N, -1)
            else:  # conv
                _, name, cols, w, (L, L_in, C, k, s, pad), has_b = entry
                Co = w.shape[1]
                go = grad.reshape(R, p * L * B, Co)  # a copy only for a padded view
                go3 = go.view(P, L * B, Co)
                gw = torch.bmm(go3.transpose(1, 2), cols.view(P, L * B, k * C))
                out[f"{name}.weight"] = gw.reshape(R, p, Co, k, C).transpose(3, 4)
                if has_b:
                    out[f"{name}.bias"] = go3.sum(1).reshape(R, p, Co)
                if not first:
                    # col2im: tap j of window l read padded input position l*s + j;
                    # each tap's input gradient is one product, added to every s-th
                    # position as whole (B, C) blocks
                    Lp = L_in + 2 * pad
                    # taps 0..s-1 cover positions 0..s*L-1 once each: they are
                    # written, not added, and only the positions after them are
                    # zeroed first (all of them when there are fewer taps than s)
                    dpad = self._buffer(("dpad", i), (P, Lp, B, C), grad, zero=False)
                    if k >= s:
                        dpad[:, s * L :].zero_()
                    else:
                        dpad.zero_()
                    last = s * (L - 1) + 1
                    # each tap's (Co, C) matrix contiguous once: a strided one
                    # would be copied for every worker's product
                    taps = w.permute(0, 3, 1, 2).contiguous()  # (R, k, Co, C)
                    for j in range(k):
                        dj = _each_worker(go3, taps[:, j], p).view(P, L, B, C)
                        if j < s and k >= s:
                            dpad[:, j : j + last : s] = dj
                        else:
                            dpad[:, j : j + last : s] += dj
                    grad = dpad[:, pad : pad + L_in]
        return torch.cat([out[name].reshape(R, p, size) for name, _, size in self.shapes],
                         dim=2)


def _each_worker(x, m, p, b=None):
    """``x[w] @ m[r] (+ b[r])`` for every worker w of every run r: one product per worker.

    Parameters
    ----------
    x : torch.Tensor of shape (R*p, M, K)
        Each worker's rows, run by run.
    m : torch.Tensor of shape (R, K, N)
        Each run's matrix.
    p : int
        Workers per run.
    b : torch.Tensor of shape (R, 1, N), optional
        Each run's bias row.

    Returns
    -------
    out : torch.Tensor of shape (R*p, M, N)

    Notes
    -----
    A worker's gradient must come from products of the same shapes whatever
    the number of workers beside it: with one product over all the workers'
    rows, the BLAS may pick another kernel (another order of the sums) for
    another number of rows, and a run that computes fewer workers (the
    simulator skips the faulty workers' gradients that their attack does not
    read) would not be bit for bit the same (a test shows it does differ
    for small products). So every worker's rows are one entry of a batched
    product, against its run's matrix broadcast (a stride-0 view, no copy),
    and the runs of a lockstep group go one call each: a run's call is the
    same with or without other runs beside it.
    """
    R = m.shape[0]
    if R == 1:
        mr = m[0].expand(p, *m.shape[1:])
        return torch.bmm(x, mr) if b is None else torch.baddbmm(b[0], x, mr)
    out = x.new_empty((x.shape[0], x.shape[1], m.shape[2]))
    for r in range(R):
        xr, mr = x[r * p : (r + 1) * p], m[r].expand(p, *m.shape[1:])
        if b is None:
            torch.bmm(xr, mr, out=out[r * p : (r + 1) * p])
        else:
            torch.baddbmm(b[r], xr, mr, out=out[r * p : (r + 1) * p])
    return out


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
