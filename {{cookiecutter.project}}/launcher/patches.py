"""Every change the launcher makes to torch's elastic agent and c10d rendezvous, in one place:
the one module that reaches into torch's private API (the training package imports one private
module early, `torch.distributed._shard`, for the reason given in distributed.py).

torch is pinned (TESTED_TORCH). Each patch is a module-level function that says the torch
behaviour it changes, why, and the upstream issue; PATCHES is the table that install() applies,
by name, and ORIGINAL keeps torch's own functions by the same names. tests/test_patches.py
checks, against the installed torch, the behaviour each one relies on, each patch alone, so a
new torch that changes it fails there first.

Public mechanisms that replaced patches (launcher/node.py sets them):
- TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: each round's rank 0 publishes its own address for the
  ranks' store. With the shared store, torch caches the first round's address on the other nodes
  and rank 0 may now be any node: after it died they dialed a dead address.
- torch's rendezvous handler registry: its "c10d" entry makes torch's own c10d handler and
  remembers it here (for `leave`), instead of a patched `next_rendezvous` on every handler.
- torch's own `shutdown` on every node: no node hosts the store any more, so no node has to keep
  the rendezvous open when its agent ends (a patched `shutdown` on workers, before).
Measured and kept as patches: TORCH_ELASTIC_WORKER_IDENTICAL=1 would replace the process-count
exchange (`PolledStore`), but then the ranks of a round that lost a node as it formed wait for
its ranks in `init_process_group` until `--timeout` (120 s) instead of the 3 s that the dropped
heartbeats take; `--nnodes=MIN:MAX` on every node would replace `join_at_the_jobs_sizes`, but
then the job's first round forms with MIN_NODES after a last call instead of waiting for all
NODES. Tried and dropped: completing a re-forming round as soon as every node with a live
heartbeat had joined it (no last call). torch removes a node's heartbeat as it leaves a round
to join the next, so for a moment a node on its way back looks gone: in a 240 s chaos run a
stop on 4 nodes formed a round of 1, then one of 3. The last call (LAST_CALL_TIMEOUT, 1 s, five
of `poll_faster`'s polls) stays for a round that lost a member by a stop;
`end_the_last_call_once_all_are_in` ends it once every member of the last round but the ones
this node dropped as dead has joined and nobody else waits (no heartbeats read).
"""

import functools
import logging
import os
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import torch
from torch.distributed import DistStoreError
from torch.distributed.elastic.agent.server import api as agent_api
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure
from torch.distributed.elastic.rendezvous import dynamic_rendezvous as rdzv
from torch.distributed.elastic.rendezvous import rendezvous_handler_registry
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import create_backend
from torch.distributed.elastic.utils import store as store_util

from {{ cookiecutter.package }}.errors import PEER_STOPPED, USAGE_ERROR

TESTED_TORCH = "2.14.1"
BACKEND = "c10d"
# How often a node waiting for a round reads the shared state (torch: 1 s).
POLL_S = 0.2
# After its ranks lost a peer, the heartbeat age, in intervals, at which a survivor takes a
# member of its round for dead (torch waits HEARTBEAT_MISSES: 3): a live member writes one on
# every interval's tick (keep_alive_due).
DEAD_AFTER_INTERVALS = 1.5


def version_warning(version=torch.__version__):
    """A line to print when torch is not the version these patches were tested with, else None."""
    if version.split("+")[0] == TESTED_TORCH:
        return None
    return (
        f"WARNING: torch {version}: launcher/patches.py was tested with torch {TESTED_TORCH};"
        " run `pytest tests/test_patches.py` before trusting elastic runs on this one"
    )


class Node:
    """What the patches share in this process: the job's sizes, this node's rendezvous handler,
    and the members of the last round it joined."""

    def __init__(self, min_nodes=1, max_nodes=1, rdzv_timeout=60, forks=False):
        self.min_nodes, self.max_nodes, self.rdzv_timeout = min_nodes, max_nodes, rdzv_timeout
        self.forks = forks  # START_METHOD=fork: the ranks inherit this process's modules
        self.handler, self.members = None, set()
        self.dead = set()  # members of that round this node dropped (reform_without_the_dead)
        self.had_spares = False  # a spare waited during that round (torch's redundancy list)
        self.spare = False  # said once that it waits as a spare
        self.importing = None  # the thread that imports torch._dynamo as this node waits

    def a_member_is_gone(self):
        return not self.members <= set(participants(self.handler))


NODE = Node()


def participants(handler):
    """The nodes of the handler's current round, as torch's state holder last synced them."""
    return handler._state_holder.state.participants


def live_nodes(handler):
    """Nodes whose heartbeats have not timed out, after a sync (which drops the others)."""
    handler._state_holder.sync()
    return set(handler._state_holder.state.last_heartbeats)


# The patches, in the order of a node's life: its handler, its rounds, its processes.


def remembered_c10d_handler(params):
    """torch's rendezvous handler registry entry for "c10d" (register() refuses a second creator
    for a name): torch's own handler, remembered in NODE for `leave` and the patches below, with
    its two methods that learn of the rounds wrapped."""
    backend, store = create_backend(params)
    handler = rdzv.create_handler(store, backend, params)
    # torch serves the shared state from a 1 s cache between writes, so a node polling every
    # POLL_S saw a round complete, or a dead node dropped, up to a second late.
    handler._state_holder._cache_duration = POLL_S
    handler.next_rendezvous = functools.partial(remember_members, handler, handler.next_rendezvous)
    handler.num_nodes_waiting = functools.partial(
        num_nodes_waiting_or_dropped, handler, handler.num_nodes_waiting
    )
    NODE.handler = handler
    return handler


def remember_members(handler, next_rendezvous):
    """The members of each round this node joins: the patches below compare them with the
    round's current state to see that a member is gone."""
    info = next_rendezvous()
    NODE.members, NODE.dead = set(participants(handler)), set()
    NODE.had_spares = bool(handler._state_holder.state.redundancy_list)
    if NODE.forks:
        if NODE.importing is not None:
            NODE.importing.join()  # a fork while a thread imports would copy a half module
        import_torch_dynamo()
    return info


def import_torch_dynamo():
    """torch imports `torch._dynamo` in each process at its first optimizer step
    (`_use_grad_for_differentiable` in torch/optim/optimizer.py): 2 s of every round's start on
    2 CPUs, all ranks at once, while the round waits. Ranks forked from the agent inherit its
    modules, so the agent imports it once, as its first round forms, or as it waits to join a
    running one (import_torch_dynamo_as_it_waits): not before it has arrived, where it would
    delay a joining node while the others train on (a new node that imported it before joining
    took 5.6 s to start instead of 2.1 s)."""
    import torch._dynamo  # noqa: F401


def import_torch_dynamo_as_it_waits(context):
    """A node that joins a running job (`make scale`, a restarted node) waits in torch's wait
    list while the others stop their ranks and re-form: it imports `torch._dynamo` then, in a
    thread, so that its polls go on, instead of after the round has formed, when the others
    wait for it. Once it is on the list, not sooner: the others see it as they would without."""
    state = context.state
    waits = state.complete and context.node in state.wait_list
    if waits and NODE.forks and NODE.importing is None and "torch._dynamo" not in sys.modules:
        NODE.importing = threading.Thread(target=import_torch_dynamo, daemon=True)
        NODE.importing.start()


def num_nodes_waiting_or_dropped(handler, num_nodes_waiting):
    """torch's agent never checks that its node is still in the round it trains in: a node the
    others dropped (heartbeats late: a stall, a paused VM) trained on alone while they formed a
    round without it, two groups writing the same checkpoints (seen in a bench run with 2 s
    heartbeats). Changed: such a node counts as one waiting, so its agent stops its ranks and
    rejoins, as for a node that joins."""
    waiting = num_nodes_waiting()
    NODE.had_spares |= bool(handler._state_holder.state.redundancy_list)
    if NODE.members and handler._this_node not in participants(handler):
        print("torchrun: this node was dropped from its round: rejoining", flush=True)
        return max(waiting, 1)
    if len(participants(handler)) >= NODE.max_nodes:
        # A round of MAX_NODES has no place for a waiting node: re-forming would only trade one
        # node for another, again and again (seen: 20 re-forms in 60 s). It waits as a spare.
        return 0
    return waiting


def join_at_the_jobs_sizes(op, context, deadline):
    """torch applies each node's own --nnodes to the shared rendezvous state, so nodes started
    with different sizes disagree on when a round is complete (no upstream fix; the docs ask for
    equal --nnodes). Changed: once the job's first round has formed, every node joins with
    MIN_NODES..MAX_NODES, whatever NODES it was started with (a `make scale` node, a
    replacement): else a node could clear the last call the others waited for, or wait in
    torch's redundancy list and never be taken in."""
    import_torch_dynamo_as_it_waits(context)
    state = context.state
    if state.complete or state.round > 0:
        settings = context.settings  # frozen; shared with the handler and its heartbeats
        object.__setattr__(settings, "min_nodes", NODE.min_nodes)  # the launcher checked both
        object.__setattr__(settings, "max_nodes", NODE.max_nodes)
    return reform_without_the_dead(op, context, deadline)


def reform_without_the_dead(op, context, deadline):
    """After a kill, the survivors, out of their round because their ranks lost a peer, wait in
    torch's wait list until the dead node's heartbeats time out (HEARTBEAT_MISSES intervals, 3
    s), then the last call (1 s) for nodes that come late. Changed: a node waiting for the next
    round drops the rest of its own last round once none of them has written a heartbeat for
    DEAD_AFTER_INTERVALS (a member still training writes one every interval; one on its way to
    the next round is no longer in it); the last call then ends as for any re-form
    (end_the_last_call_once_all_are_in). A member dropped by mistake (a stall) rejoins, as when
    torch drops it (num_nodes_waiting_or_dropped). Not done by heartbeats alone: a node between
    two rounds has none for a moment (see the module's docstring)."""
    state, settings = context.state, context.settings
    if state.complete and context.node in state.wait_list and set(state.participants):
        gone = set(state.participants)
        since = datetime.now(UTC) - settings.keep_alive_interval * DEAD_AFTER_INTERVALS
        beats = state.last_heartbeats
        if gone <= NODE.members and all(beats.get(node, since) <= since for node in gone):
            for node in gone:
                del state.participants[node]
                beats.pop(node, None)
            rdzv._remove_participant_epilogue(state, settings)
            NODE.dead |= gone
            names = ", ".join(sorted(node.addr for node in gone))
            print(f"torchrun: no heartbeat from {names}: the job re-forms without it", flush=True)
            return rdzv._Action.KEEP_ALIVE  # written back by torch's next sync
    return end_the_last_call_once_all_are_in(op, context, deadline)


def end_the_last_call_once_all_are_in(op, context, deadline):
    """torch completes a re-forming round after its last call (1 s from the first MIN_NODES
    joins), even when every node it can expect has joined sooner: each join, restart and kill
    paid the whole second. Changed: a member of the last round completes the new one once every
    other member of that round (but those it dropped as dead) has joined it and no node waits
    outside it (torch's wait and redundancy lists: a node that asked to join, a spare). Not
    by heartbeats, the trap the module's docstring records; a member that left (a stop) never
    rejoins, so its round keeps torch's last call. So does a round that had a spare: torch moves
    a spare to a free place in two steps, out of its list and then in, and between them it is
    in none (a round of 1 formed without it in a test)."""
    state, settings = context.state, context.settings
    expected = NODE.members and not NODE.had_spares  # else torch's last call
    if expected and not state.complete and context.node in state.participants:
        rejoined = NODE.members - NODE.dead <= set(state.participants)
        outside = state.wait_list or state.redundancy_list
        sizes = settings.min_nodes <= len(state.participants) <= settings.max_nodes
        if rejoined and not outside and sizes and state.deadline is not None:
            return rdzv._Action.MARK_RENDEZVOUS_COMPLETE
    return wait_as_a_spare(op, context, deadline)


def wait_as_a_spare(op, context, deadline):
    """torch keeps a node that finds a complete round of max_nodes in its wait list if it was
    there already (it came during a re-form), where it times out after RDZV_TIMEOUT and fails,
    and where the members see it as waiting and re-form for it, forever. Changed: it moves to
    torch's redundancy list, which has no deadline and which the members do not count; it takes
    a place when a member leaves or dies, as torch's redundancy list provides."""
    state = context.state
    full = state.complete and len(state.participants) >= context.settings.max_nodes
    if full and context.node in state.wait_list and not state.closed:
        return rdzv._Action.REMOVE_FROM_WAIT_LIST  # then, in the next call, the redundancy list
    if full and context.node in state.redundancy_list and not NODE.spare:
        NODE.spare = True
        print(
            f"torchrun: the job has its MAX_NODES={NODE.max_nodes} nodes: this node waits as a"
            " spare and takes a place when one leaves or dies",
            flush=True,
        )
    elif context.node in state.participants:
        NODE.spare = False
    return ORIGINAL["_RendezvousJoinOp.__call__"](op, context, deadline)


def poll_faster(seconds):
    """torch's rendezvous polls the shared state once a second while a node waits for a round
    (`_delay(seconds=1)` on SYNC), which adds up to a second when a dead node's heartbeats time
    out and again before every node sees the round complete. Changed: the waits poll every
    POLL_S; the other delays stay."""
    ORIGINAL["dynamic_rendezvous._delay"](POLL_S if seconds == 1 else seconds)


def keep_alive_due(context):
    """torch writes a heartbeat only once the last one is keep_alive_interval old, and its timer
    ticks every keep_alive_interval: a tick that comes a moment early skips its write, so a live
    node's heartbeat is up to two intervals old, and a timeout of two intervals drops live nodes
    (seen with HEARTBEAT_MISSES=2). Changed: a heartbeat is due at half an interval, so every
    tick writes one."""
    last = context.state.last_heartbeats.get(context.node)
    if last is None:
        return False
    # Aware, in local time: torch's heartbeats are aware (UTC) and compare with it.
    return last <= datetime.now().astimezone() - context.settings.keep_alive_interval / 2


def rendezvous_again_if_a_member_is_gone(agent, worker_group):
    """A node that died between a round and its writes left the others' agents ending on
    DistStoreError, and the job with them (pytorch/pytorch#67742 for the family). Changed:
    another round is formed, counted as a restart."""
    while True:
        try:
            return ORIGINAL["LocalElasticAgent._rendezvous"](agent, worker_group)
        except DistStoreError:
            if agent._remaining_restarts <= 0:
                raise
            agent._remaining_restarts -= 1
            print("torchrun: a node of the new round is gone: forming another", flush=True)


def assign_ranks_between_heartbeats(agent, store, *rest):
    """torch's exchange of process counts after each round blocks on the store connection that
    also carries the node's heartbeats (NVIDIA/nvidia-resiliency-ext#263 hit the same wait).
    Changed: the waits are short polls, and end once the heartbeats have dropped a member of the
    round: its key will never come."""
    polled = PolledStore(store, NODE.rdzv_timeout, NODE.a_member_is_gone)
    return ORIGINAL["LocalElasticAgent._assign_worker_ranks"](agent, polled, *rest)


def add_recorded_failures(agent, worker_group, result):
    """With START_METHOD=fork, torch reports one failed process of the node: torch.multiprocessing's
    join raises for the first ended process it looks at, often a rank that failed because its
    peer had (gloo: "Connection closed by peer"); the cause's error file goes unread. No upstream
    issue found (searched 2026-12). Changed: every local rank that left an error file is among
    the failures, so that the node reports the one that failed first (launcher/node.py)."""
    files = getattr(getattr(agent, "_pcontext", None), "error_files", None) or {}
    known = {failure.local_rank for failure in result.failures.values()}
    for worker in worker_group.workers:
        path = files.get(worker.local_rank)
        if worker.local_rank in known or not path or not os.path.isfile(path):
            continue
        failure = ProcessFailure(local_rank=worker.local_rank, pid=-1, exitcode=1, error_file=path)
        result.failures[worker.global_rank] = failure


def monitor_with_exit_codes(agent, worker_group):
    """torch restarts the workers after any failure, up to --max-restarts, and counts every
    restart (pytorch/pytorch#60910, #108158). Changed: a usage or data error (status 2) is not
    restarted, since it would fail the same way; ranks that stopped because a peer left
    (PEER_STOPPED) are a membership change, which torch does not count when a node joins
    either."""
    result = ORIGINAL["LocalElasticAgent._monitor_workers"](agent, worker_group)
    if result.is_failed():
        add_recorded_failures(agent, worker_group, result)
    codes = {f.exitcode for f in result.failures.values()} if result.is_failed() else set()
    if USAGE_ERROR in codes:
        agent._remaining_restarts = 0
    elif codes == {PEER_STOPPED}:
        agent._remaining_restarts += 1
        print("torchrun: a node left or joins: the job re-forms, no restart counted", flush=True)
    return result


def exit_barrier_while_the_round_lasts(agent):
    """Once its ranks are done, torch's agent waits for every agent of the round in one blocking
    store.wait of up to exit_barrier_timeout (300 s), on the connection that also carries its
    heartbeats. A member stopped as the job ended never comes (its agent left with its ranks'
    work done): CI saw the others held there 144 s, until the service went. No upstream issue
    found (searched 2026-12). Changed: the wait polls, and ends once the heartbeats have dropped
    a member of the round or it left the rendezvous, as in the process-count exchange."""
    agent._in_exit_barrier = True  # torch's health check reads it
    try:
        key = store_util._barrier_nonblocking(
            store=agent._store,
            world_size=agent._worker_group.group_world_size,
            key_prefix=agent_api._TERMINAL_STATE_SYNC_ID,
        )
        PolledStore(agent._store, agent._exit_barrier_timeout, NODE.a_member_is_gone).wait([key])
    except DistStoreError:
        print("torchrun: a node of the round left as the job ended: not waiting for it", flush=True)
    finally:
        agent._in_exit_barrier = False


# (where, torch's name, the patch): install() sets each; ORIGINAL keeps torch's own by that name.
PATCHES = (
    (rdzv, "_should_keep_alive", keep_alive_due),
    (rdzv, "_delay", poll_faster),
    (rdzv._RendezvousJoinOp, "__call__", join_at_the_jobs_sizes),
    (LocalElasticAgent, "_rendezvous", rendezvous_again_if_a_member_is_gone),
    (LocalElasticAgent, "_assign_worker_ranks", assign_ranks_between_heartbeats),
    (LocalElasticAgent, "_monitor_workers", monitor_with_exit_codes),
    (LocalElasticAgent, "_exit_barrier", exit_barrier_while_the_round_lasts),
)


def torch_name(where, name):
    """`LocalElasticAgent._rendezvous`, `dynamic_rendezvous._delay`: a module by its last part."""
    return f"{where.__name__.rsplit('.', 1)[-1]}.{name}"


# Kept at import, before any install(): a second install() (the tests) wraps torch's own.
ORIGINAL = {torch_name(where, name): getattr(where, name) for where, name, _ in PATCHES}


def install(min_nodes, max_nodes, rdzv_timeout, only=None, forks=False):
    """Apply the patches (`only`: those whose function names are listed) to this process's
    torch, with the job's sizes; returns the Node they share."""
    global NODE
    NODE = Node(min_nodes, max_nodes, rdzv_timeout, forks)
    rendezvous_handler_registry._registry[BACKEND] = remembered_c10d_handler
    for where, name, patch in PATCHES:
        if only is None or patch.__name__ in only:
            setattr(where, name, patch)
    quiet_torch_logs()
    return NODE


def leave(handler):
    """torch does not take a node that is stopped (SIGTERM) out of the rendezvous: the others
    wait until its heartbeats time out (pytorch/pytorch#67742). This runs the exit step a node
    runs before it joins a new round, so the others re-form at once."""
    handler._stop_heartbeats()
    try:
        with handler._heartbeat_lock:
            # Short: a rendezvous service that is stopping too (make down) must not hold it up.
            deadline = handler._get_deadline(timedelta(seconds=5))
            handler._op_executor.run(rdzv._RendezvousExitOp(), deadline)
        print("left the rendezvous", flush=True)
    except Exception as failure:  # the service may be gone already: its heartbeats time out
        name = type(failure).__name__
        print(f"could not leave the rendezvous ({name}): the others drop it later", flush=True)


class PolledStore:
    """The round's store for torch's exchange of process counts (`_assign_worker_ranks` calls
    set, multi_set, get and multi_get), waiting for keys in short polls."""

    def __init__(self, store, timeout_s, a_member_is_gone):
        self.store, self.timeout_s, self.a_member_is_gone = store, timeout_s, a_member_is_gone

    def set(self, key, value):
        self.store.set(key, value)

    def multi_set(self, keys, values):
        self.store.multi_set(keys, values)

    def get(self, key):
        self.wait([key])
        return self.store.get(key)

    def multi_get(self, keys):
        self.wait(keys)
        return self.store.multi_get(keys)

    def wait(self, keys):
        deadline = time.monotonic() + self.timeout_s
        while not self.store.check(keys):
            if time.monotonic() > deadline or self.a_member_is_gone():
                raise DistStoreError(f"a node of the round never wrote one of {keys}")
            time.sleep(0.05)


class WithoutTraceback(logging.Filter):
    """torchrun logs a failed process with its own traceback, which says nothing about the
    script, and a lost rendezvous service once per heartbeat: the launcher says each in one line.
    """

    def filter(self, record):
        record.exc_info = record.exc_text = None
        message = record.getMessage()
        # Not a failure: the monitor patch says what it is.
        return f"(exitcode: {PEER_STOPPED})" not in message and "RendezvousConnectionError" not in (
            message
        )


def quiet_torch_logs():
    for name in (
        "torch.distributed.elastic.multiprocessing.api",
        "torch.distributed.elastic.rendezvous.dynamic_rendezvous",
        "torch.distributed.elastic.agent.server.api",
    ):
        logging.getLogger(name).addFilter(WithoutTraceback())
