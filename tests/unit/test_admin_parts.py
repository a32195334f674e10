"""The admin view's parts: listen forms, NTP server specs, time services' words, runtime state, journald prefixes."""

from __future__ import annotations

import io
import json
import os

import pytest

from mitigator_agent.clock import (parse_chronyc_tracking, parse_ntp_server, parse_ntpq_peers, parse_timedatectl,
                                   ask_time_service, TimeService)
from mitigator_agent import health
from mitigator_agent.logs import EventFormatter, journal_priority, stream_is_journal
from mitigator_agent.poll import normalise_fingerprint
from mitigator_agent.runstate import PollRecorder, RuntimeStateError, read_polls
from mitigator_agent.server import ServerSettings, listen_endpoints, split_listen_address


@pytest.mark.parametrize("text, expected", [
    ("192.0.2.10", ("192.0.2.10", None)),
    ("[192.0.2.10]", ("192.0.2.10", None)),
    ("192.0.2.10:7101", ("192.0.2.10", 7101)),
    ("::1", ("::1", None)),
    ("[::1]", ("::1", None)),
    ("[2001:db8::10]:7100", ("2001:db8::10", 7100)),
    ("2001:db8::7100", ("2001:db8::7100", None)),  # a bare IPv6 address is all address, as in sshd
])
def test_listen_forms(text, expected):
    assert split_listen_address(text) == expected


@pytest.mark.parametrize("text, reason", [
    ("[::1", "'[::1' is not an address"),
    ("[::1]x", "'[::1]x' is not an address"),
    ("localhost", "'localhost' is not an IP address"),
    ("127.0.0.1:99999", "'127.0.0.1:99999': port '99999' is not a number from 0 to 65535"),
])
def test_bad_listen_forms_say_what_is_wrong(text, reason):
    with pytest.raises(ValueError) as raised:
        split_listen_address(text)
    assert str(raised.value).startswith(reason)


def test_each_listen_address_keeps_its_own_port():
    settings = ServerSettings(port=7100, listen=("127.0.0.1", "[::1]:7200"))
    assert listen_endpoints(settings) == [("127.0.0.1", 7100), ("::1", 7200)]
    assert listen_endpoints(ServerSettings(port=5)) == [("", 5)]


@pytest.mark.parametrize("spec, expected", [
    ("pool.ntp.org", ("pool.ntp.org", 123)), ("127.0.0.1:1123", ("127.0.0.1", 1123)),
    ("[::1]:1123", ("::1", 1123)), ("::1", ("::1", 123)),
])
def test_ntp_server_specs(spec, expected):
    assert parse_ntp_server(spec) == expected


@pytest.mark.parametrize("spec", ["127.0.0.1:abc", "127.0.0.1:0", "[::1", ":123"])
def test_bad_ntp_server_specs_are_refused(spec):
    with pytest.raises(ValueError):
        parse_ntp_server(spec)


CHRONYC_SYNCED = """Reference ID    : C0000201 (192.0.2.1)
Stratum         : 3
Ref time (UTC)  : Sun Nov 29 23:40:02 2026
System time     : 0.000012345 seconds slow of NTP time
Last offset     : -0.000004321 seconds
RMS offset      : 0.000020000 seconds
Frequency       : 11.234 ppm fast
Leap status     : Normal
"""
CHRONYC_UNSYNCED = """Reference ID    : 00000000 ()
Stratum         : 0
System time     : 0.000000000 seconds fast of NTP time
Leap status     : Not synchronised
"""
NTPQ = """     remote           refid      st t when poll reach   delay   offset  jitter
==============================================================================
+192.0.2.2       .GPS.            1 u   33   64  377    0.512    0.300   0.021
*192.0.2.1       .GPS.            1 u   12   64  377    0.420   -1.250   0.030
"""


def test_time_services_in_their_own_words():
    synced = parse_chronyc_tracking(CHRONYC_SYNCED)
    assert (synced.name, synced.synchronized, synced.server) == ("chronyd", True, "192.0.2.1")
    assert synced.offset == pytest.approx(-0.000012345)
    assert parse_chronyc_tracking(CHRONYC_UNSYNCED).synchronized is False
    ntpd = parse_ntpq_peers(NTPQ)
    assert (ntpd.name, ntpd.synchronized, ntpd.server, ntpd.offset) == ("ntpd", True, "192.0.2.1", -0.00125)
    assert parse_ntpq_peers(NTPQ.replace("*", " ")).synchronized is False
    timesyncd = parse_timedatectl("NTP=yes\nNTPSynchronized=yes\n", "ntp.example.net\n")
    assert (timesyncd.synchronized, timesyncd.server) == (True, "ntp.example.net")
    assert parse_timedatectl("NTP=no\nNTPSynchronized=no\n", None).detail == "NTP is switched off (timedatectl set-ntp)"


def test_the_first_time_service_that_answers_is_asked():
    answers = {"chronyc": None, "ntpq": NTPQ}
    asked = []

    def runner(args):
        asked.append(args[0])
        return answers.get(args[0])
    assert ask_time_service(runner).name == "ntpd"
    assert asked == ["chronyc", "ntpq"]
    assert ask_time_service(lambda args: None) is None


@pytest.mark.parametrize("given", ["SHA256:" + "A" * 43, "A" * 43, "sha256:" + "A" * 43 + "="])
def test_fingerprints_are_understood_with_or_without_prefix(given):
    assert normalise_fingerprint(given) == "SHA256:" + "A" * 43


@pytest.mark.parametrize("given", ["MD5:aa:bb:cc", "SHA256:short", ""])
def test_what_is_not_a_sha256_fingerprint_is_refused(given):
    with pytest.raises(ValueError, match="is not a SHA256 fingerprint"):
        normalise_fingerprint(given)


def test_the_last_poll_per_instance_is_kept_atomically_without_secrets(tmp_path):
    runtime = tmp_path / "run"
    clock = iter([100.0, 200.0, 300.0])
    recorder = PollRecorder(str(runtime), clock=lambda: next(clock))
    recorder.record("mitigator1", "192.0.2.1", "SHA256:a", "get", 0, "ok")
    recorder.record("mitigator2", "192.0.2.2", "SHA256:b", "get json", 2, "module not loaded")
    recorder.record("mitigator1", "192.0.2.3", "SHA256:a", "get", 0, "ok")
    polls = read_polls(str(runtime))
    assert {name: (p.source, p.time, p.status) for name, p in polls.items()} == {
        "mitigator1": ("192.0.2.3", 300.0, 0), "mitigator2": ("192.0.2.2", 200.0, 2)}
    assert sorted(os.listdir(runtime)) == ["last-polls.json"]  # no temporary file left
    assert oct((runtime / "last-polls.json").stat().st_mode & 0o777) == "0o644"
    assert read_polls(str(tmp_path / "absent")) == {}
    (runtime / "last-polls.json").write_text(json.dumps({"version": 9}))
    with pytest.raises(RuntimeStateError, match="is not the agent's poll record"):
        read_polls(str(runtime))


def test_an_unwritable_runtime_dir_is_logged_once_and_polls_go_on(tmp_path):
    import logging
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())
    logger = logging.getLogger("test-runstate")
    logger.addHandler(Keep())
    recorder = PollRecorder(str(tmp_path / "missing" / "run"), logger)
    for _ in range(3):
        recorder.record("mitigator1", "192.0.2.1", "SHA256:a", "get", 0, "ok")
    assert len(records) == 1 and records[0].startswith("last-poll-not-recorded path=")
    assert "RuntimeDirectory=mitigator-agent" in records[0]


def test_journal_priorities_and_stream_detection(tmp_path):
    import logging
    assert [journal_priority(level) for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR,
                                                  logging.CRITICAL)] == [7, 6, 4, 3, 2]
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "refused src=1.2.3.4:5", None, None)
    assert EventFormatter(journal=True).format(record) == "<4>refused src=1.2.3.4:5"
    assert EventFormatter(journal=False).format(record) == "WARNING refused src=1.2.3.4:5"
    with open(tmp_path / "out", "w") as stream:
        st = os.fstat(stream.fileno())
        assert stream_is_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not stream_is_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not stream_is_journal(stream, {})
    assert not stream_is_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


@pytest.mark.parametrize("service, fix", [
    (TimeService("chronyd", False, None, None, "leap status Not synchronised"),
     "let it reach a server on UDP 123 (chronyc sources shows which answer), then run chronyc makestep"),
    (TimeService("ntpd", False, None, None, "no peer selected (no line starts with *)"),
     "let it reach a peer on UDP 123 (ntpq -pn shows which answer), then run systemctl restart ntp"),
    (TimeService("systemd-timesyncd", False, None, None, "not synchronised yet"),
     "let it reach a server on UDP 123 (timedatectl timesync-status shows the one it tries),"
     " then run timedatectl set-ntp true"),
])
def test_an_unsynchronised_time_service_fails_with_the_command_that_fixes_it(monkeypatch, service, fix):
    monkeypatch.setattr(health, "ask_time_service", lambda: service)
    [clock] = health.clock_items(measure=False)
    assert clock.check_line() == f"FAIL clock synchronised: {service.name} says no ({service.detail}): {fix}"
