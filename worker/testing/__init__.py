"""Test and demo kits: embedded servers, events, seeding and invariant SQL, topics, results.

The running worker never imports this package; the demo, the bench and the tests do.
"""
