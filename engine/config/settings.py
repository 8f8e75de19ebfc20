"""Tern's settings: the Config and Listener dataclasses, with Postfix's defaults.

Trusts its callers: load_config (engine.config.loader) validates a file's values before they get
here. With no file, these defaults make a loopback-only server that is not an open relay.
"""

import dataclasses
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from engine.tls.protocols import MODERN_CIPHERS

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# TOML keys that are not Python names: Postfix's name → the Config field.
KEY_ALIASES = {"2bounce_notice_recipient": "double_bounce_notice_recipient"}

# Services a [[listen]] table may name: SMTP (25), submission (587, RFC 6409) with STARTTLS,
# and submission over implicit TLS (465, RFC 8314).
LISTEN_SERVICES: frozenset[str] = frozenset({"smtp", "submission", "smtps"})
# Delivery agents Tern has under these transport names (engine.delivery.agents); a
# [pipe_transports.NAME] table adds more.
BUILTIN_TRANSPORTS = ("smtp", "lmtp", "local", "virtual", "error", "retry", "discard")
TLS_SECURITY_LEVELS = ("none", "may", "encrypt")
# Services for mail submission (RFC 6409, RFC 8314) have AUTH on, as Postfix's master.cf
# entries set smtpd_sasl_auth_enable=yes; "submission" also requires it before MAIL (530).
SUBMISSION_SERVICES: frozenset[str] = frozenset({"submission", "smtps"})
AUTH_REQUIRED_SERVICES: frozenset[str] = frozenset({"submission"})


@dataclass(frozen=True)
class Listener:
    """One ``[[listen]]`` table: where to accept SMTP, and which service runs there."""

    host: str = "127.0.0.1"
    port: int = 2525
    service: str = "smtp"
    # a PROXY protocol v1/v2 header (HAProxy) comes first and names the real client
    proxy_protocol: bool = False


@dataclass(frozen=True)
class PipeTransport:
    """A pipe(8) service: the command's argv template (``${sender}``, ``${recipient}``…), the
    user it runs as (required, never root, as Postfix), its time limit in seconds and its
    flags (engine.delivery.pipe.FLAGS)."""

    argv: tuple[str, ...]
    user: str
    time_limit: float = 1000.0  # Postfix's command_time_limit
    flags: str = ""  # Postfix's pipe flags: B D F O R h u . >


def default_myhostname() -> str:
    """The host's fully qualified name, Postfix's default for myhostname."""
    import socket  # here: the sans-I/O cores import engine.config, and no I/O module with it

    return socket.getfqdn()


def default_queue_directory() -> Path:
    """``$TERN_HOME/spool``, else the user's data directory (XDG), as the brief asks."""
    home = os.environ.get("TERN_HOME")
    if home:
        return Path(home) / "spool"
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "tern" / "spool"


@dataclass(frozen=True)
class Config:
    """Every setting, with Postfix's defaults where Postfix has the concept.

    Durations are seconds."""

    config_file: str = ""  # where this came from ("" = embedded defaults)
    myhostname: str = field(default_factory=default_myhostname)
    mydomain: str = ""  # default: myhostname minus its first label
    mydestination: tuple[str, ...] = ("$myhostname", "localhost")  # local domains
    queue_directory: Path = field(default_factory=default_queue_directory)
    mynetworks: tuple[Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    relay_domains: tuple[str, ...] = ()
    relayhost: str = ""  # "" = deliver by MX; "[host]:port" = no MX lookup
    transport_maps: dict[str, str] = field(default_factory=dict)
    # Postfix's sender_dependent_default_transport_maps: sender address or "@domain" ->
    # "transport:nexthop" for mail that transport_maps and the local domains leave to the
    # default transport (IP pools chosen by sender; by destination: transport_maps)
    sender_dependent_default_transport_maps: dict[str, str] = field(default_factory=dict)
    # [transport.NAME]: SMTP transports of their own, each with smtp_* settings that override
    # the main ones (Postfix's master.cf entry with -o), e.g. smtp_bind_address, smtp_helo_name
    transport: dict[str, dict[str, object]] = field(default_factory=dict)
    # local(8) and virtual(8) delivery (engine.delivery.local), Postfix's names and defaults
    recipient_delimiter: str = ""  # e.g. "+": user+ext@domain is user's
    home_mailbox: str = ""  # under the user's home; "Maildir/" = Maildir; "" = the spool
    mail_spool_directory: str = "/var/mail"  # mbox files (a trailing "/": Maildirs)
    virtual_mailbox_domains: tuple[str, ...] = ()
    virtual_mailbox_base: str = ""
    virtual_mailbox_maps: str = ""  # "type:name": address or @domain -> path under the base
    virtual_uid_maps: str = ""  # "type:name", e.g. "static:5000"
    virtual_gid_maps: str = ""
    virtual_minimum_uid: int = 100
    deliver_lock_attempts: int = 20  # mbox locks (dotlock, fcntl): tries, then defer
    deliver_lock_delay: float = 1.0  # between tries
    # local(8) aliases and .forward (engine.delivery.aliases), Postfix's names and defaults.
    # alias_maps: aliases(5) files as "texthash:/path" (a missing file: no aliases), or other
    # "type:name" tables
    alias_maps: tuple[str, ...] = ("texthash:/etc/aliases",)
    forward_path: tuple[str, ...] = ("$home/.forward${recipient_delimiter}${extension}",
                                     "$home/.forward")
    allow_mail_to_commands: tuple[str, ...] = ("alias", "forward")  # and/or "include"
    allow_mail_to_files: tuple[str, ...] = ("alias", "forward")
    default_privs: str = "nobody"  # rights of commands and files of root-owned aliases
    command_time_limit: float = 1000.0  # a |command's run time
    duplicate_filter_limit: int = 1000  # destinations remembered per recipient's expansion (0: all)
    # pipe(8) transports, Postfix's master.cf entries: name -> {argv, user, time_limit}
    pipe_transports: dict[str, "PipeTransport"] = field(default_factory=dict)
    listen: tuple[Listener, ...] = (Listener(),)
    # Postfix's proxy_interfaces: addresses of a proxy or NAT that forwards port 25 to Tern;
    # the SMTP client treats them as itself (no delivery to an MX host there: a mail loop)
    proxy_interfaces: tuple[str, ...] = ()
    maillog_file: str = ""  # "" = stderr
    smtpd_banner: str = "$myhostname ESMTP Tern"
    # smtpd limits
    hopcount_limit: int = 50  # Received: headers (ours included) past which mail is a loop
    message_size_limit: int = 10240000  # 0 = no limit, as in Postfix
    smtpd_recipient_limit: int = 1000
    line_length_limit: int = 2048
    smtpd_timeout: float = 300.0
    # sessions one worker serves at once; past it a client gets 421 (master.cf's maxproc role)
    smtpd_connection_limit: int = 20000
    # a [[listen]] table's proxy_protocol: how long the header may take (Postfix's default)
    smtpd_upstream_proxy_timeout: float = 5.0
    # who may replace the client's identity (XCLIENT) or forward the previous hop's (XFORWARD)
    smtpd_authorized_xclient_hosts: tuple[Network, ...] = ()
    smtpd_authorized_xforward_hosts: tuple[Network, ...] = ()
    # abuse defences (smtpd(8), anvil(8)): Postfix's names and defaults, except where noted
    smtpd_forbid_bare_newline: str = "normalize"  # "normalize" (Postfix 3.9's; "yes") | "reject"
    # clients exempt from "reject" (None = $mynetworks); they still get "normalize", the floor
    smtpd_forbid_bare_newline_exclusions: tuple[Network, ...] | None = None
    smtpd_forbid_bare_newline_reject_code: int = 550  # 521 replies and disconnects
    smtpd_forbid_unauth_pipelining: bool = True  # Postfix >= 3.9
    smtpd_soft_error_limit: int = 10  # errors before every reply is delayed ...
    smtpd_error_sleep_time: float = 1.0  # ... by this long
    smtpd_hard_error_limit: int = 20  # errors before 421 and disconnect
    # a deadline per request (command line, or DATA at smtpd_min_data_rate bytes/s) as well as
    # per read: Tern's default is yes (Postfix's is no), so a trickling client cannot stay
    smtpd_per_request_deadline: bool = True
    smtpd_min_data_rate: int = 500
    smtpd_client_connection_count_limit: int = 50  # concurrent sessions per client; 0 = off
    smtpd_client_connection_rate_limit: int = 0  # per anvil_rate_time_unit; 0 = off
    smtpd_client_message_rate_limit: int = 0
    smtpd_client_recipient_rate_limit: int = 0
    smtpd_client_event_limit_exceptions: tuple[Network, ...] | None = None  # None = $mynetworks
    anvil_rate_time_unit: float = 60.0
    # SMTP AUTH (RFC 4954): PLAIN and LOGIN, checked against a Dovecot passwd-file
    smtpd_sasl_auth_enable: bool = False  # on every listener; a submission one has it anyway
    smtpd_tls_auth_only: bool = True  # offer AUTH only under TLS (unlike Postfix's "no")
    smtpd_sasl_password_file: str = ""  # absolute path: user:{SCHEME}hash lines (tern passwd)
    # failed AUTHs one client address may make per anvil_rate_time_unit: then 421 and no more
    # AUTH from it until the unit ends (smtpd_client_event_limit_exceptions exempt); 0 = no limit
    smtpd_client_auth_failure_limit: int = 5
    # worker processes (each with its own spool shard); 0 = one per core
    worker_count: int = 0
    # queue manager (qmgr(8)): retries, expiry and the active queue
    minimal_backoff_time: float = 300.0
    maximal_backoff_time: float = 4000.0
    queue_run_delay: float = 300.0  # how often deferred mail is scanned
    maximal_queue_lifetime: float = 5 * 86400.0
    bounce_queue_lifetime: float = 5 * 86400.0  # for null-sender (bounce) messages
    delay_warning_time: float = 0.0  # 0 = no delay warnings (Postfix's default)
    qmgr_message_active_limit: int = 20000  # messages in memory at once
    # per destination: concurrency with slow start, rate, recipients per transaction
    initial_destination_concurrency: int = 5
    default_destination_concurrency_limit: int = 20
    default_destination_concurrency_failed_cohort_limit: int = 1
    default_destination_rate_delay: float = 0.0  # 0 = no delay between deliveries
    default_destination_recipient_limit: int = 50
    # bounces: who gets mail that cannot be returned to its (null) sender
    double_bounce_notice_recipient: str = "postmaster"  # TOML key: 2bounce_notice_recipient
    # which problems the postmaster hears about; "2bounce" = undeliverable bounces (Postfix)
    notify_classes: tuple[str, ...] = ("resource", "software")
    bounce_size_limit: int = 50000  # original content returned in a bounce, at most
    # spool: the group-commit window (how long a commit waits for companions), map size
    queue_commit_window: float = 0.002
    queue_map_size: int = 1 << 30  # LMDB map size in bytes at start
    queue_map_size_limit: int = 1 << 36  # the map grows (doubling) up to this
    # smtp client connection cache (Postfix's names and defaults)
    smtp_connection_cache_time_limit: float = 2.0  # how long an idle connection is kept
    smtp_connection_reuse_time_limit: float = 300.0  # how long one connection is reused
    smtp_connection_reuse_count_limit: int = 0  # 0 = no limit on transactions
    # smtp client (Postfix's names and defaults)
    smtp_helo_name: str = "$myhostname"
    smtp_bind_address: str = ""  # local IPv4 address of outgoing connections; "" = any
    smtp_bind_address6: str = ""  # local IPv6 address of outgoing connections; "" = any
    smtp_connect_timeout: float = 30.0
    smtp_helo_timeout: float = 300.0
    smtp_mail_timeout: float = 300.0
    smtp_rcpt_timeout: float = 300.0
    smtp_data_init_timeout: float = 120.0
    smtp_data_xfer_timeout: float = 180.0
    smtp_data_done_timeout: float = 600.0
    smtp_quit_timeout: float = 300.0
    smtp_rset_timeout: float = 20.0
    # EHLO keywords the client acts as if the server had not offered ("chunking": DATA, not
    # BDAT; "pipelining", "size", "8bitmime", "smtputf8", "dsn"…), case ignored
    smtp_discard_ehlo_keywords: tuple[str, ...] = ()
    # lmtp client (engine.delivery.lmtp): Postfix's lmtp_* twins of the smtp_* settings, with
    # Postfix's defaults; lmtp_connect_timeout 0 = the operating system's own limit
    lmtp_lhlo_name: str = "$myhostname"
    lmtp_connect_timeout: float = 0.0
    lmtp_lhlo_timeout: float = 300.0  # the greeting and LHLO
    lmtp_mail_timeout: float = 300.0
    lmtp_rcpt_timeout: float = 300.0
    lmtp_data_init_timeout: float = 120.0
    lmtp_data_xfer_timeout: float = 180.0
    lmtp_data_done_timeout: float = 600.0  # every per-recipient reply after "." / BDAT LAST
    lmtp_quit_timeout: float = 300.0
    lmtp_rset_timeout: float = 20.0
    lmtp_discard_lhlo_keywords: tuple[str, ...] = ()  # "chunking": DATA, not BDAT
    # no 8BITMIME to 7BIT (quoted-printable) conversion for a server without 8BITMIME
    disable_mime_output_conversion: bool = False
    # which address family of an MX host goes first: ipv4 | ipv6 | any (random order)
    smtp_address_preference: str = "any"
    smtp_mx_address_limit: int = 5  # addresses tried per delivery, over all MX hosts; 0 = all
    smtp_mx_session_limit: int = 2  # sessions that got past EHLO per delivery; 0 = no limit
    # SMTP AUTH to the next hop (RFC 4954; engine.delivery.sasl, engine.smtp.sasl_client):
    # Postfix's names and defaults but one. PLAIN and LOGIN send the password itself, which
    # Postfix's security options call "plaintext": smtp_sasl_security_options (for a session
    # without TLS) keeps Postfix's "noplaintext, noanonymous", so no password goes in clear
    # unless it is set to "noanonymous" (as Postfix's SASL_README does); Tern's
    # smtp_sasl_tls_security_options (for a session under TLS) is "noanonymous", where
    # Postfix's inherits smtp_sasl_security_options: under TLS PLAIN and LOGIN may go.
    smtp_sasl_auth_enable: bool = False
    # "type:name": sender address / "@domain" (with smtp_sender_dependent_authentication),
    # then the server's host name, then the next hop as written ("[relay.example]:587")
    # -> "username:password"; no entry: no AUTH
    smtp_sasl_password_maps: str = ""
    smtp_sasl_mechanism_filter: tuple[str, ...] = ()  # e.g. "login": only those; () = any
    smtp_sasl_security_options: tuple[str, ...] = ("noplaintext", "noanonymous")
    smtp_sasl_tls_security_options: tuple[str, ...] = ("noanonymous",)
    smtp_sasl_auth_soft_bounce: bool = True  # a 5xx reply to AUTH defers (no: it bounces)
    smtp_sender_dependent_authentication: bool = False  # credentials by sender first
    # Postfix's sender_dependent_relayhost_maps: sender address, "@domain", or the null
    # sender's empty_address_relayhost_maps_lookup_key -> the relayhost for that sender's
    # mail (overriding relayhost; transport_maps and local domains still come first)
    sender_dependent_relayhost_maps: dict[str, str] = field(default_factory=dict)
    empty_address_relayhost_maps_lookup_key: str = "<>"
    # Outbound TLS (engine.tls.client): Postfix's names and defaults
    smtp_tls_security_level: str = ""  # "" = none; may | encrypt | fingerprint | verify | secure
    smtp_tls_policy_maps: str = ""  # "type:name": next-hop domain → "level [match=…]"
    smtp_tls_wrappermode: bool = False  # TLS from the first byte (smtps, port 465)
    # The CAs the client trusts (engine.tls.trust), as Postfix: these files only, the system's
    # CAs added with tls_append_default_CA; none → "Untrusted" at may, verify/secure defer
    smtp_tls_CAfile: str = ""  # PEM CAs
    smtp_tls_CApath: str = ""  # a directory of hashed CA certificates (c_rehash)
    tls_append_default_CA: bool = False
    # The SMTP client's OpenSSL cipher list for TLS 1.2 (Postfix's default grade "medium"); ""
    # = OpenSSL's default. Anonymous (aNULL) suites, when listed, are used at may and encrypt
    # only (Postfix); OpenSSL 3 offers them only at "@SECLEVEL=0".
    tls_medium_cipherlist: str = ""
    smtp_tls_protocols: str = ">=TLSv1.2"
    smtp_starttls_timeout: float = 300.0  # the TLS handshake (Postfix's name and default)
    smtp_tls_fingerprint_digest: str = "sha256"
    smtp_tls_verify_cert_match: str = "hostname"
    smtp_tls_secure_cert_match: str = "nexthop, dot-nexthop"
    # MTA-STS (RFC 8461, engine.tls.sts_fetch); not a Postfix setting (Postfix uses a policy daemon)
    smtp_mta_sts_enable: bool = False
    smtp_mta_sts_CAfile: str = ""  # PEM CAs for the policy's HTTPS host; "" = the system's
    smtp_mta_sts_https_port: int = 443
    # TLS-RPT (RFC 8460; engine.tls.tlsrpt*): Postfix 3.10's switch; the report's fields (in
    # Postfix, the tlsrpt-reporter's); "" = $mydomain, postmaster@$mydomain
    smtp_tlsrpt_enable: bool = False
    tlsrpt_organization_name: str = ""
    tlsrpt_contact_info: str = ""
    tlsrpt_sender_address: str = ""
    tlsrpt_CAfile: str = ""  # PEM CAs for https: report URIs; "" = the system's
    # SMTP access restrictions (Postfix >= 2.10 defaults; engine.policy.restrictions). Each is
    # a list of restriction names, check_*_access followed by its "type:name" table.
    smtpd_client_restrictions: tuple[str, ...] = ()
    smtpd_helo_restrictions: tuple[str, ...] = ()
    smtpd_sender_restrictions: tuple[str, ...] = ()
    smtpd_relay_restrictions: tuple[str, ...] = (
        "permit_mynetworks", "permit_sasl_authenticated", "reject_unauth_destination")
    smtpd_recipient_restrictions: tuple[str, ...] = ()
    smtpd_data_restrictions: tuple[str, ...] = ()
    smtpd_delay_reject: bool = True  # client/helo/sender lists wait for RCPT
    smtpd_reject_unlisted_recipient: bool = True
    smtpd_null_access_lookup_key: str = "<>"
    # lookups where "example.com" also matches its subdomains (else ".example.com" does)
    parent_domain_matches_subdomains: tuple[str, ...] = ("relay_domains", "smtpd_access_maps")
    # reply codes of the restrictions (Postfix's defaults)
    access_map_reject_code: int = 554
    access_map_defer_code: int = 450
    reject_code: int = 554
    defer_code: int = 450
    relay_domains_reject_code: int = 554
    unknown_address_reject_code: int = 450
    unknown_hostname_reject_code: int = 450
    unknown_local_recipient_reject_code: int = 550
    unknown_virtual_mailbox_reject_code: int = 550
    non_fqdn_reject_code: int = 504
    invalid_hostname_reject_code: int = 501
    # DNS: servers as "ip" or "ip:port"; empty = the system's resolv.conf
    dns_servers: tuple[str, ...] = ()
    dns_timeout: float = 5.0  # per query and server (resolv.conf's "timeout")
    dns_attempts: int = 2  # rounds over the servers (resolv.conf's "attempts")
    # smtpd TLS (Postfix's names). The key may sit in the certificate file (key_file "").
    smtpd_tls_cert_file: str = ""  # PEM chain, leaf first; "" = no TLS
    smtpd_tls_key_file: str = ""  # "" = $smtpd_tls_cert_file, as in Postfix
    smtpd_tls_security_level: str = ""  # none | may | encrypt; "" = may with a cert, else none
    smtpd_tls_protocols: str = ">=TLSv1.2"
    tls_high_cipherlist: str = MODERN_CIPHERS  # OpenSSL cipher list for TLS 1.2
    tls_server_sni_maps: dict[str, str] = field(default_factory=dict)  # domain → PEM key+chain

    def tls_security_level(self, service: str) -> str:
        """The STARTTLS level of a listener: "encrypt" on submission when a certificate is set
        (as Postfix's master.cf submission entry), the configured level (default "may") on
        smtp, "none" without a certificate. smtps is TLS from the first byte instead."""
        if not self.smtpd_tls_cert_file or service == "smtps":
            return "none"
        if service == "submission":
            return "encrypt"
        return self.smtpd_tls_security_level or "may"

    def for_transport(self, name: str) -> "Config":
        """The settings of SMTP transport ``name``: these, with its ``[transport.NAME]``
        overrides (the same object for a transport without any)."""
        overrides = self.transport.get(name)
        if not overrides:
            return self
        return dataclasses.replace(self, **overrides)  # type: ignore[arg-type]

    def expand(self, value: str) -> str:
        """Postfix-style ``$myhostname`` / ``$mydomain`` expansion, for the values that use it."""
        return value.replace("$myhostname", self.myhostname).replace(
            "$mydomain", self.effective_mydomain
        )

    @property
    def effective_mydomain(self) -> str:
        if self.mydomain:
            return self.mydomain
        _, _, rest = self.myhostname.partition(".")
        return rest or "localdomain"

    @property
    def bare_newline_exclusions(self) -> tuple[Network, ...]:
        return self.mynetworks if self.smtpd_forbid_bare_newline_exclusions is None else (
            self.smtpd_forbid_bare_newline_exclusions)

    @property
    def event_limit_exceptions(self) -> tuple[Network, ...]:
        return self.mynetworks if self.smtpd_client_event_limit_exceptions is None else (
            self.smtpd_client_event_limit_exceptions)

    @property
    def local_domains(self) -> frozenset[str]:
        return frozenset(self.expand(d).lower() for d in self.mydestination)

    @property
    def virtual_domains(self) -> frozenset[str]:
        return frozenset(self.expand(d).lower() for d in self.virtual_mailbox_domains)
