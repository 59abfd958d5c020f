"""Content detectors for constitutional validation: PII leaks, harmful content, biased statements.

Pattern based, on purpose: microseconds per call, deterministic, explainable. Text is NFKC-folded,
stripped of zero-width characters and lower-cased first, and every pattern is word-bounded, so
"ｈｏｗ ｔｏ ｍａｋｅ ａ ｂｏｍｂ" and "b\u200bomb" are caught while "bombastic" is not.

They look for *instructions, encouragement and sweeping claims*, not topics: "the film depicts
violence" or "women's suffrage" are not violations; "how to build a pipe bomb", "you should kill
yourself" and "all women are bad at math" are.
"""
from __future__ import annotations

import re
import unicodedata

from ray_app.governance.pii import find_pii

_ZERO_WIDTH = dict.fromkeys(map(ord, "\u00ad\u180e\u200b\u200c\u200d\u2060\ufeff"))

HARM_PATTERNS: dict[str, list[str]] = {
    "violence": [
        r"how (?:do i |can i |to )?(?:make|build|assemble|construct) (?:a |an )?(?:pipe )?(?:bomb|explosive|ied|molotov(?: cocktail)?|grenade)s?",
        r"(?:make|build|assemble) (?:a |an )?(?:pipe bomb|explosive device|ied|molotov cocktail)",
        r"(?:3d[- ]print|build|make) (?:an? )?(?:untraceable|ghost) (?:gun|firearm)",
        r"(?:convert|modify) (?:an? |my )?(?:ar-?15|rifle|gun|pistol) (?:to|into) (?:full[- ]auto|automatic)",
        r"(?:best|easiest|quickest) way to (?:kill|murder|poison|strangle|stab|shoot) (?:a |my |your |him|her|them|someone|somebody|people)",
        r"how (?:do i |can i |to )(?:kill|murder|poison|hurt|attack) (?:a |my |your |him|her|them|someone|somebody|people|a person)",
        r"plan (?:a|an) (?:mass shooting|terror(?:ist)? attack|bombing)",
    ],
    "self_harm": [
        r"(?:you should|go|just) (?:kill|hurt|cut) yourself",
        r"(?:you should|just) (?:die|end (?:it all|your life))",
        r"how (?:do i |can i |to )(?:kill myself|commit suicide|end my life|overdose|hang myself|cut myself)",
        r"(?:best|easiest|painless|quickest) (?:way|method)s? to (?:die|commit suicide|kill (?:myself|yourself)|overdose)",
        r"nobody would miss you",
    ],
    "illegal": [
        r"how (?:do i |can i |to )(?:launder|laundering) (?:money|cash|funds)",
        r"(?:cook|make|synthesi[sz]e|manufacture) (?:meth|methamphetamine|crystal meth|fentanyl|heroin|cocaine)",
        r"how (?:do i |can i |to )(?:hotwire|steal) (?:a |an |my )?(?:car|vehicle|motorcycle)",
        r"(?:buy|sell|use) (?:stolen )?(?:credit card numbers|card dumps|cvv dumps)",
        r"how (?:do i |can i |to )(?:evade|avoid paying|cheat on) (?:my |your )?taxes",
        r"how (?:do i |can i |to )(?:hack|break) into (?:a |an |my |someone'?s |his |her |their )?(?:account|email|phone|bank|computer|network|server)",
        r"(?:make|print|produce) counterfeit (?:money|bills|currency|notes)",
        r"(?:write|create|build|deploy) (?:a |an )?(?:ransomware|keylogger|credential stealer)",
    ],
}

_GROUPS: dict[str, list[str]] = {
    "gender": ["women", "woman", "men", "girls", "boys", "females", "males", "wives", "husbands"],
    "race": ["black people", "blacks", "white people", "whites", "asians", "latinos", "hispanics", "africans",
             "arabs", "indians", "native americans"],
    "religion": ["muslims", "jews", "christians", "hindus", "buddhists", "atheists", "catholics", "sikhs"],
    "nationality": ["immigrants", "foreigners", "mexicans", "chinese", "americans", "russians", "refugees"],
    "age": ["old people", "elderly people", "the elderly", "boomers", "millennials", "teenagers", "young people"],
    "disability": ["disabled people", "the disabled", "autistic people", "blind people", "deaf people"],
    "sexual_orientation": ["gay people", "gays", "lesbians", "homosexuals", "trans people", "transgender people"],
}
_CLAIMS = [
    r"are (?:all |always |naturally |inherently |just |simply |genetically )?(?:inferior|superior|stupid|lazy|"
    r"dumb|violent|criminals|dangerous|worse|better|bad at \w+|incapable of \w+|terrorists|greedy|dirty|liars|"
    r"untrustworthy|too emotional|not as smart|less intelligent|more intelligent|weak|parasites)",
    r"(?:can'?t|cannot|should(?:n'?t| not)|shouldn'?t be allowed to|don'?t deserve to) "
    r"(?:be trusted|lead|vote|drive|work|be (?:leaders|engineers|doctors|pilots|in charge))",
    r"belong in the kitchen",
    r"are (?:all|always) (?:the same|like that)",
]


def _compile_harm() -> re.Pattern:
    parts = [f"(?P<{cat}>{'|'.join(f'(?:{p})' for p in pats)})" for cat, pats in HARM_PATTERNS.items()]
    return re.compile(r"\b(?:" + "|".join(parts) + r")\b")


def _compile_bias() -> re.Pattern:
    claims = "|".join(f"(?:{c})" for c in _CLAIMS)
    parts = [f"(?P<{cat}>{'|'.join(re.escape(g) for g in groups)})" for cat, groups in _GROUPS.items()]
    quantifier = r"(?:(?:all|most|every one of the|typical) )?"
    return re.compile(r"\b" + quantifier + r"(?:" + "|".join(parts) + r") (?:" + claims + r")\b")


_HARM = _compile_harm()
_BIAS = _compile_bias()


def normalize(text: str) -> str:
    """What detectors read: NFKC-folded, zero-width characters removed, lower case, plain spaces."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text.translate(_ZERO_WIDTH))
    return " ".join(text.lower().replace("\u2019", "'").split())


def detect(text: str) -> list[str]:
    """Sorted violation codes: "pii_leak:<type>", "harmful:<category>", "bias:<group>"."""
    found = {f"pii_leak:{kind}" for _, _, kind in find_pii(text)}
    norm = normalize(text)
    for pattern, prefix in ((_HARM, "harmful"), (_BIAS, "bias")):
        for m in pattern.finditer(norm):
            found.add(f"{prefix}:{m.lastgroup or next(k for k, v in m.groupdict().items() if v)}")
    return sorted(found)
