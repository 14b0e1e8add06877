"""Values that look like PII but are reserved or published as documentation examples, so they belong to no one:
e-mail domains reserved by RFC 2606/6761, IP addresses outside the public internet and the public DNS resolvers'
service addresses, the example keys, IBANs and card numbers that vendors and standards print, and US Social
Security numbers that can never be issued.

Structural rules first (a reserved domain, an address range, an SSN's never-issued area), then a short allow-list
of exact published values. A value that merely resembles these (another key, another IBAN) is still reported:
each list entry is one exact string that documentation everywhere copies.
"""

from __future__ import annotations

import ipaddress

# RFC 2606 second-level example domains (and their subdomains) and RFC 2606/6761 special-use top-level domains.
_EXAMPLE_DOMAINS = ("example.com", "example.org", "example.net")
_RESERVED_TLDS = ("example", "test", "invalid", "localhost", "local")

# The IBAN standard's and the banks' registry examples (ISO 13616, the SWIFT IBAN registry, ECBS), compact.
EXAMPLE_IBANS = frozenset(
    {
        "DE89370400440532013000",
        "GB82WEST12345698765432",
        "GB29NWBK60161331926819",
        "GB33BUKB20201555555555",
        "FR1420041010050500013M02606",
        "NL91ABNA0417164300",
        "ES9121000418450200051332",
        "IT60X0542811101000000123456",
        "CH9300762011623852957",
        "AT611904300234573201",
        "BE68539007547034",
    }
)

# Card numbers that card networks and payment processors publish for testing: accepted by test systems only,
# never issued to anyone.
TEST_CARD_NUMBERS = frozenset(
    {
        "4111111111111111",
        "4242424242424242",
        "4000056655665556",
        "4012888888881881",
        "4222222222222",
        "5555555555554444",
        "5105105105105100",
        "2223003122003222",
        "5200828282828210",
        "378282246310005",
        "371449635398431",
        "378734493671000",
        "6011111111111117",
        "6011000990139424",
        "3056930009020004",
        "36227206271667",
        "3566002020360505",
        "6200000000000005",
    }
)

# The service addresses of the public DNS resolvers (Google, Cloudflare, Quad9, OpenDNS), anycast from many
# sites: "set your DNS to 8.8.8.8" names a public service, as "example.com" does, and locates no one.
PUBLIC_RESOLVERS = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "8.8.8.8",
        "8.8.4.4",
        "1.1.1.1",
        "1.0.0.1",
        "9.9.9.9",
        "149.112.112.112",
        "208.67.222.222",
        "208.67.220.220",
        "2001:4860:4860::8888",
        "2001:4860:4860::8844",
        "2606:4700:4700::1111",
        "2606:4700:4700::1001",
        "2620:fe::fe",
        "2620:fe::9",
    )
)

# Published SSNs that were voided: the "Woolworth wallet" number and two from advertisements.
_VOIDED_SSNS = frozenset({"078051120", "457555462", "219099999"})


def is_reserved_email_domain(domain: str) -> bool:
    """Whether an address at ``domain`` is a documentation or test address (``user@example.com``, ``a@b.test``)."""
    domain = domain.lower().rstrip(".")
    if domain in _EXAMPLE_DOMAINS or domain.endswith(tuple("." + d for d in _EXAMPLE_DOMAINS)):
        return True
    return domain.rsplit(".", 1)[-1] in _RESERVED_TLDS


def is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``address`` can locate someone on the public internet.

    Not: private (RFC 1918, unique local), shared (CGNAT), loopback, link-local, unspecified, multicast,
    broadcast and the documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32):
    ``ipaddress`` marks all of these as not global. Nor the public resolvers (``PUBLIC_RESOLVERS``). An IPv4
    address mapped into IPv6 is judged as IPv4.
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast and address not in PUBLIC_RESOLVERS


def is_example_key(value: str) -> bool:
    """Whether a key-shaped ``value`` is a vendor's documentation example: they end in ``EXAMPLE`` (AWS's
    ``AKIAIOSFODNN7EXAMPLE``, ``wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY``)."""
    return value.rstrip("=\"'").upper().endswith(("EXAMPLE", "EXAMPLEKEY"))


def is_unissuable_ssn(digits: str) -> bool:
    """Whether nine ``digits`` in the SSN layout can never be a real SSN: area 000, 666 or 9xx, group 00,
    serial 0000, or one of the published voided numbers."""
    if len(digits) != 9 or not digits.isdigit():
        return False
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    return area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000" or digits in _VOIDED_SSNS
