"""The dbmate SQL migrations, shipped in the wheel as the package `worker.migrations`.

pyproject.toml maps this directory into the package; worker/migrate.py reads it through
importlib.resources. dbmate reads only the `*.sql` files here.
"""
