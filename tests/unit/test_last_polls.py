"""status/check's last poll per instance: dated, stale polls warned about, removed keys gone, history when down."""

from __future__ import annotations

import json
from pathlib import Path

import asyncssh

from mitigator_agent import health
from mitigator_agent.health import FAIL, INFO, OK, WARN, last_poll_items

NOW = 1_800_000_000.0


def record(runtime: Path, **ages: float) -> None:
    """The agent's runtime file (runstate.py, version 1): one ok `get` per instance, ``ages`` s before NOW."""
    runtime.mkdir(exist_ok=True)
    (runtime / "last-polls.json").write_text(json.dumps({"version": 1, "instances": {
        name: {"source": "192.0.2.1", "key": "SHA256:x", "time": NOW - age, "command": "get", "status": 0,
               "result": "ok"} for name, age in ages.items()}}))


def test_a_recent_poll_is_ok_an_old_one_is_a_warning_with_its_age(tmp_path):
    record(tmp_path, m1=5, m2=3 * 3600)
    m1, m2 = last_poll_items(["m1", "m2"], str(tmp_path), now=NOW)
    assert (m1.status, m2.status) == (OK, WARN)
    assert m1.text == "last poll by m1 from 192.0.2.1 at 2027-01-15 07:59:55 UTC (5 s ago): get, exit status 0, ok"
    assert m2.text.endswith("(3 h ago): get, exit status 0, ok; no poll for longer than 15 min")
    assert m2.fix.startswith("check that MITIGATOR still lists this agent") and m2.facts["age_s"] == 10800


def test_a_removed_key_s_instance_is_not_listed(tmp_path):
    record(tmp_path, m1=5, gone=5)
    assert [item.facts["instance"] for item in last_poll_items(["m1"], str(tmp_path), now=NOW)] == ["m1"]


def test_while_the_agent_does_not_answer_a_recorded_poll_is_history_never_ok(tmp_path):
    record(tmp_path, m1=5)
    [item] = last_poll_items(["m1"], str(tmp_path), now=NOW, agent_answers=False)
    assert item.status == INFO and item.text.endswith(", before the agent stopped answering")


def test_judge_ties_the_last_poll_to_the_listening_check(tmp_path, monkeypatch):
    runtime = tmp_path / "run"
    record(runtime, m1=0)
    (tmp_path / "keys").write_text(asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
                                   + " m1\n")
    subject = health.Subject(str(tmp_path / "keys"), str(tmp_path / "host"), str(tmp_path / "dev"),
                             health.current_user_name(), runtime_dir=str(runtime))
    monkeypatch.setattr(health.time, "time", lambda: NOW)

    def last_poll(listening_status: str) -> health.Item:
        monkeypatch.setattr(health, "listening_items",
                            lambda *args: [health.Item("listening", listening_status, "agent listening")])
        [item] = [i for i in health.judge(subject, command="status", measure_ntp=False) if i.name == "last-poll"]
        return item

    assert last_poll(OK).status == OK
    assert last_poll(FAIL).status == INFO
