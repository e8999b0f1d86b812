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
Activations are kept feature-major with the samples last, (worker, channel,
position, sample): every product is a small shared weight matrix times a
worker's block whose long axis (positions x samples) is the output's, the
orientation in which a CPU core's small matrix products run fastest (1.2 to
1.5 times faster than with the few output channels last); a convolution
is a transposed im2col product whose output is already the next layer's
layout, and the input gradient's col2im adds whole (sample,) runs. The
first axis holds the workers of R runs that share a model but not their
parameters or data (the seeds, rules or learning rates of a grid cell),
which step in lockstep with the same number of operations as one run.
The result equals vmap's up to the order of floating-point sums (tests
compare them); other models (``cnn``, with
max-pooling) keep the vmap path.
"""

from __future__ import annotations

import torch
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
        # each parameter as the products use it, a view of the flat vector:
        # a weight as one matrix (a convolution's (Co, C, k) as (Co, C*k), the
        # rows of its transposed im2col), a bias as a column
        self._views, start = [], 0
        for name, shape, size in self.shapes:
            use = ((shape[0], size // shape[0]) if name.endswith("weight") and len(shape) > 1
                   else (size, 1))
            self._views.append((name, start, start + size, use))
            start += size

    def _buffer(self, key, shape, like, zero):
        """A scratch array for ``key``, zero-filled when new (``zero``: every call)."""
        buf = self._scratch.get(key)
        if (buf is None or buf.shape != shape or buf.dtype != like.dtype
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
        if p == 1:
            # A batched product of one matrix takes another BLAS path than one
            # of two or more, which sums in another order for some shapes (few
            # output columns): the lone worker is computed as a batch of two,
            # so that its gradient is the one it gets beside other workers
            twice = self(flats, xb.expand(R, 2, *xb.shape[2:]), yb.expand(R, 2, B))
            return twice[:, :1]
        P = R * p
        params = {name: flats[:, a:b].reshape(R, *use) for name, a, b, use in self._views}
        # Activations are feature-major, samples last: (R*p, C, L, B) after a
        # convolution, (R*p, F, B) after a linear layer. Every product then has
        # the worker's positions and samples as its long output axis: the
        # shared (out, in) weight times a (in, positions x samples) block, which
        # runs 1.2-1.5 times faster than the same product with the few output
        # channels last; and a convolution's output is already the next
        # layer's layout (channels, positions, samples), so is its flattening
        if self.plan[0][0] == "conv":
            if xb.dim() != 5:
                raise ValueError(f"a convolution needs (channels, length) inputs: got inputs "
                                 f"of shape {tuple(xb.shape[3:])}")
            a = xb.reshape(P, B, *xb.shape[3:]).permute(0, 2, 3, 1)  # (P, C, L, B), a view
        elif self.plan[0][0] == "linear" and xb.dim() != 4:
            raise ValueError(f"a first linear layer needs flat inputs: got inputs of shape "
                             f"{tuple(xb.shape[3:])} (flatten them in the model)")
        else:
            a = xb.reshape(P, B, -1).transpose(1, 2)  # (P, F, B), a view
        tape = []
        padded = None  # a ReLU output already written into the next convolution's padding
        for at, step in enumerate(self.plan):
            kind = step[0]
            if kind == "conv":
                _, name, k, s, pad = step
                # (R, Co, C*k) and (R, Co, 1)
                wm, b = params[f"{name}.weight"], params.get(f"{name}.bias")
                Co, C = wm.shape[1], wm.shape[2] // k
                L_in = a.shape[2]
                if padded is None:
                    ap = self._buffer(("input", at), (P, C, L_in + 2 * pad, B), a, zero=False)
                    ap[:, :, pad : pad + L_in] = a  # the padding is never written: it stays zero
                else:
                    ap, padded = padded, None
                # im2col, transposed: row (c, j) of a worker's block is channel c
                # at tap j of every window, its columns (position, sample): the
                # rows of PyTorch's (Co, C, k) weight flattened, and (for s <= k)
                # one strided copy of whole (B,) runs
                windows = ap.unfold(2, k, s)                            # (P, C, L, B, k)
                L = windows.shape[2]
                # copied into a kept array: a fresh one of 0.5-1 MB a call costs
                # its page faults, more than the copy itself
                cols = self._buffer(("cols", at), (P, C * k, L * B), a, zero=False)
                cols.view(P, C, k, L, B).copy_(windows.permute(0, 1, 4, 2, 3))
                z = _each_worker(wm, cols, p, b,
                                 out=self._buffer(("z", at), (P, Co, L * B), cols, zero=False))
                tape.append(("conv", name, cols, wm, (L, L_in, C, k, s, pad), b is not None))
                a = z.view(P, Co, L, B)
            elif kind == "linear":
                _, name = step
                w, b = params[f"{name}.weight"], params.get(f"{name}.bias")  # (R, K, F), (R, K, 1)
                x = a.reshape(P, -1, B)
                z = _each_worker(w, x, p, b)
                tape.append(("linear", name, x, w, b is not None))
                a = z
            elif kind == "relu":
                nxt = self.plan[at + 1] if at + 1 < len(self.plan) else None
                if nxt is not None and nxt[0] == "conv":
                    # write the activation straight into the next layer's padded
                    # input: one copy fewer than padding it there
                    pad = nxt[4]
                    L = a.shape[2]
                    # only the interior is written, so the padding stays zero
                    padded = self._buffer(("padded", at), (P, a.shape[1], L + 2 * pad, B), a,
                                          zero=False)
                    a = torch.clamp_min(a, 0, out=padded[:, :, pad : pad + L])
                else:
                    a = torch.relu_(a)
                tape.append(("relu", a))
            else:  # flatten: (P, C, L, B) -> (P, C*L, B), PyTorch's feature order
                tape.append(("flatten", a.shape))
                a = a.reshape(P, -1, B)

        # cross-entropy, mean over each worker's B samples. The softmax runs
        # sample by sample along the classes ((P, B, K), a small copy): over the
        # classes axis of (P, K, B) PyTorch vectorises across samples and
        # workers and takes the scalar exp for the last few elements of the
        # whole array, so a worker's values would depend on how many workers
        # are computed
        grad = torch.softmax(a.transpose(1, 2).contiguous(), dim=-1)
        minus_one = self._scratch.get(("minus_one", P, B, grad.dtype, grad.device))
        if minus_one is None:
            minus_one = torch.full((P, B, 1), -1.0, dtype=grad.dtype, device=grad.device)
            self._scratch[("minus_one", P, B, grad.dtype, grad.device)] = minus_one
        grad.scatter_add_(-1, yb.reshape(P, B, 1), minus_one)
        grad = grad.div_(B).transpose(1, 2)  # (P, K, B), a view

        out = {}
        # no gradient flows below the first layer with parameters
        first_param = next(i for i, e in enumerate(tape) if e[0] in ("conv", "linear"))
        for i in range(len(tape) - 1, first_param - 1, -1):
            entry = tape[i]
            kind = entry[0]
            first = i == first_param
            if kind == "relu":
                kept = self._buffer(("relu", i), grad.shape, grad, zero=False)
                grad = torch.ops.aten.threshold_backward.grad_input(grad, entry[1], 0.0,
                                                                    grad_input=kept)
            elif kind == "flatten":
                grad = grad.reshape(entry[1])
            elif kind == "linear":
                _, name, x, w, has_b = entry
                go = grad.reshape(P, -1, B)                        # (P, K, B)
                out[f"{name}.weight"] = torch.bmm(go, x.transpose(1, 2))  # (P, K, F)
                if has_b:
                    out[f"{name}.bias"] = go.sum(2)
                if not first:
                    grad = _each_worker(w.transpose(1, 2), go, p,  # (P, F, B)
                                        out=self._buffer(("dx", i), (P, w.shape[2], B), go,
                                                         zero=False))
            else:  # conv
                _, name, cols, wm, (L, L_in, C, k, s, pad), has_b = entry
                Co = wm.shape[1]
                go = grad.reshape(P, Co, L * B)  # a copy only for a padded view
                out[f"{name}.weight"] = torch.bmm(go, cols.transpose(1, 2))  # (P, Co, C*k)
                if has_b:
                    out[f"{name}.bias"] = go.sum(2)
                if not first:
                    # col2im: tap j of window l read padded position l*s + j; all
                    # the taps' input gradients are one product, and tap j's
                    # (C, L, B) block is added to every s-th position
                    Lp = L_in + 2 * pad
                    # taps 0..s-1 cover positions 0..s*L-1 once each: they are
                    # written, not added, and only the positions after them are
                    # zeroed first (all of them when there are fewer taps than s)
                    dpad = self._buffer(("dpad", i), (P, C, Lp, B), grad, zero=False)
                    if k >= s:
                        dpad[:, :, s * L :].zero_()
                    else:
                        dpad.zero_()
                    last = s * (L - 1) + 1
                    dcols = self._buffer(("dcols", i), (P, C * k, L * B), go, zero=False)
                    _each_worker(wm.transpose(1, 2), go, p, out=dcols)
                    dcols = dcols.view(P, C, k, L, B)
                    for j in range(k):
                        if j < s and k >= s:
                            dpad[:, :, j : j + last : s] = dcols[:, :, j]
                        else:
                            dpad[:, :, j : j + last : s] += dcols[:, :, j]
                    grad = dpad[:, :, pad : pad + L_in]
        return torch.cat([out[name].reshape(R, p, size) for name, _, size in self.shapes],
                         dim=2)


def _each_worker(m, x, p, b=None, out=None):
    """``m[r] @ x[w] (+ b[r])`` for every worker w of every run r: one product per worker.

    Parameters
    ----------
    m : torch.Tensor of shape (R, M, K)
        Each run's matrix.
    x : torch.Tensor of shape (R*p, K, N)
        Each worker's columns, run by run.
    p : int
        Workers per run.
    b : torch.Tensor of shape (R, M, 1), optional
        Each run's bias column.
    out : torch.Tensor of shape (R*p, M, N), optional
        Where to write the result (a kept array: a fresh one of a megabyte
        costs its page faults on every call).

    Returns
    -------
    out : torch.Tensor of shape (R*p, M, N)

    Notes
    -----
    A worker's gradient must come from products of the same shapes whatever
    the number of workers beside it: with one product over all the workers'
    columns, the BLAS may pick another kernel (another order of the sums) for
    another number of columns, and a run that computes fewer workers (the
    simulator skips the faulty workers' gradients that their attack does not
    read) would not be bit for bit the same (a test shows it does differ
    for small products). So every worker's columns are one entry of a batched
    product, against its run's matrix broadcast (a stride-0 view, no copy),
    and the runs of a lockstep group go one call each: a run's call is the
    same with or without other runs beside it. A batch of one entry takes
    another path again; :meth:`GradientEngine.__call__` never makes one.
    """
    R = m.shape[0]
    if R == 1 and out is None:
        mr = m[0].expand(p, *m.shape[1:])
        return torch.bmm(mr, x) if b is None else torch.baddbmm(b[0], mr, x)
    if out is None:
        out = x.new_empty((x.shape[0], m.shape[1], x.shape[2]))
    for r in range(R):
        xr, mr = x[r * p : (r + 1) * p], m[r].expand(p, *m.shape[1:])
        if b is None:
            torch.bmm(mr, xr, out=out[r * p : (r + 1) * p])
        else:
            torch.baddbmm(b[r], mr, xr, out=out[r * p : (r + 1) * p])
    return out


def _plan(model):
    """The layer steps of ``model`` for :class:`GradientEngine`, or None if unsupported.

    Convolutions come first (on ``(channels, length)`` inputs), then a
    Flatten, then linear layers; ReLUs anywhere after the first layer.
    """
    if not isinstance(model, nn.Sequential):
        return None
    plan, state = [], "start"  # then "sequence" (after a convolution) or "flat"
    for name, module in model.named_children():
        if isinstance(module, nn.Conv1d):
            if (state == "flat" or module.groups != 1 or module.dilation != (1,)
                    or isinstance(module.padding, str) or module.padding_mode != "zeros"):
                return None
            plan.append(("conv", name, module.kernel_size[0], module.stride[0],
                         module.padding[0]))
            state = "sequence"
        elif isinstance(module, nn.Linear):
            if state == "sequence":
                return None  # a linear layer over the positions of each channel
            plan.append(("linear", name))
            state = "flat"
        elif isinstance(module, nn.ReLU):
            plan.append(("relu",))
        elif isinstance(module, nn.Flatten):
            if module.start_dim != 1 or module.end_dim != -1:
                return None
            plan.append(("flatten",))
            state = "flat"
        else:
            return None
    if not plan or plan[-1][0] != "linear" or plan[0][0] == "relu":
        return None
    return plan
