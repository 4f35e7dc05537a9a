"""Shared run state: the store protocol (base.py) and its Redis implementation."""
