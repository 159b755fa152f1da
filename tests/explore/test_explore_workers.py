"""Explorer workers (idtlab.explore._in_workers): a worker that dies costs its chunk a
re-run in a fresh pool, never a hang; a chunk that kills its worker twice is a one-line
error; results come back in order; no worker process outlives the call."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from idtlab.errors import BadInput
from idtlab.explore import _in_workers


def double(job: tuple[str, int]) -> list[int]:
    return [job[1] * 2]


def die_once(job: tuple[str, int]) -> list[int]:
    """Dies (as if killed) the first time it runs a job whose marker file is absent."""
    marker, value = job
    if marker and not os.path.exists(marker):
        Path(marker).write_text("died")
        os._exit(9)
    return [value * 2]


def die_always(job: tuple[str, int]) -> list[int]:
    if job[0]:
        os._exit(9)
    return [job[1] * 2]


def test_results_come_back_in_order() -> None:
    assert list(_in_workers([("", i) for i in range(7)], 2, double)) == [[2 * i] for i in range(7)]


def test_a_chunk_whose_worker_died_is_run_again(tmp_path: Path) -> None:
    jobs = [("", 0), (str(tmp_path / "m"), 1), ("", 2), ("", 3)]
    assert list(_in_workers(jobs, 2, die_once)) == [[0], [2], [4], [6]]
    assert (tmp_path / "m").read_text() == "died"
    assert not multiprocessing.active_children()


def test_a_chunk_that_kills_its_worker_twice_is_one_error() -> None:
    with pytest.raises(BadInput, match="a worker process died twice"):
        list(_in_workers([("", 0), ("x", 1)], 2, die_always))
    assert not multiprocessing.active_children()
