"""Operator and tooling commands of `release-worker`, one module a command group.

The running worker never imports this package; `worker/__main__.py` registers each
group on the top-level typer app.
"""
