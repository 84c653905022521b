"""The pipeline's config for containers: every socket on TCP, on the host its component runs on.

    python deploy/layout.py compose --num-workers 2 --base deploy/pipeline.yaml   # to stdout
    python deploy/layout.py k8s --num-workers 2 --base deploy/pipeline.yaml
    python deploy/layout.py compose --num-workers 2 --base ... --out /run/modkit/pipeline.yaml
    python deploy/layout.py worker-id --num-workers 2                            # in a worker's container

Each component runs in its own container, so each socket of ``modkit/pipeline/addresses.py``
is a ``tcp://`` endpoint on the host name of the component that binds it, on the same three
ports in every container: ``.rpc`` 9000, ``.in`` 9001, ``.ev`` (and ``kv.events``) 9002. A
component binds its own endpoints (its name resolves to its own address) and connects to
the others'. These sockets speak CURVE with the keys of ``python -m modkit keys DIR``.

Host names, by where the containers run:

- ``compose``: a service's name (``scheduler``), and for worker ``i`` the container that
  Docker Compose names ``modkit-worker-<i+1>`` (project ``modkit``, replica ``i+1``):
  replicas of one service share its name, but each container's own name resolves to it.
- ``k8s``: a Service's name (``scheduler``), and for worker ``i`` the StatefulSet's pod
  ``worker-<i>``, named through the headless Service ``worker``: ``worker-<i>.worker``.

``worker-id`` prints the id of the worker this container is: the ``i`` whose host name
resolves to one of this container's addresses. A replica beyond ``--num-workers`` is
refused: the scheduler would never send it a step.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import yaml

from modkit.pipeline.addresses import socket_names, worker_name

SOCKET_PORTS = {"rpc": 9000, "in": 9001, "ev": 9002, "events": 9002}  # by the name's suffix
COMPONENT_HOSTS = {  # component -> the compose service and Kubernetes Service it runs as
    "frontend": "frontend",
    "router": "router",
    "scheduler": "scheduler",
    "kv_cache_manager": "kv-cache-manager",
    "sampler": "sampler",
}


def worker_host(platform: str, worker_id: int) -> str:
    if platform == "compose":
        return f"modkit-worker-{worker_id + 1}"
    return f"worker-{worker_id}.worker"


def owner(socket_name: str) -> str:
    """The component that binds a socket: ``worker-1.in`` -> ``worker-1``, ``kv.events`` -> the KV manager."""
    name = socket_name.rpartition(".")[0]
    return "kv_cache_manager" if name == "kv" else name


def addresses(hosts: dict[str, str], num_workers: int) -> dict[str, str]:
    """Every socket's ``tcp://`` endpoint: its owner's host, the port for its kind."""
    return {
        name: f"tcp://{hosts[owner(name)]}:{SOCKET_PORTS[name.rpartition('.')[2]]}"
        for name in socket_names(num_workers)
    }


def layout(platform: str, num_workers: int, base: dict[str, object]) -> dict[str, object]:
    """``base`` (the user's settings) with the workers, the hosts and every socket's endpoint."""
    hosts = dict(COMPONENT_HOSTS)
    hosts.update({worker_name(i): worker_host(platform, i) for i in range(num_workers)})
    return {
        **base,
        "num_workers": num_workers,
        "host": "0.0.0.0",  # each component's HTTP port (/health), on the container's interfaces
        "allow_remote": True,  # the sockets are on other containers' addresses, with CURVE
        "addresses": addresses(hosts, num_workers),
    }


def resolve(host: str) -> set[str]:
    """Every address ``host`` resolves to (socket.gaierror if none)."""
    return {str(info[4][0]) for info in socket.getaddrinfo(host, None)}


def find_worker_id(platform: str, num_workers: int, timeout_s: float = 60.0) -> int:
    """The ``i`` whose ``worker_host`` resolves to this container; waits for its DNS entry."""
    mine = resolve(socket.gethostname())  # the container's own addresses
    deadline = time.monotonic() + timeout_s
    while True:
        for i in range(num_workers):
            try:
                theirs = resolve(worker_host(platform, i))
            except socket.gaierror:
                continue  # that replica is not up (or not in DNS) yet
            if theirs & mine:
                return i
        if time.monotonic() > deadline:
            sys.exit(
                f"worker-id: none of the {num_workers} worker names resolves to this container ({', '.join(mine)}): "
                f"are there more worker replicas than MODKIT_NUM_WORKERS={num_workers}?"
            )
        time.sleep(0.5)  # DNS is updated as containers start; nothing to wait on but the name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python deploy/layout.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["compose", "k8s", "worker-id"])
    parser.add_argument("--num-workers", type=int, required=True)
    parser.add_argument("--base", type=Path, default=None, help="a pipeline.yaml of your own settings")
    parser.add_argument("--wait-s", type=float, default=60.0, help="worker-id: how long to wait for DNS")
    parser.add_argument("--out", type=Path, default=None, help="write the config here (whole, by a rename)")
    args = parser.parse_args(argv)
    if args.num_workers < 1:
        parser.error(f"--num-workers must be 1 or more, got {args.num_workers}")
    if args.what == "worker-id":
        print(find_worker_id("compose", args.num_workers, args.wait_s))
        return 0
    base = yaml.safe_load(args.base.read_text()) if args.base is not None else {}
    text = f"# written by deploy/layout.py {args.what} --num-workers {args.num_workers}\n"
    text += yaml.safe_dump(layout(args.what, args.num_workers, base or {}), sort_keys=False)
    if args.out is None:
        print(text, end="")
    else:  # a component reading it meanwhile sees the old file or the new one, never half of one
        partial = args.out.with_name(args.out.name + ".partial")
        partial.write_text(text)
        os.replace(partial, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
