"""Phone numbers by their written form (pii_detect.py runs this pass last, on its normalized view).

A number written as a phone number is one, whether or not its area code is assigned or its line in
service: privacy does not hang on a numbering plan. So the shape decides; `phonenumbers` supplies
the country codes and, for digits in no known shape, its validity is one more way in, never a
requirement.

  * Shapes taken anywhere:
      NANP     (415) 555-2671 · 415-555-2671 · 415.555.2671 · 415 555 2671 · 1-415-555-2671 · 415/555-2671
      +CC/00CC +44 20 7946 0958 · +4915123456789 · +44 (0)20 7946 0958 · 0049 30 123456: a country code
               phonenumbers knows, then 8-15 digits in all (ten after +1); 00 only with separators
      trunk 0  020 7946 0958 · 07700 900123 · 030 123456 · (02) 9876 5432 · 01 23 45 67 89 · 03-1234-5678:
               a leading 0 and 9-12 digits in groups (not a ZIP+4 such as 02139-4307)
      others   India 98765 43210 · Brazil (11) 91234-5678 · China 138 0013 8000
  * Any other 7-15 digits in up to seven groups, the last of two or more (867 5309, 8675309,
    55 1234 5678; not an ISBN's 978-3-16-148410-0 nor an SSN's shape), where a word says phone:
    call, phone, tel, cell, mobile, fax, reach, text, number, ... among the 48 characters before
    (the last number-naming word counts: "order no." beats "number"; a word before another number
    or value is that one's, unless both are phones of a list), or just after ("867-5309. Call her.",
    "(cell)").
  * Standing alone (no single space joins them to more digits), with no word at all: NANP's compact
    form 5558675309 and its local form 867-5309 (not a range: 300-1000 and 830-1645 are kept), or
    digits phonenumbers finds valid (US; GB from a leading 0; 00 as +).
  * Kept whatever the shape: dates and date-times (15/03/2024 14, 2024-03-15 14), and a number
    right after a word naming another kind of number (order #, invoice, tracking, SKU, ISBN, page,
    ticket, code, count, ...) unless a word before said phone. Amounts (after a currency sign,
    before ",89" or "EUR"), thousands groupings (1 234 567, 1.234.567) and quantities (4155552671
    bytes) are kept unless their shape is a phone's.

A number starts and ends at a space inside a run of digit groups: 4417-2290-118 is read whole, never
as 2290-118. Work is bounded: a candidate is at most 36 characters and a number seven groups; per
string, at most MAX_PHONE_PARSES validity checks (then standing-alone digits count as valid) and
MAX_PHONE_WORK digit groups examined (then every remaining candidate of 7+ digits is redacted
unexamined: fail closed on hostile input).
"""
from __future__ import annotations

import re
from bisect import bisect_left

import phonenumbers

MAX_PHONE_PARSES = 2_000
MAX_PHONE_WORK = 200_000
_MAX_GROUPS = 7  # 00 33 1 23 45 67 89
_MIN_DIGITS, _MAX_DIGITS = 7, 17  # 555-8675 .. 0044 (0)20 7946 0958

# Runs of digits and separators, starting at a digit, "+" or "(" that does not continue a word, a
# number, a version or an id, and ending at a digit the next character does not continue (an
# extension may follow: 555-867-5309x12, ... ext. 12).
CANDIDATE = re.compile(r"[+(\d](?<![\w+\-.][+(\d])[\d ().\-/]{5,34}\d(?=x\d|ext|(?![\w]|\.\d|-\d))",
                       re.ASCII | re.IGNORECASE)
_GROUP = re.compile(r"\d+", re.ASCII)
_JOINED, _SLASH, _SPACE = 0, 1, 2  # what lies between two digit groups: "-" or ".", a lone "/", a space
_SPACED = re.compile(r"[\d ]+", re.ASCII)
# A digit, or a value the passes before masked (an email, an SSN, ...): another number or value.
_VALUE = re.compile(r"[\d\x00]", re.ASCII)
_LAST_VALUE = re.compile(r"[\d\x00](?=[^\d\x00]*\Z)", re.ASCII)
# Between two phone numbers of a list: "555-1234 or 555 5678", "555-1234, 555 5678".
_LIST = re.compile(r"(?:[\s,;/&]|\bor\b|\band\b)*", re.ASCII)
# How people separate the groups of a phone number: "415 555", "415-555", "415 - 555", "030/123", "(0)20".
_PLAIN = re.compile(r"\(?\d{1,15}\)?(?:(?: ?[.\-] ?| |/|(?<=\)))\(?\d{1,15}\)?)*", re.ASCII)
# A number known by the words around it: at most 15 digits (E.164's most) and not ending in a lone
# digit, as ISBNs (978-3-16-148410-0) and check-digit ids do.
_WRITTEN = re.compile(r"(?=(?:\D*\d){7,15}\D*\Z)(?:\(?\d{1,15}\)?(?: ?[.\-] ?| |/|(?<=\))))*\(?\d{2,15}\)?", re.ASCII)

_S = r"(?: ?[.\-] ?| )"  # between groups: a space, or a dash or a dot with or without spaces
_SHAPES = re.compile("|".join([
    rf"(?P<nanp>(?:1{_S}?)?(?:\(\d{{3}}\){_S}?|\d{{3}}(?:{_S}|/))\d{{3}}{_S}\d{{4}})",
    rf"(?P<trunk0>(?:0[1-9]\d{{0,3}}(?:{_S}|/| / )|\(0[1-9]\d{{0,3}}\){_S}?)\d{{2,8}}(?:{_S}\d{{2,8}}){{0,4}})",
    r"(?P<india>0?[6-9]\d{4}[ \-]\d{5})",
    r"(?P<brazil>\(\d{2}\) ?\d{4,5}[ \-]\d{4})",
    r"(?P<china>1[3-9]\d[ \-]\d{4}[ \-]\d{4})",
]), re.ASCII)
_COMPACT_NANP = re.compile(r"1?[2-9]\d\d[2-9]\d{6}", re.ASCII)  # 5558675309: NANP's form, assigned or not
_LOCAL = re.compile(r"[2-9]\d\d-\d{4}", re.ASCII)  # 867-5309: NANP's local form
_SSN_SHAPE = re.compile(r"\d{3}([\- ])\d\d\1\d{4}", re.ASCII)  # an SSN's (a valid one is an SSN already)
_ZIP4 = re.compile(r"\d{5}-\d{4}", re.ASCII)
# Dates and date-times (2024-03-15 14, 15/03/2024 14) and dotted quads (a malformed IP address).
_NOT_PHONE = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}"
                        r"|(?:\d{4}([\-/.])\d{1,2}\1\d{1,2}|\d{1,2}([\-/.])\d{1,2}\2\d{2,4})(?: \d{1,2})?", re.ASCII)
_THOUSANDS = re.compile(r"[1-9]\d{0,2}([ .])\d{3}(?:\1\d{3})*", re.ASCII)
_CURRENCY = r"[$€£¥₹]|(?:usd|eur|gbp|chf|jpy|inr|cad|aud|sek|nok|dkk|pln|rs|kr)\b"
_AMOUNT_BEFORE = re.compile(rf"(?:{_CURRENCY})\.? ?\(?$", re.IGNORECASE)
_AMOUNT_AFTER = re.compile(rf",\d| ?(?:{_CURRENCY}|%)", re.IGNORECASE)

# Words naming a number that is not a phone number; "number", "no", "id" right after one of them
# belong to it ("order number 4417-2290-118").
_OTHER_WORDS = frozenset((
    "order", "invoice", "inv", "po", "sku", "item", "part", "model", "serial", "s/n", "tracking", "track", "waybill",
    "awb", "shipment", "parcel", "package", "ticket", "case", "incident", "ref", "reference", "id", "isbn", "issn",
    "ean", "upc", "gtin", "page", "pages", "pp", "room", "suite", "zip", "zipcode", "postcode", "postal", "account",
    "acct", "transaction", "txn", "confirmation", "booking", "reservation", "policy", "claim", "version", "ver",
    "build", "release", "lot", "batch", "receipt", "cheque", "routing", "pin", "otp", "voucher", "coupon",
    "container", "flight", "vin", "imei", "iccid", "mrn", "license", "licence", "permit", "badge", "seat", "table",
    "step", "art", "artikel", "artnr", "bestellnr", "bestellnummer", "rechnung", "rechnungsnr", "auftrag",
    "kundennr", "kundennummer", "sendungsnummer", "code", "pnr", "uid", "uuid", "guid", "token", "session", "trace",
    "job", "task", "run", "pid", "port", "error", "err", "status", "http", "count", "total", "sum", "size", "rows",
    "seed", "epoch", "bytes", "len", "length", "qty", "quantity", "amount", "balance", "score", "value", "val",
    "max", "min", "avg", "mean", "offset", "limit", "duration", "elapsed", "took", "latency", "timestamp", "ts",
    "nonce", "checksum", "crc", "hash",
))
_QUALIFIERS = frozenset(("number", "num", "no", "nr", "id", "code", "nummer"))
_PHONE_WORDS = frozenset((
    "call", "calls", "called", "calling", "phone", "phones", "phoned", "ph", "tel", "telephone", "cell", "cellphone",
    "cellular", "mobile", "mob", "fax", "reach", "reached", "reachable", "text", "texted", "texting", "txt", "sms",
    "whatsapp", "signal", "viber", "telegram", "dial", "dialed", "dialled", "ring", "voicemail", "vm", "landline",
    "line", "hotline", "helpline", "switchboard", "ext", "extension", "contact", "contacted", "number", "tél",
    "téléphone", "telefon", "telefono", "teléfono", "handy", "móvil", "portable", "celular",
))
_WORD = re.compile(r"[^\W\d_]+(?:/[^\W\d_]+)?")
# Between a number's name and the number: "order_id": "...", order #..., code is ...
_SEPARATORS = re.compile(r"(?:[\s.:#=()\-\"'_\[\]{}]|\bis\b|\bwas\b)*")
# A unit after a number standing alone makes it a quantity: 5603990925 ns, 4155552671 bytes.
_QUANTITY = re.compile(r" ?(?:[kmgt]i?b|bytes?|[nuµm]?s|secs?|seconds?|mins?|minutes?|h|hrs?|hours?|days?|rows?|records?"
                       r"|items?|users?|times?|words?|pages?|tokens?|requests?|events?|hits?|views?|downloads?"
                       r"|k?m|mi|k?g|lbs?|px|pts?)\b", re.IGNORECASE)
_PHONE_AFTER = re.compile(r"[\s,;:\-]{0,3}\(?(?:cell|mobile|home|work|office|fax|tel|phone|landline|direct|main"
                          r"|whatsapp|voicemail)\b", re.IGNORECASE)


class PhoneFinder:
    """Finds the phone numbers in one string's view, with that string's budgets."""

    def __init__(self, view: str) -> None:
        self.view = view
        self.parses = MAX_PHONE_PARSES
        self.work = MAX_PHONE_WORK  # digit groups examined
        self._context: dict[int, tuple[bool, bool, bool]] = {}  # start -> context(start)
        self.found: list[tuple[int, int]] = []  # (start, end) of the phone numbers so far

    def spans(self) -> list[tuple[int, int]]:
        """(start, end) of each phone number in the view, in order."""
        pos = 0
        while (m := CANDIDATE.search(self.view, pos)) is not None:
            if self.work > 0:
                pos = self._in_candidate(m.start(), m.group())
                continue
            if sum(c.isdigit() for c in m.group()) >= _MIN_DIGITS:  # fail closed: redacted unexamined
                self.found.append((m.start(), m.end()))
            pos = m.end()
        return self.found

    def _in_candidate(self, at: int, cand: str) -> int:
        """Leftmost-longest numbers in one candidate, each a run of whole digit groups; returns
        where to look next. A long candidate may end inside a number ("... 11 415 555" of
        "... 11 415 555 2671"): its last groups are looked at again, after its last number."""
        found, first = self.found, len(self.found)
        groups = [(g.start(), g.end()) for g in _GROUP.finditer(cand)]
        self.work -= len(groups)
        digits = [0]  # digits[k]: digits in the groups before group k
        for lo, hi in groups:
            digits.append(digits[-1] + hi - lo)
        # A number starts and ends where a space is, or a "/" between numbers of a phone's shape
        # (555-867-5309/555-867-5310): edge[k], what is between groups k-1 and k. It stands alone
        # unless a single space joins it to more digits.
        between = [""] + [cand[groups[k - 1][1]:groups[k][0]] for k in range(1, len(groups))] + [""]
        edge = [_SPACE] + [_edge(sep) for sep in between[1:-1]] + [_SPACE]
        last = len(groups) - 1
        runs: list[tuple[int, int]] = []  # the groups of each number found
        i = 0
        while i <= last:
            if edge[i]:
                # from the most groups down to the fewest that still hold _MIN_DIGITS
                fewest = bisect_left(digits, digits[i] + _MIN_DIGITS) - 1
                for j in range(min(last, i + _MAX_GROUPS - 1), fewest - 1, -1):
                    if not edge[j + 1] or digits[j + 1] - digits[i] > _MAX_DIGITS:
                        continue
                    start = self._match(at, cand, groups, i, j, alone=" " not in (between[i], between[j + 1]),
                                        shaped=_SLASH in (edge[i], edge[j + 1]))
                    if start >= 0:
                        found.append((at + start, at + groups[j][1]))
                        runs.append((i, j))
                        i = j
                        break
            i += 1
        if runs:
            found[first:] = [span for span, run in zip(found[first:], runs, strict=True)
                             if not _part_of_longer(cand, groups, run, runs)]
        if len(found) > first:
            return found[-1][1]
        return at + (groups[last - _MAX_GROUPS + 1][1] if last >= _MAX_GROUPS else len(cand))

    def _match(self, at: int, cand: str, groups: list[tuple[int, int]], i: int, j: int, *, alone: bool,
               shaped: bool) -> int:
        """Where the number made of groups i..j starts in `cand`, or -1 when those groups are not a
        phone number. A phone's shape may take the "(" or "+" before group i ("((415) 555-2671)"
        holds one "(" of its own); a number known by the words around it starts at its digits.
        `shaped`: only a phone's shape will do."""
        sep = cand[groups[i - 1][1] if i else 0:groups[i][0]]
        lead = min(3, len(sep) - len(sep.rstrip("(+")))
        end = at + groups[j][1]
        for start in range(groups[i][0] - lead, groups[i][0] + 1):
            if self._shaped(at + start, end):
                return start
        return groups[i][0] if not shaped and self._worded(at + groups[i][0], end, alone=alone) else -1

    def _shaped(self, start: int, end: int) -> bool:
        """A phone's shape, unless another number's name comes right before and no word said phone."""
        text = self.view[start:end]
        if _NOT_PHONE.fullmatch(text) or not _strong(text):
            return False
        _, other, phoned = self.context(start)
        return phoned or not other

    def _worded(self, start: int, end: int, *, alone: bool) -> bool:
        """No phone's shape: a word around it says phone, or it stands alone in NANP's forms."""
        view = self.view
        text = view[start:end]
        after = view[end:end + 32]
        if _NOT_PHONE.fullmatch(text) or _SSN_SHAPE.fullmatch(text) or not _WRITTEN.fullmatch(text) \
                or _AMOUNT_BEFORE.search(view, max(0, start - 6), start) or _AMOUNT_AFTER.match(after):
            return False
        said, other, _ = self.context(start)
        if said or _said_after(after):
            return not other
        if not alone or other or _THOUSANDS.fullmatch(text) or _ZIP4.fullmatch(text) or _QUANTITY.match(after):
            return False
        if _LOCAL.fullmatch(text):
            return not _range(text)
        return _COMPACT_NANP.fullmatch(text) is not None or self._valid(text)

    def context(self, start: int) -> tuple[bool, bool, bool]:
        """For a number at `start`, from the 48 characters before it: (the last number-naming word
        says phone, a word naming another number comes right before, any word says phone)."""
        known = self._context.get(start)
        if known is not None:
            return known
        window = self.view[max(0, start - 48):start]
        # Words before another number belong to it ("Contact me at 881-42-2117. / 000-12-3456"), unless
        # that number was a phone in a list ("call 555-1234 or 555 5678").
        value = _LAST_VALUE.search(window)
        if value and not self._listed(start, start - len(window) + value.start()):
            window = window[value.end():]
        words = [(m.group().lower(), m.start(), m.end()) for m in _WORD.finditer(window)]
        said, phoned, other_end = False, False, -1
        for k, (word, lo, hi) in enumerate(words):
            if word in _OTHER_WORDS or (word in _QUALIFIERS and other_end >= 0
                                        and _SEPARATORS.fullmatch(window, other_end, lo)):
                said, other_end = False, hi
            elif word in _PHONE_WORDS and not (word == "number" and words[k + 1:k + 2] and words[k + 1][0] == "of"):
                said = phoned = True
        other = other_end >= 0 and not said and _SEPARATORS.fullmatch(window, other_end) is not None
        # "#5558675309" names an order's or a ticket's number, "〒150-0002" a Japanese postcode
        other = other or (not said and window.rstrip().endswith(("#", "№", "〒")))
        self._context[start] = (said, other, phoned)
        return said, other, phoned

    def _listed(self, start: int, value: int) -> bool:
        """Whether the value at `value` is the phone number just before the one at `start` in a list."""
        return bool(self.found) and self.found[-1][0] <= value < self.found[-1][1] \
            and _LIST.fullmatch(self.view, self.found[-1][1], start) is not None

    def _valid(self, text: str) -> bool:
        """phonenumbers' validity, for digits standing alone in no phone shape (415 5552671)."""
        if self.parses <= 0:
            return True
        self.parses -= 1
        if text.startswith("00"):  # the international prefix: 00551123456302
            text, region = "+" + text[2:], None
        else:
            region = "GB" if text.startswith("0") else "US"
        try:
            return phonenumbers.is_valid_number(phonenumbers.parse(text, region))
        except phonenumbers.NumberParseException:
            return False


def _part_of_longer(cand: str, groups: list[tuple[int, int]], run: tuple[int, int],
                    runs: list[tuple[int, int]]) -> bool:
    """Whether a number of digits and single spaces has more than 3 digits beside it, joined by
    single spaces and in no other number: "0657 7939 1099" of "4250 0657 7939 1099" is part of one
    longer number (an account's, a card's), "415 555 2671" of "415 555 2671 3" is not."""
    i, j = run
    if not _SPACED.fullmatch(cand, groups[i][0], groups[j][1]):
        return False
    taken = {k for lo, hi in runs for k in range(lo, hi + 1)}
    beside = 0
    for step, k in ((-1, i - 1), (1, j + 1)):
        while 0 <= k < len(groups) and k not in taken and \
                cand[groups[min(k, k - step)][1]:groups[max(k, k - step)][0]] == " ":
            beside += groups[k][1] - groups[k][0]
            k += step
    return beside > 3


def _edge(sep: str) -> int:
    return _SPACE if " " in sep else _SLASH if sep == "/" else _JOINED


def _range(text: str) -> bool:
    """Whether "AAA-BBBB" reads as a range: up to a round number (300-1000) or a later time (830-1645)."""
    first, second = text.split("-")
    if int(second) <= int(first):
        return False
    return second.endswith("0") or (int(first[-2:]) < 60 and int(second[:2]) < 24 and int(second[2:]) < 60)


def _strong(text: str) -> bool:
    """Whether `text` has a phone number's shape (see the module's list)."""
    if text.startswith(("+", "(+")):
        return _international(text)
    if text.startswith("00") and not text.isdigit() and _international(text):
        return True
    m = _SHAPES.fullmatch(text)
    if m is None:
        return False
    if m.lastgroup == "trunk0":
        count = sum(c.isdigit() for c in text)
        return 9 <= count <= 12 and not _ZIP4.fullmatch(text)
    return True


def _international(text: str) -> bool:
    """+CC or 00CC: a country code phonenumbers knows, then 8-15 digits in all (a trunk "(0)" left out)."""
    body = text.lstrip("(")
    body = body[1:] if body.startswith("+") else body[2:]
    if not _PLAIN.fullmatch(body.replace(")", "", 1) if text.startswith("(+") else body):
        return False
    digits = "".join(c for c in body.replace("(0)", "", 1) if c.isdigit())
    if not 8 <= len(digits) <= 15:
        return False
    for n in (1, 2, 3):  # country codes are prefix-free: the first one known is the one
        code = int(digits[:n])
        if code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
            return len(digits) == 11 if code == 1 else True
    return False


def _said_after(after: str) -> bool:
    """Whether the text just after a number says phone: "(cell)", or a phone word with no other
    number or number-naming word around it ("867-5309. Call her.")."""
    if _PHONE_AFTER.match(after):
        return True
    value = _VALUE.search(after)
    for m in _WORD.finditer(after, 0, value.start() if value else len(after)):
        word = m.group().lower()
        if word in _OTHER_WORDS:
            return False
        if word in _PHONE_WORDS:  # unless it introduces the next value ("... and call me at 555-...")
            return value is None
    return False
