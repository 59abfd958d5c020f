"""PII detection: where the PII values are in a text (see pii.py for scrubbing records).

What is found and replaced by a typed placeholder:
  <EMAIL>        local@domain.tld
  <SSN>          US social security numbers: 123-45-6789 / 123 45 6789 (valid area/group/serial),
                 and 9 bare digits only when "SSN" / "social security" is written just before them
  <CREDIT_CARD>  13-19 digits (spaces/dashes allowed) with a card-network prefix that pass Luhn
  <IP_ADDRESS>   IPv4 dotted quads and IPv6 (validated by `ipaddress`)
  <PHONE>        international (+CC or 00CC, any region) and US/UK national formats, validated
                 by `phonenumbers` (Google's libphonenumber metadata)

Decisions, so the behaviour is predictable:
  * Detection runs on a normalized view: fullwidth/compatibility characters folded (NFKC, per
    character), other scripts' decimal digits mapped to 0-9, zero-width and soft-hyphen characters
    removed, exotic spaces made plain. The replacement is applied to the ORIGINAL text, so
    everything that is not PII is kept byte for byte.
  * A dotted quad is an IP address unless it reads as a version: "v1.2.3.4", "version 1.2.3.4",
    "1.2.3.4-beta", "1.2.3.4+build". Dates, prices, ISBNs and order numbers are not flagged.
  * Hex-only IPv6 look-alikes without a digit ("dead::beef", C++ "a::b") are left alone.
  * Homoglyphs (Cyrillic letters in an email) and spelled-out PII ("john at example dot com") are
    NOT detected.
  * Bounded work: every pattern is linear (bounded quantifiers, look-behind guards); at most
    MAX_PHONE_PARSES `phonenumbers` calls per string, after which remaining phone-shaped
    candidates are redacted without validation (fail closed on hostile input).

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

import phonenumbers

PLACEHOLDERS = {
    "email": "<EMAIL>",
    "ssn": "<SSN>",
    "credit_card": "<CREDIT_CARD>",
    "ip_address": "<IP_ADDRESS>",
    "phone": "<PHONE>",
}
MAX_PHONE_PARSES = 2_000
_MASK = "\x00"

# ---- patterns (ASCII mode: detection runs on the normalized view) -----------------------------
# Candidates start with a character class (the regex engine then skips ahead in C) followed by
# a look-behind over that first character, so starts inside a long digit run fail at once.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
_EMAIL_DOMAIN = re.compile(rf"@{_LABEL}(?:\.{_LABEL})*\.[A-Za-z]{{2,24}}(?![A-Za-z0-9\-])", re.ASCII)
_EMAIL_LOCAL = re.compile(r"[A-Za-z0-9._%+\-]{1,64}\Z", re.ASCII)
_IPV4 = re.compile(r"\d(?<![\w.]\d)\d{0,2}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?!\w|\.\d)", re.ASCII)
_VERSION_BEFORE = re.compile(r"(?:\bv|\bversion\s?|\bver\.?\s?|\brelease\s|\bbuild\s)$", re.ASCII | re.I)
_IPV6 = re.compile(r"(?<![\w:.])(?=[0-9A-Fa-f]{0,4}:[0-9A-Fa-f:.]*:)[0-9A-Fa-f:.]{1,44}[0-9A-Fa-f:](?![\w:]|\.\w)",
                   re.ASCII)
_CARD = re.compile(r"\d(?<![\d\-+]\d)(?:[ \-]?\d){12,18}(?![\d\-]|\.\d)", re.ASCII)
# Network prefixes and the lengths they issue: Visa, Mastercard, Amex, Diners, Discover, JCB.
_CARD_PREFIX = re.compile(r"(?:4\d{12}(?:\d{3}){0,2}|(?:5[1-5]|2[2-7])\d{14}|3[47]\d{13}|3[068]\d{12,14}"
                          r"|(?:6011|65\d\d|64[4-9]\d)\d{12,15}|35\d{14,17})$")
_SSN = re.compile(r"\d(?<![\d\-]\d)\d\d([\- ])\d{2}\1\d{4}(?![\d\-]|\.\d)", re.ASCII)
_SSN_BARE = re.compile(r"\d(?<![\d\-]\d)\d{8}(?![\d\-]|\.\d)", re.ASCII)
_SSN_CONTEXT = re.compile(r"(?:\bssn|\bss#|\bsocial security|\btaxpayer id)[^0-9]{0,24}$", re.ASCII | re.I)
_PHONE = re.compile(r"[+(\d](?<![\w+\-.][+(\d])[\d ().\-/]{5,26}\d(?![\w]|\.\d|-\d)", re.ASCII)
HINTS = re.compile(r"[0-9@]", re.ASCII)
# Phone-shaped but not phones: dotted quads (malformed IPs) and dates.
_NOT_PHONE = re.compile(r"(?:\d{1,3}(?:\.\d{1,3}){3}|\d{1,4}([/.\-])\d{1,2}\1\d{2,4})$", re.ASCII)

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


class _PhoneChecker:
    """phonenumbers validation with a per-string budget (fail closed once it is spent)."""

    def __init__(self) -> None:
        self.budget = MAX_PHONE_PARSES

    def find(self, candidate: str) -> list[tuple[int, int]]:
        """(start, end) of each phone number inside a phone-shaped candidate."""
        digits = sum(c.isdigit() for c in candidate)
        if digits < 7:
            return []
        if _NOT_PHONE.match(candidate):
            return []
        if digits <= 15 and self._valid(candidate):
            return [(0, len(candidate))]
        # "415-555-2671 3", "3 (415) 555-2671" or two numbers side by side: whitespace-delimited
        # runs, leftmost-longest; leading tokens are skipped only while they are short (a count, a
        # room), never a 4-digit group that could be the start of another number.
        tokens = [(m.start(), m.end()) for m in re.finditer(r"\S+", candidate)]
        found: list[tuple[int, int]] = []
        first = 0
        while first < len(tokens):
            if not found and first and sum(c.isdigit() for c in candidate[:tokens[first][0]]) > 3:
                break
            for last in range(len(tokens) - 1, first - 1, -1):
                if (first, last) != (0, len(tokens) - 1) and self._valid(candidate[tokens[first][0]:tokens[last][1]]):
                    found.append((tokens[first][0], tokens[last][1]))
                    first = last
                    break
            first += 1
        # Digits left over next to space-only groups ("3435 716287 45953") are one longer number.
        left = sum(c.isdigit() for c in candidate) - sum(sum(c.isdigit() for c in candidate[lo:hi]) for lo, hi in found)
        if left > 3:
            found = [(lo, hi) for lo, hi in found if re.search(r"[^\d ]", candidate[lo:hi])]
        return found

    def _valid(self, text: str) -> bool:
        text = text.strip(". -/")
        if sum(c.isdigit() for c in text) < 7:
            return False
        if self.budget <= 0:
            return True
        self.budget -= 1
        if text.startswith(("+", "(+")):
            region, text = None, text.lstrip("(")
        elif text.startswith("00"):
            region, text = None, "+" + text[2:]
        else:
            region = "GB" if text.lstrip("(").startswith("0") else "US"
        try:
            return phonenumbers.is_valid_number(phonenumbers.parse(text, region))
        except phonenumbers.NumberParseException:
            return False


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
    phones = _PhoneChecker()

    def run(pattern: re.Pattern, kind: str, check: Callable[[re.Match], bool], text: str) -> str:
        def sub(m: re.Match) -> str:
            if not check(m):
                return m.group()
            spans.append((m.start(), m.end(), kind))
            return _MASK * (m.end() - m.start())
        return pattern.sub(sub, text)

    if email:
        view = _emails(view, spans)
    if ipv6:
        view = run(_IPV6, "ip_address", lambda m: _is_ipv6(m.group()), view)
    if ipv4:
        view = run(_IPV4, "ip_address", _is_ipv4, view)
    if digits >= 13:
        view = run(_CARD, "credit_card", lambda m: _is_card(m.group()), view)
    if digits >= 9:
        view = run(_SSN, "ssn", _is_ssn, view)
        view = run(_SSN_BARE, "ssn", lambda m: _is_ssn(m) and _ssn_in_context(m), view)
    # Phones last; a candidate can swallow the start of the next number, so resume after a find.
    pos = 0
    while digits >= 7 and (m := _PHONE.search(view, pos)) is not None:
        found = phones.find(m.group())
        spans.extend((m.start() + lo, m.start() + hi, "phone") for lo, hi in found)
        pos = m.start() + found[-1][1] if found and m.start() + found[-1][1] < m.end() else m.end()
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
