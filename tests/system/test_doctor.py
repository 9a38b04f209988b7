"""`uffdsnap doctor` on this machine, as root and with privileges taken away, plus its verdict
and table logic on made-up findings. The doctor is run as users run it: a separate process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any

import pytest

from uffdsnap.cli.commands.doctor import _ASCII_MARKS, render
from uffdsnap.doctor import ATTACH, INFO, REQUIRED, USEFUL, Check, Diagnosis, Route

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root: on this machine only root can "
                                "create a userfaultfd; CI runs as root")
TIMEOUT = 120


def doctor(*args: str, prefix: tuple[str, ...] = (), env: dict[str, str] | None = None,
           cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-m", "uffdsnap", "doctor", *args],
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd,
                          env={**os.environ, **(env or {})})


def checks_by_name(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in result["checks"]}


def test_json_is_one_object_and_exit_code_matches() -> None:
    """Whatever this machine allows: one JSON object, a check list, exit 0 exactly when ok."""
    proc = doctor("--json")
    result = json.loads(proc.stdout)
    assert proc.returncode == (0 if result["ok"] else 1), proc.stderr
    assert {"ok", "kernel", "features", "checks", "routes", "modes", "reasons"} <= set(result)
    assert result["kernel"] == os.uname().release
    assert set(result["routes"]) == {"syscall", "device"}
    for check in result["checks"]:
        assert {"name", "ok", "level", "detail", "fix"} <= set(check)
        assert check["level"] in (REQUIRED, ATTACH, USEFUL, INFO)
        assert check["ok"] or check["fix"] or check.get("skipped") or check["level"] == INFO
    assert bool(result["reasons"]) == (not result["ok"])


@needs_root
def test_doctor_json_as_root_says_ok() -> None:
    proc = doctor("--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""
    result = json.loads(proc.stdout)
    assert result["ok"] is True and result["modes"] == {"enlist": True, "attach": True}
    assert "WP_HUGETLBFS_SHMEM" in result["features"]
    assert "PAGEFAULT_FLAG_WP" in result["features"]
    checks = checks_by_name(result)
    for name in ("userfaultfd", "features", "live probe", "ptrace", "pidfd_getfd"):
        assert checks[name]["ok"], checks[name]
    assert "WP|WRITE fault" in checks["live probe"]["detail"]
    assert result["routes"]["syscall"]["ok"] and "CAP_SYS_PTRACE" in \
        result["routes"]["syscall"]["detail"]
    assert result["capabilities"]["CAP_SYS_PTRACE"] is True
    assert result["reasons"] == []


@needs_root
def test_doctor_human_table() -> None:
    proc = doctor()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1].startswith("snapshots: possible here")
    rows = {line.split()[1]: line for line in lines[1:-1] if line.split()[0] in "✓✗!·–"}
    assert rows["live"].startswith("  ✓ live probe") and rows["features"].startswith("  ✓")
    assert rows["syscall"].startswith("      ✓ syscall")  # routes sit under userfaultfd
    # aligned: every detail starts in the same column
    starts = {rows["kernel"].index("Linux"), rows["features"].index("PAGEFAULT_FLAG_WP"),
              rows["live"].index("child"), rows["syscall"].index("userfaultfd()")}
    assert len(starts) == 1


@needs_root
def test_doctor_ascii_fallback() -> None:
    proc = doctor(env={"PYTHONIOENCODING": "ascii"})
    assert proc.returncode == 0, proc.stderr
    proc.stdout.encode("ascii")
    assert "  + features" in proc.stdout


def _setpriv(*args: str) -> tuple[str, ...]:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    return ("setpriv", *args)


@needs_root
def test_without_cap_sys_ptrace_device_route_still_works() -> None:
    """Root without CAP_SYS_PTRACE: the syscall is refused (and the doctor says why), the
    device route carries the whole probe, and EVENT_FORK is flagged as unusable."""
    prefix = _setpriv("--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace")
    proc = doctor("--json", prefix=prefix)
    result = json.loads(proc.stdout)
    assert result["capabilities"]["CAP_SYS_PTRACE"] is False
    syscall, device = result["routes"]["syscall"], result["routes"]["device"]
    assert not syscall["ok"] and "EPERM" in syscall["detail"]
    assert "CAP_SYS_PTRACE" in syscall["detail"] and "vm.unprivileged_userfaultfd" in \
        syscall["detail"]
    assert syscall["fix"]
    assert device["ok"]
    checks = checks_by_name(result)
    assert checks["live probe"]["ok"] and "via device" in checks["live probe"]["detail"]
    assert not checks["useful features"]["ok"] and "EVENT_FORK" in \
        checks["useful features"]["detail"]
    assert result["ok"] is True and proc.returncode == 0


@needs_root
def test_unprivileged_user_gets_reasons_and_exit_1() -> None:
    """An ordinary user (uid 65534) here can use neither route: exit 1, each route says why,
    the probes that depend on them are marked skipped (not blamed), one line on stderr."""
    # CAP_DAC_READ_SEARCH (ambient) only lets this user reach the interpreter under /root;
    # it grants no write access, so /dev/userfaultfd (root 0600) stays closed to it.
    prefix = _setpriv("--reuid=65534", "--regid=65534", "--clear-groups",
                      "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search")
    probe = subprocess.run([*prefix, sys.executable, "-c", "import uffdsnap"], cwd="/",
                           capture_output=True, timeout=TIMEOUT)
    if probe.returncode:
        pytest.skip(f"cannot run uffdsnap as uid 65534 here: {probe.stderr.decode()[-200:]}")
    proc = doctor("--json", prefix=prefix, cwd="/")
    result = json.loads(proc.stdout)
    assert proc.returncode == 1 and result["ok"] is False
    assert result["uid"] == 65534
    syscall, device = result["routes"]["syscall"], result["routes"]["device"]
    assert not syscall["ok"] and "CAP_SYS_PTRACE" in syscall["detail"]
    assert not device["ok"] and "no read-write access" in device["detail"]
    assert "uid 65534" in device["detail"] and "chmod" in device["fix"]
    checks = checks_by_name(result)
    assert not checks["userfaultfd"]["ok"] and not checks["userfaultfd"].get("skipped")
    assert checks["live probe"]["skipped"] and checks["features"]["skipped"]
    assert len(result["reasons"]) == 1 and result["reasons"][0].startswith("userfaultfd:")
    stderr = proc.stderr.strip().splitlines()
    assert len(stderr) == 1 and stderr[0].startswith("uffdsnap: error: snapshots are not "
                                                     "possible here: userfaultfd:")

    human = doctor(prefix=prefix, cwd="/")
    assert human.returncode == 1
    assert human.stdout.splitlines()[-1] == "snapshots: NOT possible here (failed: userfaultfd)"


# ---- verdict and table on made-up findings (pure) -------------------------------------------


def _diag(*checks: Check) -> Diagnosis:
    routes = {"syscall": Route("syscall", False, "refused", "grant CAP_SYS_PTRACE"),
              "device": Route("device", True, "/dev/userfaultfd crw-rw---- root:kvm")}
    return Diagnosis("6.18.0", "x86_64", ["PAGEFAULT_FLAG_WP"], routes,
                     [Check("kernel", True, INFO, "Linux 6.18.0 x86_64"),
                      Check("userfaultfd", True, REQUIRED, "works via device"), *checks],
                     {"uid": 1000})


def test_verdict_levels() -> None:
    ok = _diag(Check("hugetlb", False, USEFUL, "no pages", "reserve some"))
    assert ok.ok and ok.attach_ok and ok.reasons() == []
    no_attach = _diag(Check("ptrace", False, ATTACH, "Yama 3", "reboot"))
    assert no_attach.ok and not no_attach.attach_ok
    assert no_attach.to_json()["modes"] == {"enlist": True, "attach": False}
    broken = _diag(Check("features", False, REQUIRED, "kernel lacks X", "upgrade"),
                   Check("live probe", False, REQUIRED, "skipped: ...", skipped=True))
    assert not broken.ok and not broken.attach_ok
    assert broken.reasons() == ["features: kernel lacks X — upgrade"]
    assert broken.to_json()["ok"] is False


def test_render_table() -> None:
    text = render(_diag(Check("ptrace", False, ATTACH, "Yama ptrace_scope=3", "reboot"),
                        Check("hugetlb", False, USEFUL, "no pages", "reserve some")),
                  _ASCII_MARKS)
    lines = text.splitlines()
    assert lines[0] == "uffdsnap doctor — uid 1000"
    assert lines[-1] == "snapshots: possible here (enlist +, attach x) — attach failed: ptrace"
    by_name = {line.split()[1]: line for line in lines[1:-1] if not line.strip().startswith("->")}
    assert by_name["kernel"].startswith("  - kernel")
    assert by_name["syscall"].startswith("      ! syscall")  # routes sit under userfaultfd
    assert by_name["/dev/userfaultfd"].startswith("      + /dev/userfaultfd")
    assert by_name["ptrace"].startswith("  x ptrace") and by_name["hugetlb"].startswith("  !")
    column = {line.index(detail) for line, detail in
              [(by_name["kernel"], "Linux"), (by_name["ptrace"], "Yama"),
               (by_name["/dev/userfaultfd"], "/dev/userfaultfd crw")]}
    assert len(column) == 1
    fix = lines[lines.index(by_name["ptrace"]) + 1]
    assert fix.strip() == "-> reboot" and fix.index("->") in column
