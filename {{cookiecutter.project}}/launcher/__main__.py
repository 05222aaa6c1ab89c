"""`python -m launcher`: one training node (launcher/node.py)."""

from .node import run

run()
