"""The pipeline's configuration: one typed object that every component process starts from.

The pipeline runs six components as separate processes that talk over ZeroMQ; each also
answers ``GET /health`` on its own HTTP port::

    component          port   role
    frontend           8001   the OpenAI-compatible API
    scheduler          8002   decides which requests compute how many tokens each step
    worker-0           8003   runs the model (worker-1, worker-2, ... take 8007, 8008, ...)
    router             8004   picks the worker for each request
    kv_cache_manager   8005   owns the KV blocks and the prefix cache
    sampler            8006   turns logits into tokens

Four ways to build one, all validated once, in ``__post_init__``::

    PipelineConfig(num_workers=2)
    PipelineConfig.from_dict({"num_workers": 2})
    PipelineConfig.from_file("pipeline.yaml")             # or .yml, .json
    PipelineConfig.from_cli(["--config", "pipeline.yaml", "--num-workers", "2"])

Nothing changes a config afterwards; derive a variant with ``dataclasses.replace``, which
validates it again.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from modkit.attention import attention_backends
from modkit.config_sources import parse_cli, read_file, reject_unknown_keys
from modkit.engine.config import CUDAGRAPH_MODES, ConfigError, EngineConfig
from modkit.kvcache.eviction import eviction_policies
from modkit.router import ROUTER_POLICIES
from modkit.sampler import samplers
from modkit.scheduler import policies

__all__ = ["COMPONENTS", "DEFAULT_GPU_MODEL", "DTYPES", "ConfigError", "PipelineConfig"]

DEFAULT_GPU_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"  # what model=None loads on a CUDA GPU
DTYPES = ("float32", "fp32", "float", "bfloat16", "bf16", "float16", "fp16", "half")  # what parse_dtype accepts
DEVICES = ("cpu", "cuda", "mps")  # and cuda:N
# Each component's HTTP port is the field f"{component}_port"; urls() lists them in this order.
COMPONENTS = ("frontend", "scheduler", "worker", "router", "kv_cache_manager", "sampler")


def free_component_ports(num_workers: int = 4) -> dict[str, int]:
    """``<component>_port`` for every component, laid out as ``ports="auto"`` lays them: a run of
    ports free now, with room for up to ``num_workers`` workers (worker-1 and on take the ports
    after the sampler's). For a pipeline beside another on one machine (tests, benchmarks).
    Racy, as any free port is, but the run lies below the range the OS hands client
    connections their ports from, so that none of those takes a worker's port meanwhile."""
    from modkit.pipeline.preflight import with_ports

    config = with_ports(PipelineConfig(num_workers=max(num_workers, 1)), "auto")
    return {f"{name}_port": getattr(config, f"{name}_port") for name in COMPONENTS}


# NOTE: why a CPU worker computes small steps on one thread. Its threads sleep while they wait
# (OMP_WAIT_POLICY=PASSIVE, modkit.pipeline.processes), and a forward wakes them at every parallel
# region. On a 2-core machine the embedded model's decode steps took 1.4 to 1.5 times as long on
# two threads as on one, a 1,024-token prompt step 0.65 times as long; at 64 tokens the two were
# even; Qwen2.5-0.5B's shapes decoded as fast on one thread as on two, and a 64-token chunk 1.2 to
# 1.3 times faster on two (docs/benchmarks.md, "Small steps on one thread"). Not measured on more
# cores, where a big model's decodes read more weights than one core can stream: there the default
# keeps every step on every thread.
CPU_PARALLEL_MIN_TOKENS = 64  # the default of cpu_parallel_min_tokens on a worker of two threads or fewer


def cpu_worker_threads(usable_cores: int, num_workers: int) -> int:
    """Each CPU worker's OpenMP threads in a launch of ``num_workers``: its share of the usable cores."""
    return max(1, usable_cores // num_workers)


def cpu_parallel_min_tokens(setting: int | None, threads: int) -> int:
    """The fewest tokens a step of a CPU worker of ``threads`` threads computes on all of them
    (``PipelineConfig.cpu_parallel_min_tokens``; None: the default for that many threads)."""
    if setting is not None:
        return setting
    return CPU_PARALLEL_MIN_TOKENS if threads <= 2 else 1


def cpu_step_threads(num_tokens: int, threads: int, min_tokens: int) -> int:
    """The threads a CPU worker of ``threads`` threads computes a step of ``num_tokens`` tokens on."""
    return threads if num_tokens >= min_tokens else 1


REDACTED = "<redacted>"  # what to_dict() writes in place of the API key


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    # -- the model and each worker's engine (see to_engine_config) -------------------------
    model: str | None = None  # None: Qwen/Qwen2.5-0.5B-Instruct on a CUDA GPU, else the embedded tiny model
    dtype: str | None = None  # None: float32 on CPU, bfloat16 (or float16) on GPU
    device: str | None = None  # None: cuda if available, else cpu
    # One device per worker, e.g. ["cuda:0", "cuda:1"]: each worker runs on its own and sizes its KV
    # cache from that device's memory. None: every worker on ``device``. Not both.
    devices: list[str] | None = None
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    gpu_memory_utilization: float = 0.9  # GPU memory share for a card's workers: weights, activations, KV cache
    max_num_batched_tokens: int = 2048  # token budget of one step: enough for a long prompt chunk plus decodes
    max_num_seqs: int = 256  # requests running at once in one worker, as in vLLM
    block_size: int = 16  # tokens per KV block, as in vLLM: small enough to waste little, big enough to batch
    num_kv_blocks: int | None = None  # None: as many as gpu_memory_utilization allows
    enable_prefix_caching: bool = True  # requests that share a prompt prefix share its KV blocks
    # -- policies and swappable parts, each chosen by name ------------------------------------
    scheduling_policy: str = "fcfs"  # first come, first served; "priority" admits low priority values first
    router_policy: str = "round_robin"  # needs no load reports; "least_loaded" and "kv_aware" do
    eviction_policy: str = "lru"  # which free cached block goes first: "lru" (vLLM's) or "lfu"
    sampler: str = "default"  # batched, vLLM's order of operations; "per_request" loops row by row
    attention_backend: str = "auto"  # "triton" on a CUDA GPU, else "torch_batched"; "torch_ref" is the reference
    enforce_eager: bool = False  # True: no CUDA graphs at all (they are captured only on a GPU)
    cudagraph_mode: str = "full_and_piecewise"  # or "full_decode_only": steps with prompt chunks run eagerly
    async_scheduling: bool = True  # plan a worker's step N+1 while it runs step N (vLLM's async scheduling)
    seed: int = 0  # seeds requests that bring no seed, so a run can be repeated
    # -- processes and network --------------------------------------------------------------
    num_workers: int = 1  # one model replica; the router spreads requests over more
    # A CPU worker splits a step over its threads only when the step computes at least this many
    # tokens; a smaller one (decodes, short chunks) runs on one thread. 1: every step on every
    # thread. None: CPU_PARALLEL_MIN_TOKENS for a worker of two threads or fewer, else 1 (see there).
    cpu_parallel_min_tokens: int | None = None
    # Each worker split over this many ranks and devices (tensor parallelism, modkit.worker.tensor_parallel);
    # must divide the model's attention and KV heads.
    tensor_parallel_size: int = 1
    # -- disaggregated prefill and decode (modkit.kvtransfer); 0 and 0: every worker does both ---------
    # Workers 0 .. P-1 compute prompts, P .. P+D-1 generate; num_workers is P + D (set from them when
    # left at 1). A prompt is computed on a prefill worker only when more than max_local_prefill_length
    # of its tokens are not cached on its decode worker and a prefill worker has fewer than
    # max_prefill_queue_size requests waiting (Dynamo's conditional disaggregation); else locally.
    prefill_workers: int = 0
    decode_workers: int = 0
    max_local_prefill_length: int = 0
    max_prefill_queue_size: int = 8
    kv_connector: str = "zmq"  # moves the blocks: a name in KV_CONNECTORS or "package.module:Class"
    kv_transfer_timeout_s: float = 5.0  # a decode worker's read of a prefill worker's blocks, per try
    host: str = "127.0.0.1"  # loopback: only this machine can reach the components
    allow_remote: bool = False  # a non-loopback host is refused unless this is True
    api_key: str | None = field(default=None, repr=False)  # None: the frontend asks no key (fine on loopback)
    frontend_port: int = 8001  # 8001..8006: one port per component, as in the module docstring
    scheduler_port: int = 8002
    worker_port: int = 8003  # worker-0's; further workers take the next ports no component uses
    router_port: int = 8004
    kv_cache_manager_port: int = 8005
    sampler_port: int = 8006
    log_dir: str | None = None  # where each component writes <name>.log; None: a temporary directory per launch
    # -- the frontend's limits on requests ---------------------------------------------------
    # 4 MiB: the longest legitimate body, a 128k-token context, is ~1 MiB as token ids
    # (<= 7 characters each with the comma) and ~0.5 MiB as text (~4 characters a token), ~3 MiB
    # if every character is \u-escaped; past 4 MiB a body is a mistake or an attack (413).
    max_request_body_bytes: int = 4 * 2**20
    # Requests accepted but not yet at their first token; one more gets 429 + Retry-After. 512
    # is two full batches of max_num_seqs (256): a request queued behind more would wait for two
    # batches to finish before its first token, longer than a client should hang on unanswered.
    max_queued_requests: int = 512
    # Socket name -> endpoint, for sockets that must not be ipc files in one directory
    # (components on other hosts or containers); names as in modkit/pipeline/addresses.py.
    # In a launch, a tcp:// socket speaks ZeroMQ CURVE with the launch's keys (transport/security.py).
    addresses: dict[str, str] | None = None
    # -- supervision (modkit/pipeline/supervisor.py) ----------------------------------------------
    supervise: bool = True  # restart a component whose process died (or hung), with the same settings
    max_restarts: int = 5  # restarts of one component within restart_window_s; the next death is final
    restart_window_s: float = 300.0
    restart_backoff_s: float = 1.0  # the first restart is at once; the next waits this, then twice as long...
    restart_unresponsive_after_s: float | None = 300.0  # a live process silent this long is hung; None: never
    # NOTE: a component's heartbeat waits while its serve loop is busy (a long forward, a slow
    # call), so "hung" must mean far longer than any step can take.

    # NOTE: the dataclass's __init__ would answer an unknown keyword with a bare TypeError;
    # checking the names here first gives it the same "did you mean ...?" as the other sources.
    def __new__(cls, *args: Any, **kwargs: Any) -> PipelineConfig:
        _reject_unknown_keys(kwargs)
        return object.__new__(cls)

    def __post_init__(self) -> None:
        _check_str("model", self.model, optional=True)
        _check_choice("dtype", self.dtype, DTYPES, optional=True)
        if self.device is not None:
            _check_device("device", self.device)
        _check_int("max_model_len", self.max_model_len, minimum=2, optional=True)
        _check_fraction("gpu_memory_utilization", self.gpu_memory_utilization)
        for name in ("max_num_batched_tokens", "max_num_seqs", "block_size"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("num_kv_blocks", self.num_kv_blocks, minimum=2, optional=True)  # block 0 is reserved
        _check_bool("enable_prefix_caching", self.enable_prefix_caching)
        # NOTE: three policies are checked against their registries, so a notebook that
        # registers its own must do so before building the config (and in that component's process).
        _check_choice("scheduling_policy", self.scheduling_policy, policies())
        _check_choice("router_policy", self.router_policy, ROUTER_POLICIES.names())
        _check_choice("eviction_policy", self.eviction_policy, eviction_policies())
        _check_choice("sampler", self.sampler, samplers())
        _check_choice("attention_backend", self.attention_backend, attention_backends())
        _check_bool("enforce_eager", self.enforce_eager)
        _check_choice("cudagraph_mode", self.cudagraph_mode, CUDAGRAPH_MODES)
        _check_bool("async_scheduling", self.async_scheduling)
        _check_int("seed", self.seed, minimum=0)
        _check_int("num_workers", self.num_workers, minimum=1)
        _check_int("cpu_parallel_min_tokens", self.cpu_parallel_min_tokens, minimum=1, optional=True)
        _check_int("tensor_parallel_size", self.tensor_parallel_size, minimum=1)
        self._check_roles()
        _check_bool("allow_remote", self.allow_remote)
        _check_host(self.host, self.allow_remote)
        _check_str("api_key", self.api_key, optional=True)
        if self.api_key == REDACTED:
            raise ConfigError(
                "api_key",
                f"is {REDACTED!r}, what to_dict() writes in place of a key; "
                "use to_dict(include_secrets=True) to keep the key",
            )
        _check_str("log_dir", self.log_dir, optional=True)
        _check_bool("supervise", self.supervise)
        _check_int("max_restarts", self.max_restarts, minimum=0)
        _check_seconds("restart_window_s", self.restart_window_s)
        _check_seconds("restart_backoff_s", self.restart_backoff_s, minimum=0.0)
        _check_seconds("restart_unresponsive_after_s", self.restart_unresponsive_after_s, optional=True)
        _check_int("max_request_body_bytes", self.max_request_body_bytes, minimum=1)
        _check_int("max_queued_requests", self.max_queued_requests, minimum=1)
        self._check_ports()
        self._check_addresses()
        self._check_devices()

    def worker_parallel_min_tokens(self, threads: int) -> int:
        """The fewest tokens a step of a CPU worker of ``threads`` threads runs on all of them: 1
        (every step) for a tensor-parallel worker, whose ranks keep their threads alike."""
        return 1 if self.tensor_parallel_size > 1 else cpu_parallel_min_tokens(self.cpu_parallel_min_tokens, threads)

    def _check_roles(self) -> None:
        """Prefill and decode workers come together; num_workers is their sum."""
        _check_int("prefill_workers", self.prefill_workers, minimum=0)
        _check_int("decode_workers", self.decode_workers, minimum=0)
        _check_int("max_local_prefill_length", self.max_local_prefill_length, minimum=0)
        _check_int("max_prefill_queue_size", self.max_prefill_queue_size, minimum=1)
        _check_str("kv_connector", self.kv_connector)
        _check_seconds("kv_transfer_timeout_s", self.kv_transfer_timeout_s)
        if not self.prefill_workers and not self.decode_workers:
            return
        if not self.prefill_workers or not self.decode_workers:
            field_name = "decode_workers" if self.prefill_workers else "prefill_workers"
            raise ConfigError(
                field_name,
                f"is 0 with prefill_workers={self.prefill_workers}, decode_workers={self.decode_workers}: "
                "disaggregation needs at least one of each (or neither)",
            )
        total = self.prefill_workers + self.decode_workers
        if self.num_workers == 1:
            object.__setattr__(self, "num_workers", total)  # frozen: set once, here, before anyone reads it
        elif self.num_workers != total:
            raise ConfigError(
                "num_workers",
                f"is {self.num_workers}, but prefill_workers + decode_workers is {total}: "
                "leave it out or make them agree",
            )
        if self.tensor_parallel_size != 1:
            raise ConfigError("prefill_workers", "with tensor_parallel_size > 1 is not supported yet")
        from modkit.kvtransfer.worker_side import KV_CONNECTORS  # torch and sockets: only when asked

        if ":" not in self.kv_connector and self.kv_connector not in KV_CONNECTORS.names():
            raise ConfigError(
                "kv_connector",
                f"{self.kv_connector!r} is not one of {KV_CONNECTORS.names()} nor 'package.module:Class'",
            )
        if self.kv_connector in ("shm", "cuda_ipc"):
            self._check_one_host_connector()

    def _check_one_host_connector(self) -> None:
        """The shm and cuda_ipc connectors hand memory between processes of one host: shm host
        memory, for workers on the CPU; cuda_ipc GPU memory, for workers on CUDA."""
        name = self.kv_connector
        hosts = {self._host_of_worker(i) for i in range(self.num_workers)}
        if len(hosts) > 1:
            raise ConfigError(
                "kv_connector",
                f"{name!r} moves blocks between processes of one host, but the workers run on "
                f"{sorted(hosts)}: use 'zmq' across hosts",
            )
        for i in range(self.num_workers):
            device = self.worker_device(i)
            if device is None and hosts == {"local"}:  # a worker elsewhere decides its own default
                import torch

                device = "cuda" if torch.cuda.is_available() else "cpu"
            if device is None:
                continue
            if name == "cuda_ipc" and not device.startswith("cuda"):
                raise ConfigError(
                    "kv_connector",
                    f"'cuda_ipc' needs every worker on CUDA, but worker-{i} is on {device}: use 'shm' or 'zmq'",
                )
            if name == "shm" and device.startswith("cuda"):
                raise ConfigError(
                    "kv_connector",
                    f"'shm' is for workers on the CPU, but worker-{i} is on {device}: use 'cuda_ipc' or 'zmq'",
                )

    @property
    def disaggregated(self) -> bool:
        """Whether workers have roles (prefill_workers and decode_workers)."""
        return self.prefill_workers > 0

    def worker_role(self, worker_id: int) -> str:
        """``"prefill"``, ``"decode"``, or ``"both"`` (aggregated: today's workers)."""
        if not self.disaggregated:
            return "both"
        return "prefill" if worker_id < self.prefill_workers else "decode"

    def _check_ports(self) -> None:
        owner: dict[int, str] = {}  # port -> the field that took it first
        for component in COMPONENTS:
            name = f"{component}_port"
            port = getattr(self, name)
            _check_int(name, port, minimum=1, maximum=65535)
            if port in owner:
                raise ConfigError(name, f"is {port}, the same as {owner[port]}; every component needs its own port")
            owner[port] = name
        last = self.worker_ports()[-1]
        if last > 65535:
            raise ConfigError(
                "num_workers",
                f"is {self.num_workers}, so the workers need ports up to {last} "
                f"(counting from worker_port {self.worker_port}); ports end at 65535",
            )

    def _check_addresses(self) -> None:
        if self.addresses is None:
            return
        if not isinstance(self.addresses, Mapping):
            raise ConfigError("addresses", f"must be a mapping of socket names to endpoints, {_got(self.addresses)}")
        from modkit.pipeline.addresses import socket_names
        from modkit.transport.addresses import InsecureAddressError, check_bind_address

        known = socket_names(self.num_workers)
        taken: dict[str, str] = {}  # endpoint -> the socket given it first
        for name, endpoint in self.addresses.items():
            if name not in known:
                close = difflib.get_close_matches(str(name), known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"sockets: {', '.join(known)}"
                raise ConfigError("addresses", f"has an unknown socket {name!r}; {hint}")
            if not isinstance(endpoint, str) or not endpoint.startswith(("ipc://", "tcp://")):
                raise ConfigError("addresses", f"[{name!r}] must be an 'ipc://' or 'tcp://' endpoint, got {endpoint!r}")
            try:
                check_bind_address(endpoint, allow_remote=self.allow_remote)
            except (InsecureAddressError, ValueError) as error:
                raise ConfigError("addresses", f"[{name!r}]: {error}") from None
            port = endpoint.rpartition(":")[2]
            if endpoint.startswith("tcp://") and not (port.isdigit() and 1 <= int(port) <= 65535):
                raise ConfigError(
                    "addresses", f"[{name!r}] is {endpoint!r}: its peers connect to it, so it needs a port 1 to 65535"
                )
            if endpoint in taken:
                raise ConfigError("addresses", f"gives {endpoint!r} to both {taken[endpoint]!r} and {name!r}")
            taken[endpoint] = name

    def _check_devices(self) -> None:
        if self.devices is None:
            return
        if self.device is not None:
            raise ConfigError(
                "devices", f"and device ({self.device!r}) are both set: give one device per worker, or one for all"
            )
        if not isinstance(self.devices, (list, tuple)):
            raise ConfigError("devices", f"must be a list of devices, one per worker, {_got(self.devices)}")
        if len(self.devices) != self.num_workers:
            raise ConfigError(
                "devices", f"has {len(self.devices)} entries for num_workers={self.num_workers}: give one per worker"
            )
        for device in self.devices:
            _check_device("devices", device)
        kinds = {device.partition(":")[0] for device in self.devices}
        if len(kinds) > 1:
            raise ConfigError(
                "devices",
                f"mixes {' and '.join(sorted(kinds))}: the workers are replicas, which must run one kind of "
                f"device (and so one dtype), got {self.devices!r}",
            )
        for i, device in enumerate(self.devices):
            if self._host_of_worker(i) == "local":  # one on another host checks its own device when it starts
                _check_cuda_index("devices", device)

    def _host_of_worker(self, worker_id: int) -> str:
        """The host worker ``worker_id`` runs on: its inbox's TCP host beyond loopback, else ``"local"``."""
        from modkit.transport.addresses import is_loopback, split_tcp

        endpoint = (self.addresses or {}).get(f"worker-{worker_id}.in", "")
        if not endpoint.startswith("tcp://"):
            return "local"
        host, _ = split_tcp(endpoint)
        return "local" if is_loopback(host) else host

    # -- sources ------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any]) -> PipelineConfig:
        """A config from field names to values; unknown names are refused."""
        if not isinstance(mapping, Mapping):
            raise ConfigError("config", f"must be a mapping of field names to values, got {type(mapping).__name__}")
        _reject_unknown_keys(mapping)
        return cls(**mapping)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> PipelineConfig:
        """A config from a YAML (.yaml, .yml) or JSON (.json) file holding one mapping of fields."""
        values = read_file(Path(path), _field_names())  # its errors name the file already
        try:
            return cls(**values)
        except ConfigError as err:
            reason = str(err).removeprefix(f"{err.field} ")  # ConfigError's message is f"{field} {reason}"
            raise ConfigError(err.field, f"{reason} (in {os.fspath(path)})") from err

    @classmethod
    def from_cli(cls, argv: list[str] | None = None) -> PipelineConfig:
        """A config from command-line flags (``sys.argv[1:]`` when None): ``--config FILE``, then
        one ``--flag-name`` per field, which overrides the file's value."""
        flags, config_file = parse_cli(argv, fields(cls))
        values = read_file(Path(config_file), _field_names()) if config_file is not None else {}
        values.update(flags)
        return cls.from_dict(values)

    # -- derived values -----------------------------------------------------------------------

    def resolved_model(self) -> str | None:
        """The model the workers load: ``model`` if set; else, on a CUDA device, Qwen2.5-0.5B-Instruct;
        else None, the embedded tiny model. Asks torch about CUDA only when ``device`` is None
        (worker 0's entry in ``devices``, if given)."""
        if self.model is not None:
            return self.model
        device = self.worker_device(0)
        on_cuda = device.startswith("cuda") if device is not None else torch.cuda.is_available()
        return DEFAULT_GPU_MODEL if on_cuda else None

    def worker_device(self, worker_id: int) -> str | None:
        """The device worker ``worker_id`` runs on: its entry in ``devices``, else ``device``."""
        return self.devices[worker_id] if self.devices is not None else self.device

    def workers_sharing_device(self, worker_id: int) -> int:
        """How many workers share worker ``worker_id``'s device (itself included): those of its host
        with the same device. Each sizes its KV cache for that share of the device's memory."""

        def card(i: int) -> tuple[str, str]:
            device = self.worker_device(i) or "default"
            return self._host_of_worker(i), "cuda:0" if device == "cuda" else device

        return sum(card(i) == card(worker_id) for i in range(self.num_workers))

    def worker_ports(self) -> list[int]:
        """One port per worker: ``worker_port``, then the next ports that no other component uses."""
        taken = {getattr(self, f"{c}_port") for c in COMPONENTS if c != "worker"}
        ports = [self.worker_port]
        candidate = self.worker_port + 1
        while len(ports) < self.num_workers:
            if candidate not in taken:
                ports.append(candidate)
            candidate += 1
        return ports

    def ports(self) -> dict[str, int]:
        """Every component's HTTP port: frontend, scheduler, worker-0 .. worker-N-1, router, ...."""
        ports: dict[str, int] = {}
        for component in COMPONENTS:
            if component == "worker":
                ports.update({f"worker-{i}": port for i, port in enumerate(self.worker_ports())})
            else:
                ports[component] = getattr(self, f"{component}_port")
        return ports

    def urls(self) -> dict[str, str]:
        """The ``/health`` URL of every component, named as in ``ports()``."""
        host = self.host
        address = _ip_address(host)
        if address is not None and address.is_unspecified:  # bound to every interface: ask over loopback
            host = "127.0.0.1" if address.version == 4 else "::1"
        if ":" in host:
            host = f"[{host}]"  # an IPv6 address in a URL
        return {name: f"http://{host}:{port}/health" for name, port in self.ports().items()}

    def frontend_limits(self) -> dict[str, int]:
        """The limits the OpenAI app enforces on requests: ``build_app``'s keyword arguments."""
        return {
            "max_request_body_bytes": self.max_request_body_bytes,
            "max_queued_requests": self.max_queued_requests,
        }

    def to_engine_config(self, worker_index: int = 0) -> EngineConfig:
        """The in-process engine's config for one worker. Workers are replicas, so all get the same
        settings, each on its own device (``worker_device``), which must exist on this machine."""
        if type(worker_index) is not int or not 0 <= worker_index < self.num_workers:  # a bool is no index
            raise ConfigError("worker_index", f"must be an integer in [0, {self.num_workers}), got {worker_index!r}")
        device = self.worker_device(worker_index)
        if self.devices is not None and device is not None:
            _check_cuda_index("devices", device)
        return EngineConfig(
            model=self.resolved_model(),
            dtype=self.dtype,
            device=device,
            block_size=self.block_size,
            num_kv_blocks=self.num_kv_blocks,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_num_seqs=self.max_num_seqs,
            enable_prefix_caching=self.enable_prefix_caching,
            max_model_len=self.max_model_len,
            scheduling_policy=self.scheduling_policy,
            eviction_policy=self.eviction_policy,
            sampler=self.sampler,
            attention_backend=self.attention_backend,
            gpu_memory_utilization=self.gpu_memory_utilization,
            enforce_eager=self.enforce_eager,
            cudagraph_mode=self.cudagraph_mode,
            async_scheduling=self.async_scheduling,
            seed=self.seed,
            tensor_parallel_size=self.tensor_parallel_size,
        )

    def to_dict(self, *, include_secrets: bool = False) -> dict[str, Any]:
        """Every field, JSON- and YAML-ready. The API key is written as '<redacted>' unless
        ``include_secrets``, so the dict can go to logs."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.api_key is not None and not include_secrets:
            values["api_key"] = REDACTED
        return values


# -- checks: each raises ConfigError naming the field, the bad value and what is allowed -------


def _got(value: object) -> str:
    """'got VALUE (TYPE)', for a value of the wrong type; a number in quotes (YAML's "16") says so."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            pass
        else:
            return f"got {value!r}, a string (write it without quotes)"
    return f"got {value!r} ({type(value).__name__})"


def _check_int(name: str, value: object, *, minimum: int, maximum: int | None = None, optional: bool = False) -> None:
    if value is None and optional:
        return
    allowed = f"an integer >= {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}"
    if optional:
        allowed = f"None or {allowed}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be {allowed}, {_got(value)}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ConfigError(name, f"must be {allowed}, got {value!r}")


def _check_fraction(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(name, f"must be a number in (0, 1], {_got(value)}")
    if not 0.0 < value <= 1.0:  # also refuses NaN
        raise ConfigError(name, f"must be a number in (0, 1], got {value!r}")


def _check_seconds(name: str, value: object, *, minimum: float | None = None, optional: bool = False) -> None:
    """A finite number of seconds, > 0 (or >= ``minimum`` when given)."""
    if value is None and optional:
        return
    allowed = "a number of seconds " + (f">= {minimum:g}" if minimum is not None else "> 0")
    if optional:
        allowed = f"None or {allowed}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(name, f"must be {allowed}, {_got(value)}")
    too_small = value < minimum if minimum is not None else value <= 0
    if too_small or value != value or value == float("inf"):  # value != value: NaN
        raise ConfigError(name, f"must be {allowed}, got {value!r}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(name, f"must be True or False, {_got(value)}")


def _check_str(name: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        allowed = "None or a non-empty string" if optional else "a non-empty string"
        raise ConfigError(name, f"must be {allowed}, {_got(value)}")


def _check_choice(name: str, value: object, choices: Iterable[str], *, optional: bool = False) -> None:
    if value is None and optional:
        return
    choices = list(choices)
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1) if isinstance(value, str) else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        allowed = ", ".join(map(repr, choices))
        raise ConfigError(name, f"must be {'None or ' if optional else ''}one of {allowed}, got {value!r}{hint}")


def _check_device(name: str, value: object) -> None:
    _check_str(name, value)
    kind, colon, index = str(value).partition(":")
    if kind not in DEVICES or (colon and (kind != "cuda" or not index.isdigit())):
        raise ConfigError(name, f"must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {value!r}")


def _check_cuda_index(name: str, device: str) -> None:
    """ConfigError if ``device`` is ``cuda:N`` and this machine has CUDA but no GPU N (without CUDA: no check)."""
    kind, _, index = device.partition(":")
    if kind != "cuda" or not index or not torch.cuda.is_available():
        return
    count = torch.cuda.device_count()
    if int(index) >= count:
        raise ConfigError(
            name, f"names {device!r}, but this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}"
        )


def _ip_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The host as an IP address; None for a host name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _check_host(host: object, allow_remote: bool) -> None:
    _check_str("host", host)
    address = _ip_address(str(host))
    # A host name other than localhost may resolve to any interface, so it counts as remote.
    loopback = host == "localhost" or (address is not None and address.is_loopback)
    if not loopback and not allow_remote:
        raise ConfigError(
            "host",
            f"is {host!r}, which is not loopback: other machines could reach every component, and "
            "only the frontend checks an API key, so anyone on the network could run the model or "
            "drive the scheduler and workers. Use 127.0.0.1, ::1 or localhost, or set "
            "allow_remote=True (with an api_key) if you mean to serve other machines",
        )


def _field_names() -> list[str]:
    return [f.name for f in fields(PipelineConfig)]


def _reject_unknown_keys(keys: Iterable[object]) -> None:
    reject_unknown_keys(keys, _field_names())
