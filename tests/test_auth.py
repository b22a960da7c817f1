"""core.auth: SMTP AUTH credentials against a real slapd (every userPassword scheme, accountStatus,
ldaprebind, the directory down or hung), the embedded LDIF directory, no enumeration by answer or
timing, and the Redis failure throttle (per IP, per login, Redis down)."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from core.auth import AUTH_THREADS, Authenticator, AuthResult, AuthThrottle, AuthVerdict
from core.config import Settings, load
from core.directory import open_directory
from core.redis_conn import connect
from ingress import replies
from tests.conftest import RedisServer
from tests.slapd import Slapd, combined_ldif
from tests.support import wait_until

LDAP_TIMEOUT = 2
# (login, right password): one account per scheme in tests/data/auth.ldif
SCHEMES = [
    ("auth-ssha@auth.example", "pw-ssha-secret"),
    ("auth-sha@auth.example", "pw-sha-secret"),
    ("auth-smd5@auth.example", "pw-smd5-secret"),
    ("auth-md5@auth.example", "pw-md5-secret"),
    ("auth-ssha256@auth.example", "pw-ssha256-secret"),
    ("auth-ssha512@auth.example", "pw-ssha512-secret"),
    ("auth-des@auth.example", "pwDES123"),
    ("auth-md5crypt@auth.example", "pw-md5crypt-secret"),
    ("auth-sha256crypt@auth.example", "pw-sha256crypt-secret"),
    ("auth-sha512crypt@auth.example", "pw-sha512crypt-secret"),
    ("auth-barecrypt@auth.example", "pw-barecrypt-secret"),
]
STATUS_PASSWORD = "pw-status-secret"


def wrong(password: str) -> str:
    """Another password, different within the first 8 characters (all DES crypt reads)."""
    return ("X" if password[0] != "X" else "Y") + password[1:]


@pytest.fixture
def auth_slapd_fresh(tmp_path: Path) -> Iterator[Slapd]:
    """A private one the test may stop or pause."""
    with Slapd(tmp_path, combined_ldif(tmp_path)).serving() as server:
        yield server


def ldap_settings(server: Slapd, **extra: str) -> Settings:
    env = {"SHARDMAIL_LDAPSERVER": server.url, "SHARDMAIL_LDAPBASEDN": server.base_dn,
           "SHARDMAIL_LDAPTIMEOUT": str(LDAP_TIMEOUT), "SHARDMAIL_AUTHFAILDELAY": "0", "SHARDMAIL_ME": "mx.test"}
    env.update({f"SHARDMAIL_{k.upper()}": v for k, v in extra.items()})
    return load(env=env)


def ldif_settings(path: Path, **extra: str) -> Settings:
    env = {"SHARDMAIL_USERS_LDIF": str(path), "SHARDMAIL_AUTHFAILDELAY": "0", "SHARDMAIL_ME": "mx.test"}
    env.update({f"SHARDMAIL_{k.upper()}": v for k, v in extra.items()})
    return load(env=env)


def authenticator(settings: Settings, throttle: AuthThrottle | None = None) -> Authenticator:
    return Authenticator(settings, open_directory(settings), throttle)


def check(auth: Authenticator, login: str, password: str | bytes, ip: str = "192.0.2.1") -> AuthVerdict:
    return asyncio.run(auth.verify(login, password, ip))


@pytest.fixture
def ldap_auth(auth_slapd: Slapd) -> Iterator[Authenticator]:
    auth = authenticator(ldap_settings(auth_slapd))
    yield auth
    auth.close()


# -- every scheme, against slapd and against the LDIF file ---------------------------------------


@pytest.mark.parametrize(("login", "password"), SCHEMES)
def test_each_scheme_against_slapd(ldap_auth: Authenticator, login: str, password: str) -> None:
    verdict = check(ldap_auth, login, password)
    assert verdict.ok and verdict.mail == login and replies.auth(verdict.result).startswith("235 2.7.0"), verdict
    assert check(ldap_auth, login.upper(), password.encode()).ok  # addresses are case-insensitive
    assert check(ldap_auth, login.split("@")[0], password).ok  # no "@": the uid
    refused = check(ldap_auth, login, wrong(password))
    assert refused.result is AuthResult.BAD and replies.auth(refused.result).startswith("535 5.7.8"), refused
    assert check(ldap_auth, login, "").result is AuthResult.BAD


@pytest.mark.parametrize(("login", "password"), SCHEMES)
def test_each_scheme_in_the_embedded_ldif_directory(tmp_path: Path, login: str, password: str) -> None:
    auth = authenticator(ldif_settings(combined_ldif(tmp_path)))
    try:
        assert check(auth, login, password).ok
        assert check(auth, login.split("@")[0], password).mail == login
        assert check(auth, login, wrong(password)).result is AuthResult.BAD
    finally:
        auth.close()


def test_unknown_and_refused_accounts_answer_like_a_wrong_password(ldap_auth: Authenticator) -> None:
    wrong = check(ldap_auth, "gracie@auth.example", "not-it")
    cases = {
        "unknown": check(ldap_auth, "nobody@alias.example", STATUS_PASSWORD),
        "unknown uid": check(ldap_auth, "nobody", STATUS_PASSWORD),
        "disabled": check(ldap_auth, "auth-disabled@auth.example", STATUS_PASSWORD),
        "deleted": check(ldap_auth, "auth-deleted@auth.example", STATUS_PASSWORD),
        "noaccess": check(ldap_auth, "auth-noaccess@auth.example", STATUS_PASSWORD),
        "no password": check(ldap_auth, "auth-nopassword@auth.example", ""),
        "no userPassword": check(ldap_auth, "auth-nopassword@auth.example", "anything"),
        "ambiguous": check(ldap_auth, "authdup@auth.example", "pw-dup-secret"),
        # the catchall receives unknown addresses at delivery; it never logs them in
        "catchall round": check(ldap_auth, "someone@auth.example", "pw-catchall-secret"),
    }
    for name, verdict in cases.items():
        said, expected = (verdict, replies.auth(verdict.result)), (wrong, replies.auth(wrong.result))
        assert (said[0].result, said[0].mail, said[1]) == (expected[0].result, expected[0].mail, expected[1]), name
    assert "disabled" in cases["disabled"].reason and "unknown" in cases["unknown"].reason
    assert check(ldap_auth, "catchall@auth.example", "pw-catchall-secret").ok  # its own address, though


def test_alternate_addresses_and_several_password_values(ldap_auth: Authenticator) -> None:
    for login in ("gracie@auth.example", "Grace@Auth.Example", "gracie@alias.auth.example", "gracie"):
        for password in (STATUS_PASSWORD, "pw-second-secret"):
            verdict = check(ldap_auth, login, password)
            assert verdict.ok and verdict.mail == "gracie@auth.example", (login, verdict)


@pytest.mark.parametrize("login", ["*", "*@auth.example", "auth-ssha@auth.example)(mail=*", "auth-ssha*",
                                   "auth-ssha@auth.example\x00", "(uid=auth-ssha)", "x" * 400, "", " ",
                                   "auth-ssha@auth.example\\", "*)(|(uid=*"])
def test_hostile_logins_never_match(ldap_auth: Authenticator, login: str) -> None:
    assert check(ldap_auth, login, "pw-ssha-secret").result is AuthResult.BAD


def test_objectclass_restriction_applies(auth_slapd: Slapd) -> None:
    auth = authenticator(ldap_settings(auth_slapd, ldapobjectclass="posixAccount"))
    try:
        assert check(auth, "auth-ssha@auth.example", "pw-ssha-secret").result is AuthResult.BAD
    finally:
        auth.close()


def test_embedded_directory_statuses_and_a_changed_password(tmp_path: Path) -> None:
    users = combined_ldif(tmp_path)
    auth = authenticator(ldif_settings(users, ldaprebind="true"))  # no LDAP to bind to: hashes compared
    try:
        assert check(auth, "gracie@auth.example", STATUS_PASSWORD).ok
        assert check(auth, "auth-disabled@auth.example", STATUS_PASSWORD).result is AuthResult.BAD
        assert check(auth, "nobody@auth.example", STATUS_PASSWORD).result is AuthResult.BAD
        assert check(auth, "authdup@auth.example", "pw-dup-secret").result is AuthResult.BAD
        ssha = "{SSHA}AHOTLVi53eEqPtqcOt89ck5CzllP7JUs"  # slappasswd, "Tr0ub4dor&3"
        text = users.read_text()
        start = text.index("dn: uid=auth-ssha,")
        line = text.index("userPassword:", start)
        end = text.index("\n", line)
        users.write_text(text[:line] + "userPassword: " + ssha + "\n# changed\n" + text[end + 1:])
        assert check(auth, "auth-ssha@auth.example", "Tr0ub4dor&3").ok  # no cache in the way
        assert check(auth, "auth-ssha@auth.example", "pw-ssha-secret").result is AuthResult.BAD
        users.unlink()
        assert check(auth, "auth-ssha@auth.example", "Tr0ub4dor&3").result is AuthResult.BAD
    finally:
        auth.close()


# -- ldaprebind --------------------------------------------------------------------------------


def test_ldaprebind(auth_slapd: Slapd) -> None:
    auth = authenticator(ldap_settings(auth_slapd, ldaprebind="true"))
    try:
        # slapd checks the password itself: it knows {SSHA}, {SHA}, {SMD5}, {MD5}, {CRYPT} (SHA-2 only with
        # its pw-sha2 module) and reads a bare value as plain text, unlike qmail-ldap
        for login, password in SCHEMES[:4] + SCHEMES[6:-1]:
            assert check(auth, login, password).ok, login
            assert check(auth, login, wrong(password)).result is AuthResult.BAD, login
        assert check(auth, "gracie", "pw-second-secret").mail == "gracie@auth.example"
        assert check(auth, "nobody@alias.example", "x").result is AuthResult.BAD
        assert check(auth, "auth-disabled@auth.example", STATUS_PASSWORD).result is AuthResult.BAD
        assert check(auth, "auth-ssha@auth.example", "").result is AuthResult.BAD  # never an anonymous bind
        assert check(auth, "auth-nopassword@auth.example", "x").result is AuthResult.BAD
        # the binds used fresh connections: the pooled search connection is still anonymous
        assert asyncio.run(_pooled_identity(auth)) == ""
        assert "userPassword" not in auth.accounts.attributes  # type: ignore[union-attr]
    finally:
        auth.close()


def who_am_i(backend: object) -> str:
    conn = backend._connection()  # type: ignore[attr-defined]
    return str(conn.extend.standard.who_am_i() or "")


async def _pooled_identity(auth: Authenticator) -> str:
    return await asyncio.get_running_loop().run_in_executor(auth._executor, who_am_i, auth.directory.backend)


# -- the directory down or hung: temporary, fast, event loop free ----------------------------------


def test_directory_stopped_is_temporary_within_the_timeout(auth_slapd_fresh: Slapd) -> None:
    auths = [authenticator(ldap_settings(auth_slapd_fresh, ldaprebind=rebind)) for rebind in ("false", "true")]
    try:
        for auth in auths:
            assert check(auth, "auth-ssha@auth.example", "pw-ssha-secret").ok
        auth_slapd_fresh.stop()
        for auth in auths:
            for login in ("auth-ssha@auth.example", "nobody@alias.example"):
                started = time.monotonic()
                verdict = check(auth, login, "pw-ssha-secret")
                assert verdict.result is AuthResult.TEMPORARY, verdict
                assert replies.auth(verdict.result).startswith("454 4.7.0"), verdict
                assert time.monotonic() - started < LDAP_TIMEOUT + 1
        auth_slapd_fresh.start()
        # ldap3 skips an address that failed for RESET_AVAILABILITY_TIMEOUT (5 s): poll past it
        for auth in auths:
            assert wait_until(lambda a=auth: check(a, "auth-ssha@auth.example", "pw-ssha-secret").ok,  # type: ignore[misc]
                              15, "AUTH after slapd restarted")
    finally:
        for auth in auths:
            auth.close()


def test_directory_hung_is_temporary_within_the_timeout_and_never_blocks_the_loop(auth_slapd_fresh: Slapd) -> None:
    auth = authenticator(ldap_settings(auth_slapd_fresh))

    async def scenario() -> tuple[AuthVerdict, float, int]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        started = time.monotonic()
        verdict = await auth.verify("auth-ssha@auth.example", "pw-ssha-secret", "192.0.2.1")
        elapsed = time.monotonic() - started
        done.set()
        await task
        return verdict, elapsed, ticks

    try:
        assert check(auth, "auth-ssha@auth.example", "pw-ssha-secret").ok
        auth_slapd_fresh.pause()
        try:
            verdict, elapsed, ticks = asyncio.run(scenario())
        finally:
            auth_slapd_fresh.resume()
        assert verdict.result is AuthResult.TEMPORARY, verdict
        assert elapsed < LDAP_TIMEOUT + 1, elapsed
        assert ticks > elapsed / 0.01 / 4, (ticks, elapsed)  # the loop kept running while LDAP hung
    finally:
        auth.close()


# -- no enumeration by timing ------------------------------------------------------------------


def mean_times(auth: Authenticator, cases: list[tuple[str, str]], rounds: int) -> list[float]:
    """Mean seconds of each case, interleaved round by round so drift hits all alike."""
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(rounds):
        for index, (login, password) in enumerate(cases):
            started = time.perf_counter()
            verdict = auth.check(login, password, "192.0.2.1")
            times[index].append(time.perf_counter() - started)
            assert verdict.result is AuthResult.BAD
    return [statistics.fmean(t) for t in times]


@pytest.mark.parametrize("account", ["auth-sha512crypt", "auth-ssha"])
def test_unknown_user_costs_what_a_wrong_password_costs(ldap_auth: Authenticator, account: str) -> None:
    ldap_auth.check(f"{account}@auth.example", "warm-up", "192.0.2.1")  # the imitation follows real hashes
    unknown, wrong = mean_times(ldap_auth, [("nobody@alias.example", "guess"), (f"{account}@auth.example", "guess")],
                                30)
    print(f"{account}: unknown user {unknown * 1e3:.2f} ms, wrong password {wrong * 1e3:.2f} ms")
    assert 1 / 2.5 < unknown / wrong < 2.5, (unknown, wrong)


def test_unknown_user_costs_a_hash_even_before_any_real_one_was_seen(ldap_auth: Authenticator) -> None:
    """The first imitation is sha512-crypt: never a free answer for an unknown login."""
    unknown, wrong = mean_times(ldap_auth, [("nobody@alias.example", "guess"),
                                            ("auth-sha512crypt@auth.example", "guess")], 10)
    assert unknown / wrong > 1 / 2.5, (unknown, wrong)


def test_rebind_unknown_user_costs_what_a_wrong_password_costs(auth_slapd: Slapd) -> None:
    auth = authenticator(ldap_settings(auth_slapd, ldaprebind="true"))
    try:
        unknown, wrong = mean_times(auth, [("nobody@alias.example", "guess"), ("auth-ssha@auth.example", "guess")],
                                    30)
        print(f"rebind: unknown user {unknown * 1e3:.2f} ms, wrong password {wrong * 1e3:.2f} ms")
        assert 1 / 2.5 < unknown / wrong < 2.5, (unknown, wrong)
    finally:
        auth.close()


def test_a_failure_takes_at_least_authfaildelay(auth_slapd: Slapd) -> None:
    auth = authenticator(ldap_settings(auth_slapd, authfaildelay="300"))
    try:
        for login, password in (("nobody@alias.example", "x"), ("auth-ssha@auth.example", "x")):
            started = time.monotonic()
            assert check(auth, login, password).result is AuthResult.BAD
            assert time.monotonic() - started >= 0.3
        started = time.monotonic()
        assert check(auth, "auth-ssha@auth.example", "pw-ssha-secret").ok
        assert time.monotonic() - started < 0.3  # success is not held back
    finally:
        auth.close()


# -- the throttle -------------------------------------------------------------------------------


def throttled(server: Slapd, conn: redis.Redis, **limits: str) -> Authenticator:
    settings = ldap_settings(server, **limits)
    return authenticator(settings, AuthThrottle(conn, "t-" + str(time.monotonic_ns()), settings))


def test_brute_force_from_one_ip_is_blocked_while_another_ip_gets_through(auth_slapd: Slapd, redis_url: str) -> None:
    conn = redis.Redis.from_url(redis_url)
    auth = throttled(auth_slapd, conn, authfailmaxip="20", authfailmaxuser="0")
    try:
        results = [check(auth, "gracie@auth.example" if n % 2 else f"guess{n}@auth.example", f"guess{n}",
                         "203.0.113.9").result for n in range(200)]
        assert results[:20] == [AuthResult.BAD] * 20
        assert results[20:] == [AuthResult.BLOCKED] * 180
        blocked = check(auth, "gracie@auth.example", STATUS_PASSWORD, "203.0.113.9")  # right, but not looked at
        assert blocked.result is AuthResult.BLOCKED and replies.auth(blocked.result).startswith("454 4.7.0")
        assert check(auth, "gracie@auth.example", STATUS_PASSWORD, "198.51.100.7").ok
        # an IPv6 client counts per /64: a neighbour address shares the count
        for n in range(20):
            check(auth, "gracie", "x", f"2001:db8:1:2::{n + 1:x}")
        assert check(auth, "gracie", STATUS_PASSWORD, "2001:db8:1:2:ffff::1").result is AuthResult.BLOCKED
        assert check(auth, "gracie", STATUS_PASSWORD, "2001:db8:1:3::1").ok
        assert check(auth, "gracie", STATUS_PASSWORD, "::ffff:203.0.113.9").result is AuthResult.BLOCKED
    finally:
        auth.close()


def test_concurrent_brute_force_overshoots_by_at_most_the_checks_in_flight(auth_slapd: Slapd, redis_url: str) -> None:
    conn = redis.Redis.from_url(redis_url)
    auth = throttled(auth_slapd, conn, authfailmaxip="20", authfailmaxuser="0")

    async def attack() -> list[AuthVerdict]:
        return await asyncio.gather(*(auth.verify(f"u{n}@auth.example", "x", "203.0.113.10") for n in range(200)))

    try:
        results = [v.result for v in asyncio.run(attack())]
        bad = results.count(AuthResult.BAD)
        assert 20 <= bad <= 20 + AUTH_THREADS - 1, bad
        assert results.count(AuthResult.BLOCKED) == 200 - bad
    finally:
        auth.close()


def test_per_login_limit_across_ips(auth_slapd: Slapd, redis_url: str) -> None:
    conn = redis.Redis.from_url(redis_url)
    auth = throttled(auth_slapd, conn, authfailmaxip="20", authfailmaxuser="5")
    try:
        for n in range(5):
            assert check(auth, "gracie@auth.example", "guess", f"198.18.0.{n + 1}").result is AuthResult.BAD
        # the login is spelled differently but is the same key; the right password no longer helps
        assert check(auth, "Gracie@Auth.Example", STATUS_PASSWORD, "198.18.1.1").result is AuthResult.BLOCKED
        assert check(auth, "auth-ssha@auth.example", "pw-ssha-secret", "198.18.0.1").ok  # the IPs are not blocked
    finally:
        auth.close()


def test_counts_expire_by_themselves(auth_slapd: Slapd, redis_url: str) -> None:
    conn = redis.Redis.from_url(redis_url)
    auth = throttled(auth_slapd, conn, authfailmaxip="2", authfailmaxuser="0", authfailwindow="1")
    try:
        for _ in range(2):
            check(auth, "gracie", "x", "192.0.2.50")
        assert check(auth, "gracie", STATUS_PASSWORD, "192.0.2.50").result is AuthResult.BLOCKED
        assert auth.throttle is not None
        ip_key, user_key = auth.throttle.keys("192.0.2.50", "gracie")
        assert 0 < conn.pttl(ip_key) <= 1000 and 0 < conn.pttl(user_key) <= 1000
        assert wait_until(lambda: check(auth, "gracie", STATUS_PASSWORD, "192.0.2.50").ok, 5)
    finally:
        auth.close()


def test_redis_down_refuses_auth_for_now(auth_slapd: Slapd, own_redis: RedisServer) -> None:
    auth = throttled(auth_slapd, connect(load(env={"SHARDMAIL_REDIS_URL": own_redis.url, "SHARDMAIL_ME": "mx.test"})),
                     authfailmaxip="20")
    try:
        assert check(auth, "gracie", STATUS_PASSWORD).ok
        own_redis.stop()
        started = time.monotonic()
        verdict = check(auth, "gracie", STATUS_PASSWORD)
        assert verdict.result is AuthResult.TEMPORARY and replies.auth(verdict.result).startswith("454 4.7.0"), verdict
        assert time.monotonic() - started < 3
        assert auth.throttle is not None
        auth.throttle.failed("192.0.2.1", "gracie")  # logged, not raised
        own_redis.start()
        assert wait_until(lambda: check(auth, "gracie", STATUS_PASSWORD).ok, 10)
    finally:
        auth.close()


def test_no_limits_means_no_redis_at_all(auth_slapd: Slapd) -> None:
    dead = redis.Redis(unix_socket_path="/nonexistent/redis.sock", socket_connect_timeout=0.5)
    auth = throttled(auth_slapd, dead, authfailmaxip="0", authfailmaxuser="0")
    try:
        assert check(auth, "gracie", STATUS_PASSWORD).ok
    finally:
        auth.close()
