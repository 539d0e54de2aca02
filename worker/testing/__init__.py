"""Test and demo kits: embedded servers, seeding, invariants, topics, reading results back.

The running worker never imports this package; the demo, the bench and the tests do.
"""
