"""MTA-STS (RFC 8461), the pure rules: TXT record, policy file, MX patterns, the cache."""

import pytest

from engine.tls.mtasts import (
    MAX_AGE_LIMIT,
    PolicyCache,
    StsError,
    StsPolicy,
    mx_matches,
    parse_policy,
    parse_txt,
    select_txt,
)

POLICY = (b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\n"
          b"max_age: 604800\r\n")


def test_txt_record_gives_the_id():
    assert parse_txt(["v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert parse_txt(["v=STSv1;id=abc"]) == "abc"


@pytest.mark.parametrize("records, fragment", [
    (["v=STSv1; id=a;", "v=STSv1; id=b;"], "found 2"),
    (["v=STSv2; id=a;"], "v=STSv1"),
    (["v=STSv1; id=has-dash;"], "bad id"),
    (["v=STSv1; id=" + "a" * 33 + ";"], "bad id"),
    (["v=STSv1;"], "no id"),
    (["v=STSv1; junk;"], "malformed field"),
])
def test_bad_txt_records(records, fragment):
    with pytest.raises(StsError, match=fragment):
        parse_txt(records)


def test_only_sts_records_are_selected():
    assert select_txt(["v=spf1 -all", "v=STSv1; id=1;"]) == ["v=STSv1; id=1;"]


def test_policy_file():
    policy = parse_policy(POLICY, "id1")
    assert policy == StsPolicy("enforce", ("mail.example.com", "*.example.net"), 604800, "id1")
    assert policy.mx_allowed("MAIL.example.com.") and policy.mx_allowed("a.example.net")
    assert not policy.mx_allowed("a.b.example.net") and not policy.mx_allowed("example.net")


def test_policy_file_with_lf_and_huge_max_age():
    policy = parse_policy(b"version: STSv1\nmode: testing\nmx: m.test\nmax_age: 9999999999\n")
    assert (policy.mode, policy.max_age) == ("testing", MAX_AGE_LIMIT)  # at most a year
    with pytest.raises(StsError):  # 1*10DIGIT: eleven digits is not a max_age
        parse_policy(b"version: STSv1\nmode: testing\nmx: m.test\nmax_age: 99999999999\n")
    assert parse_policy(b"version: STSv1\nmode: none\nmax_age: 99999999\n").max_age == \
        MAX_AGE_LIMIT


@pytest.mark.parametrize("body, fragment", [
    (POLICY.replace(b"STSv1", b"STSv2"), "version"),
    (POLICY.replace(b"enforce", b"strict"), "bad mode"),
    (POLICY.replace(b"604800", b"-1"), "bad max_age"),
    (b"version: STSv1\nmode: enforce\nmax_age: 1\n", "no mx"),
    (b"version: STSv1\nmode\n", "malformed line"),
    (b"version: STSv1\nmode: enforce\nmx: \xff\nmax_age: 1\n", "not ASCII"),
    (b"x" * 70000, "larger than 64 KiB"),
])
def test_bad_policies(body, fragment):
    with pytest.raises(StsError, match=fragment):
        parse_policy(body)


@pytest.mark.parametrize("pattern, host, matches", [
    ("mx.example.com", "mx.example.com", True),
    ("mx.example.com", "MX.Example.Com.", True),
    ("mx.example.com", "mx2.example.com", False),
    ("*.example.com", "mx.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "a.mx.example.com", False),
])
def test_mx_patterns(pattern, host, matches):
    assert mx_matches(pattern, host) is matches


def test_cache_honours_max_age_and_id():
    cache = PolicyCache()
    policy = StsPolicy("enforce", ("mx.test",), 100, "id1")
    cache.put("Example.COM", policy, now=1000.0)
    assert cache.get("example.com", 1099.0) == policy
    assert cache.get("example.com", 1050.0, txt_id="id1") == policy
    assert cache.get("example.com", 1050.0, txt_id="id2") is None  # changed: fetch again
    assert cache.get("example.com", 1100.0) is None  # expired
    assert cache.get("example.com", 1000.0) is None  # and forgotten


def test_cache_holds_a_failed_fetch_for_a_while_and_forgets_it_for_a_new_id():
    cache = PolicyCache()
    cache.failed("Example.COM", "id1", now=1000.0)
    assert cache.recently_failed("example.com", "id1", 1000.0 + PolicyCache.FAILURE_HOLD - 1)
    assert not cache.recently_failed("example.com", "id2", 1001.0)  # a new policy: fetch it
    assert not cache.recently_failed("example.com", "id1", 1000.0 + PolicyCache.FAILURE_HOLD)
    cache.put("example.com", StsPolicy("enforce", ("mx.test",), 100, "id1"), now=1001.0)
    assert not cache.recently_failed("example.com", "id1", 1002.0)  # fetched since


def test_cache_of_failures_is_bounded():
    cache = PolicyCache()
    cache.MAX_FAILURES = 3
    for n in range(10):
        cache.failed(f"d{n}.test", "id", now=1000.0)
    assert len(cache._failures) == 3
    assert cache.recently_failed("d9.test", "id", 1001.0)  # the newest is kept


def test_refresh_is_due_when_half_the_max_age_or_a_day_remains():
    cache = PolicyCache()
    cache.put("short.test", StsPolicy("enforce", ("mx.test",), 100, "id1"), now=1000.0)
    assert not cache.refresh_due("short.test", 1049.0)
    assert cache.refresh_due("short.test", 1051.0)
    year = 31557600
    cache.put("long.test", StsPolicy("enforce", ("mx.test",), year, "id1"), now=0.0)
    assert not cache.refresh_due("long.test", year - PolicyCache.REFRESH_MARGIN - 1)
    assert cache.refresh_due("long.test", year - PolicyCache.REFRESH_MARGIN + 1)
    assert not cache.refresh_due("unknown.test", 0.0)
