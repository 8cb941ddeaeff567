"""Where webhooks may go: the allow-list at submit, and again with a DNS lookup at each send."""

from __future__ import annotations

import ipaddress

import pytest

from app.settings import Settings
from app.webhooks import targets


def _settings(*hosts: str) -> Settings:
    return Settings(webhook_allowed_hosts=list(hosts))


@pytest.mark.parametrize(
    ("hosts", "url"),
    [
        (["hooks.example.com"], "https://hooks.example.com/x"),
        (["hooks.example.com"], "http://HOOKS.example.com:9000/x"),
        (["hooks.example.com:8443"], "https://hooks.example.com:8443/x"),
        (["hooks.example.com:443"], "https://hooks.example.com/x"),
        (["10.0.0.7"], "http://10.0.0.7:81/"),
        (["[fd00::7]:9000"], "http://[fd00::7]:9000/"),
        (["fd00::7"], "http://[fd00::7]/"),
        (["*"], "https://hooks.example.com/x"),
        (["*"], "https://8.8.8.8/x"),
    ],
)
def test_allowed_at_submit(hosts: list[str], url: str) -> None:
    targets.check_url(_settings(*hosts), url)


@pytest.mark.parametrize(
    ("hosts", "url"),
    [
        ([], "https://hooks.example.com/x"),
        (["hooks.example.com:8443"], "https://hooks.example.com/x"),
        (["example.com"], "https://hooks.example.com/x"),
        (["127.0.0.1"], "http://localhost/x"),
        (["*"], "http://127.0.0.1/x"),
        (["*"], "http://10.1.2.3/x"),
        (["*"], "http://169.254.169.254/latest/meta-data"),
        (["*"], "http://[::1]/x"),
        (["hooks.example.com"], "ftp://hooks.example.com/x"),
    ],
)
def test_refused_at_submit(hosts: list[str], url: str) -> None:
    with pytest.raises(targets.Refused):
        targets.check_url(_settings(*hosts), url)


def test_the_refusal_names_the_setting_and_the_entry_to_add() -> None:
    with pytest.raises(targets.Refused) as caught:
        targets.check_url(_settings(), "https://hooks.example.com/x")
    assert "SGJOBS_WEBHOOK_ALLOWED_HOSTS" in str(caught.value)
    assert "'hooks.example.com'" in str(caught.value)


def test_a_named_ip_is_used_as_it_is() -> None:
    target = targets.check_target(_settings("127.0.0.1"), "http://127.0.0.1:5000/x")
    assert (target.address, target.port) == ("127.0.0.1", 5000)


def test_a_named_host_resolving_to_loopback_is_allowed() -> None:
    # The real resolver: an operator may name an internal receiver.
    target = targets.check_target(_settings("localhost"), "http://localhost:5000/x")
    assert ipaddress.ip_address(target.address).is_loopback


def test_allow_list_is_read_again_at_send() -> None:
    targets.check_url(_settings("hooks.example.com"), "https://hooks.example.com/x")
    with pytest.raises(targets.Refused):
        targets.check_target(_settings("other.example.com"), "https://hooks.example.com/x")


@pytest.mark.parametrize(
    ("hosts", "addresses"),
    [
        # An allowed name whose DNS points at a cloud's metadata service.
        (["hooks.example.com"], ["169.254.169.254"]),
        (["hooks.example.com"], ["0.0.0.0"]),
        (["hooks.example.com"], ["::ffff:169.254.169.254"]),
        # '*' allows public addresses only.
        (["*"], ["93.184.216.34", "10.0.0.1"]),
        (["*"], ["127.0.0.1"]),
    ],
)
def test_dns_answers_that_are_refused_at_send(
    monkeypatch: pytest.MonkeyPatch, hosts: list[str], addresses: list[str]
) -> None:
    monkeypatch.setattr(targets, "resolve", lambda host, port: [ipaddress.ip_address(a) for a in addresses])
    with pytest.raises(targets.Refused):
        targets.check_target(_settings(*hosts), "https://hooks.example.com/x")


def test_the_checked_address_is_the_one_connected_to(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(targets, "resolve", lambda host, port: [ipaddress.ip_address("93.184.216.34")])
    target = targets.check_target(_settings("*"), "https://hooks.example.com/x")
    assert (target.host, target.port, target.address) == ("hooks.example.com", 443, "93.184.216.34")
