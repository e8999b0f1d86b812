"""One training run's state, rebuilt identically from its seed wherever it is needed.

The simulated cluster (:func:`flagagg.sim.simulate`) and the distributed
trainer (:mod:`flagagg.distributed`) both build a :class:`Replica`: shards,
faulty workers, the initial model, and the minibatch and attack streams
(``SeedSequence(seed).spawn(4)``: shards, init, batches, attack). The
simulator asks it for every worker's row of a round; a distributed worker
asks for its own row only, but draws the whole round's minibatch indices, so
every process and the simulator agree on every minibatch and every step.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from ._data import partition
from ._grads import GradientEngine
from ._models import init_parameters, make_model

__all__ = ["Replica", "RoundPlan", "sgd_step"]


class RoundPlan(NamedTuple):
    """What one round computes gradients on (:meth:`Replica.round_inputs`).

    Attributes
    ----------
    xb, yb : torch.Tensor
        The minibatches of the workers in ``need``, (len(need), B, ...) and
        (len(need), B); a data attack's rows are already poisoned.
    need : list of int
        The workers whose gradients are computed, in that order.
    rows : list of int
        The workers whose rows are wanted.
    mode : {"plain", "data", "gradient", "honest"}
        Which attack, if any, touches the round; ``"honest"`` is a gradient
        attack that does not read the faulty workers' own gradients, whose
        ``need`` holds the honest workers only (``skip_unread``).
    full : list of int or None
        The workers a gradient attack's round has rows of before the wanted
        ones are picked (``need`` plus the skipped faulty workers, in
        order, for ``"honest"``; ``need`` for ``"gradient"``); None for the
        other modes.
    """

    xb: torch.Tensor
    yb: torch.Tensor
    need: list
    rows: list
    mode: str
    full: list | None = None


class Replica:
    """Shards, faulty workers, model and random streams of one run.

    Parameters
    ----------
    dataset : flagagg.sim.Dataset
        The data.
    workers : int
        Number of workers p.
    f : int
        Number of faulty workers.
    seed : int
        The run's seed.
    model : str, default="logreg"
        Model name for :func:`flagagg.sim.make_model`.
    model_params : dict, optional
        Passed to :func:`flagagg.sim.make_model`.
    partition_method : {"iid", "dirichlet", "extreme"}, default="iid"
        How the training data are split.
    alpha : float, default=0.5
        Dirichlet concentration.
    device : str or torch.device, default="cpu"
        Where the model, the data and the gradients live.
    worker_momentum : float, default=0.0
        Local (worker) momentum beta: every worker sends
        ``m = beta * m + (1 - beta) * g`` (``m`` starts at zero) instead of its
        gradient ``g`` (Karimireddy, He and Jaggi, "Learning from History for
        Byzantine Robust Optimization", ICML 2021; ByzFL's honest clients
        compute the same). 0 sends the gradient itself. Faulty workers with a
        gradient attack compute their own momenta honestly and the attack sees
        the momenta, as in the literature; workers with a data attack keep
        momenta of their poisoned gradients.

    Attributes
    ----------
    faulty : ndarray of int
        Sorted indices of the faulty workers.
    honest : ndarray of int
        The other workers.
    net : torch.nn.Module
        The model (its parameters are the initial ones; training works on a
        flat vector, see :meth:`initial_parameters`).
    shapes : list of (str, torch.Size, int)
        Name, shape and size of every parameter, in flat-vector order.
    n_params : int
        Length of the flat parameter vector.
    batch_rng, attack_rng : numpy.random.Generator
        The minibatch and attack streams.
    """

    def __init__(self, dataset, *, workers, f, seed, model="logreg", model_params=None,
                 partition_method="iid", alpha=0.5, device="cpu", worker_momentum=0.0):
        self.dataset = dataset
        beta = float(worker_momentum)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"worker_momentum must be in [0, 1): got {worker_momentum!r}")
        self.worker_momentum = beta
        # each worker's momentum, for the rows this replica computes (all of them in
        # the simulator; a distributed worker's own, or all for an omniscient attack)
        self._momenta = None
        self._kept = set()  # the workers whose momenta have been updated
        self.workers = int(workers)
        self.f = int(f)
        self.device = torch.device(device)
        # one independent stream per purpose, so that e.g. an attack that draws
        # random numbers does not shift the minibatches of the honest workers
        s_shard, s_init, s_batch, s_attack = np.random.SeedSequence(seed).spawn(4)
        shard_rng = np.random.default_rng(s_shard)
        shards = partition(dataset.y_train, workers, rng=shard_rng, method=partition_method,
                           alpha=alpha)
        self.faulty = (np.sort(shard_rng.choice(workers, size=f, replace=False)) if f
                       else np.zeros(0, int))
        # (np.setdiff1d would load numpy.ma, 60 ms of every process's first run)
        is_faulty = np.zeros(self.workers, dtype=bool)
        is_faulty[self.faulty] = True
        self.honest = np.flatnonzero(~is_faulty)
        self.batch_rng = np.random.default_rng(s_batch)
        self.attack_rng = np.random.default_rng(s_attack)

        self.net = make_model(model, dataset.input_shape, dataset.n_classes,
                              **(model_params or {}))
        init_parameters(self.net, np.random.default_rng(s_init))
        self.net.to(self.device)
        self.shapes = [(n, p.shape, p.numel()) for n, p in self.net.named_parameters()]
        self.n_params = sum(size for _, _, size in self.shapes)
        self._per_worker_vmap = vmap(grad(_loss(self.net)), in_dims=(None, 0, 0, None))
        self._engine = GradientEngine(self.net, self.shapes)
        self._positions = {}

        self.sizes = np.array([s.size for s in shards])
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self.pooled = np.concatenate(shards)
        self.X_train = torch.from_numpy(dataset.X_train).to(self.device)
        self.y_train = torch.from_numpy(dataset.y_train).to(self.device)

    def _per_worker(self, flat, xb, yb, shapes):
        """Every worker's minibatch gradient at ``flat``: (p, B, ...) data in, (p, n) out."""
        if not self._engine.supported:
            return self._per_worker_vmap(flat, xb, yb, shapes)
        return self._engine(flat[None], xb[None], yb[None])[0]

    def initial_parameters(self):
        """The initial model as a flat float32 vector on the replica's device."""
        return torch.cat([p.detach().reshape(-1) for _, p in self.net.named_parameters()]).float()

    def draw_batches(self, batch_size):
        """Draw one round's minibatch indices of every worker from the batch stream.

        Returns
        -------
        idx : ndarray of int64, shape (workers, batch_size)
            Indices into the training set, each worker's from its own shard,
            drawn with replacement.
        """
        local = (self.batch_rng.random((self.workers, batch_size))
                 * self.sizes[:, None]).astype(np.int64)
        return self.pooled[self.offsets[:, None] + local]

    def gradients(self, flat, idx, attack, rows, *, skip_unread=False):
        """The rows some workers send in one round, attacks applied.

        Parameters
        ----------
        flat : torch.Tensor of shape (n_params,)
            Current parameters.
        idx : ndarray of shape (workers, batch_size)
            The round's minibatches, from :meth:`draw_batches`.
        attack : flagagg.attacks.Attack
            What the faulty workers do.
        rows : sequence of int
            Workers whose rows are wanted.
        skip_unread : bool, default=False
            Skip the faulty workers' gradients when the attack does not read
            them (see :meth:`round_inputs`); the rows are the same.

        Returns
        -------
        G : torch.Tensor of shape (len(rows), n_params)

        Notes
        -----
        A faulty worker's row depends on the other faulty workers (the
        attack draws all ``f`` rows from one stream) and, for omniscient
        attacks, on the honest workers; those rows are computed too, exactly
        as the simulator does, and then dropped.
        """
        plan = self.round_inputs(idx, attack, rows, skip_unread=skip_unread)
        G = self._per_worker(flat, plan.xb, plan.yb, self.shapes)
        return self.round_rows(G, plan, attack)

    def round_inputs(self, idx, attack, rows, *, skip_unread=False):
        """The first half of :meth:`gradients`: the minibatches the round computes on.

        :meth:`gradients` is ``round_rows(G, plan, attack)`` with ``G`` the
        per-worker gradients of ``plan.xb, plan.yb`` at the parameters; the
        halves are apart so that several runs' gradients can be computed in
        one call in between (lockstep runs, :func:`flagagg.sim.simulate`'s
        grid executor). A data attack draws from the attack stream here, a
        gradient attack in :meth:`round_rows`.

        Parameters
        ----------
        idx, attack, rows
            As in :meth:`gradients`.
        skip_unread : bool, default=False
            Leave out the faulty workers' gradients when the attack replaces
            them without reading them (:attr:`~flagagg.attacks.Attack.reads_own`
            is False, e.g. A Little Is Enough): f of the p gradients fewer a
            round, and the same rows (each worker's gradient comes from
            products of its own, whatever the number of workers: see
            :class:`~flagagg.training._grads.GradientEngine`; the minibatches
            are drawn before). Only for models the engine computes: under
            ``vmap`` (``cnn``) the number of workers may change the
            convolution's algorithm, so every row is computed there. The
            faulty workers' momenta are then not kept (nothing reads them);
            the simulator skips, a distributed worker, whose momenta are
            checkpointed, does not.

        Returns
        -------
        plan : RoundPlan
        """
        rows = [int(r) for r in rows]
        faulty = [int(i) for i in self.faulty]
        touched = (attack.kind in ("data", "gradient") and self.f > 0
                   and bool(set(rows) & set(faulty)))
        if not touched:
            sel = torch.from_numpy(idx[rows])
            return RoundPlan(self.X_train[sel], self.y_train[sel], rows, rows, "plain")
        if attack.kind == "data":
            # the faulty rows first, in the simulator's order, for the attack stream
            need = faulty + [r for r in rows if r not in faulty]
            sel = torch.from_numpy(idx[need])
            xb, yb = self.X_train[sel], self.y_train[sel]
            xf, yf = attack(xb[: self.f], yb[: self.f], rng=self.attack_rng,
                            n_classes=self.dataset.n_classes)
            xb, yb = xb.clone(), yb.clone()
            xb[: self.f], yb[: self.f] = xf, yf
            return RoundPlan(xb, yb, need, rows, "data")
        need = list(range(self.workers)) if attack.omniscient else sorted(set(faulty) | set(rows))
        if skip_unread and not attack.reads_own and self._engine.supported:
            honest = [w for w in need if w not in faulty]
            if honest:  # an attack that reads no row at all still needs their shape
                sel = torch.from_numpy(idx[honest])
                return RoundPlan(self.X_train[sel], self.y_train[sel], honest, rows, "honest",
                                 need)
        sel = torch.from_numpy(idx if len(need) == self.workers else idx[need])
        return RoundPlan(self.X_train[sel], self.y_train[sel], need, rows, "gradient", need)

    def round_rows(self, G, plan, attack):
        """The second half of :meth:`gradients`: momenta and attacks on the raw gradients.

        Parameters
        ----------
        G : torch.Tensor of shape (len(plan.need), n_params)
            The per-worker gradients of ``plan.xb, plan.yb`` at the round's
            parameters (a gradient attack writes its rows into it).
        plan : RoundPlan
            From :meth:`round_inputs` of the same round.
        attack : flagagg.attacks.Attack

        Returns
        -------
        G : torch.Tensor of shape (len(plan.rows), n_params)
        """
        need, rows = plan.need, plan.rows
        if plan.mode == "plain":
            return self._with_momentum(G, rows)
        if plan.mode == "data":
            G = self._with_momentum(G, need)
            return G[[need.index(r) for r in rows]]
        faulty = [int(i) for i in self.faulty]
        # the honest computation of every row at hand (the faulty workers' own
        # included): the attack sees momenta when the workers send momenta
        G = self._with_momentum(G, need)
        if plan.mode == "honest":
            # only the honest rows were computed: the same values the attack
            # reads from a full round, rows in the same order
            full = plan.full
            f_rows, h_rows, out_rows = self._row_positions(full, faulty, rows)
            H = G
            G = G.new_empty((len(full), G.shape[1]))
            G[h_rows] = H
            G[f_rows] = attack(H, self.f, rng=self.attack_rng)
            return G if out_rows is None else G[out_rows]
        f_rows, h_rows, out_rows = self._row_positions(need, faulty, rows)
        G[f_rows] = attack(G[h_rows], self.f, rng=self.attack_rng, own=G[f_rows])
        return G if out_rows is None else G[out_rows]

    def _row_positions(self, need, faulty, rows):
        """Index tensors of the faulty rows, the honest rows and the wanted rows in ``need``.

        Built once per combination and kept: a Python list used as an index
        is converted to a tensor on every use, several times a round.
        """
        key = (tuple(need), tuple(faulty), tuple(rows))
        hit = self._positions.get(key)
        if hit is None:
            pos = {w: i for i, w in enumerate(need)}
            f_rows = torch.tensor([pos[w] for w in faulty], dtype=torch.long,
                                  device=self.device)
            # the honest rows at hand: all of them for an omniscient attack (and in
            # the simulator); the others only read their shape and dtype
            h_rows = torch.tensor([pos[w] for w in need if w not in faulty],
                                  dtype=torch.long, device=self.device)
            out_rows = (None if need == list(rows) else
                        torch.tensor([pos[r] for r in rows], dtype=torch.long,
                                     device=self.device))
            hit = self._positions[key] = (f_rows, h_rows, out_rows)
        return hit

    def reset_momentum(self):
        """Forget every worker's momentum (the next round starts it from zero).

        For a gradient computed outside training, e.g. a warm-up call, which
        must not count as a round.
        """
        self._momenta = None
        self._kept = set()

    def momentum_state(self):
        """The workers' momenta this replica keeps, for a checkpoint.

        Returns
        -------
        state : dict
            ``"workers"``: int64 tensor of the workers whose momentum this
            replica has updated (all of them in the simulator, one for an honest
            distributed worker); ``"momenta"``: float tensor of their rows, on
            the CPU. Both empty before the first round or without momentum.
        """
        if self._momenta is None:
            return {"workers": torch.zeros(0, dtype=torch.long),
                    "momenta": torch.zeros(0, self.n_params)}
        at = torch.tensor(sorted(self._kept), dtype=torch.long)
        return {"workers": at, "momenta": self._momenta[at.to(self._momenta.device)].cpu()}

    def load_momentum_state(self, state):
        """Continue from :meth:`momentum_state`'s output (workers not in it start at zero).

        Raises
        ------
        ValueError
            When the state does not fit this replica (worker indices, number of
            parameters).
        """
        at, rows = state["workers"], state["momenta"]
        if not (isinstance(at, torch.Tensor) and isinstance(rows, torch.Tensor)):
            raise TypeError("a momentum state holds tensors 'workers' and 'momenta'")
        at = at.to(torch.long).reshape(-1)
        if at.numel() and (int(at.min()) < 0 or int(at.max()) >= self.workers):
            raise ValueError(f"momentum state names workers outside 0..{self.workers - 1}")
        if tuple(rows.shape) != (at.numel(), self.n_params):
            raise ValueError(f"momentum state rows have shape {tuple(rows.shape)}; expected "
                             f"({at.numel()}, {self.n_params})")
        self._momenta = None
        self._kept = set()
        if at.numel():
            self._momenta = torch.zeros(self.workers, self.n_params, dtype=torch.float32,
                                        device=self.device)
            self._momenta[at.to(self.device)] = rows.to(self.device, torch.float32)
            self._kept = {int(w) for w in at}

    def _with_momentum(self, G, workers):
        """Rows ``G`` of ``workers`` -> their (updated) momenta; ``G`` itself without momentum."""
        beta = self.worker_momentum
        if beta == 0.0:
            return G
        if self._momenta is None:
            self._momenta = torch.zeros(self.workers, G.shape[1], dtype=G.dtype,
                                        device=G.device)
        at = torch.as_tensor(list(workers), dtype=torch.long, device=G.device)
        m = torch.add(self._momenta[at] * beta, G, alpha=1.0 - beta)
        self._momenta[at] = m
        self._kept.update(int(w) for w in workers)
        return m

    def accuracy(self, flat, split="test"):
        """Accuracy of the flat parameters on a split of the dataset."""
        X, y = (torch.from_numpy(a).to(self.device) for a in self.dataset.split(split))
        return _accuracy(self.net, flat, self.shapes, X, y)


def _loss(model):
    def loss(flat, x, y, shapes):
        params, start = {}, 0
        for name, shape, size in shapes:
            params[name] = flat[start : start + size].view(shape)
            start += size
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return loss


def _accuracy(model, flat, shapes, X, y):
    params, start = {}, 0
    for name, shape, size in shapes:
        params[name] = flat[start : start + size].view(shape)
        start += size
    with torch.no_grad():
        logits = functional_call(model, params, (X,))
        ok = torch.isfinite(logits).all(dim=1) & (logits.argmax(dim=1) == y)
    return float(ok.double().mean())


def sgd_step(flat, buf, g, *, lr, momentum, weight_decay):
    """One step of SGD with momentum and weight decay (``torch.optim.SGD``'s update).

    Parameters
    ----------
    flat : torch.Tensor
        Parameters.
    buf : torch.Tensor or None
        Momentum buffer; ``None`` before the first step.
    g : torch.Tensor
        Aggregated gradient.
    lr, momentum, weight_decay : float
        ``buf = momentum * buf + (g + weight_decay * flat)``, ``flat -= lr * buf``.

    Returns
    -------
    flat, buf : torch.Tensor
    """
    d = g + weight_decay * flat
    buf = d if buf is None else momentum * buf + d
    return flat - lr * buf, buf
