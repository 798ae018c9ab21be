"""The cache-money key spec in standard-library Python.

A call's digest is md5 of its arguments as one JSON array serialized per RFC 8785 (the JSON
Canonicalization Scheme): no whitespace, object keys sorted by UTF-16 code units, strings
escaping only quote, backslash and control characters, numbers in ECMAScript's format.
Values JSON cannot carry faithfully are refused rather than keyed: NaN and infinities,
integers beyond +-(2**53 - 1) (pass them as strings), and non-string dict keys.
A versioned function (version 2 and up) hashes "v{version}:" followed by that text.
"""

import hashlib
import json
import math

MAX_SAFE_INTEGER = 2**53 - 1


def es_number(x: float) -> str:
    """Formats a float as ECMAScript's Number.prototype.toString, which RFC 8785 adopts."""
    if math.isnan(x) or math.isinf(x):
        raise ValueError(f"{x} has no JSON form; NaN and infinities cannot be keyed")
    if x == 0:
        return "0"  # -0 too
    sign = "-" if x < 0 else ""
    # repr gives the shortest digits that read back to the same float; only the layout differs.
    mantissa, _, exponent = repr(abs(x)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    all_digits = whole + fraction
    significant = all_digits.lstrip("0")
    n = len(whole) - (len(all_digits) - len(significant)) + int(exponent or 0)  # x = 0.DIGITS * 10**n
    digits = significant.rstrip("0")
    k = len(digits)
    if k <= n <= 21:
        body = digits + "0" * (n - k)
    elif 0 < n <= 21:
        body = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        body = "0." + "0" * -n + digits
    else:
        e = n - 1
        body = digits[0] + ("." + digits[1:] if k > 1 else "") + "e" + ("+" if e >= 0 else "-") + str(abs(e))
    return sign + body


def canonical(value) -> str:
    """The RFC 8785 text of a JSON-like Python value."""
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise ValueError(f"integer {value} is beyond +-(2**53 - 1); pass it as a string")
        return str(value)
    if isinstance(value, float):
        return es_number(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(canonical(item) for item in value) + "]"
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise ValueError("dict keys must be strings; JSON objects have string keys only")
        keys = sorted(value, key=lambda key: key.encode("utf-16-be"))
        return "{" + ",".join(json.dumps(key, ensure_ascii=False) + ":" + canonical(value[key]) for key in keys) + "}"
    raise TypeError(f"{type(value).__name__} has no JSON form; convert it before keying")


def digest(*args, version: int = 1) -> str:
    """The digest of a call with these positional arguments, in the function's key space
    `version`: from version 2 on, md5 of "v{version}:" and the canonical text; version 1 is
    the unversioned digest (the seed's keys)."""
    if version < 1:
        raise ValueError(f"version must be 1 or more, got {version}")
    text = canonical(list(args))
    if version > 1:
        text = f"v{version}:{text}"
    return hashlib.md5(text.encode("utf-8")).hexdigest()
