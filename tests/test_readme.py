"""The README's front-door examples run as written: PyTorch loop, DDP under torchrun, Flower."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

# benchmark / docs / packaging smoke: out of `pytest -m "not tooling"` (make test runs it)
pytestmark = pytest.mark.tooling

ROOT = Path(__file__).resolve().parent.parent


def block(heading):
    """The first ```python block under the README's ``## heading``."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 10, (heading, "longer than 10 lines")
    return code


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME="lo",
                OMP_NUM_THREADS="1", FLWR_TELEMETRY_ENABLED="0",
                RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")


def test_pytorch_loop_block(capsys):
    pytest.importorskip("torch")
    exec(compile(block("In a PyTorch training loop"), "README.md", "exec"), {})
    assert re.fullmatch(r"\([\d, ]*\)\n", capsys.readouterr().out)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_block_under_torchrun(tmp_path):
    pytest.importorskip("torch")
    code = block("DistributedDataParallel under torchrun")
    assert "torchrun --nproc-per-node 4 train.py" in code
    (tmp_path / "train.py").write_text(code)
    # torchrun as the README says, two ranks to stay cheap, on the loopback only.
    # Each rank's stdout goes to its own file (--redirects 1): two ranks printing
    # to one pipe can interleave their lines.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
           "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "--log-dir", str(tmp_path / "logs"),
           "--redirects", "1", "train.py"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = "".join(f.read_text() for f in sorted((tmp_path / "logs").rglob("stdout.log")))
    lines = sorted(line for line in out.splitlines() if re.match(r"^[01] \(", line))
    assert len(lines) == 2, out
    verdicts = eval(lines[0].split(" ", 1)[1].split(") ", 1)[1])  # noqa: S307 - our own output
    assert isinstance(verdicts, tuple) and len(verdicts) == 2
    # Every rank reports the same suspects and verdicts.
    assert lines[0][1:] == lines[1][1:]


HARNESS = '''
import logging
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

client = ClientApp()


@client.train()
def train(msg: Message, context: Context):
    w = msg.content["arrays"]["w"].numpy()
    pid = int(context.node_config["partition-id"])
    new = w - 10.0 * (1.0 - w) if pid == 0 else w + 0.5 * (1.0 - w)  # partition 0: reversed
    return Message(RecordDict({"arrays": ArrayRecord({"w": Array(new)}),
                               "metrics": MetricRecord({"num-examples": 1, "partition-id": pid})}),
                   reply_to=msg)


logging.getLogger("flwr").setLevel(logging.WARNING)
run_simulation(server_app=app, client_app=client, num_supernodes=4,
               backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                               "init_args": {"num_cpus": 2, "_node_ip_address": "127.0.0.1",
                                             "include_dashboard": False}})
'''


def test_flower_block_in_a_simulation(tmp_path):
    pytest.importorskip("flwr")
    pytest.importorskip("ray", reason="needs flwr[simulation]")
    (tmp_path / "server.py").write_text(block("A Flower strategy") + HARNESS)
    proc = subprocess.run([sys.executable, "server.py"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("{"))
    verdicts = eval(line)  # noqa: S307 - the script's own printed dict
    assert len(verdicts) == 4
    partition0 = next(v for k, v in verdicts.items() if k.startswith("partition 0 "))
    assert partition0 != "trusted" and ("outsized" in partition0 or "against" in partition0)
    assert sum(v == "trusted" for v in verdicts.values()) >= 2
