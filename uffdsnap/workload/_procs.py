"""Writer processes for tests and the demo: the native writer or the Python one, each in its own
process, driven through the same "ready ..." / "done seq=N" lines.

A writer must be a process of its own: the driving process must never map the object (it would
become a mapper a snapshot has to attach to), and a Python writer blocked on a protected page holds
its GIL (DESIGN §5).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from uffdsnap import native
from uffdsnap.workload._writer import WorkloadError


@dataclass
class WriterProcess:
    """A writer running in its own process, speaking the "ready" / "done seq=N" line protocol."""

    proc: subprocess.Popen[str]
    index: int
    impl: str
    ready_line: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the writer has mapped the object and announced itself."""
        assert self.proc.stdout is not None
        readable, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if readable else ""
        if not line.startswith("ready"):
            self.kill()
            err = self.proc.stderr.read().strip() if self.proc.stderr else ""
            raise WorkloadError(f"{self.impl} writer {self.index} did not become ready within "
                                f"{timeout}s: {err or line.strip() or 'no output'}")
        self.ready_line = line.strip()

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the writer to exit (after set_stop or --max-ops); return its final seq
        (of its last writer, for a process running several: see wait_all())."""
        return list(self.wait_all(timeout).values())[-1]

    def wait_all(self, timeout: float = 30.0) -> dict[int, int]:
        """Wait for the process to exit; return {writer index: final seq} from its "done" lines
        (one per writer: `done seq=S ...`, or `done index=I seq=S ...` when it runs several)."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise WorkloadError(f"{self.impl} writer {self.index} did not exit within "
                                f"{timeout}s") from None
        done = [ln for ln in out.splitlines() if ln.startswith("done ")]
        if self.proc.returncode != 0 or not done:
            raise WorkloadError(f"{self.impl} writer {self.index} failed (exit "
                                f"{self.proc.returncode}): {err.strip() or out.strip()}")
        finals: dict[int, int] = {}
        for line in done:
            fields = dict(f.split("=", 1) for f in line.split()[1:])
            finals[int(fields.get("index", self.index))] = int(fields["seq"])
        return finals

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def writer_command(obj: str | os.PathLike[str], index: int, *, impl: str = "c",
                   rate: float | None = None, max_ops: int | None = None,
                   map_twice: bool = False, partial: bool = False,
                   enlist: str | None = None, threads: int = 1,
                   agent_hooks: dict[str, Any] | None = None) -> list[str]:
    """argv of a writer process: the native writer shipped in the package (impl="c") or
    `python -m uffdsnap.workload` (impl="python"); `enlist` (Python only) is a coordinator socket
    the writer enlists with before it starts; `threads` (native only) runs writers
    index..index+threads-1, one per thread."""
    if impl == "c":
        argv = [str(native.program(native.WRITER))]
    elif impl == "python":
        argv = [sys.executable, "-P", "-m", "uffdsnap.workload"]
    else:
        raise ValueError(f"unknown writer implementation {impl!r}")
    argv += ["--object", os.fspath(obj), "--index", str(index)]
    if rate:
        argv += ["--rate", str(rate)]
    if max_ops is not None:
        argv += ["--max-ops", str(max_ops)]
    if map_twice:
        argv.append("--map-twice")
    if partial:
        argv.append("--partial")
    if enlist:
        if impl != "python":
            raise ValueError("only the Python writer enlists; native writers are attached")
        argv += ["--enlist", enlist]
        if agent_hooks:
            argv += ["--agent-hooks", json.dumps(agent_hooks)]
    if threads != 1:
        if impl != "c":
            raise ValueError("only the native writer runs several writer threads")
        argv += ["--threads", str(threads)]
    return argv


def spawn_writer(obj: str | os.PathLike[str], index: int, *, impl: str = "c",
                 rate: float | None = None, max_ops: int | None = None, map_twice: bool = False,
                 partial: bool = False, enlist: str | None = None,
                 threads: int = 1, agent_hooks: dict[str, Any] | None = None) -> WriterProcess:
    """Start a writer process on the object at path `obj`; wait_ready() before relying on it."""
    argv = writer_command(obj, index, impl=impl, rate=rate, max_ops=max_ops,
                          map_twice=map_twice, partial=partial, enlist=enlist, threads=threads,
                          agent_hooks=agent_hooks)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return WriterProcess(proc, index, impl)
