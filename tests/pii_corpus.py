"""A labeled PII corpus: planted values of every kind in varied contexts, plus look-alikes that are not PII.

`text_samples()` gives sentences with the exact offsets of what was planted; `record_samples()` gives
chat records with values in JSON-string arguments, argument objects, lists of content parts, tool
definitions and split across parts. Seeded: the same corpus every run.
"""
from __future__ import annotations

import ipaddress
import json
import random
from dataclasses import dataclass, field

import phonenumbers

KINDS = ("email", "ssn", "credit_card", "ip_address", "phone")
PER_KIND = 600

_FIRST = ["john", "jane", "maria", "wei", "ahmed", "olga", "li", "sam", "priya", "carlos", "anna", "kofi"]
_LAST = ["smith", "doe", "garcia", "chen", "khan", "ivanova", "nguyen", "okafor", "patel", "rossi"]
_DOMAINS = ["example.com", "mail.example.org", "corp.example.co.uk", "uni-example.edu", "example.io",
            "sub.dept.example.net", "example.travel"]
_US_AREAS = ["201", "202", "212", "213", "305", "312", "404", "415", "512", "617", "646", "702", "718", "808"]
_REGIONS = ["GB", "DE", "FR", "IN", "JP", "AU", "BR", "ES", "IT", "MX", "NL", "SE", "CA", "ZA", "SG"]

TEMPLATES = [
    "Contact me at {v}.", "My {label} is {v}, thanks!", "{v}", "Please send it to {v} asap",
    "- item one\n- {v}\n- item three", "Re: {v} (see ticket)", "customer said \"{v}\" twice",
    "Details: name=Ann; {label}={v}; note=ok", "I told them {v} yesterday, right?", "({v})",
    "Order shipped; if anything goes wrong use {v} or reply here.", "{label}: {v}\nthanks",
]
LABELS = {"email": "email", "ssn": "SSN", "credit_card": "card", "ip_address": "IP", "phone": "phone"}


@dataclass
class Sample:
    text: str
    planted: list[tuple[int, int, str]] = field(default_factory=list)  # (start, end, kind)
    decoys: list[str] = field(default_factory=list)


def _luhn_digit(body: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


def email(rng: random.Random) -> str:
    local = rng.choice([f"{rng.choice(_FIRST)}.{rng.choice(_LAST)}", f"{rng.choice(_FIRST)}{rng.randint(1, 99)}",
                        f"{rng.choice(_FIRST)}+tag{rng.randint(1, 9)}", f"{rng.choice(_FIRST)}_{rng.choice(_LAST)}"])
    value = f"{local}@{rng.choice(_DOMAINS)}"
    return value.upper() if rng.random() < 0.1 else value


def ssn(rng: random.Random) -> str:
    area = rng.choice([rng.randint(1, 665), rng.randint(667, 899)])
    sep = rng.choice(["-", "-", " "])
    return f"{area:03d}{sep}{rng.randint(1, 99):02d}{sep}{rng.randint(1, 9999):04d}"


def credit_card(rng: random.Random, *, valid: bool = True) -> str:
    prefix, length = rng.choice([("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("34", 15), ("37", 15),
                                 ("6011", 16), ("65", 16), ("35", 16), ("4", 13)])
    body = prefix + "".join(rng.choice("0123456789") for _ in range(length - len(prefix) - 1))
    check = _luhn_digit(body)
    if not valid:
        check = str((int(check) + rng.randint(1, 9)) % 10)
    digits = body + check
    style = rng.choice(["plain", "space", "dash"])
    if style == "plain":
        return digits
    sep = " " if style == "space" else "-"
    groups = [digits[:4], digits[4:10], digits[10:]] if length == 15 else [digits[i:i + 4] for i in range(0, length, 4)]
    return sep.join(groups)


def ip_address(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return ".".join(str(rng.randint(1 if i == 0 else 0, 255)) for i in range(4))
    addr = ipaddress.IPv6Address(rng.getrandbits(128))
    return rng.choice([str(addr), addr.exploded, f"fe80::{rng.randint(1, 0xffff):x}:{rng.randint(1, 0xffff):x}",
                       "2001:db8::" + f"{rng.randint(1, 0xfff):x}", "::1"])


def phone(rng: random.Random) -> str:
    if rng.random() < 0.45:
        while True:
            number = f"{rng.choice(_US_AREAS)}{rng.randint(2, 9)}{rng.randint(0, 99):02d}{rng.randint(0, 9999):04d}"
            if phonenumbers.is_valid_number(phonenumbers.parse(number, "US")):
                break
        a, b, c = number[:3], number[3:6], number[6:]
        return rng.choice([f"({a}) {b}-{c}", f"{a}-{b}-{c}", f"{a}.{b}.{c}", f"+1 {a} {b} {c}", f"+1-{a}-{b}-{c}",
                           f"1-{a}-{b}-{c}", f"+1 ({a}) {b}-{c}", f"{a} {b} {c}"])
    region = rng.choice(_REGIONS)
    kind = rng.choice([phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE])
    example = phonenumbers.example_number_for_type(region, kind)
    national = str(example.national_number)
    for _ in range(50):
        tail = "".join(rng.choice("0123456789") for _ in range(3))
        candidate = phonenumbers.parse(f"+{example.country_code}{national[:-3]}{tail}", None)
        if phonenumbers.is_valid_number(candidate):
            break
    else:
        candidate = example
    fmt = rng.choice(["intl", "intl", "e164", "00"] + (["national"] if region == "GB" else []))
    if fmt == "intl":
        return phonenumbers.format_number(candidate, phonenumbers.PhoneNumberFormat.INTERNATIONAL)
    if fmt == "e164":
        return phonenumbers.format_number(candidate, phonenumbers.PhoneNumberFormat.E164)
    if fmt == "00":
        return "00" + phonenumbers.format_number(candidate, phonenumbers.PhoneNumberFormat.E164)[1:]
    return phonenumbers.format_number(candidate, phonenumbers.PhoneNumberFormat.NATIONAL)


GENERATORS = {"email": email, "ssn": ssn, "credit_card": credit_card, "ip_address": ip_address, "phone": phone}


def decoy(rng: random.Random) -> str:
    """Look-alikes that are NOT PII (see pii.py for the version/IP decision)."""
    return rng.choice([
        lambda: f"order #{rng.randint(100000, 99999999)}",
        lambda: f"ORD-{rng.randint(2019, 2025)}-{rng.randint(0, 999999):06d}",
        lambda: f"{rng.randint(2000, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        lambda: f"{rng.randint(1, 28):02d}/{rng.randint(1, 12):02d}/{rng.randint(1990, 2030)}",
        lambda: f"{rng.randint(2000, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T10:{rng.randint(0, 59):02d}:00Z",
        lambda: f"at {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}",
        lambda: f"v{rng.randint(0, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 20)}.{rng.randint(0, 99)}",
        lambda: f"{rng.randint(0, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}-beta",
        lambda: f"version {rng.randint(1, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 999)}",
        lambda: f"release {rng.randint(1, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 9)}",
        lambda: f"${rng.randint(1, 99)},{rng.randint(100, 999)}.{rng.randint(0, 99):02d}",
        lambda: f"EUR {rng.randint(1, 9999)}.{rng.randint(0, 99):02d}",
        lambda: f"1Z{rng.randint(100, 999)}AA{rng.randint(10**9, 10**10 - 1)}",
        lambda: rng.choice(["978-3-16-148410-0", "ISBN 9780306406157", "ISBN 0-306-40615-2", "978-1-4028-9462-6"]),
        lambda: credit_card(rng, valid=False),
        lambda: rng.choice(["000-12-3456", "666-45-6789", "123-00-4567", "912-34-5678"]),
        lambda: f"{rng.randint(256, 999)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}",
        lambda: rng.choice(["dead::beef", "std::vector", "a::b::c", "Foo::Bar"]),
        lambda: f"room {rng.randint(100, 9999)}, zip {rng.randint(10000, 99999)}",
        lambda: f"{rng.randint(1, 99)}.{rng.randint(0, 9)} x {rng.randint(1, 99)}.{rng.randint(0, 9)} cm",
        lambda: "550e8400-e29b-41d4-a716-446655440000",
        lambda: f"commit {rng.getrandbits(160):040x}",
        lambda: f"ticket {rng.randint(100000000, 999999999)}",
        lambda: f"qty {rng.randint(1, 50)} @ {rng.randint(1, 99)}.99",
    ])()


def text_samples(seed: int = 7) -> list[Sample]:
    rng = random.Random(seed)
    samples = []
    for kind in KINDS:
        for i in range(PER_KIND):
            value = GENERATORS[kind](rng)
            template = rng.choice(TEMPLATES)
            if kind == "ssn" and i % 10 == 0:  # bare nine digits: only with the words that say SSN
                value, template = value.replace("-", "").replace(" ", ""), "my social security number is {v}"
            before, after = template.split("{v}")
            before = before.replace("{label}", LABELS[kind])
            after = after.replace("{label}", LABELS[kind])
            lead = decoy(rng) + " and " if rng.random() < 0.5 else ""
            tail = " / " + decoy(rng) if rng.random() < 0.5 else ""
            text = lead + before + value + after + tail
            start = len(lead) + len(before)
            samples.append(Sample(text, [(start, start + len(value), kind)],
                                  [d for d in (lead[:-5], tail[3:]) if d]))
    for _ in range(1000):  # look-alikes alone
        d = decoy(rng)
        samples.append(Sample(f"{rng.choice(['See', 'Note', 'Ref'])}: {d}.", [], [d]))
    return samples


def record_samples(seed: int = 11, n: int = 200) -> list[tuple[dict, list[str], list[str]]]:
    """(record, planted values, decoys): values in structures the scrubber must walk into."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind_a, kind_b = rng.choice(KINDS), rng.choice(KINDS)
        a, b, c = GENERATORS[kind_a](rng), GENERATORS[kind_b](rng), GENERATORS["email"](rng)
        d1, d2 = decoy(rng), decoy(rng)
        args = {"query": f"look up {a}", "order": d1, "nested": {"list": [b, "ok", 3]}}
        record = {
            "workload_id": "w", "client_id": "c",
            "request": {"messages": [
                {"role": "user", "content": [{"type": "text", "text": f"hi, reach me at {c}"},
                                             {"type": "text", "text": f"ref {d2}"}]}],
                "tools": [{"type": "function", "function": {"name": "lookup", "description": f"default contact {c}"}}]},
            "response": {"choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "lookup", "arguments": json.dumps(args) if i % 2 else args}}]}}]},
        }
        planted = [a, b, c]
        if i % 4 == 0:  # a US phone split over two content parts
            number = phone(random.Random(i))
            while not number[0].isdigit() or "-" not in number:
                number = phone(rng)
            cut = number.rindex("-")
            record["request"]["messages"][0]["content"] += [{"type": "text", "text": f"call {number[:cut + 1]}"},
                                                             {"type": "text", "text": number[cut + 1:] + " after 5"}]
            planted.append(number)
        out.append((record, planted, [d1, d2]))
    return out
