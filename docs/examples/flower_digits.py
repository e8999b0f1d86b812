"""Federated learning with Flower: FedAvg vs flagagg's RobustStrategy under attack.

One Flower simulation (``flwr.simulation.run_simulation``, Ray backend) with
15 clients, each holding a fifteenth of scikit-learn's digits training set,
training a softmax regression in NumPy. Clients 0-2 are Byzantine. The
ServerApp runs, on the same clients, Flower's FedAvg and
``RobustStrategy("flag")`` and ``RobustStrategy("multi_krum")``, each under
no attack, "reverse" (the Byzantine clients send -10 times their update)
and "A Little Is Enough" (they send the honest mean shifted by z honest
standard deviations, z from Baruch et al.'s formula), and prints the test
accuracy of the final global model.

Run: ``python flower_digits.py [--rounds 10]`` (needs ``flagagg[flower-sim]``).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import warnings

# Before Flower and Ray are imported: no usage reports, no Ray notices.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
warnings.filterwarnings("ignore", category=FutureWarning)

import numpy as np  # noqa: E402
from flwr.app import (  # noqa: E402
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from flagagg import attacks  # noqa: E402
from flagagg.flower import RobustStrategy  # noqa: E402

CLIENTS, BYZANTINE = 15, 3
EPOCHS, LR = 5, 1.0  # local full-batch gradient steps per round, and their step size


_DATA: dict = {}  # a plain dict, not lru_cache: Ray pickles this module's functions by value


def load(seed: int = 0):
    """Digits scaled to [0, 1]: the 15 clients' shards and the server's test set."""
    if seed in _DATA:
        return _DATA[seed]
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=seed, stratify=y)
    shards = np.array_split(np.random.default_rng(seed).permutation(len(ytr)), CLIENTS)
    _DATA[seed] = [(Xtr[s], ytr[s]) for s in shards], (Xte, yte)
    return _DATA[seed]


def local_train(W, b, X, y):
    """EPOCHS steps of full-batch gradient descent on the softmax cross-entropy."""
    W, b = W.copy(), b.copy()
    Y = np.eye(10, dtype=np.float32)[y]
    for _ in range(EPOCHS):
        Z = X @ W + b
        Z -= Z.max(axis=1, keepdims=True)
        P = np.exp(Z)
        P /= P.sum(axis=1, keepdims=True)
        G = (P - Y) / len(y)
        W -= LR * (X.T @ G)
        b -= LR * G.sum(axis=0)
    return W, b


def accuracy(W, b, X, y) -> float:
    """Fraction of ``X`` classified as ``y``."""
    return float(((X @ W + b).argmax(axis=1) == y).mean())


client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    """Train locally; the Byzantine clients then replace their update."""
    pid = int(context.node_config["partition-id"])
    arrays = msg.content["arrays"]
    W, b = arrays["W"].numpy(), arrays["b"].numpy()
    shards, _ = load()
    W1, b1 = local_train(W, b, *shards[pid])
    attack = str(msg.content["config"]["attack"])
    if pid < BYZANTINE and attack != "none":
        # Attacks act on the update; the client sends global + attacked update.
        own = np.concatenate([(W1 - W).ravel(), b1 - b])[None, :]
        if attack == "reverse":
            bad = attacks.reverse(own[:0], 1, own=own)[0]
        else:  # "alie": colluding, omniscient: it recomputes every honest update
            honest = []
            for Xc, yc in shards[BYZANTINE:]:
                Wc, bc = local_train(W, b, Xc, yc)
                honest.append(np.concatenate([(Wc - W).ravel(), bc - b]))
            bad = attacks.little_is_enough(np.stack(honest), BYZANTINE)[0]
        W1 = W + bad[:W.size].reshape(W.shape)
        b1 = b + bad[W.size:]
    reply = RecordDict({
        "arrays": ArrayRecord({"W": Array(W1), "b": Array(b1)}),
        # The partition id, stated: the strategy's diagnostics name clients by it.
        "metrics": MetricRecord({"num-examples": len(shards[pid][1]), "partition-id": pid}),
    })
    return Message(reply, reply_to=msg)


server = ServerApp()
ROUNDS = 10  # set by run(); the ServerApp runs in this process (clients run in Ray workers)
RESULTS: dict[tuple[str, str], float] = {}
SECONDS: dict[str, list[float]] = {}


def strategies():
    """The three strategies compared, fresh for each run."""
    # min_train_nodes too: Flower sizes a round's sample from the clients connected
    # when the round starts, before waiting for min_available_nodes
    common = dict(fraction_evaluate=0.0, min_available_nodes=CLIENTS, min_train_nodes=CLIENTS)
    return {
        "FedAvg": FedAvg(**common),
        'RobustStrategy("flag")': RobustStrategy("flag", f=BYZANTINE, **common),
        'RobustStrategy("multi_krum")': RobustStrategy("multi_krum", f=BYZANTINE, **common),
    }


@server.main()
def main(grid: Grid, context: Context) -> None:
    """Every attack x strategy on the same clients, one after the other."""
    _, (Xte, yte) = load()
    start = ArrayRecord({"W": Array(np.zeros((64, 10), np.float32)),
                         "b": Array(np.zeros(10, np.float32))})

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        return MetricRecord({"accuracy": accuracy(arrays["W"].numpy(), arrays["b"].numpy(),
                                                  Xte, yte)})

    rounds = ROUNDS
    for attack in ("none", "reverse", "alie"):
        for name, strategy in strategies().items():
            result = strategy.start(grid=grid, initial_arrays=start, num_rounds=rounds,
                                    train_config=ConfigRecord({"attack": attack}),
                                    evaluate_fn=evaluate)
            RESULTS[attack, name] = float(
                result.evaluate_metrics_serverapp[rounds]["accuracy"])
            if isinstance(strategy, RobustStrategy):
                trouble = {r: (d.rejected, d.skipped) for r, d in strategy.diagnostics_.items()
                           if d.rejected or d.skipped}
                if trouble:  # e.g. failing clients: the table would mean nothing
                    raise RuntimeError(f"{name} under {attack}: {trouble}")
                SECONDS.setdefault(name, []).extend(
                    d.seconds for d in strategy.diagnostics_.values())


def run(rounds: int) -> None:
    """Run the simulation and print the table."""
    global ROUNDS
    ROUNDS = rounds
    logging.getLogger("flwr").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    run_simulation(
        server_app=server, client_app=client, num_supernodes=CLIENTS,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                        # Ray on the loopback interface only, no dashboard.
                        "init_args": {"num_cpus": 2, "logging_level": "ERROR",
                                      "_node_ip_address": "127.0.0.1",
                                      "include_dashboard": False}},
    )
    wall = time.perf_counter() - t0
    names = list(strategies())
    print(f"{CLIENTS} clients ({BYZANTINE} Byzantine), {rounds} rounds; "
          "test accuracy of the final global model:\n")
    print(f"{'attack':<10}" + "".join(f"{n:>30}" for n in names))
    for attack in ("none", "reverse", "alie"):
        print(f"{attack:<10}" + "".join(f"{RESULTS[attack, n]:>30.3f}" for n in names))
    print()
    for name, secs in SECONDS.items():
        print(f"{name}: server-side aggregation {1e3 * np.median(secs):.1f} ms per round "
              "(median)")
    print(f"whole simulation: {wall:.0f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    run(parser.parse_args().rounds)
