"""Run ids come from a block of the OS's random bytes (service/ids.py): each is `run_` and 96 random bits, none
repeats across blocks, and a forked child draws its own block instead of handing out its parent's next ids."""

from __future__ import annotations

import os
import re

from service import ids


def test_ids_are_96_random_bits_and_do_not_repeat_across_blocks() -> None:
    made = [ids.new_run_id() for _ in range(3 * ids._BLOCK + 7)]  # more than three blocks
    assert all(re.fullmatch(r"run_[0-9a-f]{24}", m) for m in made)
    assert len(set(made)) == len(made)


def test_a_forked_child_does_not_hand_out_its_parents_next_ids() -> None:
    ids.new_run_id()  # a block is drawn, most of it left
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.close(read)
        os.write(write, " ".join(ids.new_run_id() for _ in range(5)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read().split()
    os.waitpid(pid, 0)
    parent = [ids.new_run_id() for _ in range(5)]
    assert len(child) == 5
    assert not set(child) & set(parent)
