"""PII redaction: emails, phone numbers, payment card numbers and IBANs.

Card numbers must start with an issuer digit (2-6) and pass the Luhn check and IBANs the ISO 13616 mod-97 check, so order
numbers and dates are not redacted by accident. Each hit is replaced by `[EMAIL]`,
`[PHONE]`, `[CARD]` or `[IBAN]` and counted.
"""

from __future__ import annotations

import re
from collections import Counter

EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?\b")
CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){2,4}(?![\w])")


def luhn_ok(digits: str) -> bool:
    total, alt = 0, False
    for ch in reversed(digits):
        d = int(ch)
        if alt:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
        alt = not alt
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    s = text.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    try:
        return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1
    except ValueError:
        return False


def redact(text: str, kinds: list[str], counts: Counter) -> str:
    if not text:
        return text
    if "iban" in kinds:
        def _iban(m):
            if iban_ok(m.group()):
                counts["iban"] += 1
                return "[IBAN]"
            return m.group()
        text = IBAN.sub(_iban, text)
    if "card" in kinds:
        def _card(m):
            digits = re.sub(r"\D", "", m.group())
            # issuer digits 2-6 (Mastercard, Amex, Visa, Discover...) keep runs of zeros out
            if 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_ok(digits):
                counts["card"] += 1
                return "[CARD]"
            return m.group()
        text = CARD.sub(_card, text)
    if "email" in kinds:
        text, n = EMAIL.subn("[EMAIL]", text)
        counts["email"] += n
    if "phone" in kinds:
        def _phone(m):
            digits = re.sub(r"\D", "", m.group())
            if 9 <= len(digits) <= 15:
                counts["phone"] += 1
                return "[PHONE]"
            return m.group()
        text = PHONE.sub(_phone, text)
    return text
