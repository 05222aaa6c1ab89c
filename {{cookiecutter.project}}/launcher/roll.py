"""The rendezvous service's roll of the job's nodes: each node signs in once it reaches the
service and out when it ends (launcher/node.py), so that the service, once the job has ended,
stops as soon as no node can still ask it how the job ended (launcher/rendezvous.py), not after
a fixed wait. A node signs in under the name torch's rendezvous gives it (address and process
id), so the service can tell one killed without a word by its heartbeats."""

import os
from datetime import timedelta

KEY = "ddp-template/roll/"


def service_store(addr, port):
    """A client of the rendezvous service's store; None where it cannot be reached."""
    from torch.distributed import TCPStore

    try:
        return TCPStore(addr, port, is_master=False, timeout=timedelta(seconds=5))
    except Exception:  # noqa: BLE001 - the service is gone, or not there yet
        return None


class Signed:
    """This node on the roll of the job `run_id`, as torch's rendezvous names it (`addr`, and
    this process: the agent runs in it)."""

    def __init__(self, store, run_id, addr):
        self.store, self.key = store, KEY + run_id
        # A life of its own: a container restarted by Docker has the same address and pid.
        self.name = f"{addr}_{os.getpid()} {os.urandom(4).hex()}"
        slot = store.add(self.key, 1)
        store.set(f"{self.key}/{slot}", self.name)

    def sign_out(self, status):
        try:
            self.store.set(f"{self.key}/out/{self.name}", str(status))
        except Exception:  # noqa: BLE001 - the service stopped meanwhile: nobody to tell
            pass


class Roll:
    """The service's view of the roll of the job `run_id`."""

    def __init__(self, store, run_id):
        self.store, self.key = store, KEY + run_id
        self.names, self.seen_alive = [], set()

    def expected(self, live):
        """How many nodes may still ask the service how the job ended: signed in, not out, and
        alive (`live`: torch's nodes with a heartbeat) or not seen alive yet (still importing
        torch, or on its way into a round)."""
        count = int(self.store.add(self.key, 0))
        while len(self.names) < count:
            slot = f"{self.key}/{len(self.names) + 1}"
            if not self.store.check([slot]):
                return count - len(self.names)  # signing in at this moment
            self.names.append(self.store.get(slot).decode())
        alive = {f"{node.addr}_{node.pid}" for node in live}
        waiting = 0
        for name in self.names:
            if self.store.check([f"{self.key}/out/{name}"]):
                continue
            if name.split()[0] in alive:
                self.seen_alive.add(name)
                waiting += 1
            elif name not in self.seen_alive:
                waiting += 1
        return waiting
