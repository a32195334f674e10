"""The ``from="pattern-list"`` option of a keys-file line: parsed strictly, matched as sshd does.

A pattern list is comma-separated, without white space.  Each pattern is, after an optional ``!``
(negation):

- a CIDR, ``192.0.2.0/24`` or ``2001:db8::/32``: its prefix length in range and no address bit set
  beyond it (``192.0.2.1/24`` is refused: which network was meant is not known);
- an address, ``192.0.2.1`` or ``2001:db8::1``;
- an address pattern with the wildcards ``*`` (any run of characters) and ``?`` (one character):
  ``192.0.2.*``, ``2001:db8::*``; made of digits, hexadecimal letters, ``.`` and ``:`` only.

Anything else (a host name, an empty pattern, white space, a bad CIDR) makes the whole line admit
nobody, with a message naming the pattern: sshd refuses a key whose from= it cannot evaluate, and
a pattern skipped quietly could drop an exclusion (``!``) and admit a source the admin shut out.
Host names are refused rather than ignored: the agent never looks a name up, so a host name could
only ever match nothing, which is not what whoever wrote it meant.

Matching, as sshd's ``match_host_and_ip``: a source matching any negated pattern is refused;
otherwise it is admitted when it matches a positive pattern.  Addresses are compared as addresses
(``::ffff:192.0.2.1`` is 192.0.2.1, ``2001:DB8::1`` is ``2001:db8::1``); wildcards are matched
against the address's canonical text (IPv4 dotted quad, IPv6 compressed lower case).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

_WILDCARD_CHARS = re.compile(r"^[0-9A-Fa-f.:*?]+$")
_WILDCARD_ONLY = frozenset("*?.:")


class PatternError(ValueError):
    """A from= pattern list that cannot be evaluated; the message names the pattern."""


@dataclass(frozen=True)
class Pattern:
    """One pattern of a list: a network (an address is a /32 or /128) or a wildcard text."""

    text: str                   # as written, without its '!'
    negated: bool
    network: Optional[Network]  # None for a wildcard pattern

    def matches(self, address: Address) -> bool:
        if self.network is not None:
            return address.version == self.network.version and address in self.network
        return fnmatch.fnmatchcase(address.compressed, self.text.lower())

    @property
    def matches_anyone(self) -> bool:
        """Whether this (positive) pattern matches any address: ``*``, ``0.0.0.0/0``, ``::/0``..."""
        if self.network is not None:
            return self.network.prefixlen == 0
        return set(self.text) <= _WILDCARD_ONLY


def parse_pattern(text: str) -> Pattern:
    """One pattern of a list (see the module's docstring); PatternError when it is none of the forms."""
    negated = text.startswith("!")
    body = text[1:] if negated else text
    if not body:
        raise PatternError("an empty pattern" + (" after '!'" if negated else ""))
    if "/" in body:
        try:
            network = ipaddress.ip_network(body, strict=False)
        except ValueError:
            raise PatternError(f"{body!r} is not a CIDR (address/prefix length)") from None
        if network.network_address != ipaddress.ip_address(body.split("/", 1)[0]):
            raise PatternError(f"{body!r} has address bits set beyond its prefix: write {network}")
        return Pattern(body, negated, _unmapped(network))
    if "*" in body or "?" in body:
        if not _WILDCARD_CHARS.match(body):
            raise PatternError(f"{body!r} is not an address pattern (host names are not looked up:"
                               " give addresses, CIDRs or address wildcards)")
        return Pattern(body, negated, None)
    try:
        address = ipaddress.ip_address(body)
    except ValueError:
        raise PatternError(f"{body!r} is not an address (host names are not looked up:"
                           " give addresses, CIDRs or address wildcards)") from None
    return Pattern(body, negated, _unmapped(ipaddress.ip_network(address)))


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _unmapped(network: Network) -> Network:
    """An IPv4-mapped IPv6 network as the IPv4 network it is (sources are compared unmapped too)."""
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96 and network.subnet_of(_MAPPED):
        return ipaddress.IPv4Network((int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96))
    return network


def parse_pattern_list(value: str) -> Tuple[Pattern, ...]:
    """A from= value's patterns; PatternError for the first that cannot be evaluated."""
    if not value:
        raise PatternError('from= needs a quoted pattern list, e.g. from="192.0.2.1"')
    if re.search(r"\s", value):
        raise PatternError(f"from=\"{value}\" has white space: separate its patterns with commas only")
    return tuple(parse_pattern(part) for part in value.split(","))


def admits(patterns: Sequence[Pattern], address: str) -> bool:
    """Whether a source at ``address`` passes ``patterns`` (sshd's rule: a negated match refuses)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    if any(p.negated and p.matches(ip) for p in patterns):
        return False
    return any(not p.negated and p.matches(ip) for p in patterns)


def names_particular_sources(pattern_lists: Sequence[str]) -> bool:
    """Whether from= pattern lists name particular sources rather than everyone.

    The agent gives the sources a key's from= names an admission pool of their own
    (MITIGATOR's addresses, see ratelimit.Admission); a list that admits anyone must not turn
    every stranger into one of them.  So an entry names nobody in particular when it has no
    from= at all, or when one of its positive patterns matches any address (``*``, ``*.*.*.*``,
    ``0.0.0.0/0``, ``::/0``).  Lists that do not parse name nobody (their line admits nobody).
    """
    if not pattern_lists:
        return False
    for value in pattern_lists:
        try:
            patterns = parse_pattern_list(value)
        except PatternError:
            return False
        if any(not p.negated and p.matches_anyone for p in patterns):
            return False
    return True
