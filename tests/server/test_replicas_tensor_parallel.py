"""`llavakit serve --replicas 2 --tensor-parallel-size 2`: each Ray Serve replica is rank 0 of its own two
ranks. Greedy answers equal one process's; every replica reports its own rank processes; a rank killed
with SIGKILL fails its replica's health check, its requests get a prompt 503 (none hangs), and Ray Serve
replaces the replica, ranks and all; SIGTERM leaves no rank behind.

One server serves the module (Ray and four torch processes are slow to start on two cores); the tests
run in file order, and the last one stops it. The tests before the live server need no Ray.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
import time

import psutil
import pytest

from server_helpers import Server, image_message, start_replicated, local_message, png_bytes

START_TIMEOUT_S = 300  # Ray, two replicas and their two ranks each, on a busy 2-core machine
REPLACE_TIMEOUT_S = 180
ANSWER_TIMEOUT_S = 30  # no request may take longer, a dead rank or not
NAME = "tp"
_RANK = re.compile(r'llavakit_replica_rank_resident_memory_bytes\{node="[^"]*",pid="(\d+)",rank="(\d+)",'
                   r'replica="([^"]+)"\}')


# ───────────────────────────── resources, health and metrics, without Ray ─────────────────────────────


def test_a_replica_reserves_for_every_rank_and_refuses_a_gpu_share(capsys):
    from llavakit.cli import main
    from llavakit.errors import ConfigError
    from llavakit.server.replicas import ReplicaOptions, _reservation

    cpu = ReplicaOptions(replicas=2, tensor_parallel_size=2, num_cpus_per_replica=1.5)
    assert (cpu.replica_cpus, cpu.replica_gpus) == (3.0, 0.0)
    assert _reservation(cpu) == ", each on 2 tensor-parallel ranks, reserving 3 CPUs"
    gpu = ReplicaOptions(replicas=2, tensor_parallel_size=4, num_gpus_per_replica=1)
    assert (gpu.replica_cpus, gpu.replica_gpus) == (4.0, 4.0)
    assert (ReplicaOptions(replicas=2).replica_cpus, _reservation(ReplicaOptions(replicas=2))) == (1.0, "")
    with pytest.raises(ConfigError, match=re.escape("--num-gpus-per-replica is per rank and must be 0 or 1 (each "
                                                    "rank runs on one whole GPU), got 0.5")):
        ReplicaOptions(replicas=2, tensor_parallel_size=2, num_gpus_per_replica=0.5)
    with pytest.raises(ConfigError, match=re.escape("--tensor-parallel-size must be 1 or more, got 0")):
        ReplicaOptions(replicas=2, tensor_parallel_size=0)
    # A local cluster short of GPUs for every rank of every replica is refused before anything is deployed.
    from llavakit.server.config import ServerConfig
    from llavakit.server.replicas import ReplicaStartError, _deploy

    class OneGpu:
        @staticmethod
        def cluster_resources():
            return {"CPU": 8.0, "GPU": 1.0}

    with pytest.raises(ReplicaStartError, match=re.escape(
            "1 replica(s) x --num-gpus-per-replica 1 x --tensor-parallel-size 2 need more GPUs than this machine "
            "has (1)")):
        _deploy(OneGpu, None, "app", None, "m", ServerConfig(),
                ReplicaOptions(replicas=1, max_replicas=1, tensor_parallel_size=2, num_gpus_per_replica=1), True, {},
                30)
    # The command line takes the combination (it used to refuse it) and checks it before starting Ray.
    assert main(["serve", "--replicas", "2", "--tensor-parallel-size", "2", "--num-gpus-per-replica", "2"]) == 2
    assert "per rank and must be 0 or 1" in capsys.readouterr().err


def test_a_replica_whose_rank_failed_is_unhealthy_and_answers_503():
    from llavakit.errors import ParallelError
    from llavakit.server.config import ServerConfig
    from llavakit.server.front import Forwarded
    from llavakit.server.replicas import EngineReplica

    class Driver:
        failed = None
        workers = []

    class Vlm:
        parallel = Driver()

    class Probe(EngineReplica):
        def __del__(self):  # nothing to stop (EngineReplica's is a coroutine Ray Serve awaits)
            pass

    replica = object.__new__(Probe)  # the health check and the refusal, without Ray or a model
    replica.vlm, replica.config, replica.app = Vlm(), ServerConfig(), None
    asyncio.run(replica.check_health())
    Vlm.parallel.failed = "tensor-parallel rank 1 (pid 4242) was killed by SIGKILL"
    with pytest.raises(ParallelError, match=r"rank 1 \(pid 4242\) was killed by SIGKILL; this replica cannot run "
                                            "its model any more and is being replaced"):
        asyncio.run(replica.check_health())

    async def answer() -> list[dict]:
        request = Forwarded("POST", "/v1/chat/completions", b"", [(b"content-type", b"application/json")], b"{}")
        return [m async for m in replica.call(request)]

    start, body = asyncio.run(answer())
    assert start["status"] == 503 and (b"retry-after", b"1") in start["headers"]
    error = json.loads(body["body"])["error"]
    assert error["code"] == "overloaded" and "tensor-parallel rank of the replica" in error["message"]


def test_metrics_list_each_replicas_ranks():
    from prometheus_client.parser import text_string_to_metric_families

    from llavakit.server.front import FrontMetrics, ReplicaReport

    reports = [ReplicaReport("r1", 11, "10.0.0.1", 300, "", 0.5, ((0, 11, 300), (1, 21, 200))),
               ReplicaReport("r2", 12, "10.0.0.1", 310, "", 0.5, ((0, 12, 310), (1, 22, 210))),
               ReplicaReport("gone", 13, "10.0.0.1", 320, "", 60.0, ((0, 13, 320), (1, 23, 220)))]
    samples = {(s.labels["replica"], s.labels["rank"], s.labels["pid"]): s.value
               for family in text_string_to_metric_families(FrontMetrics().render(reports).decode())
               for s in family.samples if s.name == "llavakit_replica_rank_resident_memory_bytes"}
    assert samples == {("r1", "0", "11"): 300, ("r1", "1", "21"): 200, ("r2", "0", "12"): 310,
                       ("r2", "1", "22"): 210}
    plain = FrontMetrics().render([ReplicaReport("r1", 11, "10.0.0.1", 300, "", 0.5)]).decode()
    assert "rank_resident" not in plain  # replicas without ranks: no such series


# ───────────────────────────── a live server: 2 replicas x 2 ranks ─────────────────────────────


@pytest.fixture(scope="module")
def tp_replicas(checkpoint, tmp_path_factory):
    """`llavakit serve --replicas 2 --tensor-parallel-size 2` of the tiny random Llama checkpoint."""
    log = tmp_path_factory.mktemp("replicas_tp") / "server.log"
    s = start_replicated(checkpoint("llama"), NAME, ["--replicas", "2", "--tensor-parallel-size", "2",
                                                     "--shutdown-timeout", "2"], log, START_TIMEOUT_S)
    yield s
    if s.proc.poll() is None:
        s.proc.kill()
        s.proc.wait(30)


@pytest.fixture(scope="module")
def one_process(checkpoint):
    """The same checkpoint loaded in this process, for reference answers."""
    import llavakit
    import torch

    return llavakit.load(checkpoint("llama"), dtype=torch.float32)


def _groups(s: Server) -> dict[str, dict[int, int]]:
    """{replica id: {rank: pid}} of the replicas reporting in /metrics."""
    out: dict[str, dict[int, int]] = {}
    for key in s.metrics():
        if m := _RANK.fullmatch(key):
            out.setdefault(m[3], {})[int(m[2])] = int(m[1])
    return out


def _rank_processes(root: int) -> dict[int, int]:
    """{pid: parent pid} of every tensor-parallel rank process below `root`."""
    out = {}
    for p in psutil.Process(root).children(recursive=True):
        try:
            if "llavakit.parallel.entry" in " ".join(p.cmdline()):
                out[p.pid] = p.ppid()
        except psutil.NoSuchProcess:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _question(i: int) -> tuple[str, bytes]:
    return f"Question {i}: what is in the picture?", png_bytes(24 + i, 20 + 2 * i, seed=i)


def _body(i: int) -> dict:
    text, image = _question(i)
    return {"model": NAME, "messages": image_message(text, image), "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}


def _first_choice(i: int, replicas: list[str]) -> str:
    """The replica the router sends question i to while no replica is loaded (its media key's first)."""
    from llavakit.server.front import affinity_key
    from llavakit.server.replicas import rank

    return rank(affinity_key(json.dumps(_body(i)).encode()), replicas)[0]


def _post(s: Server, body: dict, out: dict, key) -> None:
    started = time.monotonic()
    try:
        status, raw, _ = s.request("POST", "/v1/chat/completions", json.dumps(body).encode(),
                                   {"Content-Type": "application/json"}, timeout=ANSWER_TIMEOUT_S)
        out[key] = (status, json.loads(raw), time.monotonic() - started)
    except Exception as e:  # a timeout above all: reported by the test
        out[key] = (None, repr(e), time.monotonic() - started)


def _concurrently(s: Server, bodies: dict) -> dict:
    out: dict = {}
    threads = [threading.Thread(target=_post, args=(s, body, out, key)) for key, body in bodies.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(ANSWER_TIMEOUT_S + 10)
    assert not any(t.is_alive() for t in threads), "a request hung"
    return out


def _want(one_process, i: int) -> str:
    import llavakit

    text, image = _question(i)
    return one_process.chat(local_message(text, image),
                            sampling=llavakit.SamplingParams(max_new_tokens=8, ignore_eos=True)).text


def test_each_replica_runs_its_own_ranks_and_answers_as_one_process(tp_replicas, one_process):
    s = tp_replicas
    groups = _groups(s)
    assert len(groups) == 2 and all(sorted(g) == [0, 1] for g in groups.values()), groups
    replica_pids = {int(m[1]) for key in s.metrics() if (m := re.search(
        r'^llavakit_replica_resident_memory_bytes\{node="[^"]*",pid="(\d+)"', key))}
    assert {g[0] for g in groups.values()} == replica_pids  # rank 0 is the replica's own process
    # Rank 1 of each replica is a process of its own, started by that replica (its parent), and the
    # process tree holds exactly these ranks.
    ranks = _rank_processes(s.proc.pid)
    assert ranks == {g[1]: g[0] for g in groups.values()}, (ranks, groups)
    assert len(set(ranks)) == 2 and not set(ranks) & replica_pids
    # Two questions for each replica (the router's first choice, computed as it computes it), at once.
    per_replica: dict[str, list[int]] = {r: [] for r in groups}
    for i in range(40):
        chosen = per_replica[_first_choice(i, list(groups))]
        if len(chosen) < 2:
            chosen.append(i)
    questions = [i for chosen in per_replica.values() for i in chosen]
    assert len(questions) == 4
    answers = _concurrently(s, {i: _body(i) for i in questions})
    for i in questions:
        status, reply, _ = answers[i]
        assert status == 200, reply
        assert reply["choices"][0]["message"]["content"] == _want(one_process, i)


def test_a_killed_rank_fails_its_replica_fast_and_the_replica_is_replaced(tp_replicas, one_process):
    s = tp_replicas
    groups = _groups(s)
    victim, survivor = sorted(groups)
    os.kill(groups[victim][1], signal.SIGKILL)
    time.sleep(2)  # rank 0 looks at its ranks twice a second
    bodies = {}
    for i in range(40, 200):
        bodies.setdefault(_first_choice(i, [victim, survivor]), (i, _body(i)))
        if len(bodies) == 2:
            break
    answers = _concurrently(s, {replica: body for replica, (_, body) in bodies.items()} |
                            {"text": {"model": NAME, "messages": [{"role": "user", "content": "Hi"}],
                                      "max_tokens": 2}})
    status, reply, took = answers[victim]
    assert status == 503 and reply["error"]["code"] == "overloaded", reply
    assert "tensor-parallel rank of the replica answering this request failed" in reply["error"]["message"]
    assert took < 10
    status, reply, _ = answers[survivor]
    assert status == 200 and reply["choices"][0]["message"]["content"] == _want(one_process, bodies[survivor][0])
    assert answers["text"][0] in (200, 503), answers["text"]  # routed by load: to either replica

    # Ray Serve stops the broken replica after its health checks fail and starts another, with new ranks.
    deadline = time.monotonic() + REPLACE_TIMEOUT_S
    while True:
        now = _groups(s)
        if victim not in now and len(now) == 2 and all(sorted(g) == [0, 1] and all(map(_alive, g.values()))
                                                       for g in now.values()):
            break
        assert time.monotonic() < deadline, f"no replacement within {REPLACE_TIMEOUT_S} s: {now}\n{s.log_tail()}"
        time.sleep(1)
    assert now[survivor] == groups[survivor]
    assert not _alive(groups[victim][0]) and not _alive(groups[victim][1]), "the broken replica's processes remain"
    assert set(_rank_processes(s.proc.pid)) == {g[1] for g in now.values()}
    (fresh,) = set(now) - {survivor}
    i = next(i for i in range(200, 400) if _first_choice(i, list(now)) == fresh)
    status, reply, _ = _concurrently(s, {i: _body(i)})[i]
    assert status == 200 and reply["choices"][0]["message"]["content"] == _want(one_process, i)


def test_sigterm_stops_every_replica_and_every_rank(tp_replicas):
    s = tp_replicas
    groups = _groups(s)
    processes = [pid for g in groups.values() for pid in g.values()]
    assert len(set(processes)) == 4
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(30) == 0, s.log_tail()
    gone_by = time.monotonic() + 10
    while any(map(_alive, processes)) and time.monotonic() < gone_by:
        time.sleep(0.2)
    assert not [pid for pid in processes if _alive(pid)], "a replica or a rank outlived the server"
    assert time.monotonic() - t0 < 40
