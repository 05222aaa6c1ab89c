"""Pieces of the training job that tests import: data, model and checkpoints."""
