"""The shipped systemd units and the readiness they wait for: ``systemd-analyze verify`` (and its offline
security review) accepts every unit under ``systemd/``, each unit starts a real ``shardmail`` role, and
every role, started for real with ``NOTIFY_SOCKET`` naming a unix datagram socket of the test, sends
``READY=1`` when it is ready, once, and only from the process systemd started."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from core import sdnotify
from ops.cli import parser
from tests.conftest import Node, _connectable
from tests.support import free_port, read_log, wait_until
from tests.test_run import RunningNode, send

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
SHIPPED_BINARY = "/usr/local/bin/shardmail"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"  # scripts/setup.sh: systemd
ROLES = {"run", "smtpd", "qmqpd", "pop3d", "worker local", "worker remote", "scheduler", "metrics"}
# not pulled in by shardmail-roles.target
OPTIONAL = {"shardmail.service", "shardmail-qmqpd.service", "shardmail-pop3d.service"}
HARDENING = {"ProtectSystem": "strict", "NoNewPrivileges": "yes", "PrivateTmp": "yes", "ProtectHome": "yes",
             "ProtectKernelTunables": "yes", "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
             "User": "shardmail", "ReadWritePaths": "/var/lib/shardmail"}


def unit_files() -> list[Path]:
    return sorted(p for p in UNITS.iterdir() if p.suffix in (".service", ".target"))


def keys(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections and their keys (a key may repeat: each value in order)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            current.setdefault(key, []).append(value)
    return sections


def instance(path: Path) -> str:
    """The name to load a unit by: a template as its instance 0."""
    return path.name.replace("@.", "@0.")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The units with the installed path of the binary replaced by this venv's (verify wants it to exist)."""
    binary = shutil.which("shardmail", path=str(Path(sys.executable).parent)) or shutil.which("shardmail")
    assert binary, "no shardmail script beside the test's python (scripts/setup.sh installs it)"
    directory = tmp_path_factory.mktemp("units")
    for path in unit_files():
        (directory / path.name).write_text(path.read_text().replace(SHIPPED_BINARY, binary))
    return directory


@pytest.mark.parametrize("unit", [p.name for p in unit_files()])
def test_systemd_analyze_verify_accepts_the_unit_without_a_warning(rendered: Path, unit: str) -> None:
    # verify exits 0 on an unknown key or a bad value (it only warns), so the output must be empty too;
    # a target's Wants= are loaded as well, so a misspelt role unit fails here
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", instance(rendered / unit)], cwd=rendered,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.returncode, result.stdout, result.stderr)


@pytest.mark.parametrize("unit", [p.name for p in unit_files() if p.suffix == ".service"])
def test_the_offline_security_review_rates_the_unit_ok(rendered: Path, unit: str) -> None:
    result = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", "--man=no", "--no-pager",
                             instance(rendered / unit)], cwd=rendered, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    exposure = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    assert exposure and float(exposure.group(1)) <= 2.5, result.stdout[-3000:]


def test_every_role_has_a_unit_that_runs_a_real_subcommand_with_a_restart_policy_and_hardening() -> None:
    commands: dict[str, str] = {}
    for path in unit_files():
        if path.suffix != ".service":
            continue
        service = keys(path)["Service"]
        argv = shlex.split(service["ExecStart"][0].replace("%i", "0").replace("%H", "host"))
        assert argv[0] == SHIPPED_BINARY
        parser().parse_args(argv[1:])  # exits (fails the test) on a subcommand or option ops.cli does not have
        commands[" ".join(a for a in argv[1:3] if not a.startswith("-"))] = path.name
        assert service["Type"] == ["notify"], path.name  # every role sends READY=1 (tests below)
        assert service["Restart"] == ["on-failure"] and service["RestartSec"], path.name
        assert "78" in service["RestartPreventExitStatus"][0].split(), path.name  # a configuration error stays down
        for key, value in HARDENING.items():
            assert service.get(key) == [value], (path.name, key, service.get(key))
        binds = bool({"smtpd", "qmqpd", "pop3d", "run"} & set(argv))
        assert service["CapabilityBoundingSet"] == (["CAP_NET_BIND_SERVICE"] if binds else [""]), path.name
    assert set(commands) == ROLES, commands
    assert keys(UNITS / "shardmail.service")["Service"]["KillMode"] == ["mixed"]  # the supervisor stops Redis last
    target = keys(UNITS / "shardmail-roles.target")["Unit"]
    wanted = {w for line in target["Wants"] for w in line.split()}
    assert {re.sub(r"@\d+\.", "@.", w) for w in wanted} == set(commands.values()) - OPTIONAL
    assert target["Conflicts"] == ["shardmail.service"]


class Listener:
    """The service manager's end: a unix datagram socket the role is told of in ``NOTIFY_SOCKET``."""

    def __init__(self, address: str, bind_to: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)

    def receive(self, timeout: float = 30) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n"))

    def pending(self) -> list[bytes]:
        """Whatever else has been sent by now (without waiting)."""
        self.sock.setblocking(False)
        got = []
        while True:
            try:
                got.append(self.sock.recv(4096))
            except BlockingIOError:
                return got


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    path = tmp_path / "notify.sock"
    server = Listener(str(path), str(path))
    yield server
    server.sock.close()


def start(node: Node, argv: list[str], notify: str, **env: str) -> subprocess.Popen[bytes]:
    log = node.var_dir.parent / f"{argv[0]}-{len(node.procs)}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ops.cli", *argv], env=dict(node.env, NOTIFY_SOCKET=notify,
                                **env), stdout=out, stderr=subprocess.STDOUT)
    node.procs.append(proc)
    return proc


def test_smtpd_is_ready_when_it_listens(node_factory: Callable[..., Node], listener: Listener) -> None:
    node = node_factory()
    start(node, ["smtpd"], listener.address)
    message = listener.receive()
    assert _connectable(node.port)  # READY=1 means the listener is bound and accepting now
    assert message == {"READY": "1", "STATUS": f"SMTP on 127.0.0.1:{node.port}"}
    assert listener.pending() == []


def test_qmqpd_is_ready_when_it_listens(node_factory: Callable[..., Node], listener: Listener) -> None:
    port = free_port()
    node = node_factory(qmqp_listen=f"127.0.0.1:{port}", qmqpclients="127.0.0.1/32")
    start(node, ["qmqpd"], listener.address)
    message = listener.receive()
    assert _connectable(port)
    assert message == {"READY": "1", "STATUS": f"QMQP on 127.0.0.1:{port}"}
    assert listener.pending() == []


def test_pop3d_is_ready_when_it_listens(node_factory: Callable[..., Node], listener: Listener) -> None:
    port = free_port()
    node = node_factory(pop3_listen=f"127.0.0.1:{port}")
    start(node, ["pop3d"], listener.address)
    message = listener.receive()
    assert _connectable(port)
    assert message == {"READY": "1", "STATUS": f"POP3 on 127.0.0.1:{port}"}
    assert listener.pending() == []


@pytest.mark.parametrize(("argv", "status"), [(["worker", "local"], "local pool"),
                                              (["worker", "remote"], "remote pool"),
                                              (["scheduler"], "scheduler")])
def test_each_pool_and_the_scheduler_say_ready_once(node_factory: Callable[..., Node], listener: Listener,
                                                    argv: list[str], status: str) -> None:
    node = node_factory()
    proc = start(node, argv, listener.address)
    assert listener.receive() == {"READY": "1", "STATUS": status}
    assert proc.poll() is None
    assert listener.pending() == []


def test_the_abstract_namespace_form_of_notify_socket(node_factory: Callable[..., Node], tmp_path: Path) -> None:
    name = f"shardmail-test-{os.getpid()}-{tmp_path.name}"
    server = Listener("@" + name, "\0" + name)
    try:
        node = node_factory()
        port = free_port()
        start(node, ["metrics", "--listen", f"127.0.0.1:{port}"], server.address)
        assert server.receive() == {"READY": "1", "STATUS": f"metrics on 127.0.0.1:{port}"}
        assert _connectable(port)
    finally:
        server.sock.close()


def test_worker_processes_parent_is_ready_and_its_children_stay_silent(node_factory: Callable[..., Node],
                                                                       listener: Listener) -> None:
    node = node_factory()
    start(node, ["worker", "local", "--processes", "2"], listener.address)
    assert listener.receive() == {"READY": "1", "STATUS": "2 local pools"}
    log = node.var_dir.parent / "worker-0.log"
    wait_until(lambda: read_log(log).count("local pool on shards") == 2, timeout=30, what="both children running")
    assert listener.pending() == []  # children do not inherit NOTIFY_SOCKET (NotifyAccess=main refuses them)


def test_run_is_ready_once_and_its_roles_do_not_speak_for_it(tmp_path: Path, listener: Listener) -> None:
    node = RunningNode(tmp_path, NOTIFY_SOCKET=listener.address)
    try:
        assert listener.receive() == {"READY": "1", "STATUS": "Redis answers; starting the roles"}
        started = [r"local pool on shards", r"remote pool on shards", r"scheduler \S+ for shards", r"listening on"]
        wait_until(lambda: all(re.search(line, node.text()) for line in started), timeout=30, what="every role started")
        send(node.port)  # through SMTP to a local delivery: the roles are past their ready points
        assert listener.pending() == []
        assert node.proc.poll() is None, node.text()
    finally:
        node.stop()


def test_without_a_reachable_socket_a_role_runs_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready("x") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-here.sock"))
    assert sdnotify.ready("x") is False
    assert "NOTIFY_SOCKET" not in os.environ  # unset even so: children would fail the same way
    assert "cannot notify" in caplog.text
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sdnotify.notify("STATUS=x") is False and os.environ["NOTIFY_SOCKET"] == "vsock:2:1234"
