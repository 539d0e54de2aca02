"""Test and demo kits: embedded servers, scenario seeding, invariant checks.

The running worker never imports this package; the demo, the bench and the tests do.
"""
