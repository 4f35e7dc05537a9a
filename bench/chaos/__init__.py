"""The chaos harness (issue 18's proof): replicas of the service killed with SIGKILL under load, and checks that
every run still ends once, gapless, with no recorded model turn requested again and no unsafe side effect repeated.
`python -m bench.chaos --help`; `make chaos` runs the full minute; `tests/test_chaos.py` a short round."""
