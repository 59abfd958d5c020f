"""A hand-written PII corpus: values in the forms people and systems really write them, in the places
they turn up (mail, chat, support tickets, logs, JSON, CSV, HTML, forms). Not generated: the shapes
are not any one generator's (tests/pii_corpus.py is the seeded, generated one).

Each value to scrub is marked in place as [[kind:value]]; `entries()` gives the plain text and the
exact spans, `scores()` what the scrubber makes of them. Phone numbers, the most varied kind, are
in tests/pii_corpus_phones.py; look-alikes, which must come back unchanged, in
tests/pii_corpus_lookalikes.py.
Numbers are the reserved or documented ones where a scheme has them (NANP 555-01xx, Ofcom drama
ranges, RFC 5737/3849 addresses, card-network test cards, the IBAN registry's examples) and
otherwise made up in the country's written form.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ray_app.governance.pii import find_pii, scrub_text
from tests.pii_corpus_lookalikes import LOOKALIKES
from tests.pii_corpus_phones import PHONE

KINDS = ("email", "ssn", "credit_card", "ip_address", "phone", "iban")

EMAIL = [
    "Please send the signed contract to [[email:jane.doe@example.com]] by Friday.",
    "From: \"Smith, John\" <[[email:j.smith@mail.example.org]]>",
    "<a href=\"mailto:[[email:support+billing@example.io]]\">Billing</a>",
    "CC [[email:FIRST.LAST@EXAMPLE.CO.UK]] on the thread",
    "login failed for user=[[email:user_name-1@sub.example-mail.com]] ip=<redacted>",
    "{\"email\":\"[[email:a.b@example.com]]\",\"verified\":true}",
    "reply-to: [[email:noreply.ops@alerts.example.net]]",
    "ping me at [[email:kofi.okafor@uni-example.edu]] if the build breaks",
    "Contact: [[email:o'brien@example.ie]]",
    "Sehr geehrte Frau Müller, bitte an [[email:müller@bücher.example]] schicken.",
    "correo: [[email:josé.garcía@empresa.example]]",
    "写信到[[email:wei.chen@example.cn]]谢谢",
    "[mail me]([[email:sam99@example.dev]])",
    "id,name,email\n17,Ann,[[email:ann@example.travel]]",
    "Forwarded message from [[email:priya.patel@corp.example.in]]:",
    "New signup: [[email:tom+newsletter@example.shop]]",
    "SMTP 550 rejected recipient <[[email:olga.ivanova@example.ru]]>",
    "The customer's email is [[email:carlos_rossi@example.it]], not the one on file.",
    "Hi team, I'm [[email:li.nguyen@example.vn]], the new PM.",
    "user: [[email:x@example.ai]]",
    "Send invoices to [[email:ap@example-holdings.com]] (accounts payable).",
    "git commit --author=\"Anna <[[email:anna.k@example.org]]>\"",
    "2024-03-15 14:22:07 INFO password reset requested for [[email:m.garcia@example.es]]",
    "Emails: [[email:one@example.com]], [[email:two@example.com]]; [[email:three@example.com]]",
    "recipient=\"[[email:ceo@example.co]]\" subject=\"Q3 numbers\"",
    "<p>Questions? Write to <b>[[email:help@example.museum]]</b></p>",
    "[[email:ALICE@EXAMPLE.COM]] asked for a refund",
    "Owner: [[email:dev-team@lists.example.org]]",
    "Please unsubscribe [[email:m.jones1985@example.net]] from all lists.",
    "Teams message: @Raj can you email [[email:raj.kumar@example.co.in]] the logs?",
    "Contact [[email:hello@example.berlin]] for tickets.",
    "e-mail: [[email:info@xn--bcher-kva.example]]",
    "The form had [[email:test.user+2024@gmail.example]] in the name field",
    "Mailing list: [[email:announce-request@example.org]]",
    "Old address [[email:jdoe@mail2.example.com]] bounces now",
    "{\"to\": [\"[[email:a1@example.com]]\", \"[[email:b2@example.com]]\"]}",
    "My work email is [[email:e.schmidt@firma.example.de]]",
    "auth: token issued to [[email:svc-backup@infra.example.io]]",
    "billing_contact = [[email:finance.team@example.com.au]]",
    "Sent from [[email:kim.lee@example.kr]] via mobile",
    "Support ticket opened by [[email:h.tanaka@example.jp]]",
    "Replying to [[email:zoe.m@example.nz]]: thanks!",
]

SSN = [
    "SSN: [[ssn:078-05-1120]]",
    "Applicant SSN [[ssn:219-09-9999]], DOB 04/12/1980",
    "my social security number is [[ssn:457-55-5462]]",
    "Please verify SSN [[ssn:536-22-8726]] against the W-2.",
    "ssn=[[ssn:123-45-6789]]&dob=1990-01-01",
    "{\"ssn\": \"[[ssn:287-65-4321]]\", \"name\": \"J. Rivera\"}",
    "Employee: Maria Lopez | SSN [[ssn:401 33 7788]] | Dept 12",
    "SSN# [[ssn:512-44-9081]]",
    "social security no. [[ssn:623-18-4410]]",
    "The customer read me her SSN, [[ssn:345-67-8901]], over the phone.",
    "SSN (last verified 2023): [[ssn:231-84-0192]]",
    "ssn:[[ssn:167-20-3345]]",
    "Tax form: name=K. Brown, SSN [[ssn:689-04-2231]]",
    "Social Security Number: [[ssn:598-27-1146]]",
    "w2.pdf extracted -> SSN [[ssn:302-11-7654]]",
    "SSN [[ssn:478839201]] on file",
    "social security number [[ssn:512336789]]",
    "Patient SSN: [[ssn:145-62-9930]]",
    "Member ID 88213, SSN [[ssn:244-51-6607]]",
    "Please don't store this: [[ssn:391-20-4478]] is my social.",
    "SSN [[ssn:732 19 5520]]",
    "Name,SSN,State\nAlex Kim,[[ssn:610-25-3391]],CA",
    "Verified identity (ssn [[ssn:655-12-0098]])",
    "ssn: [[ssn:208-71-3356]]; ein: 12-3456789",
    "<td>SSN</td><td>[[ssn:519-33-2810]]</td>",
    "Spouse SSN [[ssn:347-08-1295]]",
    "I think my SSN [[ssn:590-44-1837]] was leaked in the breach.",
    "SSN on application: [[ssn:273-91-6620]]",
    "Last year's return used [[ssn:418-66-0935]] for the dependent.",
    "ssn [[ssn:139-72-5581]] verified via e-verify",
    "The SSN field shows [[ssn:555-12-3456]].",
    "form W-9: SSN [[ssn:623-45-1190]]",
    "SSN: [[ssn:701-22-8843]] (retired)",
    "Background check for SSN [[ssn:262-18-4407]] came back clear.",
    "SSN of the primary borrower is [[ssn:486-30-1172]]",
    "soc sec [[ssn:390-22-7716]]",
    "social security: [[ssn:529-84-3310]]",
    "SSN [[ssn:201-56-7789]] and SSN [[ssn:332-90-1145]] belong to the same household",
    "{\"applicant\": {\"ssn\": \"[[ssn:610-48-2276]]\"}}",
    "Taxpayer ID [[ssn:244556677]]",
    "ssn#: [[ssn:557-81-0043]]",
]

CREDIT_CARD = [
    "Card number: [[credit_card:4111 1111 1111 1111]], exp 12/27",
    "Please charge [[credit_card:4012888888881881]] for the renewal.",
    "visa [[credit_card:4222222222222]] (old 13-digit)",
    "{\"pan\": \"[[credit_card:4242424242424242]]\", \"cvc\": \"***\"}",
    "card=[[credit_card:5555-5555-5555-4444]]&exp=0925",
    "MasterCard [[credit_card:5105 1051 0510 5100]]",
    "New 2-series card: [[credit_card:2223 0031 2200 3222]]",
    "Amex [[credit_card:3782 822463 10005]]",
    "AMEX: [[credit_card:371449635398431]]",
    "Discover card [[credit_card:6011 1111 1111 1117]]",
    "disc [[credit_card:6011-0009-9013-9424]]",
    "JCB [[credit_card:3530 1113 3330 0000]]",
    "jcb=[[credit_card:3566002020360505]]",
    "Diners Club [[credit_card:3056 930902 5904]]",
    "Diners [[credit_card:38520000023237]]",
    "UnionPay [[credit_card:6200 0000 0000 0005]]",
    "Customer read out [[credit_card:4917 6100 0000 0000]] over chat, please purge.",
    "payment failed for [[credit_card:4000000760000002]]",
    "Mastercard ending 9903 (full: [[credit_card:5425 2334 3010 9903]])",
    "card [[credit_card:2222 4200 0000 1113]] declined",
    "Visa: [[credit_card:4263 9826 4026 9299]]",
    "Card,Exp\n[[credit_card:5500 0055 5555 5559]],08/26",
    "Discover [[credit_card:6500000000000002]]",
    "Use this one: [[credit_card:4275 5828 2357 4162]]",
    "cc: [[credit_card:4320-7320-2152-7380]]",
    "MC [[credit_card:5161 8508 9414 8859]]",
    "{\"card\":{\"number\":\"[[credit_card:5300487183066997]]\"}}",
    "Mastercard [[credit_card:2720 9262 1930 8161]]",
    "Amex [[credit_card:3475-401880-01025]]",
    "Discover [[credit_card:6011 0287 7901 2603]]",
    "JCB [[credit_card:3509 9397 0011 5255]]",
    "19-digit Visa: [[credit_card:4644744058776234593]]",
    "[[credit_card:6586 4652 4300 7246]] is my card",
    "Diners: [[credit_card:36898704802607]]",
    "Card on file [[credit_card:4517 2500 9574 9759]]",
    "payment_method: [[credit_card:5487 3195 1156 2550]]",
    "charge [[credit_card:4111-1111-1111-1111]] $49.99",
    "2024-03-15 14:22:07 WARN raw PAN in request body: [[credit_card:4000056655665556]]",
    "Test card [[credit_card:4000 0025 0000 3155]] (3DS)",
    "Visa [[credit_card:4242 4242 4242 4242]], CVC 123",
    "The cardholder typed [[credit_card:5200828282828210]] into the notes field.",
]

IP_ADDRESS = [
    "Failed login from [[ip_address:203.0.113.42]] (5 attempts)",
    "client [[ip_address:198.51.100.7]] - - [15/Mar/2024:14:22:07 +0000] \"GET / HTTP/1.1\" 200",
    "X-Forwarded-For: [[ip_address:203.0.113.195]], [[ip_address:70.41.3.18]]",
    "{\"ip\": \"[[ip_address:192.0.2.10]]\", \"country\": \"US\"}",
    "ssh admin@[[ip_address:10.0.0.5]] -p 2222",
    "upstream [[ip_address:172.16.254.1]]:8080 timed out",
    "My home IP is [[ip_address:81.2.69.160]], can you whitelist it?",
    "remote_addr=[[ip_address:100.64.12.7]]",
    "ping [[ip_address:8.8.8.8]]",
    "Allow from [[ip_address:192.168.1.23]]",
    "router at [[ip_address:192.168.0.1]], printer at [[ip_address:192.168.0.50]]",
    "session started ip=[[ip_address:45.33.32.156]] ua=Mozilla/5.0",
    "block [[ip_address:185.220.101.4]] (tor exit)",
    "VPN assigned [[ip_address:10.8.0.14]] to the user",
    "src=[[ip_address:203.0.113.9]] dst=[[ip_address:198.51.100.20]] proto=tcp",
    "The attacker used [[ip_address:91.198.174.192]].",
    "DNS: [[ip_address:1.1.1.1]], [[ip_address:9.9.9.9]]",
    "host: [[ip_address:127.0.0.1]]",
    "subnet [[ip_address:10.1.0.0]]/16 is internal",
    "Customer's static IP: [[ip_address:62.210.16.61]]",
    "GeoIP lookup for [[ip_address:213.180.204.62]] returned DE",
    "last_login_ip: \"[[ip_address:176.9.25.100]]\"",
    "IPv6 client [[ip_address:2001:db8::ff00:42:8329]] connected",
    "link-local [[ip_address:fe80::1ff:fe23:4567:890a]]%eth0",
    "mapped [[ip_address:::ffff:192.0.2.128]]",
    "curl http://[[[ip_address:2001:db8::1]]]:443/health",
    "{\"ip\": \"[[ip_address:2001:0db8:85a3:0000:0000:8a2e:0370:7334]]\"}",
    "loopback [[ip_address:::1]] only",
    "peer [[ip_address:2a00:1450:4001:81c::200e]] reset the stream",
    "NAT64 [[ip_address:64:ff9b::c000:221]]",
    "fw: deny [[ip_address:2001:db8:abcd:12::1]] port 22",
    "ip: [[ip_address:2606:4700:4700::1111]]",
    "The user connected from [[ip_address:2001:db8:3333:4444:5555:6666:7777:8888]]",
    "Set-Cookie issued to [[ip_address:203.0.113.250]]",
    "ip,ts\n[[ip_address:198.51.100.33]],1710512527",
    "proxy chain: [[ip_address:10.2.3.4]] -> [[ip_address:10.2.3.5]]",
    "My IP address is [[ip_address:24.48.0.1]]",
    "gateway=[[ip_address:172.31.0.1]]",
    "banned [[ip_address:5.188.10.179]] for spam",
    "Origin IP [[ip_address:34.120.177.193]] behind CDN",
    "Request from [[ip_address:2001:db8:85a3::8a2e:370:7334]] blocked",
]

IBAN = [
    "Please transfer the deposit to [[iban:DE89 3704 0044 0532 0130 00]].",
    "IBAN: [[iban:GB29 NWBK 6016 1331 9268 19]]",
    "Bankverbindung: [[iban:DE44500105175407324931]], BIC INGDDEFFXXX",
    "Virement sur [[iban:FR14 2004 1010 0505 0001 3M02 606]] svp",
    "Rekeningnummer [[iban:NL91 ABNA 0417 1643 00]]",
    "{\"iban\": \"[[iban:BE68539007547034]]\", \"holder\": \"J. Peeters\"}",
    "Transferencia a [[iban:ES91 2100 0418 4502 0005 1332]]",
    "Bonifico su [[iban:IT60 X054 2811 1010 0000 0123 456]]",
    "IBAN [[iban:CH93 0076 2011 6238 5295 7]]",
    "iban=[[iban:AT611904300234573201]]",
    "Konto: [[iban:PL61 1090 1014 0000 0712 1981 2874]]",
    "Swedish account [[iban:SE45 5000 0000 0583 9825 7466]]",
    "Norway: [[iban:NO93 8601 1117 947]]",
    "DK [[iban:DK50 0040 0440 1162 43]]",
    "Tilinumero [[iban:FI21 1234 5600 0007 85]]",
    "Irish account [[iban:IE29 AIBK 9311 5212 3456 78]]",
    "NIB/IBAN: [[iban:PT50 0002 0123 1234 5678 9015 4]]",
    "Luxembourg [[iban:LU28 0019 4006 4475 0000]]",
    "Číslo účtu [[iban:CZ65 0800 0000 1920 0014 5399]]",
    "Számlaszám: [[iban:HU42 1177 3016 1111 1018 0000 0000]]",
    "Cont [[iban:RO49 AAAA 1B31 0075 9384 0000]]",
    "Greek IBAN [[iban:GR16 0110 1250 0000 0001 2300 695]]",
    "Saudi account [[iban:SA03 8000 0000 6080 1016 7519]]",
    "UAE: [[iban:AE070331234567890123456]]",
    "Hesap [[iban:TR33 0006 1005 1978 6457 8413 26]]",
    "Conta [[iban:BR18 0036 0305 0000 1000 9795 493C 1]]",
    "Malta [[iban:MT84 MALT 0110 0001 2345 MTLC AST0 01S]]",
    "pay to [[iban:GB82WEST12345698765432]] ref INV-2024-0042",
    "Refund IBAN: [[iban:de77 1001 0010 0123 4567 89]] (typed in lower case)",
    "Barclays [[iban:GB60 BARC 2000 0055 7799 11]]",
    "HSBC [[iban:GB26MIDL40051512345674]]",
    "Compte [[iban:FR76 3000 6000 0112 3456 7890 189]]",
    "Cuenta [[iban:ES60 0049 1500 0512 3456 7892]]",
    "IBAN [[iban:IT82 A030 6909 6061 0000 0063 758]]",
    "Rabobank [[iban:NL44 RABO 0123 4567 89]], ING [[iban:NL20INGB0001234567]]",
    "Belgian: [[iban:BE23 0011 2345 6789]]",
    "{\"payout\": {\"iban\": \"[[iban:CH0504830123456789000]]\"}}",
    "Raiffeisen [[iban:AT24 2011 1822 2121 9800]]",
    "Bank of Ireland [[iban:IE92 BOFI 9000 1710 0279 52]]",
    "Lithuania [[iban:LT12 1000 0111 0100 1000]], Estonia [[iban:EE38 2200 2210 2014 5685]]",
    "Croatia [[iban:HR1210010051863000160]]",
    "Slovenia [[iban:SI97 0191 0000 0123 438]]",
    "Slovakia [[iban:SK59 1100 0000 0029 1234 5678]]",
    "Kuwait: [[iban:KW81 CBKU 0000 0000 0000 1234 5601 01]]",
    "Israel [[iban:IL62 0108 0000 0009 9999 999]]",
    "Ukraine [[iban:UA21 3223 1300 0002 6007 2335 6600 1]]",
    "Latvia [[iban:LV80 BANK 0000 4351 9500 1]]",
    "Monaco [[iban:MC58 1122 2000 0101 2345 6789 030]]",
]

POSITIVES = {"phone": PHONE, "email": EMAIL, "ssn": SSN, "credit_card": CREDIT_CARD, "ip_address": IP_ADDRESS,
             "iban": IBAN}
_MARK = re.compile(r"\[\[(\w+):(.*?)\]\]")


@dataclass
class Entry:
    text: str
    planted: list[tuple[int, int, str]]  # (start, end, kind): what must be scrubbed
    group: str  # the kind it was written for, or the look-alike's category


def parse(marked: str, group: str) -> Entry:
    """The text without its marks, and where each marked value lies in it."""
    parts, planted, pos, out = [], [], 0, 0
    for m in _MARK.finditer(marked):
        parts.append(marked[pos:m.start()])
        out += m.start() - pos
        planted.append((out, out + len(m.group(2)), m.group(1)))
        parts.append(m.group(2))
        out += len(m.group(2))
        pos = m.end()
    parts.append(marked[pos:])
    return Entry("".join(parts), planted, group)


def entries() -> list[Entry]:
    """Every positive (planted values marked) and every look-alike (nothing planted)."""
    out = [parse(text, kind) for kind, texts in POSITIVES.items() for text in texts]
    return out + [Entry(text, [], category) for category, texts in LOOKALIKES.items() for text in texts]


def scores() -> tuple[dict[str, tuple[int, int, int]], int, int]:
    """Per kind (found, missed, false finds) over the corpus, then look-alikes kept and their count.
    A value counts as found only when one span of its own kind covers all of it."""
    counts = {kind: [0, 0, 0] for kind in KINDS}
    kept = lookalikes = 0
    for entry in entries():
        spans = find_pii(entry.text)
        for start, end, kind in entry.planted:
            hit = any(s <= start and e >= end and k == kind for s, e, k in spans)
            counts[kind][0 if hit else 1] += 1
        for s, e, k in spans:
            if not any(s < end and e > start and k == kind for start, end, kind in entry.planted):
                counts[k][2] += 1
        if not entry.planted:
            lookalikes += 1
            kept += scrub_text(entry.text)[0] == entry.text
    return {k: (f, m, x) for k, (f, m, x) in counts.items()}, kept, lookalikes
