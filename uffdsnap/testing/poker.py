"""A process that maps a shared object and writes whole pages on command, for tests and the
bench of incremental snapshots (which need writes they choose, at moments they choose).

Commands on its stdin, one per line, each answered "ok" on stdout once done (a write may wait on
a write-protect fault meanwhile):
  write OFFSET VALUE          fill the 4 KiB at OFFSET with the byte VALUE
  fork OFFSET VALUE           the same, done by a child that exits right after
  pages VALUE OFF1,OFF2,...   fill the 4 KiB at each offset with VALUE
"""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
print("ready", flush=True)
for line in sys.stdin:
    cmd, a, b = line.split()
    if cmd == "pages":
        fill = bytes([int(a)]) * 4096
        for off in map(int, b.split(",")):
            m[off:off + 4096] = fill
    elif cmd == "fork":
        pid = os.fork()
        if pid == 0:
            m[int(a):int(a) + 4096] = bytes([int(b)]) * 4096
            os._exit(0)
        os.waitpid(pid, 0)
    else:
        m[int(a):int(a) + 4096] = bytes([int(b)]) * 4096
    print("ok", flush=True)
"""

PAGE = 4096


class Poker:
    """The poker process on the object at `path` (started, mapped, ready)."""

    def __init__(self, path: str):
        self.proc = subprocess.Popen([sys.executable, "-c", SCRIPT, path], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._expect("ready")

    def _expect(self, word: str) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()  # (bounded by the caller's timeout)
        if line != word:
            raise RuntimeError(f"poker (pid {self.proc.pid}): expected {word!r}, got {line!r}")

    def _ask(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        self._expect("ok")

    def write(self, page: int, value: int, how: str = "write") -> None:
        """Fill 4 KiB page number `page` with `value` ("fork": from a child)."""
        self._ask(f"{how} {page * PAGE} {value}")

    def write_pages(self, offsets: list[int], value: int) -> None:
        """Fill the 4 KiB at each byte offset with `value`."""
        for start in range(0, len(offsets), 4096):
            self._ask(f"pages {value} {','.join(map(str, offsets[start:start + 4096]))}")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
