"""modkit's own commands, for a pipeline whose components start by hand (docs/scaling.md).

    python -m modkit keys DIR
    python -m modkit addresses --num-workers 2 --first-port 9100 --host 10.0.0.2 --on worker-1=10.0.0.7

``keys DIR`` writes a fresh set of launch keys to ``DIR`` (mode 0700, each file 0600;
``modkit.transport.keyfiles``): the CURVE key pairs and the HMAC key that components
started by hand on one host or several share through ``--keys DIR``. Copy ``DIR`` to
every host of the pipeline (``scp -rp``, keeping the modes); it refuses to overwrite keys
already there.

``addresses`` prints the ``addresses:`` block of a config file (YAML) that puts every socket
of the pipeline on TCP, one port each from ``--first-port`` on: on ``--host``, or on the
host that ``--on COMPONENT=HOST`` gives a component (where it runs and binds them).
The components themselves start with ``python -m modkit.<component>``
(``modkit.pipeline.standalone``), the whole pipeline with ``scripts/start_all.py``.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from modkit.pipeline.addresses import COMPONENT_ORDER, socket_names, tcp_addresses, worker_name
from modkit.transport.keyfiles import KEY_FILES, KeyFileError, write_keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modkit", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    keys = commands.add_parser("keys", help="write fresh launch keys to DIR, for --keys DIR")
    keys.add_argument("dir", metavar="DIR", help="directory to create (mode 0700) or an empty one of yours")
    layout = commands.add_parser("addresses", help="print a config's addresses: every socket on TCP")
    layout.add_argument("--num-workers", type=int, default=1)
    layout.add_argument("--first-port", type=int, default=9100)
    layout.add_argument("--host", default="127.0.0.1", help="where the components not named by --on run")
    layout.add_argument("--on", action="append", default=[], metavar="COMPONENT=HOST", help="e.g. worker-1=10.0.0.7")
    args = parser.parse_args(argv)
    if args.command == "addresses":
        return print_addresses(parser, args.num_workers, args.first_port, args.host, args.on)
    try:
        write_keys(args.dir)
    except KeyFileError as error:
        print(f"modkit keys: {error}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(KEY_FILES)} to {args.dir}; copy it to every host and pass --keys {args.dir}")
    return 0


def print_addresses(parser: argparse.ArgumentParser, num_workers: int, first: int, host: str, on: list[str]) -> int:
    components = [c for c in COMPONENT_ORDER if c != "worker"] + [worker_name(i) for i in range(num_workers)]
    hosts = dict(item.partition("=")[::2] for item in on)
    unknown = [c for c in hosts if c not in components]
    if unknown or not all(hosts.values()):
        parser.error(f"--on takes COMPONENT=HOST with a component among {', '.join(components)}; got {on}")
    if num_workers < 1 or not 1024 <= first <= 65536 - len(socket_names(num_workers)):
        parser.error(
            f"--num-workers must be >= 1 and --first-port leave room for {len(socket_names(num_workers))} ports"
        )
    addresses = tcp_addresses(num_workers, first, host, hosts)
    print(yaml.safe_dump({"addresses": addresses}, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
