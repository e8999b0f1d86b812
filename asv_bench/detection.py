"""Detection benchmark: do the verdicts name the faulty workers, for every rule and attack?

Run from a checkout: ``python asv_bench/detection.py [--steps 30] [--check]``.

p = 15 workers, f = 3 of them faulty (the simulator's seeded choice), a
softmax regression (or ``--model mlp``) on scikit-learn's digits. The model
follows plain SGD on the honest workers' mean, so every rule is judged on
the same gradients; at every step each rule (built with ``f=3``) aggregates
the 15 rows with ``return_result=True`` and its ``suspects`` are compared
with the true faulty set of that attack. Reported per rule and attack:
precision ``TP / (TP + FP)`` and recall ``TP / (TP + FN)`` summed over the
steps (a step that names nobody adds no false positive).

Attacks: reverse (``-10 g``), scaled (``100 g``), huge (one faulty worker
sends 1e30 in every coordinate; the other two send their honest gradient
and are not counted as faulty), in float32 and float64, random
(U(-1, 1)), NaN, A Little Is Enough, Fall of Empires (IPM, eps = 0.1) and
mimic (every faulty worker copies honest worker 0). ALIE, IPM and mimic are
built to look honest: they are reported as they are, without a target.

``--check`` exits 1 when a rule misses the 0.95 target on reverse, scaled,
huge, random or NaN. ``--rst PATH`` writes the table for the docs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

TARGET = 0.95
TARGETED = ("reverse", "scaled x100", "huge f32", "huge f64", "random", "nan")
ATTACKS = TARGETED + ("alie", "ipm", "mimic")
P, F = 15, 3


def _attack_rows(name, G, faulty, honest, rng):
    """``G`` with the faulty rows replaced; the set of rows that are really faulty."""
    from flagagg.attacks import get_attack

    G = G.copy()
    own = G[faulty]
    H = G[honest]
    if name.startswith("huge"):
        G[faulty[0]] = 1e30
        return G, {int(faulty[0])}
    spec = {"reverse": ("reverse", {}), "scaled x100": ("reverse", {"scale": 100.0}),
            "random": ("random", {}), "nan": ("nan", {}), "alie": ("little_is_enough", {}),
            "ipm": ("fall_of_empires", {}), "mimic": ("mimic", {})}[name]
    attack = get_attack(spec[0], **spec[1])
    G[faulty] = attack(H, len(faulty), rng=rng, own=own)
    return G, {int(i) for i in faulty}


def honest_gradients(steps, *, model="logreg", seed=0, lr=0.1, batch_size=32):
    """``steps`` rounds of the 15 workers' honest gradients (float64) and the faulty set."""
    import torch

    from flagagg.attacks import get_attack
    from flagagg.training._data import load_dataset
    from flagagg.training._replica import Replica

    dataset = load_dataset("digits")
    replica = Replica(dataset, workers=P, f=F, seed=seed, model=model)
    flat = replica.initial_parameters()
    none = get_attack("none")
    rounds = []
    for _ in range(steps):
        G = replica.gradients(flat, replica.draw_batches(batch_size), none, list(range(P)))
        rounds.append(G.double().numpy())
        honest = torch.as_tensor(replica.honest)
        flat = flat - lr * G[honest].mean(dim=0)
    return rounds, np.asarray(replica.faulty), np.asarray(replica.honest)


def run(steps=30, *, rules=None, attacks=ATTACKS, model="logreg", seed=0, progress=True):
    """Precision and recall of ``suspects`` per (rule, attack).

    Returns
    -------
    table : dict of (str, str) to (float, float)
        ``(rule, attack) -> (precision, recall)``.
    """
    import flagagg

    rules = list(rules or flagagg.available_rules())
    rounds, faulty, honest = honest_gradients(steps, model=model, seed=seed)
    table = {}
    for attack in attacks:
        counts = {r: [0, 0, 0] for r in rules}  # TP, FP, FN
        rng = np.random.default_rng(seed)
        for G in rounds:
            Ga, bad = _attack_rows(attack, G, faulty, honest, rng)
            if attack != "huge f64":
                Ga = Ga.astype(np.float32)
            # FLTrust's trusted input (rule.call_inputs): the server's own gradient on
            # clean data, here the mean of three honest workers' batches of the round
            # (as a small root dataset would give).
            server = G[honest[:3]].mean(axis=0).astype(Ga.dtype)
            for name in rules:
                rule = flagagg.get_rule(name, f=F)
                extra = {"reference": server} if "reference" in rule.call_inputs else {}
                res = rule(Ga, return_result=True, backend="numpy", **extra)
                sus = set(res.suspects)
                c = counts[name]
                c[0] += len(sus & bad)
                c[1] += len(sus - bad)
                c[2] += len(bad - sus)
        for name in rules:
            tp, fp, fn = counts[name]
            table[name, attack] = (tp / (tp + fp) if tp + fp else 1.0,
                                   tp / (tp + fn) if tp + fn else 1.0)
        if progress:
            print(f"  {attack}: done", file=sys.stderr)
    return table


def misses(table):
    """``(rule, attack, precision, recall)`` below the target on the targeted attacks."""
    return [(r, a, pr, rc) for (r, a), (pr, rc) in table.items()
            if a in TARGETED and (pr < TARGET or rc < TARGET)]


def format_table(table, *, rst=False):
    """The table, one row per rule, ``precision/recall`` per attack."""
    rules = sorted({r for r, _ in table})
    attacks = [a for a in ATTACKS if any(a == b for _, b in table)]
    head = ["rule"] + attacks
    rows = [[r] + [f"{table[r, a][0]:.2f}/{table[r, a][1]:.2f}" for a in attacks]
            for r in rules]
    widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]

    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))

    if not rst:
        return "\n".join([line(head)] + [line(r) for r in rows])
    rule = "  ".join("=" * w for w in widths)
    return "\n".join([rule, line(head), rule] + [line(r) for r in rows] + [rule])


def main(argv=None):
    """Command line: run, print, optionally write the docs table and check the target."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--model", default="logreg", choices=["logreg", "mlp"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rules", nargs="*", default=None)
    parser.add_argument("--rst", default=None, help="write the table as reST to this file")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 if a targeted attack is detected below {TARGET}")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    table = run(args.steps, rules=args.rules, model=args.model, seed=args.seed)
    text = format_table(table)
    print(f"precision/recall of suspects, p={P}, f={F}, {args.steps} steps, {args.model} on "
          f"digits, seed {args.seed} ({time.perf_counter() - t0:.0f} s)")
    print(text)
    bad = misses(table)
    for r, a, pr, rc in bad:
        print(f"MISS {r} under {a}: precision {pr:.2f}, recall {rc:.2f}")
    if args.rst:
        Path(args.rst).write_text(
            f".. generated by python asv_bench/detection.py --steps {args.steps} "
            f"--model {args.model} --seed {args.seed}\n\n" + format_table(table, rst=True) + "\n")
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
