"""Alias and .forward expansion for the local agent, as Postfix's local(8) does it.

What one local recipient becomes: mailboxes of passwd users, files (``/file/name``, a Maildir
when it ends in "/"), commands (``|command``) and addresses to forward elsewhere, each with the
identity its file or command is written or run as. Sources: ``alias_maps`` (aliases(5) files:
``name: value, value``, ``:include:/file``), then the user's ``.forward`` (``forward_path``).
Pure: it reads the alias, include and .forward files and the passwd database, and decides;
engine.delivery.local writes, runs and forwards.

Postfix's rules kept here:
- an alias is looked up by local part, with its extension first (``user+ext``), then without;
- an alias that names itself (``user: user, |cmd``) means the user's own mailbox, not the alias
  again; ``\\user`` in a .forward file is the mailbox without any expansion;
- nesting deeper than 100 levels bounces 5.4.6 ("alias database loop"), as local(8); more
  than 1000 final destinations for one recipient (or 10000 addresses examined to find them)
  bounce the recipient whole, 5.3.5, before anything is delivered (a retry would expand it the
  same way: deferring would repeat the deliveries that worked at every retry);
- a temporary failure (a file read that timed out, a .forward that cannot be read for a
  reason other than its absence) stops the expansion and defers the recipient whole, nothing
  delivered (engine.delivery.local), for the same reason;
- a destination met twice (same mailbox, file, command or address) is delivered once, up to
  ``duplicate_filter_limit`` remembered destinations (0: no limit); a .forward or include
  file is read once whatever the limit;
- commands and files only where ``allow_mail_to_commands`` / ``allow_mail_to_files`` name the
  source ("alias", "forward", "include"), else 5.7.1;
- rights: an alias table owned by root gives root's (commands and files then run as
  ``default_privs``: engine.delivery.local replaces uid and gid 0), one owned by someone else
  its owner's; a .forward its user's; an include file listed with root's rights its owner's,
  else the rights stay (a user cannot borrow someone else's by including their file);
- .forward and include files are opened with the current rights, never as root for a user
  (engine.delivery.userfile);
- a .forward file is used only when it is a regular file, owned by the user or root, and not
  world-writable (otherwise it is ignored, as local(8) ignores it with a warning);
- an ``owner-NAME`` alias becomes the envelope sender of what NAME expands to.
Trusts the administrator's alias files; a .forward or include file is the user's text and is
only ever parsed into destinations, never run here.
"""

import errno
import functools
import os
import pwd
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.config import Config
from engine.delivery import MACRO, split_local
from engine.delivery.mailbox import MailboxError
from engine.delivery.userfile import ABSENT, UserFile, read_as
from engine.tables import Table, TableError, open_table
from engine.tables.text import read_source

MAX_LEVEL = 100  # local(8): "alias database loop" beyond this nesting
# final destinations of one recipient (as Postfix's virtual_alias_expansion_limit), and the
# addresses and items examined to find them: bound an alias graph that fans out at every
# level long before MAX_LEVEL stops it
EXPANSION_LIMIT = 1000
VISIT_LIMIT = 10 * EXPANSION_LIMIT
INCLUDE_LIMIT = 1 << 20  # bytes read from one .forward or :include: file
EXPANSION_BYTES = 4 << 20  # bytes read from all .forward and include files of one recipient
EXPANSION_TIME = 30.0  # seconds for all file reads of one recipient (a user can stop a reader)


@dataclass(frozen=True)
class Rights:
    """Whose identity a file or command gets (uid, gid), and the home and name it runs with."""

    uid: int
    gid: int
    name: str = ""
    home: str = "/"


@dataclass(frozen=True)
class Target:
    """One final destination. ``kind``: "mailbox" (``value`` a passwd user), "file" (a path),
    "command" (a shell command) or "forward" (an address that is not local). ``source``: what
    expanded it ("alias", "forward", "include", "" for the recipient itself); ``parent``: the
    address it was expanded from."""

    kind: str
    value: str
    rights: Rights | None = None
    source: str = ""
    parent: str = ""


@dataclass
class Expansion:
    """Where a recipient's copies go. ``failures``: destinations that cannot be delivered
    (``(what, MailboxError)``), while the others still are. ``sender``: an owner- alias that
    replaces the envelope sender of forwarded copies (None: keep it)."""

    targets: list[Target] = field(default_factory=list)
    failures: list[tuple[str, MailboxError]] = field(default_factory=list)
    sender: str | None = None
    warnings: list[str] = field(default_factory=list)  # for the maillog (ignored files)


class AliasTable(Table):
    """An aliases(5) file: ``name: value, value`` lines, continued by lines that start with
    whitespace, ``#`` comments; a name may be quoted (``"a b": x``). Names are case-folded;
    the first entry of a name wins. A missing file is an empty table (a system without
    /etc/aliases has no aliases); ``owner`` is the file's uid."""

    def __init__(self, spec: str, path: str) -> None:
        super().__init__(spec)
        self._entries: dict[str, str] = {}
        self.owner = 0
        if not os.path.exists(path):
            return
        self.owner = os.stat(path).st_uid
        for number, line in read_source(path):
            name, value = _split_alias_line(line)
            if name is None or not value:
                raise TableError(f'{path}:{number}: expected "name: value", got "{line}"')
            self._entries.setdefault(name.lower(), value)

    def get(self, key: str) -> str | None:
        return self._entries.get(key)


def _split_alias_line(line: str) -> tuple[str | None, str]:
    if line.startswith('"'):
        end = line.find('"', 1)
        if end < 0 or line[end + 1:end + 2] != ":":
            return None, ""
        return line[1:end], line[end + 2:].strip()
    name, colon, value = line.partition(":")
    if not colon or not name.strip() or any(c.isspace() for c in name.strip()):
        return None, ""
    return name.strip(), value.strip()


@functools.lru_cache(maxsize=16)
def alias_tables(specs: tuple[str, ...]) -> tuple[Table, ...]:
    """The alias_maps, read once per process (as Postfix opens them at start-up): a
    ``texthash:`` file is read in aliases(5) format; other types as engine.tables opens them
    (owned by root). Raises TableError."""
    tables: list[Table] = []
    for spec in specs:
        kind, _, name = spec.partition(":")
        table = AliasTable(spec, name) if kind.lower() == "texthash" else open_table(spec)
        if table.remote:
            raise TableError(f"alias_maps: {spec}: only local tables are supported")
        tables.append(table)
    return tuple(tables)


def split_values(text: str) -> list[str]:
    """The destinations of an alias value or a .forward / include file: separated by commas
    or line ends outside double quotes; ``"…"`` around a whole item is removed; ``#`` starts
    a comment line."""
    items: list[str] = []
    for line in text.splitlines() or [""]:
        if line.lstrip().startswith("#"):
            continue
        current: list[str] = []
        quoted = False
        for char in line:
            if char == '"':
                quoted = not quoted
            if char == "," and not quoted:
                items.append("".join(current))
                current = []
            else:
                current.append(char)
        items.append("".join(current))
    out = []
    for item in (i.strip() for i in items):
        if len(item) > 1 and item[0] == item[-1] == '"':
            item = item[1:-1].strip()
        if item:
            out.append(item)
    return out


class Expander:
    """Expands local recipients under one Config. ``getpwnam`` is the passwd lookup."""

    def __init__(self, config: Config,
                 getpwnam: Callable[[str], pwd.struct_passwd] = pwd.getpwnam) -> None:
        self.config = config
        self.tables = alias_tables(tuple(config.alias_maps))
        self.getpwnam = getpwnam
        self.commands = _classes(config.allow_mail_to_commands)
        self.files = _classes(config.allow_mail_to_files)

    def expand(self, recipient: str) -> Expansion:
        """Where ``recipient`` goes (the queue manager routed it to local: its domain is not
        checked again, an expanded address's is). Raises MailboxError when the recipient
        itself is unknown (5.1.1) or expands too far (5.3.5)."""
        state = _State(Expansion(), set(), self.config.duplicate_filter_limit,
                       budget=EXPANSION_BYTES, deadline=time.monotonic() + EXPANSION_TIME)
        self._address(recipient, state, level=0, exp_from="", source="", parent="", top=True)
        if state.over:  # the same tables expand the same way at every retry: bounced
            raise MailboxError("5.3.5", f"unreasonable alias expansion size for {recipient} "
                                        f"(more than {EXPANSION_LIMIT} destinations)")
        return state.result

    # -- one address ------------------------------------------------------------------------

    def _address(self, address: str, state: "_State", *, level: int, exp_from: str,
                 source: str, parent: str, top: bool = False) -> None:
        if level > MAX_LEVEL:
            state.fail(address, MailboxError("5.4.6", f"alias database loop for {address}"))
            return
        if not state.step(address):
            return
        local, extension, domain = split_local(address, self.config.recipient_delimiter)
        if not top and domain and domain not in self.config.local_domains:
            state.add(("forward", address.lower()),
                      Target("forward", address, None, source, parent))
            return
        name = local.lower()
        full = address.rpartition("@")[0].lower() if "@" in address else address.lower()
        if name != exp_from and self._alias(address, full, name, extension, state, level):
            return
        try:
            user = self.getpwnam(name)
        except KeyError:
            error = MailboxError("5.1.1", f'unknown user: "{name}"')
            if top:
                raise error from None
            state.fail(address, error)
            return
        if self._forward(address, user, extension, state, level):
            return
        state.add(("mailbox", user.pw_name),
                  Target("mailbox", user.pw_name, _rights(user), source, parent))

    def _alias(self, address: str, full: str, name: str, extension: str, state: "_State",
               level: int) -> bool:
        """Expand ``address`` if an alias table has it: ``user+ext`` first, then ``user``."""
        keys = [full.rpartition("@")[0] if "@" in full else full] if extension else []
        keys.append(name)
        for table in self.tables:
            for key in keys:
                value = table.get(key)
                if value is None:
                    continue
                rights = self._table_rights(table, state, address)
                if rights is False:
                    return True
                if table.get(f"owner-{key}") and state.result.sender is None:
                    state.result.sender = self._qualify(f"owner-{key}")
                items = split_values(value)
                if not items:  # local(8): "no recipient in alias lookup result"
                    state.fail(address, MailboxError("4.3.0", "alias database unavailable"))
                for item in items:
                    self._item(item, state, level=level + 1, rights=rights, exp_from=key,
                               source="alias", parent=address)
                return True
        return False

    def _table_rights(self, table: Table, state: "_State", address: str) -> Rights | bool:
        """The table owner's rights (local(8)'s DELIVERY RIGHTS): root for a root-owned table,
        whose commands and files then run as default_privs (engine.delivery.local replaces
        uid and gid 0), and whose include files are opened as root."""
        owner = getattr(table, "owner", 0)
        try:
            entry = pwd.getpwuid(owner)
        except KeyError:
            state.fail(address, MailboxError("4.3.0", "cannot find alias database owner"))
            return False
        return _rights(entry)

    def _forward(self, address: str, user: pwd.struct_passwd, extension: str,
                 state: "_State", level: int) -> bool:
        """Expand the user's .forward file (the first of forward_path that opens), read with
        the user's rights (engine.delivery.userfile)."""
        found = self._forward_file(user, extension, state)
        if found is None:
            return False
        path, text = found
        if text is None:
            return True  # a read that failed or timed out, a file too large: it defers
        items = split_values(text)
        if not items:
            return False
        rights = _rights(user)
        decided = state.decided
        for item in items:
            if item.startswith("\\"):  # "\user": the mailbox, no further expansion
                target = item[1:].strip()
                try:
                    entry = self.getpwnam(split_local(target, "")[0].lower())
                except KeyError:
                    state.fail(item, MailboxError("5.1.1", f'unknown user: "{target}"'))
                    continue
                state.add(("mailbox", entry.pw_name),
                          Target("mailbox", entry.pw_name, _rights(entry), "forward", address))
                continue
            self._item(item, state, level=level + 1, rights=rights,
                       exp_from=user.pw_name, source="forward", parent=address)
        # dotforward.c: a .forward that named no destination at all (an empty include
        # file) leaves the mail to the user's mailbox, never nowhere
        return state.decided > decided

    def _forward_file(self, user: pwd.struct_passwd, extension: str,
                      state: "_State") -> tuple[str, str | None] | None:
        """The path and text of the first forward_path file that opens as the user (no
        symbolic link as its last component), when it is a regular file owned by the user or
        root and not world-writable (local(8) ignores it otherwise). An extension that could
        leave the directory ("/", a leading ".") or holds a character outside
        forward_expansion_filter skips the templates that use it."""
        values = {"home": user.pw_dir, "user": user.pw_name, "extension": extension,
                  "recipient_delimiter": self.config.recipient_delimiter[:1],
                  "local": user.pw_name}
        for template in self.config.forward_path:
            uses = "${extension}" in template or "$extension" in template
            if uses and not (extension and _safe_extension(extension)):
                continue  # .forward+ext only for an address with a usable extension
            path = MACRO.sub(lambda m: values.get(m.group(1) or m.group(2), ""), template)
            if not path.startswith("/"):
                continue
            if not state.once(("forward-file", path)):
                return None
            limit = min(INCLUDE_LIMIT, state.budget)
            try:
                found = read_as(path, user.pw_uid, user.pw_gid, follow=False, limit=limit,
                                time_limit=state.left())
                state.spend(found)
            except TimeoutError:  # retried later: neither the .forward nor the mailbox now
                state.fail(path, MailboxError("4.3.0", f"file {path}: read timed out"))
                return path, None
            except OSError as exc:
                if exc.errno in ABSENT:
                    continue  # missing, a symbolic link, unreadable to the user: the next one
                # too large (never parsed cut), or the reading failed (no fork, no pipe, a
                # child that died): retried later, never taken as "no .forward"
                why = _too_large(limit) if exc.errno == errno.EFBIG else exc.strerror
                state.fail(path, MailboxError("4.3.0", f"file {path}: {why}"))
                return path, None
            problem = _forward_problem(found, user.pw_uid)
            if problem:  # local(8) ignores it, with a warning
                state.result.warnings.append(f"file {path} {problem}")
                return None
            return path, found.text
        return None

    # -- one destination ---------------------------------------------------------------------

    def _item(self, item: str, state: "_State", *, level: int, rights: Rights, exp_from: str,
              source: str, parent: str) -> None:
        if not state.step(item):
            return
        if item.startswith("|"):
            if source not in self.commands:
                state.fail(item, MailboxError("5.7.1", "mail to command is restricted"))
            else:
                state.add(("command", item[1:].strip(), rights.uid),
                          Target("command", item[1:].strip(), rights, source, parent))
        elif item.startswith("/"):
            if source not in self.files:
                state.fail(item, MailboxError("5.7.1", "mail to file is restricted"))
            else:
                state.add(("file", os.path.normpath(item) + ("/" * item.endswith("/"))),
                          Target("file", item, rights, source, parent))
        elif item.lower().startswith(":include:"):
            self._include(item[9:].strip(), state, level=level, rights=rights,
                          exp_from=exp_from, parent=parent)
        else:
            self._address(self._qualify(item.strip("<>")), state, level=level,
                          exp_from=exp_from, source=source, parent=parent)

    def _include(self, path: str, state: "_State", *, level: int, rights: Rights,
                 exp_from: str, parent: str) -> None:
        """An ``:include:`` file, opened with the current rights: its destinations, with its
        owner's rights when the current ones are root's (include.c)."""
        if level > MAX_LEVEL:
            state.fail(path, MailboxError("5.4.6", f"alias database loop for {parent}"))
            return
        if not path.startswith("/"):
            state.fail(path, MailboxError("5.3.5", f"include file {path}: not an absolute path"))
            return
        if not state.once(("include", rights.uid, path)):
            return  # include.c's been_here: each (rights, file) once per recipient
        if not state.budget:
            state.fail(path, MailboxError("5.3.5", f"include file {path}: more than "
                                          f"{EXPANSION_BYTES} bytes of include files"))
            return
        limit = min(INCLUDE_LIMIT, state.budget)
        try:  # opened with the current rights, never as root for a user (include.c)
            found = read_as(path, rights.uid, rights.gid, follow=True, limit=limit,
                            time_limit=state.left())
            state.spend(found)
        except TimeoutError:
            state.fail(path, MailboxError("4.3.0", f"include file {path}: read timed out"))
            return
        except OSError as exc:
            if exc.errno == errno.EFBIG:  # never a cut list parsed as complete: bounced
                state.fail(path, MailboxError(
                    "5.3.5", f"include file {path}: {_too_large(limit)}"))
                return
            # no such file for these rights bounces; the reading failing defers
            state.fail(path, MailboxError(
                "5.3.5" if exc.errno in ABSENT else "4.3.0",
                f"unable to lookup include file {path}: {exc.strerror}"))
            return
        if found.text is None:
            state.fail(path, MailboxError("5.3.5", f"not a regular include file: {path}"))
            return
        if found.mode & stat.S_IWOTH or not _own_file(found):  # include.c: bounced
            state.result.warnings.append(
                f":include: file {path} is world writable" if found.mode & stat.S_IWOTH
                else f":include: file {path} has owner uid {found.uid}, and Tern, not root, "
                     "cannot take its rights")
            state.fail(path, MailboxError("5.3.5", "mail system configuration error"))
            return
        # include.c: a root-owned alias's include file gets its owner's rights; a user's
        # include (from a .forward or a user-owned alias) keeps the user's own
        if rights.uid == 0 and found.uid != 0:
            try:
                rights = _rights(pwd.getpwuid(found.uid))
            except KeyError:
                state.fail(path, MailboxError("4.3.5", "mail system configuration error"))
                return
        text = found.text
        for item in split_values(text):
            self._item(item, state, level=level + 1, rights=rights, exp_from=exp_from,
                       source="include", parent=parent)

    def _qualify(self, address: str) -> str:
        """A bare local name is in $myhostname's domain (Postfix's append_at_myorigin)."""
        return address if "@" in address else f"{address}@{self.config.myhostname}"




@dataclass
class _State:
    result: Expansion
    seen: set
    limit: int
    steps: int = 0
    files: set = field(default_factory=set)  # .forward and include files already read
    decided: int = 0  # destinations decided (kept, duplicate or failed)
    over: bool = False  # past EXPANSION_LIMIT or VISIT_LIMIT: the recipient bounces
    halted: bool = False  # a temporary failure (a read timed out): the recipient defers whole
    budget: int = EXPANSION_BYTES  # bytes of .forward and include files still to read

    deadline: float = 0.0  # time.monotonic() past which no file is read

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def spend(self, found: UserFile) -> None:
        self.budget = max(0, self.budget - len((found.text or "").encode()))

    def step(self, what: str) -> bool:
        """Count one address or item examined (not a destination: a bound on the work of an
        alias graph whose paths end at the same few destinations); False once over."""
        self.steps += 1
        if self.steps > VISIT_LIMIT:
            self.over = True
        return not (self.over or self.halted)

    def first(self, key: tuple) -> bool:
        """Whether ``key`` is new (Postfix's duplicate filter, bounded by its limit; 0 is no
        limit, as been_here's)."""
        if key in self.seen:
            return False
        if not self.limit or len(self.seen) < self.limit:
            self.seen.add(key)
        return True

    def once(self, key: tuple) -> bool:
        """Whether a .forward or include file is met for the first time: always remembered,
        whatever duplicate_filter_limit says (a .forward naming itself, or an include file
        listed many times, is read once)."""
        if key in self.files:
            return False
        self.files.add(key)
        return True

    def add(self, key: tuple, target: Target) -> None:
        """One destination decided: kept when new (a duplicate is delivered once)."""
        self.decided += 1
        if self.first(key):
            self.result.targets.append(target)
            self._count()

    def fail(self, what: str, error: MailboxError) -> None:
        """A destination that failed; a temporary failure stops the expansion (nothing of
        this recipient is delivered before a retry: no more files to read or time to wait)."""
        self.halted = self.halted or error.transient
        self.decided += 1
        self.result.failures.append((what, error))
        self._count()

    def _count(self) -> None:
        """The final destinations (kept or failed) are at most EXPANSION_LIMIT."""
        if len(self.result.targets) + len(self.result.failures) > EXPANSION_LIMIT:
            self.over = True


def _too_large(limit: int) -> str:
    """Why a .forward or include file is not used: longer than one file may be, or than
    what is left of the recipient's byte budget (EXPANSION_BYTES)."""
    if limit >= INCLUDE_LIMIT:
        return f"more than {INCLUDE_LIMIT} bytes"
    return (f"more than the {limit} bytes left of {EXPANSION_BYTES} bytes of .forward and "
            "include files")


def _classes(value: tuple[str, ...]) -> frozenset[str]:
    return frozenset(v.strip().lower() for v in value)


def _rights(entry: pwd.struct_passwd) -> Rights:
    return Rights(entry.pw_uid, entry.pw_gid, entry.pw_name, entry.pw_dir or "/")


def _own_file(found: UserFile) -> bool:
    """Whether Tern may act on a file's text: as root always (it takes the file's rights);
    otherwise only for its own or root's files, as everything then runs as Tern's own user
    (a user's .forward command must never get Tern's identity)."""
    euid = os.geteuid()
    return euid == 0 or found.uid in (0, euid)


def _forward_problem(found: UserFile, uid: int) -> str:
    """Why a .forward file is ignored ("" when it is used): not a regular file, an owner
    other than the user or root, world-writable (local(8)'s checks), or not Tern's own
    when Tern is not root."""
    if found.text is None:
        return "is not a regular file"
    if found.uid not in (0, uid):
        return f"has bad owner uid {found.uid}"
    if found.mode & stat.S_IWOTH:
        return "is world writable"
    if not _own_file(found):
        return (f"has owner uid {found.uid}, and Tern, not root, cannot take its rights")
    return ""


def _safe_extension(extension: str) -> bool:
    """Whether an address extension may name a .forward file: no "/" or leading "." (it
    would leave the home directory or name a hidden file), only forward_expansion_filter's
    characters (Postfix's default)."""
    return (not extension.startswith(".") and "/" not in extension and ".." not in extension
            and all(c in _FORWARD_FILTER for c in extension))


_FORWARD_FILTER = frozenset("1234567890!@%-_=+:,./abcdefghijklmnopqrstuvwxyz"
                            "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
