"""What a user of the wheel gets, run from outside the checkout with the wheel's venv python:
`uffdsnap snapshot --shm` of a live object written by two processes of the workload that ships
in the package, then the consistency checker on the image."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

import uffdsnap
from uffdsnap import workload as wl


def main() -> int:
    here = os.path.dirname(uffdsnap.__file__)
    assert "site-packages" in here, f"uffdsnap imported from {here}, not from the installed wheel"
    uffdsnap_cmd = os.path.join(os.path.dirname(sys.executable), "uffdsnap")
    shm = f"/dev/shm/uffdsnap-ci-{uuid.uuid4().hex[:8]}"
    tmp = tempfile.mkdtemp(prefix="uffdsnap-ci-")
    writers: list[wl.WriterProcess] = []
    try:
        fd, _ = wl.create_object(shm, 2, 1024)
        os.close(fd)
        writers = [wl.spawn_writer(shm, i) for i in range(2)]
        for w in writers:
            w.wait_ready()
        out = os.path.join(tmp, "live.img")
        proc = subprocess.run([uffdsnap_cmd, "snapshot", "--shm", shm, "-o", out, "--json"],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            print(f"snapshot failed: {proc.stderr.strip()}", file=sys.stderr)
            return 1
        summary = json.loads(proc.stdout)
        check = wl.check_file(out)
        print(f"snapshot --shm of 2 live writers: {len(summary['processes'])} processes, "
              f"{summary['faults']} faults; checker: {check.summary()}")
        return 0 if check.ok and len(summary["processes"]) == 2 else 1
    finally:
        if writers:
            wl.set_stop(shm)
            for w in writers:
                try:
                    w.wait(timeout=20)
                except wl.WorkloadError:
                    w.kill()
        if os.path.exists(shm):
            os.unlink(shm)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
