"""The rendezvous service: the c10d store every training node dials, on no training node.

It holds the job's membership (torch's c10d rendezvous state), nothing of training, so any
training node may die, rank 0's included, and the job goes on. It ends by itself once the job
has: when the rendezvous is closed (the job finished or failed) and every node on its roll has
left (launcher/roll.py: a node still on its way in learns from it how the job ended), or when no
node has sent a heartbeat for IDLE_TIMEOUT seconds (every node gone). If it dies, every node
stops with one line and the next start resumes from the last checkpoint
(docs/what-happens-when.md).
usage: python -m launcher.rendezvous   (settings from the environment, else .env, as every node)
"""

import os
import signal
import socket
import sys
import time
from datetime import timedelta

from .settings import setting  # RDZV_PORT and RUN_ID as every node reads them

# Seconds with no node's heartbeat after which the service ends (a test sets less).
IDLE_TIMEOUT = "120"
# Once the job has ended, the most it waits for nodes on its roll that neither left nor were
# ever seen alive (killed while they imported torch): the others it waits for as long as they
# are alive, and a node that has left needs nothing more of it.
CLOSED_GRACE_S = 10
# How often it reads the job's state: `make up` returns when the service has ended.
POLL_S = 0.1
# After a stop (make down), the most it waits for the nodes, stopped at the same time, to leave:
# gone first, it would make them report a lost service instead of a stop. Below Compose's
# stop_grace_period for it.
STOPPING_GRACE_S = 20


def main():
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(time.monotonic()))
    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler

    from .patches import live_nodes as live
    from .roll import Roll

    port, run_id = int(setting("RDZV_PORT")), setting("RUN_ID")
    idle = int(os.environ.get("IDLE_TIMEOUT") or IDLE_TIMEOUT)
    bind = os.environ.get("RDZV_BIND", "")
    listening = listen(bind, port)  # kept open for the store's whole life
    store = TCPStore(
        bind or "0.0.0.0",
        port,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=60),
        master_listen_fd=listening.fileno() if listening else None,
    )
    where = f"{bind}:{port}" if bind else f"port {port} of every interface"
    print(f"rendezvous: serving {run_id} on {where}", flush=True)
    backend = C10dRendezvousBackend(store, run_id)
    # A reader of the job's state that never joins it.
    handler = DynamicRendezvousHandler.from_backend(run_id, store, backend, 1, 1)
    roll = Roll(store, run_id)
    last_seen, closed = time.monotonic(), None
    while True:
        time.sleep(POLL_S)
        nodes = live(handler)
        if stopping and (time.monotonic() - stopping[0] > STOPPING_GRACE_S or not nodes):
            print("rendezvous: stopped", flush=True)
            return 0
        if closed is None and handler.is_closed():
            print("rendezvous: the job's rendezvous is closed: stopping", flush=True)
            closed = time.monotonic()
        if closed is not None:
            if not roll.expected(nodes) or time.monotonic() - closed > CLOSED_GRACE_S:
                return 0
            continue
        if nodes:
            last_seen = time.monotonic()
        elif time.monotonic() - last_seen > idle:
            print(f"rendezvous: no node for {idle}s: stopping", flush=True)
            return 0


def listen(bind, port):
    """A socket listening on `bind` only (RDZV_BIND: the address the nodes dial, where it is
    known: machine 0's for make up-node, the pod's on Kubernetes), or None: torch's store then
    listens on every interface, and cannot be told one (docs/security.md)."""
    if not bind:
        return None
    family, kind, _, _, address = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM)[0]
    listening = socket.socket(family, kind)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listening.bind(address)
    listening.listen(512)
    return listening


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    # Not sys.exit: the interpreter's teardown of torch's store server took 1.5 s after its last
    # line (measured in a container), and `make up` returns only once the service has ended.
    os._exit(status)
