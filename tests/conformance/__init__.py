"""Shared conformance suites: one list of cases that every backend of a primitive must pass.

A backend's test file subclasses a suite class and sets a few attributes (the implementation
name, tile sizes, what the backend cannot do); see :mod:`conformance.attention`.
"""
