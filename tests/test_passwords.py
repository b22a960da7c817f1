"""core.passwords: every userPassword scheme against values made by independent tools (slappasswd,
openssl passwd), wrong passwords, malformed values and unknown schemes."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shutil
import subprocess

import pytest

from core import passwords
from core.passwords import imitation, scheme, verify

PASSWORD = "Tr0ub4dor&3"
SHA512_CRYPT = ("$6$qmailldapsalt$SR8le4/xQJcU17w/YfNh2Xq3zhlYPEhOF0MJt8YezMOVW.LibAwCGQl4A5r2Mv7MWAmvl78EIYXed6"
                "BnGbSIh.")
# Made once with slappasswd 2.5 (pw-sha2 module for the SHA-2 ones) and openssl 3 passwd, for PASSWORD.
VECTORS = {
    "SSHA": "{SSHA}AHOTLVi53eEqPtqcOt89ck5CzllP7JUs",
    "SHA": "{SHA}h0Vy56WuaklGamrFeLmK26eMaqY=",
    "SMD5": "{SMD5}K//eH68ExlqeBq7uNzSMz/ECjfs=",
    "MD5": "{MD5}Ts5XphMjtSzP/b7wIZVnVA==",
    "SSHA256": "{SSHA256}+xPSkjj2/0yhXqodvkVl2ThN1elCOYPwzg+OJjBRng27KufmQlNzJg==",
    "SSHA512": "{SSHA512}WGTQQWcV8o5AXv3diqTk2qIJoUwYUMPkMUC2JFcWHyHukRldVmw4DOFjsk0W6iKWxsicEmR9B4BM1eZkNuBF"
               "livwbxjpXNHv",
    "SHA256": "{SHA256}SEhuFRToQjRv9AWx5F9EBZroJhnyMG+Z0JQNyzhukfc=",
    "SHA512": "{SHA512}xyu2IccEDPS2R0BjqaeXJpDiUvNa2+fPr/Wx7iMW7+c4LnI9QeATor+8M8MAfFDFhH0hqInM6DhTbqxyeAjeQA==",
    "CRYPT-DES": "{CRYPT}BMykot3qHgOj2",
    "CRYPT-MD5": "{CRYPT}$1$VIBep8Xv$NlDdgoa3UYXRdJ44zOPRZ.",
    "CRYPT-SHA256": "{CRYPT}$5$QjAVJLP0cH6u3pl3$VK5R/3/8ggmhhTxPNGA5RCkEUo2PRU.pwKlRXuky/46",
    "CRYPT-SHA512": "{crypt}" + SHA512_CRYPT,
    "BARE-SHA512": SHA512_CRYPT,
    "BARE-SHA256-ROUNDS": "$5$rounds=1000$saltsalt$jh8pak6Q.XKvNSjV7dvmPYxlPT2aTu6SH70.UJaCjK5",
}  # fmt: skip
UNICODE_SHA512 = "$6$x$CcOozKa6JVx4D2D8MkLiJrFeNI7WXH.mpgK166.0Klw7xGHTCeLuyZxq45XcTgw97w7RIg7n9epLe.7jp3kKM/"
SLAPPASSWD = shutil.which("slappasswd") or ("/usr/sbin/slappasswd" if os.path.exists("/usr/sbin/slappasswd") else "")
OPENSSL = shutil.which("openssl")


def hash_for_tests(name: str, password: str, salt: bytes = b"salt") -> str:
    """A userPassword value in a digest scheme, written here by hand (not by the code under test)."""
    algorithm, salted = {"SHA": ("sha1", False), "SSHA": ("sha1", True), "MD5": ("md5", False),
                         "SMD5": ("md5", True), "SSHA256": ("sha256", True), "SSHA512": ("sha512", True)}[name]
    salt = salt if salted else b""
    digest = hashlib.new(algorithm, password.encode() + salt).digest()
    return "{" + name + "}" + base64.b64encode(digest + salt).decode()


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_known_vectors_match_and_wrong_passwords_do_not(name: str) -> None:
    stored = VECTORS[name]
    assert verify(stored, PASSWORD)
    assert verify(stored, PASSWORD.encode())
    assert not verify(stored, "tr0ub4dor&3")
    assert not verify(stored, "X" + PASSWORD)
    assert not verify(stored, "")


def test_des_crypt_reads_eight_characters_only() -> None:
    """crypt(3)'s DES is what it is: anything after the 8th character is ignored (why it is obsolete)."""
    assert verify(VECTORS["CRYPT-DES"], PASSWORD + "anything")
    assert not verify(VECTORS["CRYPT-DES"], "Tr0ub4dX" + PASSWORD[8:])


def test_scheme_names_are_case_insensitive() -> None:
    for name in ("SSHA", "SMD5", "SSHA512"):
        stored = VECTORS[name]
        lowered = "{" + name.lower() + "}" + stored.split("}", 1)[1]
        assert verify(lowered, PASSWORD)
        assert scheme(lowered) == name


def test_utf8_password() -> None:
    assert verify(UNICODE_SHA512, "pässwörd")
    assert not verify(UNICODE_SHA512, "passwort")
    assert not verify(UNICODE_SHA512, "pässwörd".encode("latin-1"))  # not UTF-8: no match, no exception


@pytest.mark.parametrize("name", ["SHA", "SSHA", "MD5", "SMD5", "SSHA256", "SSHA512"])
def test_hand_made_digest_values(name: str) -> None:
    for salt in (b"s", b"saltsalt", os.urandom(16)):
        stored = hash_for_tests(name, "hunter2", salt)
        assert verify(stored, "hunter2")
        assert not verify(stored, "hunter3")


def test_md5_in_hex_as_old_tools_wrote_it() -> None:
    assert verify("{MD5}" + hashlib.md5(b"hunter2").hexdigest(), "hunter2")
    assert not verify("{MD5}" + hashlib.md5(b"hunter2").hexdigest(), "hunter3")


def test_cleartext_only_when_allowed() -> None:
    for stored in ("{CLEARTEXT}hunter2", "{plain}hunter2"):
        assert not verify(stored, "hunter2")
        assert verify(stored, "hunter2", cleartext=True)
        assert not verify(stored, "hunter3", cleartext=True)
    assert not verify("{CLEARTEXT}", "", cleartext=True)
    assert not verify("hunter2", "hunter2", cleartext=True)  # a bare value is crypt(3), never plain text


@pytest.mark.parametrize("stored", [
    "", "{SSHA}", "{SSHA}!!!notbase64", "{SSHA}" + base64.b64encode(b"short").decode(), "{SHA}" + "A" * 40,
    "{SHA}" + base64.b64encode(b"x" * 21).decode(), "{MD5}zz", "{UNKNOWN}abc", "{ARGON2}$argon2id$v=19$x",
    "{CRYPT}", "{CRYPT}*", "{CRYPT}!", "*0", "*1", "!", "!!", "{CRYPT}$6$", "{CRYPT}$6$salt", "{CRYPT}$9$a$b",
    "{CRYPT}$1$toolong-salt-here$x", "{SSHA", "SSHA}abc", "{}abc", "{" + "A" * 40 + "}x", "{SSHA}" + "A" * 5000,
    "\x00", "{CRYPT}ab\x00cdefghijk", "plain text password",
])  # fmt: skip
def test_malformed_and_unknown_values_never_match_nor_raise(stored: str) -> None:
    for password in ("", "x", PASSWORD, "*0", "\x00", "ab\x00", "é" * 600):
        assert verify(stored, password) is False


def test_crypt_failure_token_is_not_a_match() -> None:
    """libxcrypt answers an unusable setting with '*0' or '*1': equal to such a stored value, still no."""
    assert not verify("*0", "anything")
    assert not verify("{CRYPT}*0", "anything")


def test_odd_argument_types_give_false() -> None:
    assert verify(None, "x") is False  # type: ignore[arg-type]
    assert verify(VECTORS["SSHA"], None) is False  # type: ignore[arg-type]
    assert verify(VECTORS["SSHA"], "x" * 5000) is False


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_imitation_has_the_same_scheme_and_cost(name: str) -> None:
    stored = VECTORS[name]
    dummy = imitation(stored)
    assert scheme(dummy) == scheme(stored)
    assert not verify(dummy, PASSWORD)
    if "rounds=" in stored:
        assert "$rounds=1000$" in dummy
    if "$6$" in stored:
        assert dummy.startswith("{CRYPT}$6$")
    assert dummy != imitation(stored)  # fresh salt and password each time


def test_imitation_of_nonsense_is_sha512_crypt() -> None:
    assert imitation("garbage").startswith("{CRYPT}$6$")


@pytest.mark.skipif(not SLAPPASSWD, reason="slappasswd (slapd package) not installed")
@pytest.mark.parametrize("name", ["SSHA", "SHA", "SMD5", "MD5", "SSHA256", "SSHA512", "SHA512"])
def test_random_passwords_hashed_by_slappasswd(name: str) -> None:
    for _ in range(3):
        password = secrets.token_urlsafe(12)
        made = subprocess.run([SLAPPASSWD, "-o", "module-path=/usr/lib/ldap", "-o", "module-load=pw-sha2",
                               "-h", "{" + name + "}", "-s", password], capture_output=True, text=True, timeout=10)
        assert made.returncode == 0, made.stderr
        stored = made.stdout.strip()
        assert verify(stored, password), stored
        assert not verify(stored, password + "!")


@pytest.mark.skipif(not OPENSSL, reason="openssl not installed")
@pytest.mark.parametrize("flag", ["-1", "-5", "-6"])
def test_random_passwords_hashed_by_openssl(flag: str) -> None:
    for _ in range(3):
        password = secrets.token_urlsafe(12)  # may start with "-": given on stdin, never read as an option
        made = subprocess.run([OPENSSL, "passwd", flag, "-stdin"], input=password + "\n", capture_output=True,
                              text=True, timeout=10)
        assert made.returncode == 0, made.stderr
        stored = made.stdout.strip()
        assert verify("{CRYPT}" + stored, password) and verify(stored, password)
        assert not verify(stored, password[:-1])


def test_no_crypt_library_means_no_crypt_match(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(passwords, "_crypt", None)
    assert not verify(VECTORS["CRYPT-SHA512"], PASSWORD)
    assert verify(VECTORS["SSHA"], PASSWORD)
