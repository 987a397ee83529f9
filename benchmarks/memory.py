"""Peak memory of a process tree while a command runs (the preprocessing benchmark's jobs).

A sampler thread sums ``VmRSS`` over the command's whole process tree every
:data:`SAMPLE_INTERVAL_S` seconds (peak tree RSS), and GNU ``/usr/bin/time`` reports the kernel's
peak RSS of the largest single process (``%M``; the largest sampled ``VmHWM`` where GNU time is
missing). Linux only (``/proc``).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from benchmarks import common

SAMPLE_INTERVAL_S = 0.2
GNU_TIME = "/usr/bin/time"
MIB = 1024.0 * 1024.0


def _read_rss_kib(pid: int) -> tuple[int, int]:
    """(``VmRSS``, ``VmHWM``) of ``pid`` in KiB; zeros when it is gone or is a zombie."""
    values = {"VmRSS:": 0, "VmHWM:": 0}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                key = line[:6]
                if key in values:
                    values[key] = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return values["VmRSS:"], values["VmHWM:"]


def _process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants, from the parent links in ``/proc/*/stat``."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


@dataclass
class TreeRssSampler:
    """Samples the summed RSS of a process tree in a background thread; keeps the peaks.

    ``peak_kib`` is the largest sum of ``VmRSS`` over the tree; ``peak_hwm_kib`` the largest
    ``VmHWM`` (kernel high-water mark) of any one process seen. With ``skip_root`` the root (a
    ``/usr/bin/time`` wrapper) is left out of both. A :class:`benchmarks.common.Watcher`.
    """

    skip_root: bool = False
    interval: float = SAMPLE_INTERVAL_S
    peak_kib: int = 0
    peak_hwm_kib: int = 0
    peak_processes: int = 0
    peak_at_s: float = 0.0
    samples: int = 0
    timeline: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self, root: int) -> TreeRssSampler:
        """Starts sampling the tree of process ``root``."""
        self._thread = threading.Thread(target=self._run, args=(root,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops sampling and waits for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self, root: int) -> None:
        start = time.perf_counter()
        while not self._stop.is_set():
            pids = _process_tree(root)[1 if self.skip_root else 0 :]
            figures = [_read_rss_kib(pid) for pid in pids]
            total = sum(rss for rss, _ in figures)
            now = time.perf_counter() - start
            self.peak_hwm_kib = max([self.peak_hwm_kib, *(hwm for _, hwm in figures)])
            self.samples += 1
            self.timeline.append((round(now, 1), total))
            if total > self.peak_kib:
                self.peak_kib, self.peak_processes, self.peak_at_s = total, len(pids), now
            self._stop.wait(self.interval)

    def coarse_timeline(self, points: int = 50) -> list[tuple[float, float]]:
        """About ``points`` (seconds, tree RSS MiB) pairs: the max of each slice of samples."""
        step = max(1, len(self.timeline) // points)
        return [
            (chunk[0][0], round(max(kib for _, kib in chunk) / 1024, 1))
            for chunk in (self.timeline[i : i + step] for i in range(0, len(self.timeline), step))
        ]


def gnu_time() -> str | None:
    """``/usr/bin/time`` when it is GNU time (``-f``/``-o`` and ``%M``), else None."""
    if not os.access(GNU_TIME, os.X_OK):
        return None
    probe = subprocess.run([GNU_TIME, "--version"], capture_output=True, text=True, check=False)
    return GNU_TIME if "GNU" in probe.stdout + probe.stderr else None


def run_measured(command: Sequence[str], log_path: str) -> dict:
    """Runs ``command`` to completion (:func:`benchmarks.common.run_logged`) while sampling the
    memory of its process tree; returns wall time, peak RSS figures and CPU time.

    The peak RSS of the largest process comes from GNU ``/usr/bin/time`` (``%M``) when it is
    installed: ``os.wait4`` on a child forked from this process would also count this process's
    own pre-``exec`` pages. Without it, the largest ``VmHWM`` sampled is used.

    Raises:
      BenchmarkError: the command exited non-zero (the log's tail is in the message).
    """
    wrapper = gnu_time()
    usage_path = f"{log_path}.rusage"
    if wrapper:
        command = [wrapper, "-f", "%M %U %S", "-o", usage_path, *command]
    sampler = TreeRssSampler(skip_root=bool(wrapper))
    run = common.run_logged(command, log_path, watcher=sampler)
    max_rss_kib, cpu_s, source = sampler.peak_hwm_kib, run["cpu_s"], "VmHWM"
    if wrapper:
        with open(usage_path, encoding="utf-8") as f:
            fields = f.read().split()[-3:]  # GNU time may put a status line first
        max_rss_kib, cpu_s, source = (
            int(fields[0]),
            float(fields[1]) + float(fields[2]),
            "GNU time %M",
        )
    return {
        "wall_s": run["wall_s"],
        "peak_tree_rss_mib": sampler.peak_kib * 1024 / MIB,
        "peak_tree_processes": sampler.peak_processes,
        "peak_tree_rss_at_s": sampler.peak_at_s,
        "tree_rss_timeline_mib": sampler.coarse_timeline(),
        "rss_samples": sampler.samples,
        "max_process_rss_mib": max_rss_kib * 1024 / MIB,
        "max_process_rss_source": source,
        "cpu_s": cpu_s,
        "loadavg_1m_before": run["loadavg_1m_before"],
        "log": log_path,
    }
