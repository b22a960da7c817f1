#!/bin/sh
# shardmail's one set-up script for a Debian machine (root, apt and pip reachable).
#   scripts/setup.sh run  [shardmail run options]   install what is needed, then run a node
#   scripts/setup.sh test [pytest options]          install what is needed, then run the test suite
# Idempotent: a second call installs nothing new and starts at once.
set -eu
cd "$(dirname "$0")/.."
mode="${1:-run}"
[ $# -gt 0 ] && shift

SYSTEM_PACKAGES="python3 python3-venv python3-pip redis-server redis-sentinel swaks slapd ldap-utils dovecot-imapd unbound postfix openssl prometheus systemd opendkim-tools fetchmail"
# fetchmail is a POP3 client for tests/test_pop3d.py: its daemon stays off (Debian's START_DAEMON=no, and
# no /etc/fetchmailrc), and the policy-rc.d below keeps it from starting while it installs.
# Installed without their Recommends: prometheus would bring prometheus-node-exporter (one more service on every
# interface), systemd a D-Bus daemon and a time syncer; the tests need only their binaries. opendkim-tools
# (opendkim-testmsg, the tests' second DKIM verifier) is the library's command-line tools only: no daemon, no
# unit, no init script (the milter is the separate package opendkim, which is not installed).
LEAN_PACKAGES="prometheus systemd"
missing=""
for pkg in $SYSTEM_PACKAGES; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    echo "setup: installing Debian packages:$missing" >&2
    export DEBIAN_FRONTEND=noninteractive
    case " $missing " in *" slapd "*)
        # slapd is only a binary for the tests' private servers (tests/slapd.py): no system directory,
        # and no service on port 389 of every interface, neither now nor at boot.
        echo "slapd slapd/no_configuration boolean true" | debconf-set-selections
        mkdir -p /etc/ldap && touch /etc/ldap/noslapd ;;
    esac
    case " $missing " in *" postfix "*)
        # postfix is there for its test tools (smtp-sink as a scripted SMTP peer; bench/ also runs private
        # instances): "No configuration" leaves no main.cf, so no system Postfix ever listens.
        echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections ;;
    esac
    # No package may start its service while it installs (slapd, dovecot: the tests run private,
    # loopback-only instances): a temporary policy-rc.d says no, unless the machine has its own.
    own_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && own_policy=yes
    fi
    plain=""
    lean=""
    for pkg in $missing; do
        case " $LEAN_PACKAGES " in *" $pkg "*) lean="$lean $pkg" ;; *) plain="$plain $pkg" ;; esac
    done
    had_exporter=""
    dpkg-query -W -f='${Status}' prometheus-node-exporter 2>/dev/null | grep -q "ok installed" && had_exporter=yes
    apt-get update -qq
    if [ -n "$plain" ]; then apt-get install -y -qq $plain >/dev/null; fi
    if [ -n "$lean" ]; then apt-get install -y -qq --no-install-recommends $lean >/dev/null; fi
    if [ -n "$own_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
    case " $missing " in *" slapd "*) invoke-rc.d slapd stop >/dev/null 2>&1 || true ;; esac
    # dovecot too is only a binary for the tests' private servers (tests/dovecot.py): no IMAP on 143/993.
    case " $missing " in *" dovecot-imapd "*) invoke-rc.d dovecot stop >/dev/null 2>&1 || true
        systemctl disable dovecot.service dovecot.socket >/dev/null 2>&1 || true ;; esac
    # unbound too (tests/dns_server.py): no resolver on port 53 at boot, recursing to the Internet.
    case " $missing " in *" unbound "*) invoke-rc.d unbound stop >/dev/null 2>&1 || true
        systemctl disable unbound.service unbound-resolvconf.service >/dev/null 2>&1 || true ;; esac
    # redis-sentinel too (tests/sentinel.py runs private sentinels on loopback ports): no sentinel of the
    # machine's own watching a primary that is not there.
    case " $missing " in *" redis-sentinel "*) invoke-rc.d redis-sentinel stop >/dev/null 2>&1 || true
        systemctl disable redis-sentinel.service >/dev/null 2>&1 || true
        update-rc.d redis-sentinel disable >/dev/null 2>&1 || true ;; esac
    # prometheus too (tests/test_metrics.py starts its own on 127.0.0.1 with a config and data in tmp_path): the
    # package's service would listen on :9090 of every interface, now and at boot. A node exporter that came with
    # it (apt configured to install Recommends anyway) goes the same way; one that was there before stays.
    case " $missing " in *" prometheus "*)
        units="prometheus"
        if [ -z "$had_exporter" ] && dpkg-query -W -f='${Status}' prometheus-node-exporter 2>/dev/null \
                | grep -q "ok installed"; then
            units="$units prometheus-node-exporter"
        fi
        for unit in $units; do
            if [ -d /run/systemd/system ]; then
                systemctl disable --now "$unit" >/dev/null 2>&1 || true
            else  # no systemd (a container): stop what the init script may have started, and no start at boot
                service "$unit" stop >/dev/null 2>&1 || true
                systemctl disable "$unit" >/dev/null 2>&1 || true
                update-rc.d "$unit" disable >/dev/null 2>&1 || true
            fi
        done ;;
    esac
fi


PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.shardmail-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    .venv/bin/python -m pip install -q -e '.[test]'
    touch "$stamp"
fi

# nullmailer's QMQP client, for the interop tests (tests/test_qmqp_interop.py): unpacked from its Debian
# package, not installed, since the package is a whole MTA and would take Postfix's place.
NULLMAILER_QMQP=.venv/nullmailer/usr/lib/nullmailer/qmqp
if [ "$mode" = test ] && [ ! -x "$NULLMAILER_QMQP" ]; then
    work=$(mktemp -d)
    chmod 755 "$work"  # apt's sandbox user writes the download here
    (cd "$work" && { apt-get download -qq nullmailer >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get download -qq nullmailer >/dev/null 2>&1; }; }) \
        && dpkg-deb -x "$work"/nullmailer_*.deb .venv/nullmailer \
        || echo "setup: could not unpack nullmailer's qmqp client; its interop test will fail" >&2
    rm -rf "$work"
fi

case "$mode" in
    run)  exec .venv/bin/shardmail run "$@" ;;
    test) exec .venv/bin/python -m pytest -q "$@" ;;
    *)    echo "usage: scripts/setup.sh run|test [options]" >&2; exit 64 ;;
esac
