"""namespaces.py: the module's namespace table and what /proc says of each namespace."""

from __future__ import annotations

import os

import pytest

from mitigator_agent import namespaces
from mitigator_agent.namespaces import Namespace, TableUnavailable


def test_read_table(tmp_path):
    table = tmp_path / "tcpsecrets_netns"
    table.write_text("netns 4026531840 syncookies 2 accepts yes refused 0\n"
                     "netns 4026532300 syncookies 1 accepts no refused 7\n")
    assert namespaces.read_table(str(table)) == [
        Namespace(4026531840, 2, True, 0), Namespace(4026532300, 1, False, 7)]


@pytest.mark.parametrize("text", ["netns x syncookies 2 accepts yes refused 0\n", "hello\n",
                                  "netns 1 syncookies 2 accepts maybe refused 0\n"])
def test_read_table_refuses_what_it_does_not_understand(tmp_path, text):
    table = tmp_path / "tcpsecrets_netns"
    table.write_text(text)
    with pytest.raises(TableUnavailable, match="line 1 is not understood"):
        namespaces.read_table(str(table))


def test_missing_table_says_the_module_is_not_loaded(tmp_path):
    with pytest.raises(TableUnavailable, match="not loaded"):
        namespaces.read_table(str(tmp_path / "absent"))


def test_processes_and_listeners_from_a_proc_tree(tmp_path):
    for pid, inum, comm, tcp in (("10", 4026532300, "nginx", "  0: 00000000:0050 00000000:0000 0A\n"),
                                 ("11", 4026532300, "sh", ""),
                                 ("12", 4026531840, "sshd", "  0: 00000000:0016 00000000:0000 0A\n")):
        (tmp_path / pid / "ns").mkdir(parents=True)
        (tmp_path / pid / "net").mkdir()
        os.symlink(f"net:[{inum}]", tmp_path / pid / "ns" / "net")
        (tmp_path / pid / "comm").write_text(comm + "\n")
        (tmp_path / pid / "net" / "tcp").write_text("  sl  local_address rem_address   st\n" + tcp)
    table = [Namespace(4026531840, 2, True, 0), Namespace(4026532300, 1, False, 0),
             Namespace(4026532400, 1, False, 0)]
    namespaces.add_processes(table, proc=str(tmp_path))
    assert sorted(table[1].processes) == ["10 nginx", "11 sh"] and table[1].listening_ports == [80]
    assert table[0].listening_ports == [22]
    # refusing with a listener: named; refusing with nothing there: not worth a line
    assert namespaces.losing_cookies(table) == [table[1]]
    assert "tcp_syncookies to 2" in namespaces.remedy(table[1])
