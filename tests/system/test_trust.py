"""Who may ask what of a root coordinator whose socket is open to another group
(`coordinator --socket-group`): peers are judged by the kernel's record of who connected
(SO_PEERCRED), never by what they say. Each peer here is a real process running as uid 65534
(forked from the test, then setuid) speaking the real protocol to a real coordinator."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from unprivileged import NOBODY, Served, as_nobody, hello_answer, root_coordinator

from conftest import make_workload
from uffdsnap.protocol import Role

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: peers run as uid 65534")


@pytest.fixture
def coordinator(shm_path: str) -> Iterator[Served]:
    make_workload(shm_path, 1, 16)
    with root_coordinator(shm_path) as served:
        yield served


def test_a_clients_group_member_may_ask(shm_path: str) -> None:
    """With --clients-group, that group's members are clients too (the refusal's control)."""
    make_workload(shm_path, 1, 16)
    with root_coordinator(shm_path, "--clients-group", str(NOBODY)) as served:
        assert as_nobody(hello_answer, served.sock, Role.CLIENT) == "welcome"


def test_another_users_client_is_refused(coordinator: Served) -> None:
    """uid 65534 may enlist through the group-open socket, but may not ask for snapshots (a
    root coordinator would create the image wherever it was told)."""
    answer = as_nobody(hello_answer, coordinator.sock, Role.CLIENT)
    assert answer.startswith("abort refused: uid 65534 may not ask"), answer


def test_an_agent_may_not_speak_for_another_users_process(coordinator: Served) -> None:
    """An agent of uid 65534 claiming a root process (here the coordinator itself) is refused;
    claiming its own process it is welcome (the negative control of the refusal)."""
    pid = coordinator.proc.pid
    answer = as_nobody(hello_answer, coordinator.sock, Role.AGENT, pid)
    assert answer.startswith(f"abort refused: uid 65534 may not speak for pid {pid}"), answer
    assert as_nobody(hello_answer, coordinator.sock, Role.AGENT) == "welcome"


def test_the_socket_is_open_to_the_named_group_only(coordinator: Served) -> None:
    st = os.stat(coordinator.sock)
    assert st.st_mode & 0o777 == 0o660 and st.st_gid == NOBODY and st.st_uid == 0


def _files_of(where: str) -> dict[str, int]:
    return {name: os.stat(os.path.join(where, name)).st_uid for name in os.listdir(where)}


def test_images_are_created_with_the_clients_rights(shm_path: str, tmp_path) -> None:
    """A client of uid 65534 (--clients-group) gets its image in files it created itself, owned
    by it; asked for a directory only root may write, the root coordinator creates nothing
    there, whether the client passes files (it cannot create them) or names the path for the
    coordinator to create (refused: only root and its own user may). Control: root's own
    request by name is served there."""
    import shutil
    import tempfile

    from unprivileged import request

    make_workload(shm_path, 1, 16)
    mine = tempfile.mkdtemp(prefix="uffdsnap-nobody-")
    roots = tempfile.mkdtemp(prefix="uffdsnap-root-")  # 0700 root: no one else may write
    os.chown(mine, NOBODY, NOBODY)
    try:
        with root_coordinator(shm_path, "--clients-group", str(NOBODY)) as served:
            good = os.path.join(mine, "good.img")
            assert as_nobody(request, served.sock, good) == "ok"
            assert _files_of(mine) == {"good.img": NOBODY, "good.img.json": NOBODY}
            victim = os.path.join(roots, "victim.img")
            for files in (True, False):
                answer = as_nobody(request, served.sock, victim, files)
                assert answer.startswith("failed this coordinator writes images only into "
                                         "files its client created"), (files, answer)
                assert os.listdir(roots) == [], files
            assert request(served.sock, victim, False) == "ok"  # root may: the control
            assert sorted(os.listdir(roots)) == ["victim.img", "victim.img.json"]
    finally:
        shutil.rmtree(mine, ignore_errors=True)
        shutil.rmtree(roots, ignore_errors=True)
