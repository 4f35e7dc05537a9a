"""Opening one new records file from several processes at once (the workers of `--workers` start together): every
one of them gets the file in WAL mode; none fails with "database is locked"."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# Each child imports first, says so, and opens the file when told: so that all open it within microseconds.
_OPEN = """
import sys
from pathlib import Path
from service.records.sqlite import connect
print("ready", flush=True)
sys.stdin.readline()
connect(Path(sys.argv[1]))
"""


def test_processes_opening_one_new_file_at_once_all_get_it(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    for round_ in range(10):
        path = tmp_path / f"records-{round_}.db"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _OPEN, str(path)],
                cwd=root,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(6)
        ]
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        errors = [p.communicate(timeout=60)[1] for p in procs]
        assert [p.returncode for p in procs] == [0] * 6, "\n".join(errors)
