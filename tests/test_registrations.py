"""The registration table behind ``[message] routing=registrations``: what Yate's registrar
accepted, until it expires or is taken back."""

from __future__ import annotations

from yate_sipgen.features.registrations import MAX_EXPIRES, Registrations
from yate_sipgen.message import Message


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def key(user: str, host: str) -> str:
    return f"{user}@{'example.com' if host in ('example.com', '10.0.0.5') else host}"


def reg(user: str = "bob", host: str = "example.com", contact: str = "sip:bob@192.0.2.1:5060",
        expires: str = "300", handled: bool = True, **extra: str) -> Message:
    m = Message("user.register", {"number": user, "username": user, "sip_uri": f"sip:{host}",
                                  "data": "sip/" + contact, "expires": expires, **extra})
    m.handled = handled
    return m


def unreg(**params: str) -> Message:
    return Message("user.unregister", params)


def table() -> tuple[Registrations, Clock]:
    c = Clock()
    return Registrations(key, c), c


def test_an_accepted_registration_is_the_users_target_with_its_connection() -> None:
    r, _ = table()
    assert r.registered(reg(oconnection_id="tcp:3-a")) == ("bob@example.com", r.target("bob@example.com"))
    t = r.target("bob@example.com")
    assert t is not None and t.uri == "sip:bob@192.0.2.1:5060" and t.connection_id == "tcp:3-a"


def test_a_registration_the_registrar_refused_is_not_recorded() -> None:
    r, _ = table()
    assert r.registered(reg(handled=False)) is None
    assert r.target("bob@example.com") is None


def test_aliases_of_the_domain_are_one_user() -> None:
    r, _ = table()
    r.registered(reg(host="10.0.0.5"))
    assert r.target("bob@example.com") is not None


def test_a_binding_ends_at_its_expiry_and_is_capped() -> None:
    r, c = table()
    r.registered(reg(expires="60"))
    c.t += 59.9
    assert r.target("bob@example.com") is not None
    c.t += 0.2
    assert r.target("bob@example.com") is None and len(r) == 0
    r.registered(reg(expires=str(10 * MAX_EXPIRES)))
    c.t += MAX_EXPIRES + 1
    assert r.target("bob@example.com") is None


def test_several_contacts_leave_the_routing_to_yate_until_one_is_left() -> None:
    r, c = table()
    r.registered(reg(contact="sip:bob@192.0.2.1:5060", expires="60"))
    r.registered(reg(contact="sip:bob@192.0.2.2:5060", expires="600"))
    assert r.target("bob@example.com") is None
    c.t += 61
    t = r.target("bob@example.com")
    assert t is not None and t.uri == "sip:bob@192.0.2.2:5060"


def test_a_reregistration_of_the_same_contact_refreshes_it() -> None:
    r, c = table()
    r.registered(reg(expires="60"))
    c.t += 50
    r.registered(reg(expires="60"))
    c.t += 50
    assert r.target("bob@example.com") is not None


def test_unregister_of_a_contact_of_a_user_and_of_a_dead_connection() -> None:
    r, _ = table()
    r.registered(reg())
    r.unregistered(unreg(number="bob", sip_uri="sip:example.com", data="sip/sip:bob@192.0.2.1:5060"))
    assert r.target("bob@example.com") is None
    r.registered(reg())
    r.unregistered(unreg(number="bob", sip_uri="sip:example.com"))  # no data: all of the user
    assert len(r) == 0
    r.registered(reg(user="bob", connection_id="tcp:1-a"))
    r.registered(reg(user="carol", contact="sip:carol@192.0.2.3", connection_id="tcp:2-b"))
    r.unregistered(unreg(connection_id="tcp:1-a"))  # the transport died (reference §2.6)
    assert r.target("bob@example.com") is None and r.target("carol@example.com") is not None


def test_garbage_registrations_are_ignored() -> None:
    r, _ = table()
    assert r.registered(reg(data="jabber/bob@x")) is None and len(r) == 0
    assert r.registered(Message("user.register", {"data": "sip/sip:a@b"})) is None
    m = reg(expires="soon")
    assert r.registered(m) is not None and r.target("bob@example.com") is None
    r.unregistered(unreg())
