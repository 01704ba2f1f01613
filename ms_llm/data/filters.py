# SPDX-License-Identifier: Apache-2.0
"""Rule-based text-quality checks for teacher samples (seed 000 §1.2.5.1.2).

The seed uses LanguageTool for a grammar-error rate; it cannot run offline here, so the quality filter is a set
of pluggable rules, each `rule(answer, prompt, meta) -> list of issue strings`. The error rate of a sample is
issues per word of the answer (LanguageTool reports errors per text the same way). Rules in FATAL reject a
sample by themselves, whatever its length: a truncated or garbled answer is not a little bit wrong.

Register more with `RULES["name"] = fn` and list the name in `distill.generate.rules`.
"""
import re
from collections import Counter

from ms_llm.config.schema import TEXT_RULES

_DANGLING_END = re.compile(r"([+\-*/=,:(\[{<&|]|\b(and|or|the|a|an|of|to|with|is|return|def|if|else))\s*$", re.I)
_MOJIBAKE = re.compile("\ufffd|Ã.|â€|Â[\x80-\xbf ]|ðŸ")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
_LATIN = re.compile(r"[A-Za-z]")
_PAIRS = {"(": ")", "[": "]", "{": "}"}


def words(text: str) -> list:
    return re.findall(r"\w+|[^\w\s]", text)


def repetition(answer: str, prompt: str = "", meta: dict = None) -> list:
    """A word 3-gram occurring three or more times, or one token making up over half of a long answer."""
    w = [x.lower() for x in re.findall(r"\w+", answer)]
    issues = []
    grams = Counter(tuple(w[i:i + 3]) for i in range(len(w) - 2))
    issues += [f"repeated phrase '{' '.join(g)}' x{c}" for g, c in grams.items() if c >= 3]
    if len(w) >= 6:
        word, c = Counter(w).most_common(1)[0]
        if c / len(w) > 0.5:
            issues.append(f"word '{word}' is {c} of {len(w)} words")
    return issues


def truncation(answer: str, prompt: str = "", meta: dict = None) -> list:
    """Generation stopped at the length limit, the text ends mid-clause, or a code fence is left open."""
    issues = []
    if meta and meta.get("hit_limit"):
        issues.append("stopped at max_new_tokens without an end-of-turn token")
    text = answer.rstrip()
    if not text:
        issues.append("empty answer")
    elif _DANGLING_END.search(text):
        issues.append(f"ends mid-clause: '...{text[-20:]}'")
    if answer.count("```") % 2:
        issues.append("unclosed code fence")
    return issues


def brackets(answer: str, prompt: str = "", meta: dict = None) -> list:
    """Unbalanced (), [], {} and an odd number of double quotes."""
    stack, issues = [], []
    for ch in answer:
        if ch in _PAIRS:
            stack.append(ch)
        elif ch in _PAIRS.values():
            if not stack or _PAIRS[stack.pop()] != ch:
                issues.append(f"unmatched '{ch}'")
    issues += [f"unclosed '{ch}'" for ch in stack]
    if answer.count('"') % 2:
        issues.append("odd number of double quotes")
    return issues


def mojibake(answer: str, prompt: str = "", meta: dict = None) -> list:
    """Replacement characters and UTF-8-read-as-Latin-1 sequences."""
    return [f"mojibake '{m}'" for m in _MOJIBAKE.findall(answer)]


def _script(text: str):
    cjk, latin = len(_CJK.findall(text)), len(_LATIN.findall(text))
    if cjk + latin == 0:
        return None
    return "cjk" if cjk > latin else "latin"


def language(answer: str, prompt: str = "", meta: dict = None) -> list:
    """The answer is written in another script than expected (meta["language"], or the prompt's)."""
    want = (meta or {}).get("language", "auto")
    want = _script(prompt) if want == "auto" else want
    got = _script(answer)
    if want and got and got != want:
        return [f"answer is {got} text, expected {want}"]
    return []


RULES = {"repetition": repetition, "truncation": truncation, "brackets": brackets, "mojibake": mojibake,
         "language": language}
if tuple(RULES) != TEXT_RULES:          # the config's rule names are these, in this order
    raise RuntimeError(f"data.filters.RULES {list(RULES)} != config.schema.TEXT_RULES {list(TEXT_RULES)}")
FATAL = {"truncation", "mojibake", "language"}


def check(answer: str, prompt: str, rules, meta: dict = None) -> dict:
    """{"issues": {rule: [...]}, "error_rate": issues per word, "fatal": [rules that reject outright]}."""
    found = {}
    for name in rules:
        if name not in RULES:
            raise KeyError(f"unknown text-quality rule '{name}'; known: {sorted(RULES)}")
        issues = RULES[name](answer, prompt, meta or {})
        if issues:
            found[name] = issues
    n = sum(len(v) for v in found.values())
    return {"issues": found, "error_rate": n / max(len(words(answer)), 1),
            "fatal": sorted(r for r in found if r in FATAL)}
