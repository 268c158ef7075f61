"""Start a tensor-parallel model: check the split, start the ranks, load each rank's share, connect them.

    llavakit.load(..., tensor_parallel_size=N)
      config.json only ─► make_plan: an impossible split is a ConfigError before any weight is read
      one machine   ─► this process is rank 0; ranks 1..N-1 are started here (`python -m
                       llavakit.parallel.entry`) and meet at a TCPStore on 127.0.0.1, on a free port
      torchrun      ─► RANK / WORLD_SIZE from the environment (any number of machines); ranks other
                       than 0 serve inside `load` and end the program when rank 0 closes the model
      every rank    ─► load_model(split) (its slices only) ─► native linears ─► collectives (layers.py)
      rank 0        ─► processor, Driver (commands, heartbeat, watching), one startup line per rank

On a CPU every rank computes with the caller's torch thread count divided by N (at least 1), so N
ranks share the cores the one process had; rank 0 gets its own count back from `close()`.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .. import errors, original
from ..checkpoint import Checkpoint, resolve_dtype
from ..config import LlavaConfig
from ..errors import ConfigError, LlavakitError, ParallelError
from ..model.build import load_model
from ..model.linear import speed_up_linears
from ..model.quant import check_method, stored_quantization
from ..processing.processor import Processor
from ..runtime import keep_freed_memory
from ..weights import read_raw_config, resolve_model_dir
from .comm import Comm, collective_timeout, local_groups, torchrun_groups
from .driver import Driver, describe_exit
from .layers import connect
from .plan import Plan, make_plan
from .shard import Split
from .worker import SPEC_ENV, serve_commands

START_TIMEOUT = timedelta(minutes=30)  # torchrun: how long ranks wait for each other to start and load


def open_parallel(name_or_path, dtype, device, revision, vision_tower, conv_template, quantize: str,
                  size: int) -> tuple[Checkpoint, Driver]:
    """Rank 0's checkpoint parts and the Driver of the other ranks; `llavakit.load`'s arguments."""
    check_method(quantize)
    keep_freed_memory()
    folder = resolve_model_dir(name_or_path, revision)  # a hub download happens here, once
    raw = read_raw_config(folder)
    if original.is_original(raw) or vision_tower is not None or conv_template is not None:
        raise ConfigError("tensor_parallel_size reads llava-hf-format checkpoints; convert an original-format one "
                          "first (llavakit convert --to hf SRC DST).")
    if stored_quantization(raw) is not None:
        raise ConfigError(f"{folder} is saved quantised, and tensor-parallel ranks slice unquantised weights; load "
                          "the unquantised checkpoint with quantize='int8' or 'int4' instead.")
    torch_dtype = resolve_dtype(dtype, raw, device)
    cfg = LlavaConfig.from_hf(raw)
    base = torch.device(device)
    ranks = _torchrun_ranks()
    devices, kind = _devices(base, ranks)
    plan = make_plan(cfg, size, devices, kind)  # before any weight is read
    if ranks is None:
        ckpt, driver = _start_local(folder, cfg, plan, torch_dtype, base, quantize)
    else:
        ckpt, driver = _join_torchrun(folder, cfg, plan, torch_dtype, base, quantize, ranks)
    driver.parameters = whole_parameters(cfg)
    return ckpt, driver


def load_rank(folder: Path, cfg: LlavaConfig, dtype: torch.dtype, device: torch.device, quantize: str, split: Split,
              comm: Comm) -> torch.nn.Module:
    """This rank's model: its slices read, its linear layers made native on a CPU, collectives added."""
    model = load_model(folder, cfg, dtype, quantize=quantize, split=split).to(device)
    if device.type == "cpu":
        speed_up_linears(model)
    return connect(model, split, comm)


def rank_info(model) -> dict:
    """Weight bytes and key/value cache facts of one rank, for the startup lines."""
    from ..engine.async_engine import EngineConfig
    from ..engine.blocks import BLOCK
    from ..engine.runner import cache_heads, kv_budget_blocks

    tensors = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    text = model.cfg.text
    per_token = 2 * text.num_layers * cache_heads(model) * text.head_dim * model.dtype.itemsize
    default = EngineConfig()
    return {"weights": sum(t.numel() * t.element_size() for t in tensors.values()), "kv_token_bytes": per_token,
            "kv_tokens": kv_budget_blocks(model, default.max_batch_size, default.kv_cache_bytes) * BLOCK}


def run_worker(spec: dict) -> None:
    """A rank started by `_start_local`: load, report, connect, serve until STOP (see worker.py)."""
    rank, size = spec["rank"], spec["size"]
    torch.set_num_threads(spec["threads"])
    timeout = timedelta(seconds=spec["timeout_s"])
    store = dist.TCPStore("127.0.0.1", spec["port"], size, False, timeout=timeout)
    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    keep_freed_memory()
    folder = Path(spec["folder"])
    raw = read_raw_config(folder)
    cfg = LlavaConfig.from_hf(raw)
    split = Split(make_plan(cfg, size, size, "ranks"), rank)  # rank 0 checked the devices
    comm = Comm(rank, size, device)
    try:
        model = load_rank(folder, cfg, resolve_dtype(spec["dtype"], raw), device, spec["quantize"], split, comm)
    except LlavakitError as e:  # rank 0 raises it, naming this rank
        store.set(f"failed/{rank}", json.dumps({"type": type(e).__name__, "message": str(e)}))
        raise SystemExit(2)
    store.set(f"loaded/{rank}", json.dumps(rank_info(model)))
    while not store.check(["go"]):  # rank 0 may still be loading; it is watched by watch_parent meanwhile
        time.sleep(0.05)
    comm.connect(*local_groups(store, rank, size, device, timeout))
    serve_commands(model, comm)


# -- one machine -------------------------------------------------------------------------------------------------
def _start_local(folder, cfg, plan: Plan, dtype, base: torch.device, quantize: str) -> tuple[Checkpoint, Driver]:
    size = plan.size
    before = torch.get_num_threads()
    threads = max(1, before // size) if base.type == "cpu" else before
    timeout = collective_timeout()
    store = dist.TCPStore("127.0.0.1", 0, size, True, timeout=timeout, wait_for_workers=False)
    spec = {"folder": str(folder), "dtype": str(dtype).removeprefix("torch."), "quantize": quantize, "size": size,
            "port": store.port, "threads": threads, "timeout_s": timeout.total_seconds(), "parent": os.getpid()}
    workers: list[subprocess.Popen] = []
    try:
        for rank in range(1, size):
            workers.append(_start_worker({**spec, "rank": rank, "device": str(_rank_device(base, rank))}))
        torch.set_num_threads(threads)
        split = Split(plan, 0)
        comm = Comm(0, size, _rank_device(base, 0))
        model = load_rank(folder, cfg, dtype, comm.device, quantize, split, comm)
        processor = Processor.load(folder, cfg)
        infos = [rank_info(model)] + _wait_loaded(store, workers)
        store.set("go", "1")
        comm.connect(*local_groups(store, 0, size, comm.device, timeout))
    except BaseException:
        for p in workers:
            p.kill()
            p.wait()
        torch.set_num_threads(before)
        raise
    driver = Driver(comm, split, workers, restore_threads=before)
    driver.attach(model)
    _print_startup(plan, comm.device, threads, infos)
    return Checkpoint(folder, cfg, model, processor), driver


def _start_worker(spec: dict) -> subprocess.Popen:
    """Start one rank: this Python, this llavakit, one pipe on stdin that tells it when rank 0 is gone."""
    package_root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    env = dict(os.environ, **{SPEC_ENV: json.dumps(spec), "OMP_NUM_THREADS": str(spec["threads"]),
                              "PYTHONPATH": package_root + (os.pathsep + path if path else "")})
    # stdout stays quiet (the program's own output is rank 0's); errors reach stderr.
    return subprocess.Popen([sys.executable, "-m", "llavakit.parallel.entry"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, env=env)


def _wait_loaded(store, workers: list[subprocess.Popen]) -> list[dict]:
    """Each other rank's rank_info once it has loaded; its error (with its rank) if it failed."""
    infos: dict[int, dict] = {}
    while len(infos) < len(workers):
        for rank, p in enumerate(workers, start=1):
            if rank in infos:
                continue
            if store.check([f"failed/{rank}"]):
                record = json.loads(store.get(f"failed/{rank}"))
                cls = getattr(errors, record["type"], None)
                if not (isinstance(cls, type) and issubclass(cls, LlavakitError)):
                    cls = ParallelError
                raise cls(f"{record['message']} (tensor-parallel rank {rank})")
            if store.check([f"loaded/{rank}"]):
                infos[rank] = json.loads(store.get(f"loaded/{rank}"))
            elif (code := p.poll()) is not None:
                raise ParallelError(f"tensor-parallel rank {rank} (pid {p.pid}) {describe_exit(code)} while loading; "
                                    "its messages are above.")
        time.sleep(0.02)
    return [infos[r] for r in sorted(infos)]


# -- torchrun ----------------------------------------------------------------------------------------------------
def _torchrun_ranks() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when torchrun (or another launcher setting its variables) started us."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))


def _join_torchrun(folder, cfg, plan: Plan, dtype, base: torch.device, quantize: str,
                   ranks: tuple[int, int, int]) -> tuple[Checkpoint, Driver]:
    rank, world, local_rank = ranks
    if world != plan.size:
        raise ConfigError(f"tensor_parallel_size {plan.size} under torchrun needs {plan.size} processes in all, "
                          f"and WORLD_SIZE is {world}; start torchrun with --nnodes x --nproc-per-node = {plan.size}.")
    device = _rank_device(base, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    split, comm = Split(plan, rank), Comm(rank, world, device)
    comm.connect(*torchrun_groups(device, collective_timeout(), START_TIMEOUT))
    model = load_rank(folder, cfg, dtype, device, quantize, split, comm)
    infos: list = [None] * world
    dist.all_gather_object(infos, rank_info(model))  # on the default group: waits for every rank's load
    if rank != 0:
        try:
            serve_commands(model, comm)
        except ParallelError as e:
            print(f"llavakit: tensor-parallel rank {rank}: {e}", file=sys.stderr, flush=True)
            sys.exit(1)
        sys.exit(0)  # rank 0 closed the model; this process has nothing else to do
    processor = Processor.load(folder, cfg)
    driver = Driver(comm, split, [])
    driver.attach(model)
    _print_startup(plan, device, torch.get_num_threads(), infos)
    return Checkpoint(folder, cfg, model, processor), driver


# -- helpers -----------------------------------------------------------------------------------------------------
def _devices(base: torch.device, ranks: tuple[int, int, int] | None) -> tuple[int, str]:
    """How many devices the ranks can have, in all, and what they are called."""
    machines = 1
    if ranks is not None:  # torchrun: as many machines as WORLD_SIZE / LOCAL_WORLD_SIZE
        machines = max(1, ranks[1] // int(os.environ.get("LOCAL_WORLD_SIZE", ranks[1])))
    if base.type == "cuda":
        return machines * max(0, torch.cuda.device_count() - (base.index or 0)), "GPUs"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return machines * cores, "CPU cores"


def _rank_device(base: torch.device, local_rank: int) -> torch.device:
    """Rank `local_rank`'s device on its machine: the CPU, or the GPU `local_rank` places after `base`."""
    if base.type == "cuda":
        return torch.device("cuda", (base.index or 0) + local_rank)
    return base


def whole_parameters(cfg: LlavaConfig) -> int:
    """The whole model's parameter count (every rank's shares together), from a model on the meta device."""
    from ..model.llava import LlavaModel

    with torch.device("meta"):
        model = LlavaModel(cfg)
    model.tie_weights()
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _print_startup(plan: Plan, device: torch.device, threads: int, infos: list[dict]) -> None:
    """One line for the group, one per rank: what each holds."""
    backend = "gloo" if device.type != "cuda" else "nccl"
    each = f", {threads} thread{'s' if threads > 1 else ''} each" if device.type == "cpu" else ""
    tower = "split" if plan.vision_split else "on rank 0 only"
    lines = [f"[llavakit] tensor parallel over {plan.size} ranks ({device.type}, {backend}{each}); "
             f"vision tower and projector {tower}"]
    for rank, info in enumerate(infos):
        lines.append(f"[llavakit]   rank {rank}: weights {_size(info['weights'])}, KV cache "
                     f"{_size(info['kv_token_bytes'])} per token, {info['kv_tokens']:,} tokens at the default budget")
    print("\n".join(lines), file=sys.stderr, flush=True)
