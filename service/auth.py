"""`python -m service.auth < token-file`, the command the README names: the hash of each token for `token_sha256`.
The command is `service.callers.main`; authenticating calls is `service/rpc/auth.py`'s."""

import sys

from service.callers import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], sys.stdin, sys.stdout, sys.stderr))
