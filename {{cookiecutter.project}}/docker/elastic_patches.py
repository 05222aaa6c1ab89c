"""Every change the launcher makes to torch's elastic agent and c10d rendezvous, in one place.

torch is pinned (TESTED_TORCH). Each patch below says the torch behaviour it changes, why, and
the upstream issue; tests/test_elastic_patches.py checks, against the installed torch, the
behaviour each one relies on, so a new torch that changes it fails there first.

Public mechanisms that replaced patches (docker/launch.py sets them):
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
of `poll_faster`'s polls) stays.
"""

import logging
import time
from datetime import datetime, timedelta

import torch
from torch.distributed import DistStoreError
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.rendezvous import dynamic_rendezvous as rdzv
from torch.distributed.elastic.rendezvous import rendezvous_handler_registry
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import create_backend

TESTED_TORCH = "2.14.1"
BACKEND = "c10d"
USAGE_ERROR = 2  # argparse's status, and train_dist.py's for data and folder errors
# train_dist.py's status on the ranks that stopped because a peer was asked to leave.
PEER_STOPPED = 75


def version_warning(version=torch.__version__):
    """A line to print when torch is not the version these patches were tested with, else None."""
    if version.split("+")[0] == TESTED_TORCH:
        return None
    return (
        f"WARNING: torch {version}: docker/elastic.py was tested with torch {TESTED_TORCH};"
        " run `pytest tests/test_elastic_patches.py` before trusting elastic runs on this one"
    )


# torch's own methods, kept at import: a second install() (the tests) wraps these, not patches.
ORIGINAL = (
    LocalElasticAgent._monitor_workers,
    LocalElasticAgent._rendezvous,
    LocalElasticAgent._assign_worker_ranks,
    rdzv._RendezvousJoinOp.__call__,
    rdzv._delay,
    rdzv._should_keep_alive,
)
# How often a node waiting for a round reads the shared state (torch: 1 s).
POLL_S = 0.2


class Node:
    """This node's rendezvous handler and the members of the last round it joined."""

    def __init__(self):
        self.handler, self.members = None, set()

    def a_member_is_gone(self):
        return not self.members <= set(participants(self.handler))


def participants(handler):
    """The nodes of the handler's current round, as torch's state holder last synced them."""
    return handler._state_holder.state.participants


def live_nodes(handler):
    """Nodes whose heartbeats have not timed out, after a sync (which drops the others)."""
    handler._state_holder.sync()
    return set(handler._state_holder.state.last_heartbeats)


def install(min_nodes, max_nodes, rdzv_timeout):
    """Apply the patches to this process's torch; returns the Node they share."""
    node = Node()

    def remembered_c10d_handler(params):
        backend, store = create_backend(params)
        handler = rdzv.create_handler(store, backend, params)
        next_rendezvous = handler.next_rendezvous

        def next_rendezvous_remembering_members():
            info = next_rendezvous()
            node.members = set(participants(handler))
            return info

        num_nodes_waiting = handler.num_nodes_waiting

        def num_nodes_waiting_or_dropped():
            """torch's agent never checks that its node is still in the round it trains in: a
            node the others dropped (heartbeats late: a stall, a paused VM) trained on alone
            while they formed a round without it, two groups writing the same checkpoints
            (seen in a bench run with 2 s heartbeats). Changed: such a node counts as one
            waiting, so its agent stops its ranks and rejoins, as for a node that joins."""
            waiting = num_nodes_waiting()
            if node.members and handler._this_node not in participants(handler):
                print("torchrun: this node was dropped from its round: rejoining", flush=True)
                return max(waiting, 1)
            return waiting

        handler.next_rendezvous = next_rendezvous_remembering_members
        handler.num_nodes_waiting = num_nodes_waiting_or_dropped
        node.handler = handler
        return handler

    # register() refuses a second creator for a name; handlers must report torch's own name.
    rendezvous_handler_registry._registry[BACKEND] = remembered_c10d_handler

    monitor, rendezvous, assign_ranks, join, delay, _ = ORIGINAL

    def monitor_with_exit_codes(agent, worker_group):
        """torch restarts the workers after any failure, up to --max-restarts, and counts every
        restart (pytorch/pytorch#60910, #108158). Changed: a usage or data error (status 2) is
        not restarted, since it would fail the same way; ranks that stopped because a peer left
        (PEER_STOPPED) are a membership change, which torch does not count when a node joins
        either."""
        result = monitor(agent, worker_group)
        codes = {f.exitcode for f in result.failures.values()} if result.is_failed() else set()
        if USAGE_ERROR in codes:
            agent._remaining_restarts = 0
        elif codes == {PEER_STOPPED}:
            agent._remaining_restarts += 1
            print(
                "torchrun: a node left or joins: the job re-forms, no restart counted", flush=True
            )
        return result

    def join_at_the_jobs_sizes(op, context, deadline):
        """torch applies each node's own --nnodes to the shared rendezvous state, so nodes started
        with different sizes disagree on when a round is complete (no upstream fix; the docs ask
        for equal --nnodes). Changed: once the job's first round has formed, every node joins with
        MIN_NODES..MAX_NODES, whatever NODES it was started with (a `make scale` node, a
        replacement): else a node could clear the last call the others waited for, or wait in
        torch's redundancy list and never be taken in."""
        state = context.state
        if state.complete or state.round > 0:
            settings = context.settings  # frozen; shared with the handler and its heartbeats
            object.__setattr__(settings, "min_nodes", min(min_nodes, max_nodes))
            object.__setattr__(settings, "max_nodes", max_nodes)
        return join(op, context, deadline)

    def assign_ranks_between_heartbeats(agent, store, *rest):
        """torch's exchange of process counts after each round blocks on the store connection
        that also carries the node's heartbeats (NVIDIA/nvidia-resiliency-ext#263 hit the same
        wait). Changed: the waits are short polls, and end once the heartbeats have dropped a
        member of the round: its key will never come."""
        return assign_ranks(agent, PolledStore(store, rdzv_timeout, node.a_member_is_gone), *rest)

    def rendezvous_again_if_a_member_is_gone(agent, worker_group):
        """A node that died between a round and its writes left the others' agents ending on
        DistStoreError, and the job with them (pytorch/pytorch#67742 for the family). Changed:
        another round is formed, counted as a restart."""
        while True:
            try:
                return rendezvous(agent, worker_group)
            except DistStoreError:
                if agent._remaining_restarts <= 0:
                    raise
                agent._remaining_restarts -= 1
                print("torchrun: a node of the new round is gone: forming another", flush=True)

    def keep_alive_due(context):
        """torch writes a heartbeat only once the last one is keep_alive_interval old, and its
        timer ticks every keep_alive_interval: a tick that comes a moment early skips its
        write, so a live node's heartbeat is up to two intervals old, and a timeout of two
        intervals drops live nodes (seen with HEARTBEAT_MISSES=2). Changed: a heartbeat is due
        at half an interval, so every tick writes one."""
        last = context.state.last_heartbeats.get(context.node)
        if last is None:
            return False
        # Aware, in local time: torch's heartbeats are aware (UTC) and compare with it.
        return last <= datetime.now().astimezone() - context.settings.keep_alive_interval / 2

    def poll_faster(seconds):
        """torch's rendezvous polls the shared state once a second while a node waits for a
        round (`_delay(seconds=1)` on SYNC), which adds up to a second when a dead node's
        heartbeats time out and again before every node sees the round complete. Changed: the
        waits poll every POLL_S; the other delays stay."""
        delay(POLL_S if seconds == 1 else seconds)

    LocalElasticAgent._monitor_workers = monitor_with_exit_codes
    rdzv._delay = poll_faster
    rdzv._should_keep_alive = keep_alive_due
    LocalElasticAgent._rendezvous = rendezvous_again_if_a_member_is_gone
    LocalElasticAgent._assign_worker_ranks = assign_ranks_between_heartbeats
    rdzv._RendezvousJoinOp.__call__ = join_at_the_jobs_sizes
    quiet_torch_logs()
    return node


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
