"""Type stub of the compiled twin of engine.smtp.grammar (built as engine._compiled.grammar)."""

from engine.smtp.grammar import ENVID_LENGTH_LIMIT as ENVID_LENGTH_LIMIT
from engine.smtp.grammar import MAILBOX as MAILBOX
from engine.smtp.grammar import ORCPT as ORCPT
from engine.smtp.grammar import ORCPT_LENGTH_LIMIT as ORCPT_LENGTH_LIMIT
from engine.smtp.grammar import ORCPT_UTF8 as ORCPT_UTF8
from engine.smtp.grammar import XTEXT as XTEXT
from engine.smtp.grammar import GrammarError as GrammarError
from engine.smtp.grammar import Params as Params
from engine.smtp.grammar import domain_of as domain_of
from engine.smtp.grammar import dsn_envid as dsn_envid
from engine.smtp.grammar import dsn_notify as dsn_notify
from engine.smtp.grammar import dsn_orcpt as dsn_orcpt
from engine.smtp.grammar import dsn_ret as dsn_ret
from engine.smtp.grammar import xtext_decode as xtext_decode
from engine.smtp.replies import Reply

def split_command(line: bytes) -> tuple[str, str]: ...
def parse_path(arg: str, prefix: str, syntax: Reply) -> tuple[str, str]: ...
def check_mailbox(address: str, bad_address: Reply, *,
                  allow_bare: frozenset[str] = ...) -> str: ...
def parse_params(params: str) -> Params: ...
def parse_mail_from(arg: str) -> tuple[str, Params]: ...
def parse_rcpt_to(arg: str) -> tuple[str, Params]: ...
