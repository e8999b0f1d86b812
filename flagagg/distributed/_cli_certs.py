"""``flagagg certs``: the run's own CA and one certificate per process, for several machines."""

from __future__ import annotations

from .._cli_errors import report_error
from ._tls import file_of, issue

__all__ = ["add_arguments", "run"]


def add_arguments(parser):
    """Declare the command-line arguments of ``flagagg certs``."""
    parser.description = (
        "Make a training run's own certificate authority and one TLS certificate per process "
        "for `flagagg train --transport tcp` over several machines: server.pem for the "
        "server (rank 0) and worker-W.pem for worker W (rank W+1), each holding the CA "
        "certificate, the process's certificate (its rank inside) and its private key, "
        "mode 0600. Copy each file only to the node that runs that rank and pass "
        "--certs DIR there. The CA's key is not kept: nobody can issue another certificate "
        "for the run."
    )
    parser.add_argument("--workers", type=int, required=True, metavar="P",
                        help="number of workers of the run")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder for the files (created 0700; must not hold a run's files)")
    parser.add_argument("--days", type=int, default=30, metavar="N",
                        help="validity in days (default: 30)")
    parser.add_argument("--server-host", action="append", default=[], metavar="HOST",
                        help="the server's DNS name or IP address, recorded in its certificate "
                             "(repeatable; workers check the certificate's role, not the host)")


def run(args):
    """Issue the files; return the exit status."""
    from pathlib import Path

    if args.workers < 1 or args.days < 1:
        return report_error(ValueError("--workers and --days must be >= 1"))
    if file_of(args.out, 0).exists():
        return report_error(FileExistsError(
            f"{args.out} already holds a run's certificates: choose another --out, or delete "
            "the old files first"))
    paths = issue(Path(args.out), args.workers, days=args.days, hosts=args.server_host)
    print(f"wrote {len(paths)} files to {args.out}/: server.pem (rank 0) and worker-0.pem .. "
          f"worker-{args.workers - 1}.pem (ranks 1..{args.workers}); copy each only to the "
          "node that runs its rank and start every rank with --certs DIR")
    return 0
