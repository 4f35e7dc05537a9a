"""A sandboxed program for tests/test_hardening.py: tries to reach into the service that runs it, leaves a daemon
behind (setsid and a double fork), and reports. With {"mode": "hold"} it only sleeps (at most 30 s)."""

import json
import os
import sys
import time

request = json.load(sys.stdin)
service = request["service"]
if request["mode"] == "hold":
    time.sleep(30)
    sys.exit(0)
results = {}


def attempt(name, action):
    try:
        action()
        results[name] = "allowed"
    except OSError as exc:
        results[name] = type(exc).__name__


def read(path, mode="rb"):
    with open(path, mode) as f:
        f.read(16)


attempt("read_environ", lambda: read(f"/proc/{service}/environ"))
attempt("read_audit", lambda: read(request["audit_db"]))
attempt("write_audit", lambda: read(request["audit_db"], "r+b"))
attempt("signal_service", lambda: os.kill(service, 0))
ready_r, ready_w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.write(ready_w, str(os.getpid()).encode())
    time.sleep(30)
    os._exit(0)
os.close(ready_w)
results["daemon"] = int(os.read(ready_r, 32))
print(json.dumps(results))
