"""Fuzzing the smaller parsers: peer addresses, the client's KEXINIT guess, --allow, the netns table."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import List

import click
import pytest
from asyncssh.packet import Boolean, Byte, NameList, UInt32
from hypothesis import event, given
from hypothesis import strategies as st

from fuzzing import safe_dir  # noqa: F401  (fixture; also loads the profile)
from mitigator_agent.cli import main, serve
from mitigator_agent.namespaces import TableUnavailable, read_table
from mitigator_agent.ratelimit import source_bucket
from mitigator_agent.server import first_kex_guess_is_wrong, plain_address

def serve_context(args: List[str]) -> click.Context:
    """``serve``'s context as ``mitigator-agent serve ARGS`` makes it (nothing is run).

    Under the group's own context, as click makes it: a context of the bare
    command would leave click's cached help option without ``-h``.
    """
    root = main.make_context("mitigator-agent", [])
    return serve.make_context("serve", list(args), parent=root)


ADDRESS_TEXT = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"),
    st.ip_addresses(v=6).map(lambda a: f"{a}%eth0"),
    st.text(st.sampled_from("0123456789abcdef:./%"), max_size=45),
    st.text(max_size=20),
)


@given(ADDRESS_TEXT)
def test_a_peer_address_always_has_a_bucket_and_the_bucket_holds_it(address):
    bucket = source_bucket(address)
    plain = plain_address(address)
    assert isinstance(bucket, str) and isinstance(plain, str)
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        event("not an address")
        assert bucket == address and plain == address
        return
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        event("IPv6")
        network = ipaddress.ip_network(bucket)
        assert network.prefixlen == 48 and ip in network and plain == str(ip)
    else:
        event("IPv4")
        expected = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else ip
        assert bucket == plain == str(expected)


KEX = st.sampled_from([b"curve25519-sha256", b"curve25519-sha256@libssh.org", b"mlkem768x25519-sha256",
                       b"diffie-hellman-group14-sha256", b"ecdh-sha2-nistp256", b"x"])
HOST_KEY = st.sampled_from([b"ssh-ed25519", b"rsa-sha2-256", b"ecdsa-sha2-nistp256", b"y"])


def kexinit(kex: List[bytes], host_key: List[bytes], guess: bool, others: List[List[bytes]]) -> bytes:
    return (Byte(20) + bytes(16) + NameList(kex) + NameList(host_key)
            + b"".join(NameList(names) for names in others) + Boolean(guess) + UInt32(0))


@given(st.lists(KEX, max_size=4), st.lists(HOST_KEY, max_size=3), st.booleans(),
       st.lists(st.lists(st.binary(min_size=1, max_size=8).filter(lambda b: b"," not in b), max_size=3),
                min_size=8, max_size=8),
       st.lists(KEX, min_size=1, max_size=3), st.lists(HOST_KEY, min_size=1, max_size=2))
def test_a_first_kex_guess_is_right_only_when_both_sides_prefer_the_same(kex, host_key, guess, others,
                                                                         ours, our_host_keys):
    wrong = first_kex_guess_is_wrong(kexinit(kex, host_key, guess, others), ours, our_host_keys)
    # RFC 4253 7.1, restated: no guess is never wrong; a guess is right only if both first choices agree.
    assert wrong == (guess and not (kex[:1] == ours[:1] and host_key[:1] == our_host_keys[:1]))


@pytest.fixture(scope="module")
def empty_config(safe_dir: Path) -> str:
    path = safe_dir / "empty.toml"
    path.write_text("")
    path.chmod(0o644)
    return str(path)


@given(st.lists(st.one_of(ADDRESS_TEXT, st.builds(lambda a, n: f"{a}/{n}", st.ip_addresses().map(str),
                                                   st.integers(-1, 130))), min_size=1, max_size=3))
def test_allow_takes_particular_networks_or_names_the_bad_one(empty_config, cidrs):
    args = ["--config", empty_config] + [arg for cidr in cidrs for arg in ("--allow", cidr)]
    try:
        allow = serve_context(args).params["allow"]
    except click.BadParameter as exc:
        event("refused")
        assert "--allow" in exc.format_message() or any(repr(c) in exc.format_message() for c in cidrs)
        return
    event("accepted")
    assert len(allow) == len(cidrs)
    for given_text, network_text in zip(cidrs, allow):
        network = ipaddress.ip_network(network_text)
        assert network.prefixlen > 0
        assert ipaddress.ip_network(given_text.strip(), strict=False) == network


TABLE_LINE = st.one_of(
    st.builds(lambda inum, cookies, accepts, refused: f"netns {inum} syncookies {cookies} accepts {accepts}"
                                                        f" refused {refused}",
              st.integers(0, 2**32), st.integers(-3, 3), st.sampled_from(["yes", "no", "maybe"]),
              st.integers(-1, 2**64)),
    st.text(max_size=40),
)


@given(st.lists(TABLE_LINE, max_size=5))
def test_the_netns_table_parses_or_names_the_line_it_cannot(safe_dir, lines):
    path = safe_dir / "tcpsecrets_netns"
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    try:
        table = read_table(str(path))
    except TableUnavailable as exc:
        event("refused")
        assert str(path) in str(exc) and "\n" not in str(exc)
        return
    event("parsed")
    assert all(ns.name == f"net:[{ns.inum}]" and ns.refused >= 0 for ns in table)
