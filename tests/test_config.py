"""core.config: defaults, the TOML file, environment overrides, validation; the `shardmail config` command."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from core.config import SHARD_POLICIES, ConfigError, Settings, describe, load

if TYPE_CHECKING:
    from conftest import Node


@pytest.fixture(autouse=True)
def _no_cwd_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in an empty directory so that no ./shardmail.toml leaks into a test."""
    monkeypatch.chdir(tmp_path)


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "shardmail.toml"
    path.write_text(text)
    return path


def test_defaults_locals_are_localhost_and_me_and_spool_under_var_dir() -> None:
    settings = load(env={"SHARDMAIL_ME": "mx.example.org", "SHARDMAIL_VAR_DIR": "/srv/mail"})
    assert settings.me == "mx.example.org"
    assert settings.locals == ["localhost", "mx.example.org"]
    assert settings.spool_root == Path("/srv/mail/spool")
    assert settings.databytes == Settings.databytes
    assert settings.shard_policy == "roundrobin"


def test_defaults_without_any_source_use_the_fqdn_and_relative_var_dir() -> None:
    settings = load(env={})
    assert settings.me
    assert settings.locals == list(dict.fromkeys(["localhost", settings.me]))
    assert settings.spool_root == Path("./var") / "spool"
    assert settings.relaynets == ["127.0.0.1/32", "::1/128"]  # not all of 127.0.0.0/8


def test_default_locals_have_no_duplicate_when_me_is_localhost() -> None:
    assert load(env={"SHARDMAIL_ME": "localhost"}).locals == ["localhost"]


def test_explicit_spool_dir_overrides_the_var_dir_default() -> None:
    settings = load(env={"SHARDMAIL_VAR_DIR": "/srv/mail", "SHARDMAIL_SPOOL_DIR": "/fast/spool"})
    assert settings.spool_root == Path("/fast/spool")


def test_toml_file_is_read(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        'me = "mail.example.net"\ndatabytes = 5000\nrcpthosts = ["example.net", ".example.org"]\n'
        'shard_policy = "leastloaded"\n',
    )
    settings = load(path, env={})
    assert settings.me == "mail.example.net"
    assert settings.databytes == 5000
    assert settings.rcpthosts == ["example.net", ".example.org"]
    assert settings.shard_policy == "leastloaded"
    assert settings.locals == ["localhost", "mail.example.net"]


def test_config_file_found_through_environment_and_cwd(tmp_path: Path) -> None:
    other = tmp_path / "elsewhere.toml"
    other.write_text("databytes = 123\n")
    assert load(env={"SHARDMAIL_CONFIG": str(other)}).databytes == 123
    write_toml(tmp_path, "databytes = 456\n")  # ./shardmail.toml in the (temporary) cwd
    assert load(env={}).databytes == 456


def test_environment_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'me = "file.example"\ndatabytes = 5000\nlocals = ["file.example"]\n')
    settings = load(path, env={"SHARDMAIL_DATABYTES": "777", "SHARDMAIL_ME": "env.example"})
    assert settings.databytes == 777
    assert settings.me == "env.example"
    assert settings.locals == ["file.example"]


def test_lists_from_environment_are_comma_separated_and_trimmed() -> None:
    settings = load(env={"SHARDMAIL_RCPTHOSTS": " a.example, .b.example ,,c.example ",
                         "SHARDMAIL_RELAYNETS": "10.0.0.0/8,2001:db8::/32"})
    assert settings.rcpthosts == ["a.example", ".b.example", "c.example"]
    assert settings.relaynets == ["10.0.0.0/8", "2001:db8::/32"]


def test_bad_env_value_names_key_and_source() -> None:
    with pytest.raises(ConfigError) as info:
        load(env={"SHARDMAIL_DATABYTES": "abc"})
    message = str(info.value)
    assert "databytes" in message
    assert "SHARDMAIL_DATABYTES" in message
    assert "'abc'" in message


def test_bad_file_value_names_key_and_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'databytes = "lots"\n')
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    assert "databytes" in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [("databytes", "-1"), ("maxrcptcount", "0"), ("shards", "0"), ("shards", "1025"), ("timeoutsmtpd", "1.5")],
)
def test_out_of_range_numbers_are_refused(key: str, value: str) -> None:
    name = f"SHARDMAIL_{key.upper()}"
    with pytest.raises(ConfigError, match=rf"{key}.*{name}"):
        load(env={name: value})


def test_bool_in_file_is_not_an_integer(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="databytes"):
        load(write_toml(tmp_path, "databytes = true\n"), env={})


def test_unknown_key_in_file_is_named(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "databytez = 10\n")
    with pytest.raises(ConfigError, match=r"databytez.*unknown"):
        load(path, env={})


def test_unreadable_or_malformed_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing.toml"):
        load(tmp_path / "missing.toml", env={})
    with pytest.raises(ConfigError, match=r"shardmail.toml"):
        load(write_toml(tmp_path, "me = \n"), env={})


@pytest.mark.parametrize("policy", SHARD_POLICIES)
def test_shard_policy_choices_are_accepted(policy: str) -> None:
    assert load(env={"SHARDMAIL_SHARD_POLICY": policy}).shard_policy == policy


def test_unknown_shard_policy_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"shard_policy.*SHARDMAIL_SHARD_POLICY"):
        load(env={"SHARDMAIL_SHARD_POLICY": "fastest"})


@pytest.mark.parametrize("value", ["10.0.0.0/33", "not-a-net", "127.0.0.0/8,300.1.2.3/32", "::1/129"])
def test_relaynets_must_be_cidr(value: str) -> None:
    with pytest.raises(ConfigError, match="relaynets"):
        load(env={"SHARDMAIL_RELAYNETS": value})


@pytest.mark.parametrize("value", ["127.0.0.1:25", "[::1]:2525", "0.0.0.0:587,127.0.0.1:2525", "mx.example:65535"])
def test_smtp_listen_accepts_host_port(value: str) -> None:
    assert load(env={"SHARDMAIL_SMTP_LISTEN": value}).smtp_listen == value.split(",")


@pytest.mark.parametrize("value", ["127.0.0.1", ":25", "127.0.0.1:0", "127.0.0.1:65536", "host:port", "h:25,nope"])
def test_smtp_listen_refuses_bad_entries(value: str) -> None:
    with pytest.raises(ConfigError, match=r"smtp_listen.*SHARDMAIL_SMTP_LISTEN"):
        load(env={"SHARDMAIL_SMTP_LISTEN": value})


def test_settings_are_frozen() -> None:
    settings = load(env={})
    with pytest.raises(AttributeError):
        settings.databytes = 1  # type: ignore[misc]


def test_describe_documents_every_setting() -> None:
    rows = describe()
    assert [key for key, _, _ in rows] == [f for f in Settings.__dataclass_fields__]
    assert all(doc for _, _, doc in rows)


def test_config_command_prints_every_key(node_factory: Callable[..., Node]) -> None:
    node = node_factory()
    result = node.command("config")
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    for key, _, _ in describe():
        assert f"\n{key} = " in "\n" + out
    assert "me = 'mx.test.example'" in out


def test_config_command_bad_value_exits_78_with_one_line(node_factory: Callable[..., Node]) -> None:
    node = node_factory(databytes="abc")
    result = node.command("config")
    assert result.returncode == 78
    err = result.stderr.decode()
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert "databytes" in err and "SHARDMAIL_DATABYTES" in err
    assert result.stdout == b""


def test_dkim_tables_in_the_file_are_the_env_entries(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[[dkim]]\ndomain = "Shop.Example"\nselector = "r1"\nkeyfile = "/k/r1.pem"\n'
                                'algorithm = "rsa"\n\n[[dkim]]\ndomain = "shop.example"\nselector = "e1"\n'
                                'keyfile = "/k:odd/e1.pem"\n')
    from_file = load(path, env={})
    assert from_file.dkim == ["Shop.Example:r1:/k/r1.pem:rsa", "shop.example:e1:/k:odd/e1.pem"]
    from_env = load(env={"SHARDMAIL_DKIM": "Shop.Example:r1:/k/r1.pem:rsa, shop.example:e1:/k:odd/e1.pem"})
    assert from_env.dkim == from_file.dkim
    from core.dkim import KeySpec, parse_keys

    assert parse_keys(from_file.dkim) == [KeySpec("shop.example", "r1", "/k/r1.pem", "rsa"),
                                          KeySpec("shop.example", "e1", "/k:odd/e1.pem", "")]


@pytest.mark.parametrize("table", ['domain = "a.example"\nselector = "s"\n',  # no keyfile
                                   'domain = "a.example"\nselector = "s"\nkeyfile = "/k"\nalgorithm = "dsa"\n',
                                   'domain = "a.example"\nselector = "s"\nkeyfile = "/k"\nkey = "/k"\n'])
def test_a_bad_dkim_table_names_the_setting_and_file(tmp_path: Path, table: str) -> None:
    with pytest.raises(ConfigError, match=r"^dkim: expected tables with domain, selector, keyfile .*shardmail\.toml"):
        load(write_toml(tmp_path, f"[[dkim]]\n{table}"), env={})


@pytest.mark.parametrize(("key", "value"), [("SHARDMAIL_DKIM", "shop.example:r1"),
                                            ("SHARDMAIL_DKIM_FALLBACK", "shop.example"),
                                            ("SHARDMAIL_DKIM_FALLBACK", "a b=shop.example")])
def test_bad_dkim_entries_are_refused(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key.removeprefix('SHARDMAIL_').lower()}: expected .*bad entry"):
        load(env={key: value})


def test_dkim_fallback_keys_are_users_domains_or_star() -> None:
    from core.dkim import parse_fallback

    settings = load(env={"SHARDMAIL_DKIM_FALLBACK": "Alice@Shop.Example=esp.example, lists.example=Shop.Example, "
                                                    "*=shop.example"})
    assert parse_fallback(settings.dkim_fallback) == {"alice@shop.example": "esp.example",
                                                      "lists.example": "shop.example", "*": "shop.example"}
