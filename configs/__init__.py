"""Experiment configs shipped as package data: ``models/`` holds the exact config.json of every
Pythia size (for ``--random-init`` offline)."""
