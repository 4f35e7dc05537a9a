"""`python -m bench`: run the benchmark (see `bench/run.py` for the flags)."""

from bench.run import main

main()
