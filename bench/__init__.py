"""The benchmark harness: the real worker end to end against baselines, in one run.

`release-worker bench` (see `bench.run`) seeds its own data on the embedded stack (or
the servers in WORKER_*), and measures the worker and the baselines `db_limit`,
`kafka_pipe` and `naive` on the same machine. docs/benchmark.md explains the method.
"""
