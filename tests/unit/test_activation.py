"""activation.py: the sockets systemd passes, checked on real descriptors of this process."""

from __future__ import annotations

import os
import socket
from typing import Iterator, List

import pytest

from mitigator_agent.activation import ActivationError, endpoint_problem, inherited_listeners

FIRST = 200  # a descriptor range of its own, as systemd's starts at 3


@pytest.fixture
def placed() -> Iterator[List[int]]:
    """Descriptors dup2'ed to FIRST, FIRST+1, ...: call place(obj) in order; all closed after the test."""
    fds: List[int] = []
    yield fds
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def place(fds: List[int], fileno: int) -> int:
    fd = FIRST + len(fds)
    os.dup2(fileno, fd)
    fds.append(fd)
    return fd


def listener(family: int = socket.AF_INET, host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen()
    return sock


def announced(count: int, pid: int = 0) -> dict:
    return {"LISTEN_PID": str(pid or os.getpid()), "LISTEN_FDS": str(count), "LISTEN_FDNAMES": "x", "HOME": "/"}


def test_nothing_announced_is_no_sockets() -> None:
    env = {"HOME": "/"}
    assert inherited_listeners(env, first_fd=FIRST) == []


def test_sockets_for_another_process_are_not_ours_and_the_variables_go(placed: List[int]) -> None:
    with listener() as sock:
        place(placed, sock.fileno())
        env = announced(1, pid=os.getpid() + 1)
        assert inherited_listeners(env, first_fd=FIRST) == []
        assert env == {"HOME": "/"}


def test_listening_tcp_sockets_are_returned_in_order_and_not_inherited(placed: List[int]) -> None:
    with listener() as four, listener(socket.AF_INET6, "::1") as six:
        place(placed, four.fileno())
        place(placed, six.fileno())
        env = announced(2)
        got = inherited_listeners(env, first_fd=FIRST)
        assert [s.fileno() for s in got] == [FIRST, FIRST + 1]
        assert [s.getsockname()[1] for s in got] == [four.getsockname()[1], six.getsockname()[1]]
        assert not any(s.get_inheritable() for s in got)
        assert env == {"HOME": "/"}  # a child the agent starts sees none of it
        for s in got:
            s.detach()


@pytest.mark.parametrize("count", ["two", "-1", ""])
def test_a_count_that_is_not_a_number_is_refused(count: str) -> None:
    env = dict(announced(1), LISTEN_FDS=count)
    with pytest.raises(ActivationError) as caught:
        inherited_listeners(env, first_fd=FIRST)
    assert caught.value.problem.kind == "bad-environment"


def test_a_pipe_is_not_a_socket(placed: List[int]) -> None:
    read, write = os.pipe()
    try:
        place(placed, read)
        with pytest.raises(ActivationError) as caught:
            inherited_listeners(announced(1), first_fd=FIRST)
    finally:
        os.close(read)
        os.close(write)
    problem = caught.value.problem
    assert (problem.kind, problem.fd) == ("not-a-socket", FIRST)
    assert "ListenStream=" in problem.remedy
    os.fstat(FIRST)  # not closed: the descriptor stays the caller's


def test_udp_is_not_tcp_and_a_bound_socket_that_does_not_listen_is_refused(placed: List[int]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        place(placed, udp.fileno())
        with pytest.raises(ActivationError) as caught:
            inherited_listeners(announced(1), first_fd=FIRST)
        assert caught.value.problem.kind == "not-tcp"
    placed.clear()
    os.close(FIRST)
    with socket.socket() as quiet:
        quiet.bind(("127.0.0.1", 0))
        place(placed, quiet.fileno())
        with pytest.raises(ActivationError) as caught:
            inherited_listeners(announced(1), first_fd=FIRST)
        assert (caught.value.problem.kind, caught.value.problem.fd) == ("not-listening", FIRST)


def test_a_later_bad_descriptor_leaves_the_earlier_good_one_open(placed: List[int]) -> None:
    with listener() as good:
        place(placed, good.fileno())
        read, write = os.pipe()
        place(placed, read)
        os.close(read)
        os.close(write)
        with pytest.raises(ActivationError):
            inherited_listeners(announced(2), first_fd=FIRST)
        assert socket.socket(fileno=os.dup(FIRST)).getsockname() == good.getsockname()


# --- where the sockets listen, against the configuration ---------------------------------------

def test_a_dual_stack_wildcard_serves_every_address_on_its_port() -> None:
    with socket.socket(socket.AF_INET6) as wildcard:
        wildcard.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        wildcard.bind(("::", 0))
        port = wildcard.getsockname()[1]
        assert endpoint_problem([wildcard], [("", port)]) is None
        problem = endpoint_problem([wildcard], [("", port + 1 if port < 65535 else port - 1)])
        assert problem is not None and problem.kind == "unconfigured-address"


def test_a_wildcard_socket_does_not_serve_a_configured_address() -> None:
    with socket.socket() as wildcard:
        wildcard.bind(("0.0.0.0", 0))
        port = wildcard.getsockname()[1]
        problem = endpoint_problem([wildcard], [("127.0.0.1", port)])
    assert problem is not None and problem.kind == "unconfigured-address"
    assert f"0.0.0.0:{port}" in problem.sentence and f"127.0.0.1:{port}" in problem.sentence
    assert "systemctl edit mitigator-agent.socket" in problem.remedy


def test_each_configured_address_needs_its_socket() -> None:
    with listener() as four:
        port = four.getsockname()[1]
        assert endpoint_problem([four], [("127.0.0.1", port)]) is None
        problem = endpoint_problem([four], [("127.0.0.1", port), ("::1", port)])
    assert problem is not None and problem.kind == "missing-address"
    assert f"[::1]:{port}" in problem.sentence
