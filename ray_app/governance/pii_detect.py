"""PII detection: where the PII values are in a text (see pii.py for scrubbing records).

What is found and replaced by a typed placeholder:
  <EMAIL>        local@domain.tld
  <SSN>          US social security numbers: 123-45-6789 / 123 45 6789 (valid area/group/serial),
                 and 9 bare digits only when "SSN" / "social security" is written just before them
  <CREDIT_CARD>  13-19 digits (spaces/dashes allowed) with a card-network prefix that pass Luhn
  <IP_ADDRESS>   IPv4 dotted quads and IPv6 (validated by `ipaddress`)
  <PHONE>        phone numbers by their written form, assigned or not (pii_phone.py)
  <IBAN>         IBANs, compact or in groups of 4: the length registered for the country, mod-97

Decisions, so the behaviour is predictable:
  * Detection runs on a normalized view: fullwidth/compatibility characters folded (NFKC, per
    character), other scripts' decimal digits mapped to 0-9, zero-width and soft-hyphen characters
    removed, exotic spaces made plain, dashes and the minus sign made "-". The replacement is
    applied to the ORIGINAL text, so everything that is not PII is kept byte for byte.
  * A dotted quad is an IP address unless it reads as a version: "v1.2.3.4", "version 1.2.3.4",
    "1.2.3.4-beta", "1.2.3.4+build". Dates, prices, ISBNs and order numbers are not flagged.
  * Hex-only IPv6 look-alikes without a digit ("dead::beef", C++ "a::b") are left alone.
  * Spelled-out PII ("john at example dot com") is NOT detected.
  * Email addresses may have accented Latin letters (müller@bücher.example); a letter of another
    script ends the address, so a homoglyph ("jоhn" with a Cyrillic "о") leaves what comes before it.
  * Bounded work: every pattern is linear (bounded quantifiers, look-behind guards); the phone
    pass bounds its own (pii_phone.py).

Presidio was considered and rejected: its analyzer needs a spaCy model (not downloadable here)
and costs milliseconds per text, where ingest needs microseconds.
"""
from __future__ import annotations

import ipaddress
import re
import unicodedata
from bisect import bisect_right
from collections.abc import Callable
from functools import cache

from ray_app.governance.pii_phone import PhoneFinder

PLACEHOLDERS = {
    "email": "<EMAIL>",
    "ssn": "<SSN>",
    "credit_card": "<CREDIT_CARD>",
    "ip_address": "<IP_ADDRESS>",
    "phone": "<PHONE>",
    "iban": "<IBAN>",
}
_MASK = "\x00"

# ---- patterns (ASCII mode: detection runs on the normalized view) -----------------------------
# Candidates start with a character class (the regex engine then skips ahead in C) followed by
# a look-behind over that first character, so starts inside a long digit run fail at once.
# Email letters: ASCII and the accented Latin ones (müller@bücher.example, RFC 6531); other scripts'
# letters are left out, so "写信到john@example.com" loses only the address.
_ALNUM = "A-Za-z0-9\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f"
_LABEL = rf"[{_ALNUM}](?:[{_ALNUM}\-]{{0,61}}[{_ALNUM}])?"
_EMAIL_DOMAIN = re.compile(rf"@{_LABEL}(?:\.{_LABEL})*\.[A-Za-z]{{2,24}}(?![{_ALNUM}\-])")
# The local part starts with a letter, digit or one of "_%+-" and may hold "." and "'" (o'brien@...).
_EMAIL_LOCAL = re.compile(rf"[{_ALNUM}_%+\-][{_ALNUM}._%+\-']{{0,63}}\Z")
_IPV4 = re.compile(r"\d(?<![\w.]\d)\d{0,2}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?!\w|\.\d)", re.ASCII)
_VERSION_BEFORE = re.compile(r"(?:\bv|\bversion\s?|\bver\.?\s?|\brelease\s|\bbuild\s)$", re.ASCII | re.IGNORECASE)
_IPV6 = re.compile(r"(?<![\w:.])(?=[0-9A-Fa-f]{0,4}:[0-9A-Fa-f:.]*:)[0-9A-Fa-f:.]{1,44}[0-9A-Fa-f:](?![\w:]|\.\w)",
                   re.ASCII)
_CARD = re.compile(r"\d(?<![\d\-+]\d)(?:[ \-]?\d){12,18}(?![\d\-]|\.\d)", re.ASCII)
# Network prefixes and the lengths they issue: Visa, Mastercard, Amex, Diners, Discover, JCB, UnionPay.
_CARD_PREFIX = re.compile(r"(?:4\d{12}(?:\d{3}){0,2}|(?:5[1-5]|2[2-7])\d{14}|3[47]\d{13}|3[068]\d{12,14}"
                          r"|(?:6011|65\d\d|64[4-9]\d)\d{12,15}|35\d{14,17}|62\d{14,17})$")
_SSN = re.compile(r"\d(?<![\d\-]\d)\d\d([\- ])\d{2}\1\d{4}(?![\d\-]|\.\d)", re.ASCII)
_SSN_BARE = re.compile(r"\d(?<![\d\-]\d)\d{8}(?![\d\-]|\.\d)", re.ASCII)
_SSN_CONTEXT = re.compile(r"(?:\bssn|\bss#|\bsocial security|\btaxpayer id)[^0-9]{0,24}$", re.ASCII | re.IGNORECASE)
# IBAN: two letters and two check digits at a word's start, then letters and digits, compact or in
# groups of 4 (ISO 13616); the pattern starts at the first digit so the engine skips ahead in C.
_IBAN = re.compile(r"\d(?<=[A-Za-z]{2}\d)(?<!\w[A-Za-z]{2}\d)\d(?: ?[A-Za-z0-9]{4}){2,7}(?: ?[A-Za-z0-9]{1,4})?(?!\w)",
                   re.ASCII)
# IBAN length per country, from the SWIFT IBAN registry (the French overseas territories use FR's).
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27, "BL": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20,
    "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GF": 27, "GI": 23, "GL": 18,
    "GP": 27, "GR": 27, "GT": 28, "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27,
    "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27,
    "MD": 24, "ME": 22, "MF": 27, "MK": 19, "MN": 20, "MQ": 27, "MR": 27, "MT": 31, "MU": 30, "NC": 27, "NI": 28,
    "NL": 18, "NO": 15, "OM": 23, "PF": 27, "PK": 24, "PL": 28, "PM": 27, "PS": 29, "PT": 25, "QA": 29, "RE": 27,
    "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23,
    "ST": 25, "SV": 28, "TF": 27, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "WF": 27, "XK": 20,
    "YE": 30, "YT": 27,
}
HINTS = re.compile(r"[0-9@]", re.ASCII)

_FORMAT_CHARS = {0x00AD, 0x180E, 0x200B, 0x200C, 0x200D, 0x2060, 0x2061, 0x2062, 0x2063, 0x2064, 0xFEFF}
_FORMAT_RE = re.compile("[" + "".join(chr(c) for c in sorted(_FORMAT_CHARS)) + "]")


@cache
def _fold_table() -> dict[int, int | str | None]:
    """Per-character folding that keeps one character per character, except deletions."""
    table: dict[int, int | str | None] = {cp: None for cp in _FORMAT_CHARS}
    ranges = [(0x80, 0x3100), (0xFE00, 0x10000), (0x1D7CE, 0x1D800)]
    for lo, hi in ranges:
        for cp in range(lo, hi):
            if cp in table:
                continue
            ch = chr(cp)
            folded = unicodedata.normalize("NFKC", ch)
            if len(folded) == 1 and folded.isascii() and folded != ch:
                table[cp] = folded
            elif unicodedata.category(ch) == "Zs":
                table[cp] = " "
            elif unicodedata.category(ch) == "Pd" or cp == 0x2212:  # 415–555–2671 typeset with en dashes
                table[cp] = "-"
            elif unicodedata.decimal(ch, None) is not None:
                table[cp] = str(unicodedata.decimal(ch))
    return table


def _normalized_view(text: str) -> tuple[str, list[int]]:
    """The detection view and the original positions of deleted characters (for mapping back)."""
    if text.isascii():
        return text, []
    view = text.translate(_fold_table())
    if len(view) == len(text):
        return view, []
    deleted = [m.start() for m in _FORMAT_RE.finditer(text)]
    return view, deleted


def _to_original(i: int, deleted: list[int], shifted: list[int]) -> int:
    return i + bisect_right(shifted, i) if deleted else i


# ---- validators ---------------------------------------------------------------------------------

def luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = ord(ch) - 48
        if i % 2 == parity:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_card(candidate: str) -> bool:
    digits = candidate.replace(" ", "").replace("-", "")
    return bool(_CARD_PREFIX.match(digits)) and luhn_ok(digits)


def _is_ipv6(candidate: str) -> bool:
    if not any(c.isdigit() for c in candidate):
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


# ---- detection ----------------------------------------------------------------------------------

Span = tuple[int, int, str]


def find_pii(text: str) -> list[Span]:
    """(start, end, type) spans in `text`'s own coordinates, non-overlapping, sorted."""
    view, deleted = _normalized_view(text)
    spans = _detect(view)
    if not deleted or not spans:
        return spans
    shifted = [p - j for j, p in enumerate(deleted)]
    return [(_to_original(s, deleted, shifted), _to_original(e - 1, deleted, shifted) + 1, kind)
            for s, e, kind in spans]


def _detect(view: str) -> list[Span]:
    """One pass per type, most specific first; a found value is masked so later passes skip it."""
    # Every pass but the email and IPv6 ones needs that many digits in the whole text: an IPv4
    # address 4, a phone 7, an SSN 9, a card 13. Most texts that get this far (model names, ids,
    # SKUs, call ids) have fewer and skip those passes; a text no pass applies to ends here.
    # ASCII digits are one byte each in UTF-8 and no other character's bytes are digits (lone
    # surrogates, which JSON can carry, included).
    raw = view.encode("utf-8", "surrogatepass")
    digits = len(raw) - len(raw.translate(None, b"0123456789"))
    email, ipv6, ipv4 = "@" in view, "::" in view or view.count(":") >= 7, digits >= 4 and "." in view
    if digits < 7 and not (email or ipv6 or ipv4):
        return []
    spans: list[Span] = []

    def run(pattern: re.Pattern, kind: str, check: Callable[[re.Match], bool], text: str) -> str:
        def sub(m: re.Match) -> str:
            if not check(m):
                return m.group()
            spans.append((m.start(), m.end(), kind))
            return _MASK * (m.end() - m.start())
        return pattern.sub(sub, text)

    if email:
        view = _emails(view, spans)
    if digits >= 10:  # before cards and phones: an IBAN's digits can pass Luhn or read as a number
        view = _ibans(view, spans)
    if ipv6:
        view = run(_IPV6, "ip_address", lambda m: _is_ipv6(m.group()), view)
    if ipv4:
        view = run(_IPV4, "ip_address", _is_ipv4, view)
    if digits >= 13:
        view = run(_CARD, "credit_card", lambda m: _is_card(m.group()), view)
    if digits >= 9:
        view = run(_SSN, "ssn", _is_ssn, view)
        view = run(_SSN_BARE, "ssn", lambda m: _is_ssn(m) and _ssn_in_context(m), view)
    if digits >= 7:  # last: what the passes before masked (IBANs, cards, SSNs) is no number any more
        spans.extend((lo, hi, "phone") for lo, hi in PhoneFinder(view).spans())
    spans.sort()
    return spans


def _emails(view: str, spans: list[Span]) -> str:
    """Domain first (cheap: starts at '@'), then the local part just before it (at most 64 chars)."""
    pieces, pos = [], 0
    for m in _EMAIL_DOMAIN.finditer(view):
        at = m.start()
        local = _EMAIL_LOCAL.search(view, max(pos, at - 64), at)
        if local is None:
            continue
        spans.append((local.start(), m.end(), "email"))
        pieces += [view[pos:local.start()], _MASK * (m.end() - local.start())]
        pos = m.end()
    return "".join(pieces) + view[pos:] if pieces else view


def _ibans(view: str, spans: list[Span]) -> str:
    """IBANs of a registered length that pass mod-97 (ISO 7064); a match that runs on into the next
    word ("... 0130 00 BANK") is cut at the country's length, where a group must end."""
    pieces, pos = [], 0
    for m in _IBAN.finditer(view):
        start = m.start() - 2
        value = view[start:m.end()]
        length = IBAN_LENGTHS.get(value[:2].upper(), 0)
        end, seen = 0, 0
        while end < len(value) and seen < length:
            seen += value[end] != " "
            end += 1
        if seen < length or (end < len(value) and value[end] != " ") or not _mod97(value[:end]):
            continue
        spans.append((start, start + end, "iban"))
        pieces += [view[pos:start], _MASK * end]
        pos = start + end
    return "".join(pieces) + view[pos:] if pieces else view


def _mod97(value: str) -> bool:
    compact = value.replace(" ", "").upper()
    return int("".join(str(int(c, 36)) for c in compact[4:] + compact[:4])) % 97 == 1


def _is_ipv4(m: re.Match) -> bool:
    if any(int(o) > 255 for o in m.group().split(".")) or _version_suffix(m):
        return False
    return not (m.start() and _VERSION_BEFORE.search(m.string, max(0, m.start() - 9), m.start()))


def _version_suffix(m: re.Match) -> bool:
    tail = m.string[m.end():m.end() + 2]
    return len(tail) == 2 and tail[0] in "-+~" and tail[1].isalpha()


def _is_ssn(m: re.Match) -> bool:
    digits = m.group().replace("-", "").replace(" ", "")
    return digits[:3] not in ("000", "666") and digits[0] != "9" and digits[3:5] != "00" and digits[5:] != "0000"


def _ssn_in_context(m: re.Match) -> bool:
    return bool(_SSN_CONTEXT.search(m.string, max(0, m.start() - 40), m.start()))


def apply_spans(text: str, spans: list[Span]) -> str:
    out, pos = [], 0
    for start, end, kind in spans:
        out.append(text[pos:start])
        out.append(PLACEHOLDERS[kind])
        pos = end
    out.append(text[pos:])
    return "".join(out)
