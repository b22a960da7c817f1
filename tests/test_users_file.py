"""The users file `shardmail run` starts with: read by the embedded directory with its suffix and
container entries present, loaded unchanged by the real `ldapadd` into an empty slapd with the shipped
schema, and then delivering through that slapd (`shardmail run` with `ldapserver` pointed at it)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import ldap3
import pytest

from core.auth import LdifAccounts
from core.directory import Directory, LdifBackend
from ops.run import starter_users_ldif
from tests.slapd import ADMIN_PASSWORD, Slapd
from tests.support import wait_until
from tests.test_run import RunningNode, alive, send


def test_starter_file_carries_suffix_and_container_which_are_not_users(tmp_path: Path) -> None:
    path = tmp_path / "users.ldif"
    path.write_text(starter_users_ldif(["localhost", "Mx.Example.org."]))
    directory = Directory(LdifBackend(str(path)))
    postmaster = directory.lookup("postmaster@localhost")
    assert postmaster and postmaster.dn == "uid=postmaster,ou=people,dc=localhost"
    assert directory.lookup("postmaster@mx.example.org") == postmaster
    backend = LdifBackend(str(path))
    assert [u.dn for u in backend.search_uid("postmaster")] == [postmaster.dn]
    assert backend.search_uid("") == [] and backend.search("") == []  # the two containers are no one
    assert [a.dn for a in LdifAccounts(str(path)).find("postmaster")] == [postmaster.dn]
    text = path.read_text()
    assert text.index("dn: dc=localhost\n") < text.index("dn: ou=people,dc=localhost\n") < text.index(postmaster.dn)


def test_a_suffix_of_several_labels(tmp_path: Path) -> None:
    text = starter_users_ldif(["mail.example.org", "localhost"])
    assert "dn: dc=mail,dc=example,dc=org\n" in text and "dc: mail\n" in text
    assert "dn: uid=postmaster,ou=people,dc=mail,dc=example,dc=org\n" in text


@contextlib.contextmanager
def running_node(workdir: Path, **env: str) -> Iterator[RunningNode]:
    workdir.mkdir()
    node = RunningNode(workdir, **env)
    try:
        wait_until(lambda: "shardmail is running" in node.text() or node.proc.poll() is not None, timeout=30)
        assert node.proc.poll() is None, node.text()
        yield node
    finally:
        node.stop()
        for pid in [p for name in ("redis", "smtpd", "local", "remote", "scheduler") for p in node.pids(name)]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def delivered_to_postmaster(node: RunningNode) -> bytes:
    send(node.port)
    inbox = node.workdir / "var" / "mail" / "postmaster" / "new"
    wait_until(lambda: inbox.exists() and len(list(inbox.iterdir())) == 1, timeout=30, what="the postmaster's mail")
    return next(inbox.iterdir()).read_bytes()


@pytest.mark.skipif(not shutil.which("ldapadd"), reason="ldapadd missing (scripts/setup.sh installs ldap-utils)")
def test_run_users_file_loads_with_ldapadd_into_an_empty_slapd_and_delivers_through_it(tmp_path: Path) -> None:
    embedded = tmp_path / "embedded"
    with running_node(embedded) as node:
        assert b"Delivered-To: postmaster@localhost\n" in delivered_to_postmaster(node)  # the embedded reader
    users = embedded / "var" / "users.ldif"
    assert users.read_text().startswith("# shardmail's embedded directory")

    slapd = Slapd(tmp_path / "slapd", users_ldif=None, suffix="dc=localhost")  # no entry at all, not even dc=
    with slapd.serving():
        added = subprocess.run(["ldapadd", "-x", "-H", slapd.url, "-D", slapd.admin_dn, "-w", ADMIN_PASSWORD,
                                "-f", str(users)], capture_output=True, text=True, timeout=30)
        assert added.returncode == 0, added.stdout + added.stderr
        assert added.stdout.count("adding new entry") == 3
        conn = slapd.connection()
        conn.search("dc=localhost", "(mail=postmaster@localhost)", ldap3.SUBTREE, attributes=["mailMessageStore"])
        assert [e.entry_dn for e in conn.entries] == ["uid=postmaster,ou=people,dc=localhost"]
        conn.unbind()

        with running_node(tmp_path / "ldap", SHARDMAIL_LDAPSERVER=slapd.url, SHARDMAIL_LDAPBASEDN="dc=localhost",
                          SHARDMAIL_LDAPOBJECTCLASS="qmailUser") as node:
            message = delivered_to_postmaster(node)
            assert message.startswith(b"Return-Path: <a@example.net>\nDelivered-To: postmaster@localhost\n")
            assert not (node.workdir / "var" / "users.ldif").exists()  # with LDAP, no embedded file is made
