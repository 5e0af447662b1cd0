"""Pre-tokenization as llama.cpp does it (llama-vocab.cpp, unicode.cpp): cutting special tokens out of
the text, and the regex splits and byte-level alphabet of byte-level BPE vocabularies.

llama.cpp splits text with a *list* of regexes per `tokenizer.ggml.pre`: each regex is applied to every
piece the previous one produced, and both its matches and the text between them become pieces
(`unicode_regex_split`). Its `\\p{L}`, `\\p{N}`... come from its own Unicode table, not from a regex
engine: it "collapses" every non-ASCII code point to one placeholder byte per category (non-ASCII
whitespace to \\v) and runs ECMAScript `std::regex` over that; regexes without categories run over the
code points themselves (again with non-ASCII whitespace turned into \\v). llama.cpp's hand-written
fast paths for the gpt2/llama3/qwen2 patterns split exactly as those regexes do on the same table.

Why this is written by hand rather than as a `tokenizers` Split pre-tokenizer: Oniguruma's `\\p{L}`,
`\\s` and `$` differ from llama.cpp's table and ECMAScript semantics (Unicode version, \\v-collapsed
whitespace, `$` = end of input only), so the splits would not be bit-exact. Here the same collapse is
done (str.translate), and Python's `re` runs the patterns with ASCII-only `\\s`/`\\b` (re.ASCII), which is
what ECMAScript gives on the collapsed text. The merges themselves run in `tokenizers` (engine.text.tokenizer).

Category table: Python's `unicodedata` (Unicode 14.0 on Python 3.11) plus the code points that Unicode
15.0/15.1 assigned (llama.cpp's table is generated from UCD 15.1), so every code point gets the class
llama.cpp gives it. (A Python with a Unicode database newer than 15.1 would also class the code points
assigned since, which llama.cpp still treats as unassigned.)
"""
from __future__ import annotations

import bisect
import re
import unicodedata
from dataclasses import dataclass

# The White_Space property (PropList.txt): llama.cpp's `\s` for its hand-written splitters.
WHITESPACE_CPTS = frozenset([*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
                             0x2028, 0x2029, 0x202F, 0x205F, 0x3000])

# Code points assigned in Unicode 15.0/15.1 that Python 3.11's unicodedata (14.0) reports as Cn:
# (first, last, major category).
_UNICODE_15_ADDITIONS = (
    (0x0CF3, 0x0CF3, "M"), (0x0ECE, 0x0ECE, "M"), (0x2FFC, 0x2FFF, "S"), (0x31EF, 0x31EF, "S"),
    (0x10EFD, 0x10EFF, "M"), (0x1123F, 0x11240, "L"), (0x11241, 0x11241, "M"), (0x11B00, 0x11B09, "P"),
    (0x11F00, 0x11F01, "M"), (0x11F02, 0x11F02, "L"), (0x11F03, 0x11F03, "M"), (0x11F04, 0x11F10, "L"),
    (0x11F12, 0x11F33, "L"), (0x11F34, 0x11F3A, "M"), (0x11F3E, 0x11F42, "M"), (0x11F43, 0x11F4F, "P"),
    (0x11F50, 0x11F59, "N"), (0x1342F, 0x1342F, "L"), (0x13439, 0x1343F, "C"), (0x13440, 0x13440, "M"),
    (0x13441, 0x13446, "L"), (0x13447, 0x13455, "M"), (0x1B132, 0x1B132, "L"), (0x1B155, 0x1B155, "L"),
    (0x1D2C0, 0x1D2D3, "N"), (0x1DF25, 0x1DF2A, "L"), (0x1E030, 0x1E06D, "L"), (0x1E08F, 0x1E08F, "M"),
    (0x1E4D0, 0x1E4EB, "L"), (0x1E4EC, 0x1E4EF, "M"), (0x1E4F0, 0x1E4F9, "N"), (0x1F6DC, 0x1F6DC, "S"),
    (0x1F774, 0x1F776, "S"), (0x1F77B, 0x1F77F, "S"), (0x1F7D9, 0x1F7D9, "S"), (0x1FA75, 0x1FA77, "S"),
    (0x1FA87, 0x1FA88, "S"), (0x1FAAD, 0x1FAAF, "S"), (0x1FABB, 0x1FABD, "S"), (0x1FABF, 0x1FABF, "S"),
    (0x1FACE, 0x1FACF, "S"), (0x1FADA, 0x1FADB, "S"), (0x1FAE8, 0x1FAE8, "S"), (0x1FAF7, 0x1FAF8, "S"),
    (0x2B739, 0x2B739, "L"), (0x2EBF0, 0x2EE5D, "L"), (0x31350, 0x323AF, "L"),
)
_ADDITION_STARTS = [first for first, _, _ in _UNICODE_15_ADDITIONS]

# Placeholders of the collapsed view (private-use code points; any such code point in the input is
# itself collapsed to OTHER, so a placeholder never stands for anything but its class).
OTHER, NUMBER, LETTER, PUNCT, MARK, SYMBOL = "\ue000", "\ue001", "\ue002", "\ue003", "\ue004", "\ue005"
_PLACEHOLDER = {"N": NUMBER, "L": LETTER, "P": PUNCT, "M": MARK, "S": SYMBOL}

# What each category means in a collapsed pattern: the ASCII members (kept as themselves) and the
# placeholder for every non-ASCII member.
_CLASS_BODY = {
    "N": r"0-9" + NUMBER,
    "L": r"A-Za-z" + LETTER,
    "P": r"\x21-\x23\x25-\x2a\x2c-\x2f\x3a\x3b\x3f\x40\x5b-\x5d\x5f\x7b\x7d" + PUNCT,
    "M": MARK,
    "S": r"\x24\x2b\x3c-\x3e\x5e\x60\x7c\x7e" + SYMBOL,
}
_CATEGORY_NAMES = {"N": "N", "L": "L", "P": "P", "M": "M", "S": "S",
                   "Lu": "L", "Ll": "L", "Lt": "L", "Lm": "L", "Lo": "L"}


def major_category(cpt: int) -> str:
    """One letter: L, N, P, M, S, or C/Z for the rest (unassigned included), per Unicode 15.1."""
    category = unicodedata.category(chr(cpt))
    if category == "Cn":
        i = bisect.bisect_right(_ADDITION_STARTS, cpt) - 1
        if i >= 0 and cpt <= _UNICODE_15_ADDITIONS[i][1]:
            return _UNICODE_15_ADDITIONS[i][2]
    return category[0]


class _ViewTables:
    """str.translate tables for the two views, filled lazily with the non-ASCII code points seen."""

    def __init__(self) -> None:
        self.collapsed: dict[int, str] = {}
        self.wide: dict[int, str] = {}

    def learn(self, text: str) -> None:
        for ch in set(text).difference(self.collapsed):
            cpt = ord(ch)
            if cpt < 0x80:
                continue
            if cpt in WHITESPACE_CPTS:
                self.collapsed[cpt] = self.wide[cpt] = "\x0b"
            else:
                self.collapsed[cpt] = _PLACEHOLDER.get(major_category(cpt), OTHER)


_TABLES = _ViewTables()


def text_views(text: str) -> tuple[str, str]:
    """(collapsed, wide) views of `text`, code point for code point the same length as `text`."""
    if text.isascii():
        return text, text
    _TABLES.learn(text)
    return text.translate(_TABLES.collapsed), text.translate(_TABLES.wide)


def translate_pattern(pattern: str) -> tuple[re.Pattern[str], bool]:
    """Compile a llama.cpp-style (ECMAScript, with \\p{..}) regex for Python; True = collapsed view."""
    uses_categories = "\\p{" in pattern
    out: list[str] = []
    inside_class = False
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            if pattern.startswith("\\p{", i):
                end = pattern.index("}", i)
                body = _CLASS_BODY[_CATEGORY_NAMES[pattern[i + 3:end]]]
                out.append(body if inside_class else f"[{body}]")
                i = end + 1
                continue
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if ch == "[" and not inside_class:
            inside_class = True
        elif ch == "]" and inside_class:
            inside_class = False
        elif ch == "$" and not inside_class:
            ch = r"\Z"          # ECMAScript `$` without multiline: end of input only
        out.append(ch)
        i += 1
    compiled = re.compile("".join(out), re.ASCII)
    if compiled.fullmatch(""):
        raise ValueError(f"pre-tokenizer regex can match the empty string: {pattern!r}")
    return compiled, uses_categories


# ---- the patterns (the models' own pre-tokenizer regexes, written with llama.cpp's adaptations:
# case-insensitive contractions spelled out, \p{Lu}-style classes expressed with lookaheads) ----

_CONTRACTIONS = "'s|'t|'re|'ve|'m|'ll|'d"
_CONTRACTIONS_ANY_CASE = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_WHITESPACE_TAIL = r"\s*[\r\n]+|\s+(?!\S)|\s+"

GPT2 = _CONTRACTIONS + r"| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"


def _llama3_like(letters: str, digits: str, punct_tail: str = r"[\r\n]*", others: str = r"\p{L}\p{N}") -> str:
    return (f"{_CONTRACTIONS_ANY_CASE}|[^\\r\\n\\p{{L}}\\p{{N}}]?{letters}|{digits}"
            f"| ?[^\\s{others}]+{punct_tail}|{_WHITESPACE_TAIL}")


LLAMA3 = _llama3_like(r"\p{L}+", r"\p{N}{1,3}")
QWEN2 = _llama3_like(r"\p{L}+", r"\p{N}")
QWEN35 = _llama3_like(r"[\p{L}\p{M}]+", r"\p{N}", others=r"\p{L}\p{M}\p{N}")
SEED_CODER = (f"{_CONTRACTIONS_ANY_CASE}|[^\\r\\n\\p{{L}}\\p{{N}}]?\\p{{L}}+|\\p{{N}}"
              f"| ?[^\\s\\p{{L}}\\p{{N}}\\r\\n]+|{_WHITESPACE_TAIL}")
BAILINGMOE = ("'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}"
              "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+")
UFAKZEKA = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|" + _WHITESPACE_TAIL

# "Upper-ish" / "lower-ish" letters as llama.cpp approximates \p{Lu}.. on its collapsed table.
_UPPERISH = r"(?:(?=[\p{L}])[^a-z])"
_LOWERISH = r"(?:(?=[\p{L}])[^A-Z])"


def _cased_words(suffix: str, digits: str) -> str:
    lead = r"[^\r\n\p{L}\p{N}]?"
    return (f"{lead}{_UPPERISH}*{_LOWERISH}+{suffix}|{lead}{_UPPERISH}+{_LOWERISH}*{suffix}|{digits}"
            f"| ?[^\\s\\p{{L}}\\p{{N}}]+[\\r\\n/]*|{_WHITESPACE_TAIL}")


TEKKEN = _cased_words("", r"\p{N}")
GPT4O = _cased_words(f"{_CONTRACTIONS_ANY_CASE}?", r"\p{N}{1,3}")

_ASCII_PUNCT = r"[!-/:-@\[-`{-~]"
DEEPSEEK3_MAIN = (f"{_ASCII_PUNCT}[A-Za-z]+|[^\\r\\n\\p{{L}}\\p{{P}}\\p{{S}}]?[\\p{{L}}\\p{{M}}]+"
                  f"| ?[\\p{{P}}\\p{{S}}]+[\\r\\n]*|{_WHITESPACE_TAIL}")
DEEPSEEK_LLM_LETTERS = (
    "\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
    "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481"
    "\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf"
    "\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d"
    "\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4"
    "\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107"
    "\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
    "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
    "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17"
    "\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb"
    "\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+"
)
_CJK_HANGUL = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_PORO = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"

DEFAULT_REGEXES = (r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]")
_REGEXES = {
    "default": DEFAULT_REGEXES,
    "gpt2": (GPT2,),
    "starcoder": (r"\p{N}", GPT2),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]"),
    "llama3": (LLAMA3,),
    "qwen2": (QWEN2,),
    "qwen35": (QWEN35,),
    "deepseek-llm": ("[\r\n]", DEEPSEEK_LLM_LETTERS, "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
                     "\\s+$", _CJK_HANGUL, r"\p{N}+"),
    "deepseek-coder": ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_HANGUL, r"\p{N}"),
    "deepseek-v3": (r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+", DEEPSEEK3_MAIN),
    "poro": (_PORO,),
    "viking": (_PORO, r"\p{N}"),
    "tekken": (TEKKEN,),
    "gpt-4o": (GPT4O,),
    "seed-coder": (SEED_CODER,),
    "bailingmoe": (BAILINGMOE,),
    "ufakzeka": (UFAKZEKA,),
    "minicpm5": (r"\p{N}{1,3}", _llama3_like(r"\p{L}+", r"\p{N}+")),
    "laguna": ("[^\n]+|[\n]+", QWEN2),
}


@dataclass(frozen=True)
class PreTokenizerRule:
    """What a `tokenizer.ggml.pre` name selects in llama.cpp (llama_vocab::impl::load)."""
    regexes: str                 # key of _REGEXES
    clean_spaces: bool = True    # clean_up_tokenization_spaces when detokenizing
    ignore_merges: bool = False  # a word that is a whole token is not merged
    add_bos: bool = False        # default add_bos before the file's own key is read
    no_bos: bool = False         # the BOS id defaults to none
    add_sep: bool = False


def _rules(regexes: str, names: str, **flags) -> dict[str, PreTokenizerRule]:
    return {name: PreTokenizerRule(regexes, **flags) for name in names.split()}


PRE_TOKENIZERS: dict[str, PreTokenizerRule] = {
    **_rules("default", "default"),
    **_rules("gpt2", "gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert "
                     "mpt olmo jais exaone4"),
    **_rules("gpt2", "trillion granite-docling", clean_spaces=False),
    **_rules("gpt2", "jina-v1-en jina-v2-code roberta-bpe", add_sep=True),
    **_rules("starcoder", "starcoder refact codeshell exaone minerva-7b mellum2"),
    **_rules("starcoder", "command-r smollm", clean_spaces=False),
    **_rules("falcon", "falcon"),
    **_rules("llama3", "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
             ignore_merges=True, add_bos=True),
    **_rules("llama3", "dbrx smaug-bpe"),
    **_rules("llama3", "chatglm-bpe", no_bos=True),
    **_rules("llama3", "glm4 glm5", no_bos=True, ignore_merges=True),
    **_rules("qwen2", "qwen2 deepseek-r1-qwen kormo f2llmv2 hunyuan solar-open grok-2", clean_spaces=False),
    **_rules("qwen2", "stablelm2 megrez"),
    **_rules("qwen35", "qwen35", clean_spaces=False),
    **_rules("deepseek-llm", "deepseek-llm", clean_spaces=False),
    **_rules("deepseek-coder", "deepseek-coder", clean_spaces=False),
    **_rules("deepseek-v3", "deepseek-v3 hunyuan-dense joyai-llm hy_v4", clean_spaces=False),
    **_rules("poro", "poro-chat", clean_spaces=False),
    **_rules("poro", "bloom gpt3-finnish"),
    **_rules("viking", "viking", clean_spaces=False),
    **_rules("tekken", "tekken", clean_spaces=False, ignore_merges=True, add_bos=True),
    **_rules("gpt-4o", "gpt-4o llama4 kanana2 talkie minimax-m2", clean_spaces=False),
    **_rules("seed-coder", "seed-coder", clean_spaces=False),
    **_rules("bailingmoe", "bailingmoe bailingmoe2 llada-moe", clean_spaces=False),
    **_rules("ufakzeka", "ufakzeka", clean_spaces=False),
    **_rules("minicpm5", "minicpm5", ignore_merges=True),
    **_rules("laguna", "laguna", clean_spaces=False),
}

_COMPILED: dict[str, tuple[tuple[re.Pattern[str], bool], ...]] = {}


def compiled_regexes(rule: PreTokenizerRule) -> tuple[tuple[re.Pattern[str], bool], ...]:
    if rule.regexes not in _COMPILED:
        _COMPILED[rule.regexes] = tuple(translate_pattern(p) for p in _REGEXES[rule.regexes])
    return _COMPILED[rule.regexes]


def split_words(text: str, regexes: tuple[tuple[re.Pattern[str], bool], ...]) -> list[str]:
    """llama.cpp's unicode_regex_split (without byte encoding): every piece, matched or not, is kept."""
    return [text[start:end] for start, end in split_spans(text, regexes)]


def split_spans(text: str, regexes: tuple[tuple[re.Pattern[str], bool], ...]) -> list[tuple[int, int]]:
    """The (start, end) code point offsets of split_words' pieces."""
    collapsed, wide = text_views(text)
    spans = [(0, len(text))]
    for pattern, on_collapsed in regexes:
        view = collapsed if on_collapsed else wide
        next_spans: list[tuple[int, int]] = []
        for start, end in spans:
            segment = view if (start == 0 and end == len(view)) else view[start:end]
            done = 0
            for match in pattern.finditer(segment):
                m_start, m_end = match.span()
                if m_start > done:
                    next_spans.append((start + done, start + m_start))
                next_spans.append((start + m_start, start + m_end))
                done = m_end
            if done < end - start:
                next_spans.append((start + done, end))
        spans = next_spans
    return spans


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte -> printable code point map (bytes_to_unicode)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    alphabet = [""] * 256
    extra = 0
    for byte in range(256):
        if byte in printable:
            alphabet[byte] = chr(byte)
        else:
            alphabet[byte] = chr(256 + extra)
            extra += 1
    return alphabet


BYTE_TO_UNICODE = _byte_level_alphabet()
UNICODE_TO_BYTE = {ch: byte for byte, ch in enumerate(BYTE_TO_UNICODE)}
_LATIN1_TO_BYTE_LEVEL = {byte: ch for byte, ch in enumerate(BYTE_TO_UNICODE)}


def byte_encode(word: str) -> str:
    """A word's UTF-8 bytes, each written as its byte-level character."""
    return word.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_BYTE_LEVEL)


def byte_level_words(text: str, regexes: tuple[tuple[re.Pattern[str], bool], ...]) -> list[str]:
    """split_words, each piece byte-encoded (unicode_regex_split with byte_encode)."""
    spans = split_spans(text, regexes)
    if text.isascii():           # one code point = one byte: encode once, cut by the same offsets
        encoded = text.translate(_LATIN1_TO_BYTE_LEVEL)
        return [encoded[start:end] for start, end in spans if end > start]
    return [byte_encode(text[start:end]) for start, end in spans if end > start]


def byte_decode(text: str) -> bytes:
    """Byte-level characters back to bytes (llama_decode_text), with its marker for a stranger."""
    out = bytearray()
    for ch in text:
        byte = UNICODE_TO_BYTE.get(ch)
        if byte is not None:
            out.append(byte)
        else:
            out += b"[UNK_BYTE_0x" + ch.encode("utf-8").hex().encode() + text.encode("utf-8") + b"]"
    return bytes(out)


# ---- special-token partition (llama_vocab::impl::tokenizer_st_partition) ----

C_SPACES = " \t\n\v\f\r"        # isspace() in the C locale: what LSTRIP/RSTRIP remove


@dataclass(frozen=True)
class SpecialEntry:
    token_id: int
    text: str
    needs_parse_special: bool    # control and unknown tokens are only cut out with parse_special
    lstrip: bool
    rstrip: bool


class SpecialTokenSplitter:
    """Cuts special-token texts out of raw text, longest text first, each over all fragments.

    The entries come in llama.cpp's order (longest byte length first). Only entries whose text
    occurs in the input are applied; one regex scan (a trie of all texts) finds them."""

    def __init__(self, entries: list[SpecialEntry]):
        self.entries = entries
        self._scanners: dict[bool, tuple[re.Pattern[str] | None, frozenset[str]]] = {}

    def partition(self, text: str, parse_special: bool) -> list[str | int]:
        fragments: list[str | int] = [text]
        present = self._texts_present(text, parse_special)
        if not present:
            return fragments
        for entry in self.entries:
            if entry.text in present and (parse_special or not entry.needs_parse_special):
                fragments = [piece for fragment in fragments for piece in _cut(fragment, entry)]
        return fragments

    def _texts_present(self, text: str, parse_special: bool) -> set[str]:
        if parse_special not in self._scanners:
            texts = frozenset(e.text for e in self.entries if parse_special or not e.needs_parse_special)
            scanner = re.compile(f"(?=({_trie_pattern(texts)}))") if texts else None
            self._scanners[parse_special] = (scanner, texts)
        scanner, texts = self._scanners[parse_special]
        if scanner is None:
            return set()
        longest = {m.group(1) for m in scanner.finditer(text)}
        # the scan reports the longest text at each position; shorter ones there are its prefixes
        return {t[:n] for t in longest for n in range(1, len(t) + 1) if t[:n] in texts}


def _cut(fragment: str | int, entry: SpecialEntry) -> list[str | int]:
    if isinstance(fragment, int):
        return [fragment]
    pieces: list[str | int] = []
    pos, end = 0, len(fragment)
    while True:
        found = fragment.find(entry.text, pos)
        if found < 0:
            if pos < end:
                pieces.append(fragment[pos:])
            return pieces
        left = fragment[pos:found]
        if entry.lstrip:
            left = left.rstrip(C_SPACES)
        if left:
            pieces.append(left)
        pieces.append(entry.token_id)
        pos = found + len(entry.text)
        if entry.rstrip:
            while pos < end and fragment[pos] in C_SPACES:
                pos += 1
        if pos >= end:
            return pieces


def _trie_pattern(texts: frozenset[str]) -> str:
    trie: dict[str, dict] = {}
    for text in texts:
        node = trie
        for ch in text:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict[str, dict]) -> str:
        chain = ""
        while len(node) == 1 and "" not in node:     # walk plain chains without recursing
            (ch, node), = node.items()
            chain += re.escape(ch)
        branches = [re.escape(ch) + emit(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return chain
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return chain + (f"(?:{body})?" if "" in node else body)

    return emit(trie)
