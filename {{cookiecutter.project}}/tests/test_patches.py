"""The torch behaviour each patch of launcher/patches.py relies on, checked against the
installed torch, each patch alone: a torch that changes it fails here, not in a job. The
patches' effects on whole jobs are in tests/test_launch.py and tests/test_elastic.py (named in
each test below)."""

import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
from nodes import ROOT, free_port

from launcher import patches as patches_module


@pytest.fixture
def patches():
    """launcher/patches.py; torch's own functions back in place after the test."""
    yield patches_module
    for where, name, _ in patches_module.PATCHES:
        setattr(where, name, patches_module.ORIGINAL[patches_module.torch_name(where, name)])


def test_the_table_names_each_patch_once_and_keeps_torchs_own_by_that_name(patches):
    names = [patches.torch_name(where, name) for where, name, _ in patches.PATCHES]
    assert len(set(names)) == len(names) == len(patches.ORIGINAL)
    for (where, name, patch), torch_name in zip(patches.PATCHES, names, strict=True):
        assert patches.ORIGINAL[torch_name] is not patch and callable(patch)
        patches.install(min_nodes=1, max_nodes=2, rdzv_timeout=30, only=[patch.__name__])
        for other_where, other_name, other in patches.PATCHES:  # this one alone is installed
            own = patches.ORIGINAL[patches.torch_name(other_where, other_name)]
            assert getattr(other_where, other_name) is (patch if other is patch else own)
        setattr(where, name, patches.ORIGINAL[torch_name])


def test_the_pinned_torch_is_the_one_tested_and_another_is_named(patches):
    import torch

    assert patches.version_warning() is None, torch.__version__  # the pin and the patches agree
    assert patches.version_warning("2.14.1+cpu") is None
    warning = patches.version_warning("2.15.0")
    assert "torch 2.15.0" in warning and f"tested with torch {patches.TESTED_TORCH}" in warning


def context(rdzv, participants, round_, complete, min_nodes, max_nodes):
    state = rdzv._RendezvousState()
    state.round, state.complete = round_, complete
    now = datetime.now().astimezone()  # aware, as torch's heartbeats are
    for i in range(participants):
        node = rdzv._NodeDesc(f"10.0.0.{i}", 100 + i, 0)
        state.participants[node] = i
        state.last_heartbeats[node] = now
    timeout = rdzv.RendezvousTimeout(last_call=timedelta(seconds=2))
    settings = rdzv.RendezvousSettings("job", min_nodes, max_nodes, timeout, timedelta(1), 3)
    this = rdzv._NodeDesc("10.0.0.99", 999, 0)
    state.last_heartbeats[this] = now
    return rdzv._RendezvousContext(this, state, settings)


def test_a_node_started_with_the_jobs_first_size_waits_for_the_next_round(patches):
    """join_at_the_jobs_sizes: a node started with NODES=2 for a running job of 2 whose
    MAX_NODES is 3. torch alone puts it in the redundancy list (never taken in)."""
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous as rdzv

    deadline = 1e12  # far away: the op compares it with time.monotonic()
    original = patches.ORIGINAL["_RendezvousJoinOp.__call__"]
    ctx = context(rdzv, participants=2, round_=1, complete=True, min_nodes=2, max_nodes=2)
    assert original(rdzv._RendezvousJoinOp(), ctx, deadline) == rdzv._Action.ADD_TO_REDUNDANCY_LIST
    patches.install(min_nodes=1, max_nodes=3, rdzv_timeout=30, only=["join_at_the_jobs_sizes"])
    ctx = context(rdzv, participants=2, round_=1, complete=True, min_nodes=2, max_nodes=2)
    assert rdzv._RendezvousJoinOp()(ctx, deadline) == rdzv._Action.ADD_TO_WAIT_LIST
    assert (ctx.settings.min_nodes, ctx.settings.max_nodes) == (1, 3)
    # The job's first round keeps the sizes the node was started with: all NODES.
    ctx = context(rdzv, participants=1, round_=0, complete=False, min_nodes=2, max_nodes=2)
    rdzv._RendezvousJoinOp()(ctx, deadline)
    assert (ctx.settings.min_nodes, ctx.settings.max_nodes) == (2, 2)


def test_a_survivor_drops_the_dead_of_its_round_and_ends_the_last_call_once_the_rest_are_in(
    patches,
):
    """reform_without_the_dead (tests/test_elastic.py: the kill of rank 0's node). torch keeps a
    member whose heartbeats stopped for HEARTBEAT_MISSES intervals, then waits out the last
    call."""
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous as rdzv

    deadline = 1e12
    only = ["join_at_the_jobs_sizes"]
    node = patches.install(min_nodes=1, max_nodes=3, rdzv_timeout=30, only=only)
    original = patches.ORIGINAL["_RendezvousJoinOp.__call__"]
    ctx = context(rdzv, participants=2, round_=1, complete=True, min_nodes=1, max_nodes=3)
    object.__setattr__(ctx.settings, "keep_alive_interval", timedelta(seconds=1))
    state, now = ctx.state, datetime.now().astimezone()
    dead, survivor = list(state.participants)
    del state.participants[survivor]  # it left the round after its ranks failed, as this node
    state.wait_list |= {ctx.node, survivor}
    node.members = {ctx.node, dead, survivor}
    state.last_heartbeats[dead] = now - timedelta(seconds=1.2)  # a member still training
    rdzv._RendezvousJoinOp()(ctx, deadline)
    assert dead in state.participants
    state.last_heartbeats[dead] = now - timedelta(seconds=1.6)
    assert original(rdzv._RendezvousJoinOp(), ctx, deadline) != rdzv._Action.KEEP_ALIVE
    assert dead in state.participants  # torch waits for 3 intervals
    node.members = {ctx.node, survivor}  # a node not of that round (a new one) drops nobody
    rdzv._RendezvousJoinOp()(ctx, deadline)
    assert dead in state.participants
    node.members = {ctx.node, dead, survivor}
    assert rdzv._RendezvousJoinOp()(ctx, deadline) == rdzv._Action.KEEP_ALIVE
    assert dead not in state.participants and dead not in state.last_heartbeats
    assert (state.complete, state.round, node.dead) == (False, 2, {dead})
    # The next round's last call: it ends once every other member of the last round is in.
    state.wait_list.clear()
    state.participants.update({ctx.node: 0})
    state.deadline = datetime.now(UTC) + timedelta(seconds=1)
    assert rdzv._RendezvousJoinOp()(ctx, deadline) != rdzv._Action.MARK_RENDEZVOUS_COMPLETE
    state.participants.update({survivor: 0})
    assert rdzv._RendezvousJoinOp()(ctx, deadline) == rdzv._Action.MARK_RENDEZVOUS_COMPLETE


def test_a_re_form_ends_its_last_call_once_every_node_expected_has_joined(patches):
    """end_the_last_call_once_all_are_in (tests/test_elastic.py: the join and the kill; the
    bench's `make scale NODES=3`). torch completes the round only at its deadline."""
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous as rdzv

    deadline = 1e12
    only = ["join_at_the_jobs_sizes"]
    node = patches.install(min_nodes=1, max_nodes=4, rdzv_timeout=30, only=only)
    original = patches.ORIGINAL["_RendezvousJoinOp.__call__"]
    complete = rdzv._Action.MARK_RENDEZVOUS_COMPLETE
    ctx = context(rdzv, participants=2, round_=2, complete=False, min_nodes=1, max_nodes=4)
    state = ctx.state
    member, joiner = list(state.participants)
    del state.participants[joiner]
    state.wait_list.add(joiner)  # it asked to join: the re-form is for it
    state.participants[ctx.node] = 0
    state.deadline = datetime.now(UTC) + timedelta(seconds=1)
    node.members = {ctx.node, member}  # the last round
    assert rdzv._RendezvousJoinOp()(ctx, deadline) != complete
    state.wait_list.clear()
    state.participants[joiner] = 0
    assert original(rdzv._RendezvousJoinOp(), ctx, deadline) != complete
    assert rdzv._RendezvousJoinOp()(ctx, deadline) == complete
    spare = rdzv._NodeDesc("10.0.0.50", 150, 0)
    state.redundancy_list.add(spare)  # a spare on its way to a place
    assert rdzv._RendezvousJoinOp()(ctx, deadline) != complete
    state.redundancy_list.clear()  # and between torch's two steps, in no list
    node.had_spares = True
    assert rdzv._RendezvousJoinOp()(ctx, deadline) != complete
    node.had_spares = False
    node.members = {ctx.node, member, spare}  # a member that left (a stop) never comes
    assert rdzv._RendezvousJoinOp()(ctx, deadline) != complete
    node.members = set()  # a node new to the job knows no round to wait for
    assert rdzv._RendezvousJoinOp()(ctx, deadline) != complete


def test_torch_serves_the_rendezvous_state_from_a_one_second_cache_and_ours_from_poll_s(patches):
    """remembered_c10d_handler: a node polling every POLL_S reads the state that often."""
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous as rdzv
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import create_backend

    params = RendezvousParameters("c10d", f"127.0.0.1:{free_port()}", "cache", 1, 1, is_host=True)
    backend, store = create_backend(params)
    assert rdzv.create_handler(store, backend, params)._state_holder._cache_duration == 1
    patches.install(min_nodes=1, max_nodes=1, rdzv_timeout=30)
    handler = patches.remembered_c10d_handler(params)
    assert handler._state_holder._cache_duration == patches.POLL_S


class RecordingStore:
    """A store that holds keys in a dict and records the methods torch calls."""

    def __init__(self):
        self.keys, self.calls = {}, []

    def __getattr__(self, name):
        raise AssertionError(f"torch called store.{name}, which PolledStore does not have")

    def set(self, key, value):
        self.calls.append("set")
        self.keys[key] = value

    def multi_set(self, keys, values):
        self.calls.append("multi_set")
        self.keys.update(zip(keys, values, strict=True))

    def get(self, key):
        self.calls.append("get")
        return self.keys[key]

    def multi_get(self, keys):
        self.calls.append("multi_get")
        return [self.keys[key] for key in keys]

    def check(self, keys):
        return all(key in self.keys for key in keys)


def test_torchs_process_count_exchange_uses_only_the_calls_polled_store_has(patches):
    """assign_ranks_between_heartbeats hands torch a PolledStore, which has set, multi_set, get
    and multi_get only."""
    from torch.distributed.elastic.agent.server.api import WorkerSpec
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    os.environ.pop("TORCH_ELASTIC_WORKER_IDENTICAL", None)
    spec = WorkerSpec("default", 2, rdzv_handler=None, entrypoint="train.py")
    store = RecordingStore()
    polled = patches.PolledStore(store, 5, lambda: False)
    assign = patches.ORIGINAL["LocalElasticAgent._assign_worker_ranks"]
    workers = assign(LocalElasticAgent.__new__(LocalElasticAgent), polled, 0, 1, spec)
    assert [w.global_rank for w in workers] == [0, 1] and workers[0].world_size == 2
    assert set(store.calls) <= {"set", "multi_set", "get", "multi_get"} and store.calls


def test_a_wait_for_a_dropped_nodes_key_ends_at_once(patches):
    """PolledStore (tests/test_elastic.py: a node lost as its round forms)."""
    from torch.distributed import DistStoreError

    polled = patches.PolledStore(RecordingStore(), 100, lambda: True)
    with pytest.raises(DistStoreError, match="never wrote"):
        polled.get("torchelastic/role_info/1")


def test_torchs_exit_barrier_waits_out_a_member_that_never_comes_and_ours_ends_when_it_is_gone(
    patches, monkeypatch, capsys
):
    """exit_barrier_while_the_round_lasts (CI: a node stopped as the job ended held the others
    144 s). torch's barrier, one of two members in, waits its whole timeout; ours ends at once
    when the heartbeats dropped the other, and at once when both came."""
    from types import SimpleNamespace

    from torch.distributed import TCPStore

    def agent(timeout):
        store = TCPStore("127.0.0.1", free_port(), is_master=True, wait_for_workers=False)
        group = SimpleNamespace(group_world_size=2, state="SUCCEEDED")
        return SimpleNamespace(_store=store, _worker_group=group, _exit_barrier_timeout=timeout)

    original = patches.ORIGINAL["LocalElasticAgent._exit_barrier"]
    waited = time.monotonic()
    original(agent(timeout=2))  # torch logs the timeout and returns
    assert time.monotonic() - waited >= 2

    gone = []
    monkeypatch.setattr(patches, "NODE", SimpleNamespace(a_member_is_gone=lambda: bool(gone)))
    alone = agent(timeout=2)
    waited = time.monotonic()
    patches.exit_barrier_while_the_round_lasts(alone)  # not gone: its timeout, as torch's
    assert time.monotonic() - waited >= 2
    gone.append("the other member")
    waited = time.monotonic()
    patches.exit_barrier_while_the_round_lasts(agent(timeout=100))
    assert time.monotonic() - waited < 1
    assert "a node of the round left as the job ended" in capsys.readouterr().out
    both = agent(timeout=100)
    gone.clear()
    terminal = patches.agent_api._TERMINAL_STATE_SYNC_ID
    patches.store_util._barrier_nonblocking(both._store, 2, terminal)  # the other member came
    waited = time.monotonic()
    patches.exit_barrier_while_the_round_lasts(both)
    assert time.monotonic() - waited < 1 and not capsys.readouterr().out


def test_the_c10d_entry_makes_torchs_handler_and_remembers_it(patches):
    """The registry entry that `leave` and PolledStore use the handler from."""
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

    node = patches.install(min_nodes=1, max_nodes=2, rdzv_timeout=30)
    endpoint = f"127.0.0.1:{free_port()}"
    params = RendezvousParameters("c10d", endpoint, "remembered", 1, 1, is_host=True)
    handler = get_rendezvous_handler(params)
    try:
        assert isinstance(handler, DynamicRendezvousHandler) and node.handler is handler
        assert handler.get_backend() == "c10d"
        handler.next_rendezvous()
        assert len(node.members) == 1 and not node.a_member_is_gone()
        assert patches.live_nodes(handler) == node.members  # what the rendezvous service reads
        patches.leave(handler)  # what a stopped node runs: it is no member any more
        assert not patches.participants(handler) and node.a_member_is_gone()
    finally:
        handler.shutdown()


FIRST_ROUND = """
import sys
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler
from launcher import patches
imported = lambda: "torch._dynamo" in sys.modules
launcher = imported()
patches.install(min_nodes=1, max_nodes=1, rdzv_timeout=30, forks={forks})
params = RendezvousParameters("c10d", "127.0.0.1:{port}", "first", 1, 1, is_host=True)
handler = get_rendezvous_handler(params)
handler.next_rendezvous()
formed = imported()
handler.shutdown()
import torch
torch.optim.SGD(torch.nn.Linear(2, 1).parameters()).step()
print(launcher, formed, imported())
"""


@pytest.mark.parametrize("forks", [True, False])
def test_an_optimizer_step_imports_torch_dynamo_and_a_forking_node_as_its_round_forms(forks):
    """import_torch_dynamo: torch's launcher does not import torch._dynamo and an optimizer's
    first step does, in each process; a node whose ranks are forked (START_METHOD=fork) imports
    it once its round has formed, so that they inherit it; a node that spawns them does not.
    The time it saves is in bench/results.md (`docker kill` and `make scale` rows)."""
    script = FIRST_ROUND.format(forks=forks, port=free_port())
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["False", str(forks), "True"]


WAITING = """
import sys
from datetime import timedelta
from torch.distributed.elastic.rendezvous import dynamic_rendezvous as rdzv
from launcher import patches
node = patches.install(1, 3, 30, only=["join_at_the_jobs_sizes"], forks={forks})
state = rdzv._RendezvousState()
state.round, state.complete = 1, True
member, this = rdzv._NodeDesc("10.0.0.1", 1, 0), rdzv._NodeDesc("10.0.0.2", 2, 0)
state.participants[member] = 0
timeout = rdzv.RendezvousTimeout(last_call=timedelta(seconds=1))
settings = rdzv.RendezvousSettings("job", 1, 3, timeout, timedelta(seconds=1), 3)
ctx = rdzv._RendezvousContext(this, state, settings)
asks = rdzv._RendezvousJoinOp()(ctx, 1e12)
before = node.importing is not None
state.wait_list.add(this)
polls = rdzv._RendezvousJoinOp()(ctx, 1e12)
started = node.importing is not None
if started:
    node.importing.join(timeout=60)
print(asks.name, before, polls.name, started, "torch._dynamo" in sys.modules)
"""


@pytest.mark.parametrize("forks", [True, False])
def test_a_forking_node_imports_torch_dynamo_in_a_thread_once_it_waits_to_join(forks):
    """import_torch_dynamo_as_it_waits: a node that finds a running round asks to wait for the
    next one without the import; once it is on torch's wait list, a forking node starts it in
    a thread and its poll goes on (SYNC); a spawning node does not."""
    script = WAITING.format(forks=forks)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    expected = ["ADD_TO_WAIT_LIST", "False", "SYNC", str(forks), str(forks)]
    assert done.stdout.split() == expected


def test_torch_polls_a_waiting_round_through_delay_of_one_second(patches, monkeypatch):
    """poll_faster: torch's op executor sleeps through `_delay(seconds=1)` between reads of the
    shared state while a node waits; the patch shortens that call and no other."""
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous as rdzv

    delays = []
    monkeypatch.setattr(rdzv, "_delay", lambda seconds: delays.append(seconds))
    ctx = context(rdzv, participants=1, round_=1, complete=False, min_nodes=1, max_nodes=2)

    class StateHolder:
        state = ctx.state

        def sync(self):
            return None

        def mark_dirty(self):
            pass

    actions = iter([rdzv._Action.SYNC, rdzv._Action.SYNC, rdzv._Action.FINISH])
    executor = rdzv._DistributedRendezvousOpExecutor(ctx.node, StateHolder(), ctx.settings)
    executor.run(lambda *_: next(actions), deadline=1e12)
    assert delays == [1, 1]
    patches.install(min_nodes=1, max_nodes=2, rdzv_timeout=30, only=["poll_faster"])
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)  # torch's _delay sleeps with time.sleep
    rdzv._delay(1)
    rdzv._delay((0.1, 0.3))
    assert slept[0] == patches.POLL_S and 0.1 <= slept[1] <= 0.3, slept


def test_a_heartbeat_is_due_on_every_tick_not_every_other(patches):
    """keep_alive_due: torch's own rule skips the write of a tick that comes a moment before a
    whole interval has passed, so a live node's heartbeat gets two intervals old."""
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous as rdzv

    ctx = context(rdzv, participants=1, round_=1, complete=True, min_nodes=1, max_nodes=2)
    tick = ctx.settings.keep_alive_interval
    ctx.state.last_heartbeats[ctx.node] = datetime.now().astimezone() - tick * 0.9
    assert patches.ORIGINAL["dynamic_rendezvous._should_keep_alive"](ctx) is False  # torch's
    patches.install(min_nodes=1, max_nodes=2, rdzv_timeout=30, only=["keep_alive_due"])
    assert rdzv._should_keep_alive(ctx) is True
    ctx.state.last_heartbeats[ctx.node] = datetime.now().astimezone()
    assert rdzv._should_keep_alive(ctx) is False  # just written: not due


def test_a_node_dropped_from_its_round_counts_as_waiting_and_rejoins(patches):
    """num_nodes_waiting_or_dropped: the others' heartbeat check removed this node from the
    round it trains in; torch's agent would train on, alone."""
    import pickle

    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import (
        C10dRendezvousBackend,
    )
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

    node = patches.install(min_nodes=1, max_nodes=2, rdzv_timeout=30)
    endpoint = f"127.0.0.1:{free_port()}"
    params = RendezvousParameters("c10d", endpoint, "dropped", 1, 1, is_host=True)
    handler = get_rendezvous_handler(params)
    try:
        handler.next_rendezvous()
        assert handler.num_nodes_waiting() == 0
        # What another node's sanitize writes when this node's heartbeats look dead.
        backend = C10dRendezvousBackend(handler._store, "dropped")
        data, token = backend.get_state()
        state = pickle.loads(data)
        del state.participants[handler._this_node]
        assert backend.set_state(pickle.dumps(state), token)[2]
        time.sleep(1.1)  # torch's state holder reads the store again after 1 s
        assert handler.num_nodes_waiting() == 1
        assert node.members  # it was in a round: the check applies
    finally:
        handler.shutdown()


def _fails(local_rank, error_file):
    """A worker that records its failure in its error file, as train_dist.py does, and exits 1."""
    import json
    import sys

    with open(error_file, "w") as f:
        extra = {"timestamp": str(int(time.time())), "time": time.time()}
        json.dump({"message": {"message": f"ValueError: rank {local_rank}", "extraInfo": extra}}, f)
    sys.exit(1)


def test_fork_reports_one_failed_process_and_the_others_error_files_stay_unread(tmp_path, patches):
    """add_recorded_failures relies on it (effect: test_launch.py, a rank's traceback)."""
    from types import SimpleNamespace

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, start_processes

    envs = {rank: {"LOCAL_RANK": str(rank)} for rank in range(2)}
    context = start_processes(
        name="fails",
        entrypoint=_fails,
        args={rank: (rank, str(tmp_path / f"{rank}.json")) for rank in range(2)},
        envs=envs,
        logs_specs=DefaultLogsSpecs(log_dir=str(tmp_path / "logs")),
        start_method="fork",
    )
    try:
        time.sleep(2)  # both have failed when torch looks
        result = context.wait(0)
        assert result.is_failed() and len(result.failures) == 1  # the behaviour patched
        assert sorted(context.error_files) == [0, 1]  # where each worker's error file is
    finally:
        context.close()
    # The patch: both failures, each with its own error file's message.
    for rank in range(2):
        os.replace(tmp_path / f"{rank}.json", context.error_files[rank])
    agent = SimpleNamespace(_pcontext=context)
    workers = [SimpleNamespace(local_rank=r, global_rank=4 + r) for r in range(2)]
    # The agent's result names workers by global rank (this node's ranks are 4 and 5).
    reported = SimpleNamespace(failures={4 + r: f for r, f in result.failures.items()})
    patches.add_recorded_failures(agent, SimpleNamespace(workers=workers), reported)
    assert sorted(reported.failures) == [4, 5]
    added = next(f for rank, f in reported.failures.items() if rank - 4 not in result.failures)
    assert added.message["message"] == f"ValueError: rank {added.local_rank}"
