"""Operator and tooling commands of `release-worker`, one module a command group.

The running worker never imports this package. `main.py` is the top-level typer app (the
`release-worker` entry point); it registers each command group.
"""
