"""ingress.aiosmtpd_adapter against the installed aiosmtpd: every private name it relies on still
exists, the replies it recognises are still aiosmtpd's words, and the method tables it builds once per
class are the ones aiosmtpd's own constructor builds. An aiosmtpd upgrade that breaks an assumption
fails here, by name, before it fails in a session."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator

import aiosmtpd
import aiosmtpd.smtp
import pytest

from core.config import Settings
from ingress import aiosmtpd_adapter
from ingress.serve import IngressServer
from ingress.smtp_auth import AuthMechanisms
from ingress.smtpd import Handler

SOURCE = inspect.getsource(aiosmtpd.smtp)


def test_the_installed_aiosmtpd_is_a_checked_version() -> None:
    assert aiosmtpd.__version__ in aiosmtpd_adapter.CHECKED, (
        f"aiosmtpd {aiosmtpd.__version__} is installed; ingress/aiosmtpd_adapter.py was checked against "
        f"{aiosmtpd_adapter.CHECKED}: re-read each override there against the new source, then add it")


@pytest.mark.parametrize("name", sorted(aiosmtpd_adapter.DEPENDS))
def test_every_name_the_adaptation_relies_on_exists(name: str) -> None:
    why = aiosmtpd_adapter.DEPENDS[name]
    owner, _, attribute = name.rpartition(".")
    if not owner:
        assert hasattr(aiosmtpd.smtp, attribute) or f"{attribute}." in SOURCE, f"aiosmtpd.smtp.{name} gone ({why})"
        return
    present = hasattr(aiosmtpd.smtp.SMTP, attribute) or f"self.{attribute}" in inspect.getsource(aiosmtpd.smtp.SMTP)
    assert present, f"aiosmtpd.smtp.{name} gone ({why})"


@pytest.mark.parametrize("line", aiosmtpd_adapter.AIOSMTPD_LINES)
def test_the_replies_rewritten_are_still_aiosmtpds_words(line: str) -> None:
    assert line in SOURCE, f"aiosmtpd no longer says {line!r}: ingress.aiosmtpd_adapter's rewrite of it is dead"


def test_the_constructor_still_introspects_as_the_cache_assumes() -> None:
    init = inspect.getsource(aiosmtpd.smtp.SMTP.__init__)
    for use in ("inspect.getmembers(", "dir(handler)", "dir(self)", "inspect.signature(", "_AuthMechAttr("):
        assert use in init, f"SMTP.__init__ no longer uses {use}: re-check _CachedInspect and _Wiring"
    assert list(inspect.signature(aiosmtpd.smtp.SMTP._getaddr).parameters) == ["self", "arg"]
    assert list(inspect.signature(aiosmtpd.smtp.SMTP._strip_command_keyword).parameters) == ["self", "keyword", "arg"]
    assert "self._strip_command_keyword(" in inspect.getsource(aiosmtpd.smtp.SMTP.smtp_MAIL)
    assert "self._getaddr(" in inspect.getsource(aiosmtpd.smtp.SMTP.smtp_RCPT)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_method_tables_bound_on_use_match_aiosmtpds_own(loop: asyncio.AbstractEventLoop) -> None:
    handler = Handler(Settings(), None, None, None)  # type: ignore[arg-type]  # no hook is called here
    ours = IngressServer(handler, loop=loop, auth_require_tls=False)
    plain = aiosmtpd.smtp.SMTP(handler, loop=loop, auth_require_tls=False)
    for server in (ours, plain):
        assert {"MAIL", "RCPT", "DATA", "EHLO", "STARTTLS", "AUTH"} <= set(server._smtp_methods)
    assert set(ours._smtp_methods) == set(plain._smtp_methods)
    assert set(ours._handle_hooks) == set(plain._handle_hooks)
    assert ours._handle_hooks["MAIL"] == plain._handle_hooks["MAIL"]  # the same bound method, looked up on use
    assert ours._smtp_methods["DATA"].__func__ is aiosmtpd_adapter.Server.smtp_DATA
    assert ours._ehlo_hook_ver == plain._ehlo_hook_ver == "new"
    assert set(ours._auth_methods) == set(plain._auth_methods) >= {"PLAIN", "LOGIN"}
    assert ours._auth_methods["PLAIN"].method.__func__ is AuthMechanisms.auth_PLAIN  # ingress.smtp_auth's own
    assert plain._auth_methods["PLAIN"].method.__func__ is aiosmtpd.smtp.SMTP.auth_PLAIN
