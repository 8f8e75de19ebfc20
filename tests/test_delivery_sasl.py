"""engine.delivery.sasl: where smtp_sasl_password_maps finds a next hop's credentials (Postfix's
order), which settings go with them, and the connection cache key they give."""

import asyncio

from engine.config import Config
from engine.delivery import NextHop
from engine.delivery.sasl import DeliveryAuth, for_delivery, nexthop_as_written

TABLE = ("inline:{ alice@one.example=alice:a-pw, @one.example=one:o-pw, "
         "mx1.example.com=mx1:m-pw, example.com=dom:d-pw, [relay.example]:587=relay:r-pw, "
         "relay.example=bare:b-pw, nopass.example=justuser }")
MX = NextHop("smtp", "example.com", 25, True)
RELAY = NextHop("smtp", "relay.example", 587, False)


def config(**settings) -> Config:
    return Config(smtp_sasl_auth_enable=True, smtp_sasl_password_maps=TABLE, **settings)


def login(cfg: Config, sender: str, host: str, hop: NextHop):
    async def run():
        auth = await for_delivery(cfg, sender)
        return auth, await auth.login(host, hop)

    auth, found = asyncio.run(run())
    return auth, (found.username, found.password) if found else None


def test_host_name_first_then_the_next_hop_as_written():
    cfg = config()
    assert login(cfg, "alice@one.example", "mx1.example.com", MX)[1] == ("mx1", "m-pw")
    assert login(cfg, "alice@one.example", "mx2.example.com", MX)[1] == ("dom", "d-pw")
    assert login(cfg, "", "Relay.Example", RELAY)[1] == ("bare", "b-pw")  # the server's name
    assert login(cfg, "", "other.example", RELAY)[1] == ("relay", "r-pw")  # "[relay]:587"
    assert login(cfg, "", "other.example", NextHop("smtp", "x.example", 25, False))[1] is None
    assert login(cfg, "", "nopass.example", MX)[1] == ("justuser", "")  # as Postfix


def test_sender_first_with_sender_dependent_authentication():
    cfg = config(smtp_sender_dependent_authentication=True)
    auth, found = login(cfg, "Alice@One.Example", "mx1.example.com", MX)
    assert found == ("alice", "a-pw")
    assert auth.cache_key(MX.destination) == MX.destination + "\0sasl=alice"
    auth, found = login(cfg, "bob@one.example", "mx1.example.com", MX)  # then "@domain"
    assert found == ("one", "o-pw") and auth.cache_key("d") == "d\0sasl=one"
    auth, found = login(cfg, "bob@two.example", "mx1.example.com", MX)  # then the server's
    assert found == ("mx1", "m-pw") and auth.cache_key("d") == "d"
    assert login(cfg, "", "mx1.example.com", MX)[1] == ("mx1", "m-pw")  # null sender: none
    # without the setting, the sender is not looked up
    assert login(config(), "alice@one.example", "mx1.example.com", MX)[1] == ("mx1", "m-pw")


def test_nothing_without_smtp_sasl_auth_enable():
    cfg = Config(smtp_sasl_password_maps=TABLE, smtp_sender_dependent_authentication=True)
    auth, found = login(cfg, "alice@one.example", "mx1.example.com", MX)
    assert found is None and auth == DeliveryAuth(cfg)


def test_security_settings_go_with_the_login():
    cfg = config(smtp_sasl_mechanism_filter=("LOGIN",),
                 smtp_sasl_security_options=("noanonymous",),
                 smtp_sasl_tls_security_options=("noanonymous", "noplaintext"))

    async def run():
        return await (await for_delivery(cfg, "")).login("mx1.example.com", MX)

    found = asyncio.run(run())
    assert found.mechanism_filter == ("LOGIN",)
    assert found.plaintext is True and found.under_tls is False
    default = asyncio.run(DeliveryAuth(config()).login("mx1.example.com", MX))
    assert default.plaintext is False and default.under_tls is True  # only under TLS


def test_nexthop_as_written():
    assert nexthop_as_written(RELAY) == "[relay.example]:587"
    assert nexthop_as_written(NextHop("smtp", "relay.example", 25, False)) == "[relay.example]"
    assert nexthop_as_written(MX) == "example.com"
    assert nexthop_as_written(NextHop("smtp", "example.com", 2525, True)) == "example.com:2525"
