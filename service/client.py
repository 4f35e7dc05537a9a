"""`python -m service.client "question"`, the command the README names and users type; the client itself is
`service/rpc/client.py`."""

from service.rpc.client import main

if __name__ == "__main__":
    main()
