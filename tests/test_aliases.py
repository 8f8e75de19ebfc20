"""engine.delivery.aliases: aliases(5) files, .forward and :include: expansion as Postfix's
local(8) does it, with real files in tmp_path and a passwd stand-in."""

import gc
import json
import os
import pwd

import pytest

from engine.config import Config
from engine.delivery import aliases, userfile
from engine.delivery.aliases import AliasTable, Expander, Rights, Target, split_values
from engine.delivery.local import _privs as local_privs
from engine.delivery.mailbox import MailboxError
from engine.tables import TableError

ROOT = os.geteuid() == 0
ME = pwd.getpwuid(os.getuid())


@pytest.fixture(autouse=True)
def fresh_tables():
    aliases.alias_tables.cache_clear()  # each test writes its own alias file
    yield
    aliases.alias_tables.cache_clear()


def entry(name, uid, home):
    return pwd.struct_passwd((name, "x", uid, uid, "", str(home), "/bin/sh"))


@pytest.fixture
def users(tmp_path):
    """bob, carol and dave, with homes under tmp_path and this process's uid (so that their
    .forward files, written by this process, are theirs)."""
    table = {}
    for name in ("bob", "carol", "dave"):
        home = tmp_path / "home" / name
        home.mkdir(parents=True)
        table[name] = entry(name, os.getuid(), home)
    return table


def traversable(path):
    """Let other users reach files under ``path`` (pytest's directories are 0700): a
    .forward or include file is opened with its user's rights."""
    for directory in (path, *path.parents):
        if str(directory) in ("/", "/tmp"):
            break
        directory.chmod(0o755)


def expander(tmp_path, users, text="", **settings):
    path = tmp_path / "aliases"
    path.write_text(text)
    config = Config(myhostname="mx.test", recipient_delimiter="+",
                    alias_maps=(f"texthash:{path}",), **settings)
    return Expander(config, getpwnam=lambda name: users[name])


def kinds(expansion):
    return [(t.kind, t.value) for t in expansion.targets]


def failures(expansion):
    return [(what, error.dsn, error.text) for what, error in expansion.failures]


# -- parsing ---------------------------------------------------------------------------------

def test_split_values_commas_lines_quotes_and_comments():
    assert split_values('bob, "|/usr/bin/x -a, -b", /var/log/mail\n# no\ncarol ,, dave\n') == [
        "bob", "|/usr/bin/x -a, -b", "/var/log/mail", "carol", "dave"]
    assert split_values("") == [] and split_values("  \n# only\n") == []


def test_alias_file_format(tmp_path):
    path = tmp_path / "aliases"
    path.write_text('# comment\nPostmaster: root\nteam: bob,\n  carol\n\t, dave\n'
                    '"odd name": bob\npostmaster: ignored\n')
    table = AliasTable(f"texthash:{path}", str(path))
    assert table.get("postmaster") == "root"  # names case-folded, the first entry wins
    assert table.get("team") == "bob, carol , dave"
    assert table.get("odd name") == "bob"
    assert table.owner == os.stat(path).st_uid
    assert AliasTable("texthash:/nonexistent", "/nonexistent").get("postmaster") is None
    path.write_text("fine: x\nbroken line\n")
    with pytest.raises(TableError, match=r"aliases:2: expected \"name: value\""):
        AliasTable(f"texthash:{path}", str(path))


# -- aliases ---------------------------------------------------------------------------------

def test_alias_to_local_users_and_a_remote_address(tmp_path, users):
    ex = expander(tmp_path, users, "team: bob, Carol@MX.test, x@remote.test, dave@localhost\n")
    result = ex.expand("team@mx.test")
    assert kinds(result) == [("mailbox", "bob"), ("mailbox", "carol"),
                             ("forward", "x@remote.test"), ("mailbox", "dave")]
    assert {t.source for t in result.targets} == {"alias"}
    assert {t.parent for t in result.targets} == {"team@mx.test"}
    assert result.failures == [] and result.sender is None


def test_a_user_without_alias_is_the_mailbox(tmp_path, users):
    result = expander(tmp_path, users).expand("bob@mx.test")
    assert result.targets == [Target("mailbox", "bob", Rights(os.getuid(), os.getuid(), "bob",
                                                              users["bob"].pw_dir))]


def test_an_alias_naming_itself_means_the_mailbox(tmp_path, users):
    ex = expander(tmp_path, users, 'bob: bob, "|/usr/bin/vacation bob"\n')
    assert kinds(ex.expand("bob@mx.test")) == [("mailbox", "bob"),
                                              ("command", "/usr/bin/vacation bob")]


def test_extension_alias_first_then_the_plain_name(tmp_path, users):
    ex = expander(tmp_path, users, "bob+lists: carol\nbob: dave\n")
    assert kinds(ex.expand("bob+lists@mx.test")) == [("mailbox", "carol")]
    assert kinds(ex.expand("bob+other@mx.test")) == [("mailbox", "dave")]


def test_unknown_user_bounces_the_recipient_or_only_that_destination(tmp_path, users):
    ex = expander(tmp_path, users, "team: bob, ghost\n")
    with pytest.raises(MailboxError) as caught:
        ex.expand("ghost@mx.test")
    assert (caught.value.dsn, caught.value.text) == ("5.1.1", 'unknown user: "ghost"')
    result = ex.expand("team@mx.test")
    assert kinds(result) == [("mailbox", "bob")]
    assert failures(result) == [("ghost@mx.test", "5.1.1", 'unknown user: "ghost"')]


def test_alias_loop_bounces_5_4_6(tmp_path, users):
    result = expander(tmp_path, users, "a: b\nb: a\n").expand("a@mx.test")
    assert result.targets == []
    assert [(dsn, text.split(" for ")[0]) for _, dsn, text in failures(result)] == [
        ("5.4.6", "alias database loop")]


def test_fan_out_is_bounded(tmp_path, users):
    """Ten-fold at each of six levels: a million paths to one mailbox, far from the nesting
    limit; the work bound ends it and the recipient bounces whole (a retry would expand it
    the same way)."""
    text = "".join(f"l{i}: {', '.join([f'l{i + 1}'] * 10)}\n" for i in range(6)) + "l6: bob\n"
    with pytest.raises(MailboxError) as error:
        expander(tmp_path, users, text).expand("l0@mx.test")
    assert (error.value.dsn, error.value.text) == (
        "5.3.5", "unreasonable alias expansion size for l0@mx.test (more than "
                 f"{aliases.EXPANSION_LIMIT} destinations)")


def test_the_expansion_limit_counts_final_destinations(tmp_path, users):
    """EXPANSION_LIMIT destinations pass (an address is one, not one per step); one more
    bounces the recipient before anything is delivered."""
    limit = aliases.EXPANSION_LIMIT
    many = ", ".join(f"m{i}@remote.test" for i in range(limit))
    result = expander(tmp_path, users, f"list: {many}\n").expand("list@mx.test")
    assert (len(result.targets), result.failures) == (limit, [])
    aliases.alias_tables.cache_clear()
    with pytest.raises(MailboxError) as error:
        expander(tmp_path, users, f"list: {many}, one@more.test\n").expand("list@mx.test")
    assert error.value.dsn == "5.3.5"


def test_duplicates_are_delivered_once_up_to_the_filter_limit(tmp_path, users):
    text = "team: bob, bob@mx.test, BOB, x@remote.test, X@remote.test, /tmp/f, /tmp/f\n"
    assert kinds(expander(tmp_path, users, text).expand("team@mx.test")) == [
        ("mailbox", "bob"), ("forward", "x@remote.test"), ("file", "/tmp/f")]
    unlimited = expander(tmp_path, users, text, duplicate_filter_limit=0)  # been_here: 0 = no limit
    assert len(unlimited.expand("team@mx.test").targets) == 3
    one = expander(tmp_path, users, text, duplicate_filter_limit=1)  # only bob remembered
    assert len(one.expand("team@mx.test").targets) == 5


def test_forward_files_are_read_once_whatever_the_filter_limit(tmp_path, users):
    """bob's .forward names carol, carol's names bob: the second visit of bob's .forward is
    his mailbox, also when the duplicate filter remembers almost nothing."""
    forward(users, "bob", "carol\n")
    forward(users, "carol", "bob\n")
    for limit in (1000, 1, 0):
        result = expander(tmp_path, users, duplicate_filter_limit=limit).expand("bob@mx.test")
        assert (kinds(result), failures(result)) == ([("mailbox", "bob")], []), limit


def test_owner_alias_becomes_the_sender(tmp_path, users):
    ex = expander(tmp_path, users, "list: x@remote.test\nowner-list: bob\n")
    assert ex.expand("list@mx.test").sender == "owner-list@mx.test"


def test_commands_and_files_of_a_root_owned_alias_file_get_default_privs(tmp_path, users):
    """The table owner's rights (root's for a root-owned table); uid and gid 0 become
    default_privs' when a command runs or a file is written (local(8)'s command.c, file.c)."""
    text = 'run: "|/bin/true"\nsave: /var/tmp/saved, /var/tmp/box/\n'
    ex = expander(tmp_path, users, text, default_privs="daemon")
    (command,) = ex.expand("run@mx.test").targets
    owner = pwd.getpwuid(os.stat(tmp_path / "aliases").st_uid)
    assert (command.kind, command.value, command.rights.uid, command.rights.name) == (
        "command", "/bin/true", owner.pw_uid, owner.pw_name)
    assert [(t.kind, t.value, t.rights.uid) for t in ex.expand("save@mx.test").targets] == [
        ("file", "/var/tmp/saved", owner.pw_uid), ("file", "/var/tmp/box/", owner.pw_uid)]
    who = pwd.getpwnam("daemon") if owner.pw_uid == 0 else owner
    privs = local_privs(command.rights, ex.config)
    assert (privs.uid, privs.name) == (who.pw_uid, who.pw_name)
    assert local_privs(Rights(1234, 0, "u", "/"), ex.config).gid == pwd.getpwnam("daemon").pw_gid


@pytest.mark.skipif(not ROOT, reason="needs root to give the file to another owner")
def test_an_alias_file_owned_by_a_user_runs_as_that_user(tmp_path, users):
    path = tmp_path / "aliases"
    ex = expander(tmp_path, users, 'run: "|/bin/true"\n')
    nobody = pwd.getpwnam("nobody")
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    aliases.alias_tables.cache_clear()
    ex = Expander(ex.config, getpwnam=ex.getpwnam)
    assert ex.expand("run@mx.test").targets[0].rights.uid == nobody.pw_uid


def test_restricted_commands_and_files_bounce_5_7_1(tmp_path, users):
    ex = expander(tmp_path, users, 'run: "|/bin/true", /tmp/x, bob\n',
                  allow_mail_to_commands=("forward",), allow_mail_to_files=())
    result = ex.expand("run@mx.test")
    assert kinds(result) == [("mailbox", "bob")]
    assert failures(result) == [("|/bin/true", "5.7.1", "mail to command is restricted"),
                                ("/tmp/x", "5.7.1", "mail to file is restricted")]


# -- :include: ---------------------------------------------------------------------------------

def test_include_file_lists_destinations_with_its_own_restrictions(tmp_path, users):
    members = tmp_path / "members"
    members.write_text("bob\ncarol, y@remote.test\n|/usr/bin/archive\n")
    ex = expander(tmp_path, users, f"list: :include:{members}\n")
    result = ex.expand("list@mx.test")
    assert kinds(result) == [("mailbox", "bob"), ("mailbox", "carol"),
                             ("forward", "y@remote.test")]
    assert failures(result) == [("|/usr/bin/archive", "5.7.1", "mail to command is restricted")]
    allowed = expander(tmp_path, users, f"list: :include:{members}\n",
                       allow_mail_to_commands=("alias", "forward", "include"))
    (command,) = [t for t in allowed.expand("list@mx.test").targets if t.kind == "command"]
    assert (command.value, command.source) == ("/usr/bin/archive", "include")


def test_missing_include_file_bounces_that_destination(tmp_path, users):
    result = expander(tmp_path, users, f"list: bob, :include:{tmp_path}/gone\n").expand(
        "list@mx.test")
    assert kinds(result) == [("mailbox", "bob")]
    assert failures(result) == [(f"{tmp_path}/gone", "5.3.5",
                                 f"unable to lookup include file {tmp_path}/gone: No such file "
                                 "or directory")]


# -- .forward --------------------------------------------------------------------------------

def forward(users, name, text, mode=0o644, suffix=""):
    path = os.path.join(users[name].pw_dir, ".forward" + suffix)
    with open(path, "w") as out:
        out.write(text)
    os.chmod(path, mode)
    return path


def test_forward_file_redirects_the_user(tmp_path, users):
    forward(users, "bob", "\\bob, bob@elsewhere.test\n# a comment\ncarol\n")
    result = expander(tmp_path, users).expand("bob@mx.test")
    assert kinds(result) == [("mailbox", "bob"), ("forward", "bob@elsewhere.test"),
                             ("mailbox", "carol")]
    assert {t.source for t in result.targets} == {"forward"}


def test_forward_naming_the_user_again_is_the_mailbox(tmp_path, users):
    forward(users, "bob", 'bob, "|/usr/bin/procmail"\n')
    result = expander(tmp_path, users).expand("bob@mx.test")
    assert kinds(result) == [("mailbox", "bob"), ("command", "/usr/bin/procmail")]
    assert result.targets[1].rights.name == "bob"  # a .forward runs as its user


def test_forward_with_extension_first(tmp_path, users):
    forward(users, "bob", "carol\n")
    forward(users, "bob", "dave\n", suffix="+lists")
    ex = expander(tmp_path, users)
    assert kinds(ex.expand("bob+lists@mx.test")) == [("mailbox", "dave")]
    assert kinds(ex.expand("bob+misc@mx.test")) == [("mailbox", "carol")]
    assert kinds(ex.expand("bob@mx.test")) == [("mailbox", "carol")]


def test_world_writable_or_odd_forward_files_are_ignored(tmp_path, users):
    forward(users, "bob", "x@elsewhere.test\n", mode=0o666)
    assert kinds(expander(tmp_path, users).expand("bob@mx.test")) == [("mailbox", "bob")]
    path = forward(users, "bob", "x@elsewhere.test\n")
    os.unlink(path)
    os.symlink(tmp_path / "aliases", path)  # not a regular file
    assert kinds(expander(tmp_path, users).expand("bob@mx.test")) == [("mailbox", "bob")]


@pytest.mark.skipif(not ROOT, reason="needs root to give the file to another owner")
def test_forward_owned_by_someone_else_is_ignored(tmp_path, users):
    path = forward(users, "bob", "x@elsewhere.test\n")
    traversable(tmp_path)
    os.chown(path, 12345, 12345)
    assert kinds(expander(tmp_path, users).expand("bob@mx.test")) == [("mailbox", "bob")]
    users["bob"] = entry("bob", 12345, users["bob"].pw_dir)
    assert kinds(expander(tmp_path, users).expand("bob@mx.test")) == [
        ("forward", "x@elsewhere.test")]


def test_alias_then_the_users_forward(tmp_path, users):
    forward(users, "carol", "c@elsewhere.test\n")
    result = expander(tmp_path, users, "team: bob, carol\n").expand("team@mx.test")
    assert kinds(result) == [("mailbox", "bob"), ("forward", "c@elsewhere.test")]


@pytest.mark.skipif(not ROOT, reason="needs root to read as another user")
def test_forward_and_include_files_are_read_with_the_users_rights(tmp_path, users):
    """A user's .forward naming a root-only file: opened as the user, it is refused (its text
    would otherwise come back as addresses, and in a bounce)."""
    secret = tmp_path / "secret"
    secret.write_text("topsecret@leak.test\n")
    secret.chmod(0o600)
    traversable(tmp_path)
    users["bob"] = entry("bob", 12345, users["bob"].pw_dir)
    os.chown(forward(users, "bob", f":include:{secret}\n"), 12345, 12345)
    result = expander(tmp_path, users).expand("bob@mx.test")
    assert kinds(result) == []
    assert failures(result) == [(str(secret), "5.3.5", f"unable to lookup include file "
                                                       f"{secret}: Permission denied")]
    os.chown(secret, 12345, 12345)  # the user's own file: read
    assert kinds(expander(tmp_path, users).expand("bob@mx.test")) == [
        ("forward", "topsecret@leak.test")]


def test_an_extension_never_leaves_the_home_directory(tmp_path, users):
    """``user+etc/secret``: .forward+etc a link to another directory, whose root-owned file
    would be read as a .forward; an extension with "/" or a leading "." names no file."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret").write_text("x@leak.test\n")
    os.symlink(elsewhere, os.path.join(users["bob"].pw_dir, ".forward+etc"))
    forward(users, "bob", "carol\n", suffix="+..hidden")
    ex = expander(tmp_path, users)
    assert kinds(ex.expand("bob+etc/secret@mx.test")) == [("mailbox", "bob")]
    assert kinds(ex.expand("bob+..hidden@mx.test")) == [("mailbox", "bob")]
    forward(users, "bob", "dave\n", suffix="+ok")
    assert kinds(ex.expand("bob+ok@mx.test")) == [("mailbox", "dave")]


def test_each_include_file_is_read_once_and_all_reads_are_bounded(tmp_path, users, monkeypatch):
    """include.c's been_here: the same file (with the same rights) listed 200 times is read
    once; and all .forward and include files of one recipient share one byte budget."""
    reads = []
    real = aliases.read_as
    monkeypatch.setattr(aliases, "read_as", lambda path, *a, **k: reads.append(path) or
                        real(path, *a, **k))
    members = tmp_path / "members"
    members.write_text("bob\n")
    text = "list: " + ", ".join([f":include:{members}"] * 200) + "\n"
    result = expander(tmp_path, users, text).expand("list@mx.test")
    assert (kinds(result), failures(result)) == ([("mailbox", "bob")], [])
    assert reads.count(str(members)) == 1
    (tmp_path / "more").write_text("carol\n")
    monkeypatch.setattr(aliases, "EXPANSION_BYTES", len("bob\n"))
    aliases.alias_tables.cache_clear()
    result = expander(tmp_path, users, f"list: :include:{members}, :include:{tmp_path}/more\n"
                      ).expand("list@mx.test")
    assert kinds(result) == [("mailbox", "bob")]
    assert failures(result) == [(f"{tmp_path}/more", "5.3.5", f"include file {tmp_path}/more: "
                                 "more than 4 bytes of include files")]


def test_a_fifo_include_or_forward_never_blocks(tmp_path, users):
    """Opened non-blocking and checked on the open descriptor: a FIFO is refused at once
    (a blocking open would wait for a writer forever)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result = expander(tmp_path, users, f"list: :include:{fifo}\n").expand("list@mx.test")
    assert failures(result) == [(str(fifo), "5.3.5", f"not a regular include file: {fifo}")]
    aliases.alias_tables.cache_clear()
    os.mkfifo(os.path.join(users["bob"].pw_dir, ".forward"))
    assert kinds(expander(tmp_path, users).expand("bob@mx.test")) == [("mailbox", "bob")]


def expand_as(uid, ex, recipient):
    """``ex.expand(recipient)`` in a forked child running as ``uid`` (Tern not root): its
    kinds, failures and warnings."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            result = ex.expand(recipient)
            os.write(write_fd, json.dumps([kinds(result), failures(result),
                                           result.warnings]).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return [[tuple(x) for x in part] if i < 2 else part
            for i, part in enumerate(json.loads(data))]


@pytest.mark.skipif(not ROOT, reason="needs root to run a child as another user")
def test_without_root_other_users_forward_and_include_files_are_refused(tmp_path, users):
    """Tern not root cannot take a user's rights: a .forward or include file that is not
    its own (or root's) is ignored with a warning / bounced, never run as Tern's user."""
    tern = pwd.getpwnam("nobody").pw_uid
    traversable(tmp_path)
    users["bob"] = entry("bob", 12345, users["bob"].pw_dir)
    path = forward(users, "bob", '"|/bin/true", x@elsewhere.test\n')
    os.chown(path, 12345, 12345)
    members = tmp_path / "members"
    members.write_text("carol\n")
    os.chown(members, 12345, 12345)
    ex = expander(tmp_path, users, f"list: :include:{members}\n",
                  allow_mail_to_commands=("forward",))
    assert expand_as(tern, ex, "bob@mx.test") == [
        [("mailbox", "bob")], [],
        [f"file {path} has owner uid 12345, and Tern, not root, cannot take its rights"]]
    assert expand_as(tern, ex, "list@mx.test") == [
        [], [(str(members), "5.3.5", "mail system configuration error")],
        [f":include: file {members} has owner uid 12345, and Tern, not root, cannot take "
         "its rights"]]
    users["bob"] = entry("bob", tern, users["bob"].pw_dir)
    os.chown(path, tern, tern)  # Tern's own user's .forward: used
    assert expand_as(tern, ex, "bob@mx.test")[0] == [("command", "/bin/true"),
                                                     ("forward", "x@elsewhere.test")]


@pytest.mark.skipif(not ROOT, reason="needs root to give files to other owners")
def test_include_rights_come_from_the_open_file_and_only_replace_roots(tmp_path, users):
    """include.c: the owner's rights only when the current ones are root's (a root-owned
    alias); a user's .forward including someone else's file keeps the user's rights; a
    world-writable include file bounces 5.3.5."""
    traversable(tmp_path)
    nobody = pwd.getpwnam("nobody")
    members = tmp_path / "members"
    members.write_text('"|/bin/true"\n')
    os.chown(members, nobody.pw_uid, nobody.pw_gid)
    ex = expander(tmp_path, users, f"list: :include:{members}\n",
                  allow_mail_to_commands=("alias", "forward", "include"))
    (command,) = ex.expand("list@mx.test").targets
    assert command.rights.uid == nobody.pw_uid  # the root-owned alias: the file's owner
    users["bob"] = entry("bob", 12345, users["bob"].pw_dir)
    os.chown(forward(users, "bob", f":include:{members}\n"), 12345, 12345)
    (command,) = ex.expand("bob@mx.test").targets
    assert command.rights.uid == 12345  # bob's .forward: bob's rights, not the file owner's
    members.chmod(0o666)
    assert failures(ex.expand("list@mx.test")) == [
        (str(members), "5.3.5", "mail system configuration error")]


def test_a_forward_naming_no_destination_leaves_the_mailbox(tmp_path, users):
    """dotforward.c: no address in the .forward (here an include file without one) means
    the user's own mailbox, not a message delivered nowhere; a .forward whose destinations
    were all delivered already still counts as naming them."""
    empty = tmp_path / "empty"
    empty.write_text("# nobody yet\n")
    forward(users, "bob", f":include:{empty}\n")
    assert kinds(expander(tmp_path, users).expand("bob@mx.test")) == [("mailbox", "bob")]
    forward(users, "carol", "dave\n")
    aliases.alias_tables.cache_clear()
    assert kinds(expander(tmp_path, users, "team: dave, carol\n").expand("team@mx.test")) == [
        ("mailbox", "dave")]


@pytest.mark.skipif(not ROOT, reason="needs root to read as another user")
def test_file_reads_share_one_time_limit_and_defer_past_it(tmp_path, users, monkeypatch):
    """A user can stop the child reading its file: all reads of one recipient share
    EXPANSION_TIME; past it the recipient defers (no .forward, no mailbox copy now)."""
    traversable(tmp_path)
    users["bob"] = entry("bob", 12345, users["bob"].pw_dir)
    path = forward(users, "bob", "carol\n")
    os.chown(path, 12345, 12345)
    monkeypatch.setattr(aliases, "EXPANSION_TIME", 0.0)
    result = expander(tmp_path, users).expand("bob@mx.test")
    assert (kinds(result), failures(result)) == (
        [], [(path, "4.3.0", f"file {path}: read timed out")])


def test_a_file_over_the_byte_limit_fails_whole_never_cut(tmp_path, users, monkeypatch):
    """An include or .forward file longer than INCLUDE_LIMIT (or than what is left of the
    recipient's byte budget) is never parsed cut: ``alice@example.com`` at the cut would be
    forwarded to ``alice@exampl``. An include bounces 5.3.5, a .forward defers 4.3.0 (the
    mailbox does not get it either); another user's files cannot choose where it is cut."""
    monkeypatch.setattr(aliases, "INCLUDE_LIMIT", 64)
    big = tmp_path / "big"
    big.write_text("#" * (64 - 13) + "\nalice@example.com\n")
    result = expander(tmp_path, users, f"list: :include:{big}\n").expand("list@mx.test")
    assert (kinds(result), failures(result)) == (
        [], [(str(big), "5.3.5", f"include file {big}: more than 64 bytes")])
    path = forward(users, "bob", "#" * 60 + "\ncarol@example.com\n")
    result = expander(tmp_path, users).expand("bob@mx.test")
    assert (kinds(result), failures(result)) == (
        [], [(path, "4.3.0", f"file {path}: more than 64 bytes")])
    # carol's include files use up the budget but for 12 bytes: dave's .forward is not
    # read as "dave@example" (nor as empty, which would mean his mailbox)
    # (sizes from the paths' lengths: the temporary directory's name varies)
    monkeypatch.setattr(aliases, "INCLUDE_LIMIT", 4096)
    pad = tmp_path / "pad"
    pad.write_text("#" * 20 + "\n")
    carol_forward = f":include:{pad}\n"
    budget = len(carol_forward) + 21 + 12
    monkeypatch.setattr(aliases, "EXPANSION_BYTES", budget)
    forward(users, "carol", carol_forward)
    dave = forward(users, "dave", "dave@example.com\n")
    aliases.alias_tables.cache_clear()
    result = expander(tmp_path, users, "staff: carol, dave\n").expand("staff@mx.test")
    assert (kinds(result), failures(result)) == (
        [("mailbox", "carol")],
        [(dave, "4.3.0", f"file {dave}: more than the 12 bytes left of {budget} bytes of "
                         ".forward and include files")])
    os.truncate(dave, 0)  # an empty .forward still fits a used-up budget: the mailbox
    assert kinds(expander(tmp_path, users, "staff: carol, dave\n").expand("staff@mx.test")
                 ) == [("mailbox", "carol"), ("mailbox", "dave")]


def open_fds():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not ROOT, reason="needs root to read as another user (in a child)")
def test_a_failure_of_the_reading_machinery_defers_and_is_never_no_forward(
        tmp_path, users, monkeypatch):
    """A fork that fails (EAGAIN), no pipe (EMFILE) or a reading child that dies without a
    report (EIO) is no answer about the .forward: taken as "no .forward" the mail would go
    to the mailbox, skipping the user's forward. The recipient defers 4.3.0, an include
    defers too, and a failed fork leaves no pipe end open. Only an absent file (ENOENT,
    ENOTDIR, ELOOP, EACCES) moves on to the next forward_path file."""
    traversable(tmp_path)
    users["bob"] = entry("bob", 12345, users["bob"].pw_dir)
    path = forward(users, "bob", "carol\n")
    os.chown(path, 12345, 12345)
    ex = expander(tmp_path, users)
    assert kinds(ex.expand("bob@mx.test")) == [("mailbox", "carol")]

    def no_fork():
        raise BlockingIOError(11, "Resource temporarily unavailable")

    def no_pipe():
        raise OSError(24, "Too many open files")

    def dies(groups):  # in the child: it exits before any report
        raise PermissionError(1, "Operation not permitted")

    before = open_fds()
    for name, fake, why in (("fork", no_fork, "Resource temporarily unavailable"),
                            ("pipe", no_pipe, "Too many open files"),
                            ("setgroups", dies, os.strerror(5))):
        with monkeypatch.context() as patch:
            patch.setattr(os, name, fake)
            result = ex.expand("bob@mx.test")
        assert (kinds(result), failures(result)) == ([], [(path, "4.3.0", f"file {path}: {why}")])
    assert open_fds() == before
    members = tmp_path / "members"
    members.write_text("dave\n")
    os.chown(members, 12345, 12345)
    os.chown(forward(users, "bob", f":include:{members}\n"), 12345, 12345)
    real_fork, forks = os.fork, []

    def second_fails():  # the .forward is read, its include file's fork fails
        forks.append(1)
        return no_fork() if len(forks) > 1 else real_fork()

    monkeypatch.setattr(os, "fork", second_fails)
    result = ex.expand("bob@mx.test")
    assert (kinds(result), failures(result)) == ([], [
        (str(members), "4.3.0",
         f"unable to lookup include file {members}: Resource temporarily unavailable")])


@pytest.mark.skipif(not ROOT, reason="needs root to read as another user (in a child)")
def test_no_time_left_is_a_timeout_without_a_fork(tmp_path, monkeypatch):
    """With the recipient's time used up, a read fails as a timeout at once: no child is
    forked only to be killed (200 reads, 200 forks, before)."""
    path = tmp_path / "file"
    path.write_text("x\n")
    traversable(tmp_path)
    forks = []
    real = os.fork
    monkeypatch.setattr(os, "fork", lambda: forks.append(1) or real())
    for limit in (0.0, -1.0):
        with pytest.raises(TimeoutError):
            userfile.read_as(str(path), 12345, 12345, follow=True, limit=100, time_limit=limit)
    assert forks == []
    assert userfile.read_as(str(path), 12345, 12345, follow=True, limit=100).text == "x\n"
    assert forks == [1]


@pytest.mark.skipif(not ROOT, reason="needs root to read as another user (in a child)")
def test_the_reading_child_runs_no_garbage_collection(tmp_path, monkeypatch):
    """The forked reader is a copy of a threaded process: the collector is off in it before
    anything else (a finalizer could wait for a lock held by a thread that is not there)."""
    path = tmp_path / "file"
    path.write_text("x\n")
    traversable(tmp_path)
    seen = tmp_path / "gc"
    real = os.setgroups

    def setgroups(groups):  # runs in the child, as its first system call
        seen.write_text(str(gc.isenabled()))
        real(groups)

    monkeypatch.setattr(os, "setgroups", setgroups)
    assert userfile.read_as(str(path), 12345, 12345, follow=True, limit=100).text == "x\n"
    assert seen.read_text() == "False"
    assert gc.isenabled()  # the caller's collector untouched
