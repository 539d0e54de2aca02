"""`python -m worker`: the `release-worker` command line (worker/cli/main.py)."""

from worker.cli.main import main

if __name__ == "__main__":
    main()
