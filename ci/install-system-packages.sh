#!/usr/bin/env bash
# Debian packages the tests use as real peers: Postfix's smtp-sink/smtp-source (the field's
# standard next-hop sink and load generator), unbound (a DNS server on a loopback port), swaks
# with the Perl TLS module its --tls needs (a Recommends, skipped by --no-install-recommends),
# the openssl command (s_client tests STARTTLS, smtps and SNI), and haproxy (PROXY protocol v1/v2
# in front of Tern; run by the tests, its service never started), Dovecot's LMTP server (the
# LMTP agent's real peer: the tests run a throwaway instance with its own config, never the
# packaged service; its auth service, from dovecot-core, is the SASL back end of the throwaway
# Postfix that relay-AUTH tests authenticate to), nsd and ldnsutils (a zone signed at test time and served to a validating
# unbound, for DANE).
# Installs only what is missing; Postfix is installed unconfigured, so no daemon starts.
set -euo pipefail
need=()
command -v cc >/dev/null || need+=(gcc)  # builds the Cython extensions
command -v smtp-sink >/dev/null || need+=(postfix)
command -v unbound >/dev/null || need+=(unbound)
command -v swaks >/dev/null || need+=(swaks)
perl -MNet::SSLeay -e1 2>/dev/null || need+=(libnet-ssleay-perl)
command -v openssl >/dev/null || need+=(openssl)
[ -x /usr/sbin/haproxy ] || need+=(haproxy)
[ -x /usr/lib/dovecot/lmtp ] || need+=(dovecot-lmtpd)
[ -x /usr/lib/dovecot/auth ] || need+=(dovecot-core)  # Postfix's smtpd_sasl_type = dovecot
[ -x /usr/sbin/nsd ] || need+=(nsd)  # serves the DNSSEC-signed zone of the DANE tests
command -v ldns-signzone >/dev/null || need+=(ldnsutils)  # ldns-keygen, ldns-signzone
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
