"""The launcher every engine runs, without Docker too: `python -m launcher` starts one training
node (node.py, with its settings in settings.py and torch's changes in patches.py), and
`python -m launcher.rendezvous` the rendezvous service the nodes meet at. Run from the project's
folder, which holds train_dist.py and .env."""
