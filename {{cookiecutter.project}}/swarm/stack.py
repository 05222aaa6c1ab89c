"""Turn `docker compose config --format json` into a stack file that `docker stack deploy`
takes: its loader wants CPU limits as strings, no top-level `name` and no null fields; and the
stack names its own networks (Compose's resolved names would collide with `make up`'s).

usage: docker compose -f compose.yaml -f compose.swarm.yaml config --format json \\
         | python swarm/stack.py > build/stack.json
"""

import json
import sys

config = json.load(sys.stdin)
config.pop("name", None)
for network in config.get("networks", {}).values():
    network.pop("name", None)
for name, service in config["services"].items():
    config["services"][name] = service = {k: v for k, v in service.items() if v is not None}
    limits = service.get("deploy", {}).get("resources", {}).get("limits", {})
    if "cpus" in limits:
        limits["cpus"] = str(limits["cpus"])
json.dump(config, sys.stdout, indent=2)
