"""The benchmarks' one timing helper: warm-up, device synchronisation, rotating rounds, medians.

Imported by ``bench_itsm.py``, ``bench_throughput.py`` and ``device.py`` (run as scripts from this
folder, so ``from timing import ...`` finds it).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

Timing = tuple[float, float]  # (wall seconds, CPU seconds of this process)


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the queued work of a CUDA ``device`` (nothing on a CPU), so that a wall time is the work's."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def seconds(run: Callable[[], object], device: torch.device | str | None = None) -> Timing:
    """(wall, CPU) seconds of one call of ``run``, synchronised on ``device``."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def medians(timings: list[Timing]) -> Timing:
    return statistics.median(t[0] for t in timings), statistics.median(t[1] for t in timings)


def time_rounds(
    methods: dict[str, Callable[[], object]],
    repeats: int,
    device: torch.device | str | None = None,
    *,
    progress: bool = True,
    warm_up: bool = True,
) -> dict[str, Timing]:
    """Median (wall, CPU) seconds of each method over ``repeats`` rounds, after one warm-up call each
    (``warm_up=False``: the caller has warmed them up).

    Every round times each method once, the order rotating between rounds, so that a slow spell
    of a shared machine does not land on one method and the ratios stay meaningful.
    """
    for run in tqdm(methods.values(), desc="warm-up", leave=False, disable=not progress or not warm_up):
        if warm_up:
            run()
    synchronize(device)
    names = list(methods)
    times: dict[str, list[Timing]] = {name: [] for name in names}
    for round_index in tqdm(range(repeats), desc="rounds", leave=False, disable=not progress):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            times[name].append(seconds(methods[name], device))
    return {name: medians(values) for name, values in times.items()}
