"""The model's own tokenizer, read from GGUF metadata, with llama.cpp's behaviour (llama-vocab.cpp).

Supported `tokenizer.ggml.model`: "llama" (SentencePiece-style, SPM) and "gpt2" (byte-level BPE, with
the pre-tokenizers listed in engine.text.pretokenize.PRE_TOKENIZERS). `encode` follows llama_tokenize: the
special/user-defined tokens are cut out first (tokenizer_st_partition), then each text fragment is
tokenized on its own; `token_to_piece` and `decode` follow llama_token_to_piece and llama_detokenize.
Other models (bert/WPM, t5/UGM, rwkv, gemma4...) raise a ValueError listing the supported ones; so
does an unknown `tokenizer.ggml.pre`, as in llama.cpp, while a missing one means "default" with a
warning (llama.cpp's fallback).

What runs where:
- BPE merges: a `tokenizers` BPE model (vocab + merges, ignore_merges as llama.cpp sets it), fed the
  pre-split, byte-encoded words. A merge list `tokenizers` cannot hold (a duplicated pair, a part or
  result missing from the vocab) falls back to `_bpe_merge_word`, llama.cpp's merge loop in Python.
- SPM: written by hand. llama.cpp merges the adjacent pair whose joined text is the vocab token with
  the best *score* (ties to the left), with byte fallback; `tokenizers` has no such model (its BPE ranks
  merge-list pairs, its Unigram is a Viterbi search). The text is cut before a "▁" wherever no vocab
  token spans that boundary, which leaves the result unchanged and lets pieces be cached.
- The special-token partition and the pre-tokenizer regexes (engine.text.pretokenize): by hand, to match
  llama.cpp's order of cutting and its Unicode classes exactly.

Where llama.cpp's choice is unspecified, a fixed rule stands in: when several texts qualify as the
EOT/FIM token (llama.cpp takes whichever its hash map yields first), the first in its list wins
(e.g. <|eot_id|> over <|end_of_text|>); special tokens of equal length (std::sort, unstable) are cut
out in id order.
"""
from __future__ import annotations

import codecs
import heapq
import logging
import re
from typing import Any, Iterable

from gguf.constants import Keys, TokenType
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models as hf_models

from engine.text import pretokenize

log = logging.getLogger(__name__)

# llama_token_attr bits
ATTR_UNDEFINED, ATTR_UNKNOWN, ATTR_UNUSED, ATTR_NORMAL = 0, 1, 2, 4
ATTR_CONTROL, ATTR_USER_DEFINED, ATTR_BYTE = 8, 16, 32
ATTR_LSTRIP, ATTR_RSTRIP = 128, 256
_TYPE_TO_ATTR = {0: ATTR_UNDEFINED, TokenType.NORMAL: ATTR_NORMAL, TokenType.UNKNOWN: ATTR_UNKNOWN,
                 TokenType.CONTROL: ATTR_CONTROL, TokenType.USER_DEFINED: ATTR_USER_DEFINED,
                 TokenType.UNUSED: ATTR_UNUSED, TokenType.BYTE: ATTR_BYTE}

SUPPORTED_MODELS = ("llama", "gpt2")
SPM_SPACE = "\u2581"            # "▁"
_CACHE_LIMIT = 200_000


def _check_vocab_arrays(md: dict[str, Any]) -> None:
    """The token list is there and made of strings; scores and types, when present, are numbers
    with one per token (llama_vocab::impl::load refuses the same files)."""
    tokens = md.get(Keys.Tokenizer.LIST)
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ValueError(f"the vocabulary ({Keys.Tokenizer.LIST}) is missing or is not a list of strings")
    for key in (Keys.Tokenizer.SCORES, Keys.Tokenizer.TOKEN_TYPE):
        values = md.get(key)
        if values is None:
            continue
        if not isinstance(values, list) or len(values) != len(tokens) or \
                not all(isinstance(v, (int, float)) for v in values):
            count = len(values) if isinstance(values, list) else "no list of"
            raise ValueError(f"{key} has {count} numbers for {len(tokens)} tokens")


class Tokenizer:
    """A GGUF vocabulary; build it with `Tokenizer.from_metadata(md)`."""

    def __init__(self, md: dict[str, Any]):
        self.model = md.get(Keys.Tokenizer.MODEL)
        if self.model not in SUPPORTED_MODELS:
            raise ValueError(f"unsupported tokenizer model {self.model!r} (tokenizer.ggml.model); "
                             f"supported: {', '.join(SUPPORTED_MODELS)}")
        _check_vocab_arrays(md)
        self.tokens: list[str] = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(md[Keys.Tokenizer.LIST])]
        self.token_to_id: dict[str, int] = {t: i for i, t in enumerate(self.tokens)}
        scores = md.get(Keys.Tokenizer.SCORES)
        self.scores: list[float] = [float(s) for s in scores] if scores is not None else [0.0] * self.n_vocab
        types = md.get(Keys.Tokenizer.TOKEN_TYPE)
        self.attrs: list[int] = ([_TYPE_TO_ATTR.get(t, ATTR_UNDEFINED) for t in types] if types is not None
                                 else [ATTR_NORMAL] * self.n_vocab)
        self.pre = "default"
        self.pre_rule = pretokenize.PRE_TOKENIZERS["default"]
        if self.model == "llama":
            self.add_space_prefix, self.clean_spaces, self.add_bos, self.add_eos = True, False, True, False
        else:
            self.pre_rule = self._read_pre(md)
            self.add_space_prefix, self.clean_spaces = False, self.pre_rule.clean_spaces
            self.add_bos, self.add_eos = self.pre_rule.add_bos, False
        self.add_space_prefix = bool(md.get(Keys.Tokenizer.ADD_PREFIX, self.add_space_prefix))
        self.special_ids = _special_ids(md, self)
        self.eog_ids = _detect_specials(md, self)
        self._splitter = _special_splitter(md, self)
        self.add_bos = bool(md.get(Keys.Tokenizer.ADD_BOS, self.add_bos))
        self.add_eos = bool(md.get(Keys.Tokenizer.ADD_EOS, self.add_eos))
        self.add_sep = bool(md.get(Keys.Tokenizer.ADD_SEP, self.pre_rule.add_sep))
        self._piece_cache: dict[int, bytes] = {}
        self._word_cache: dict[str, list[int]] = {}
        if self.model == "llama":
            self._spm_chunk_re = self._spm_chunk_splitter()
        else:
            self._regexes = pretokenize.compiled_regexes(self.pre_rule)
            self._merges, self._hf_bpe = self._build_bpe(md)
            self._ranks: dict[tuple[str, str], int] | None = None

    @classmethod
    def from_metadata(cls, md: dict[str, Any]) -> "Tokenizer":
        return cls(md)

    def _read_pre(self, md: dict[str, Any]) -> pretokenize.PreTokenizerRule:
        pre = md.get(Keys.Tokenizer.PRE) or ""
        if not pre:
            log.warning("GGUF has no tokenizer.ggml.pre: using the 'default' pre-tokenizer, as llama.cpp does "
                        "(generation quality may be degraded)")
            return pretokenize.PRE_TOKENIZERS["default"]
        if pre not in pretokenize.PRE_TOKENIZERS:
            raise ValueError(f"unknown pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: "
                             f"{', '.join(sorted(pretokenize.PRE_TOKENIZERS))}")
        self.pre = pre
        return pretokenize.PRE_TOKENIZERS[pre]

    # ---- vocabulary facts ----

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    @property
    def vocab_type(self) -> str:
        return "SPM" if self.model == "llama" else "BPE"

    bos_id = property(lambda self: self.special_ids["bos"])
    eos_id = property(lambda self: self.special_ids["eos"])
    eot_id = property(lambda self: self.special_ids["eot"])
    eom_id = property(lambda self: self.special_ids["eom"])
    unk_id = property(lambda self: self.special_ids["unk"])
    sep_id = property(lambda self: self.special_ids["sep"])
    pad_id = property(lambda self: self.special_ids["pad"])
    mask_id = property(lambda self: self.special_ids["mask"])

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.eog_ids

    def is_control(self, token_id: int) -> bool:
        return bool(self.attrs[token_id] & ATTR_CONTROL)

    def token_text(self, token_id: int) -> str:
        """The vocabulary entry itself (e.g. '▁world', 'Ġworld', '<0x0A>')."""
        return self.tokens[token_id]

    @property
    def nl_id(self) -> int | None:
        """The newline token as llama.cpp finds it (byte token for SPM, tokenized '\\n' for BPE)."""
        if self.model == "llama":
            found = self._spm_byte_token(ord("\n"))
            return found if found is not None else self.pad_id
        ids = self._bpe_fragment("\n")
        return ids[0] if ids else self.pad_id

    # ---- encoding ----

    def encode(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        """llama_tokenize: BOS/EOS added as the vocab says when add_special; special-token texts
        recognised when parse_special (user-defined tokens always are)."""
        text = _without_surrogates(text)
        fragments = self._splitter.partition(text, parse_special) if text else []
        ids: list[int] = []
        if add_special and self.add_bos:
            ids.append(self._required(self.bos_id, "BOS"))
        prev_special = True
        for fragment in fragments:
            if isinstance(fragment, int):
                ids.append(fragment)
                prev_special = True
            elif self.model == "llama":
                prefix = " " if (self.add_space_prefix and prev_special) else ""
                ids.extend(self._spm_fragment((prefix + fragment).replace(" ", SPM_SPACE)))
                prev_special = False
            else:
                ids.extend(self._bpe_fragment(fragment))
        if add_special and self.add_eos:
            ids.append(self._required(self.eos_id, "EOS"))
        return ids

    @staticmethod
    def _required(token_id: int | None, what: str) -> int:
        if token_id is None:
            raise ValueError(f"the vocabulary asks for a {what} token but has none")
        return token_id

    def _cached(self, key: str, compute) -> list[int]:
        ids = self._word_cache.get(key)
        if ids is None:
            if len(self._word_cache) > _CACHE_LIMIT:
                self._word_cache.clear()
            ids = self._word_cache[key] = compute(key)
        return ids

    # SPM (llm_tokenizer_spm_session)

    def _spm_chunk_splitter(self) -> re.Pattern[str]:
        # A cut before "▁" is safe unless some token holds "<c>▁" for the character c before it.
        joined = {t[i - 1] for t in self.tokens if t.find(SPM_SPACE, 1) > 0
                  for i in range(1, len(t)) if t[i] == SPM_SPACE}
        behind = f"(?<![{''.join(re.escape(c) for c in sorted(joined))}])" if joined else ""
        return re.compile(f"{behind}(?={SPM_SPACE})")

    def _spm_fragment(self, text: str) -> list[int]:
        ids: list[int] = []
        for chunk in self._spm_chunk_re.split(text):
            if chunk:
                ids.extend(self._cached(chunk, self._spm_merge))
        return ids

    def _spm_merge(self, text: str) -> list[int]:
        vocab, scores = self.token_to_id, self.scores
        n = len(text)
        length = [1] * n                      # in code points; symbol i starts at text[i]
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        queue: list[tuple[float, int, int, int]] = []

        def try_pair(left: int, right: int) -> None:
            joined = text[left:right + length[right]]
            token_id = vocab.get(joined)
            if token_id is not None:     # best score first, then leftmost
                heapq.heappush(queue, (-scores[token_id], left, right, len(joined)))

        for i in range(1, n):
            try_pair(i - 1, i)
        while queue:
            _, left, right, size = heapq.heappop(queue)
            if length[left] == 0 or length[right] == 0 or length[left] + length[right] != size:
                continue                     # stale: one side has merged since
            length[left] += length[right]
            length[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            if prev[left] >= 0:
                try_pair(prev[left], left)
            if nxt[left] >= 0:
                try_pair(left, nxt[left])
        ids: list[int] = []
        i = 0
        while i != -1:
            piece = text[i:i + length[i]]
            token_id = vocab.get(piece)
            ids.extend([token_id] if token_id is not None else self._spm_bytes(piece))
            i = nxt[i]
        return ids

    def _spm_byte_token(self, byte: int) -> int | None:
        found = self.token_to_id.get(f"<0x{byte:02X}>")
        return found if found is not None or byte >= 0x80 else self.token_to_id.get(chr(byte))

    def _spm_bytes(self, piece: str) -> list[int]:
        ids = []
        for byte in piece.encode("utf-8"):
            token_id = self._spm_byte_token(byte)
            if token_id is None:         # llama.cpp aborts here; the unknown token is kinder
                token_id = self._required(self.unk_id, f"byte <0x{byte:02X}> or unknown")
            ids.append(token_id)
        return ids

    # BPE (llm_tokenizer_bpe_session)

    def _build_bpe(self, md: dict[str, Any]) -> tuple[list[tuple[str, str]], HFTokenizer | None]:
        merges = md.get(Keys.Tokenizer.MERGES)
        if merges is None:
            raise ValueError("BPE vocabulary without tokenizer.ggml.merges")
        if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
            raise ValueError("tokenizer.ggml.merges is not a list of strings")
        pairs = [_split_merge(m) if len(p) != 2 or not p[0] else (p[0], p[1])
                 for m, p in zip(merges, (m.split(" ", 1) for m in merges))]
        try:
            if len(set(pairs)) != len(pairs):
                raise ValueError("duplicated merges")
            bpe = hf_models.BPE(vocab=self.token_to_id, merges=pairs,
                                ignore_merges=self.pre_rule.ignore_merges)
            return pairs, HFTokenizer(bpe)
        except Exception as error:       # noqa: BLE001 - any refusal means: use the exact Python loop
            log.info("BPE merges not expressible in `tokenizers` (%s); using the Python merge loop", error)
            return pairs, None

    @property
    def _bpe_ranks(self) -> dict[tuple[str, str], int]:
        if self._ranks is None:
            self._ranks = {}
            for rank, pair in enumerate(self._merges):
                self._ranks.setdefault(pair, rank)    # llama.cpp keeps a repeated pair's first rank
        return self._ranks

    def _bpe_fragment(self, text: str) -> list[int]:
        words = pretokenize.byte_level_words(text, self._regexes)
        cache = self._word_cache
        missing = list(dict.fromkeys(w for w in words if w not in cache))
        if len(cache) + len(missing) > _CACHE_LIMIT:
            cache.clear()
            missing = list(dict.fromkeys(words))
        if missing:
            cache.update(zip(missing, self._bpe_merge_words(missing)))
        return [token_id for word in words for token_id in cache[word]]

    def _bpe_merge_words(self, words: list[str]) -> list[list[int]]:
        if self._hf_bpe is None:
            return [self._bpe_merge_word(word) for word in words]
        encoding = self._hf_bpe.encode(words, is_pretokenized=True, add_special_tokens=False)
        per_word: list[list[int]] = [[] for _ in words]
        for token_id, word_index in zip(encoding.ids, encoding.word_ids):
            per_word[word_index].append(token_id)
        return per_word

    def _bpe_merge_word(self, word: str) -> list[int]:
        vocab, ranks = self.token_to_id, self._bpe_ranks
        if self.pre_rule.ignore_merges and word in vocab:
            return [vocab[word]]
        symbols = list(word)
        while len(symbols) > 1:
            best = min(((ranks[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in ranks),
                       default=None)
            if best is None:
                break
            i = best[1]
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        ids: list[int] = []
        for symbol in symbols:
            token_id = vocab.get(symbol)
            # llama.cpp falls back to one token per byte of the (byte-encoded) text, where one exists
            ids.extend([token_id] if token_id is not None else
                       [vocab[c] for c in symbol if c.isascii() and c in vocab])
        return ids

    # ---- decoding ----

    def token_to_piece(self, token_id: int, special: bool = False, lstrip: int = 0) -> bytes:
        """llama_token_to_piece: the token's bytes; control/unknown tokens only when `special`."""
        if not 0 <= token_id < self.n_vocab:
            raise IndexError(f"token id {token_id} outside the vocabulary (0..{self.n_vocab - 1})")
        if not special and self.attrs[token_id] & (ATTR_UNKNOWN | ATTR_CONTROL):
            return b""
        piece = self._piece_cache.get(token_id)
        if piece is None:
            piece = self._piece_cache[token_id] = self._render_piece(token_id)
        for _ in range(lstrip):
            if not piece.startswith(b" "):
                break
            piece = piece[1:]
        return piece

    def _render_piece(self, token_id: int) -> bytes:
        attr, text = self.attrs[token_id], self.tokens[token_id]
        if attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED):
            return text.encode("utf-8")
        if attr & ATTR_NORMAL:
            if self.model == "llama":
                return text.replace(SPM_SPACE, " ").encode("utf-8")
            return pretokenize.byte_decode(text)
        if attr & ATTR_BYTE:
            return bytes([int(text[3:5], 16)])
        return b""

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        """llama_detokenize(remove_special=False, unparse_special=special), as UTF-8 text."""
        pieces = []
        strip_space = self.add_space_prefix
        for token_id in ids:
            pieces.append(self.token_to_piece(token_id, special, lstrip=1 if strip_space else 0))
            strip_space = False
        data = b"".join(pieces)
        if self.clean_spaces:
            data = _clean_up_spaces(data)
        return data.decode("utf-8", errors="replace")


class StreamingDetokenizer:
    """Token ids in, text out, one step at a time; an incomplete UTF-8 sequence waits for its end.

    Each token contributes `token_to_piece(id, special)` (as llama.cpp streams generated text);
    `strip_first_space` drops the leading space SPM vocabularies put on the first piece."""

    def __init__(self, tokenizer: Tokenizer, special: bool = False, strip_first_space: bool = False):
        self.tokenizer = tokenizer
        self.special = special
        self.strip_first_space = strip_first_space
        self.reset()

    def reset(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._first = True
        self.text = ""

    def add_token(self, token_id: int) -> str:
        """The text this token completes (possibly empty)."""
        lstrip = 1 if (self._first and self.strip_first_space) else 0
        piece = self.tokenizer.token_to_piece(token_id, self.special, lstrip=lstrip)
        if piece:
            self._first = False
        segment = self._decoder.decode(piece)
        self.text += segment
        return segment

    def finalize(self) -> str:
        """Flush what is left (an unfinished sequence becomes U+FFFD)."""
        segment = self._decoder.decode(b"", final=True)
        self.text += segment
        return segment


def _split_merge(merge: str) -> tuple[str, str]:
    space = merge.find(" ", 1)   # llama.cpp looks from the second byte: a part may start with ' '
    return (merge[:space], merge[space + 1:]) if space >= 0 else ("", "")


_SPACE_BEFORE_PUNCT = re.compile(rb" (?=[?!.,])")
_LONE_APOSTROPHE = re.compile(rb" ' ")
_SPACE_BEFORE_CONTRACTION = re.compile(rb" '(?=[sm]|re|ve)")


def _clean_up_spaces(data: bytes) -> bytes:
    """llama_detokenize's clean_spaces passes: ' ?'->'?', " ' "->"'", " 's"->"'s" (also 'm 're 've)."""
    data = _SPACE_BEFORE_PUNCT.sub(b"", data)
    data = _LONE_APOSTROPHE.sub(b"'", data)
    return _SPACE_BEFORE_CONTRACTION.sub(b"'", data)


def _without_surrogates(text: str) -> str:
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:           # lone surrogates cannot be UTF-8: U+FFFD, as invalid input gets
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


# ---- special tokens, as llama_vocab::impl::load finds them ----

_TK = Keys.Tokenizer
_ID_KEYS = (
    ("bos", _TK.BOS_ID), ("eos", _TK.EOS_ID), ("eot", _TK.EOT_ID), ("eom", _TK.EOM_ID),
    ("unk", _TK.UNK_ID), ("sep", _TK.SEP_ID), ("pad", _TK.PAD_ID), ("mask", _TK.MASK_ID),
    ("fim_pre", _TK.FIM_PRE_ID), ("fim_suf", _TK.FIM_SUF_ID), ("fim_mid", _TK.FIM_MID_ID),
    ("fim_pad", _TK.FIM_PAD_ID), ("fim_rep", _TK.FIM_REP_ID), ("fim_sep", _TK.FIM_SEP_ID),
    ("fim_pre", _TK.PREFIX_ID), ("fim_suf", _TK.SUFFIX_ID), ("fim_mid", _TK.MIDDLE_ID),   # older spellings
)
# Ids a file does not name are found by text (and the token is then treated as a control token).
_DETECT_BY_TEXT = {
    "eot": ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
            "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>"),
    "eom": ("<|eom_id|>",),
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
# Texts that end generation wherever they appear in a vocabulary.
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
              "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
              "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
              "<｜end▁of▁sentence｜>", "[e~[")
_ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")   # gpt-oss


def _special_ids(md: dict[str, Any], tok: Tokenizer) -> dict[str, int | None]:
    ids: dict[str, int | None] = dict.fromkeys((name for name, _ in _ID_KEYS), None)
    if tok.model == "llama":
        ids.update(bos=1, eos=2, unk=0)
    else:
        ids.update(bos=None if tok.pre_rule.no_bos else 11, eos=11)
    for name, key in _ID_KEYS:
        if ids[name] is not None and ids[name] >= tok.n_vocab:
            log.warning("default special token %s = %d is outside the vocabulary: none", key, ids[name])
            ids[name] = None
        value = md.get(key)
        if value is None:
            continue
        if type(value) is int and 0 <= value < tok.n_vocab:     # a list, a string or a NaN is not an id
            ids[name] = value
        else:
            log.warning("bad special token %s = %s: keeping %s", key, value, ids[name])
    return ids


def _detect_specials(md: dict[str, Any], tok: Tokenizer) -> frozenset[int]:
    """Fill unnamed EOT/EOM/FIM ids by text, mark unused control tokens, build the EOG set."""
    ids, attrs, lookup = tok.special_ids, tok.attrs, tok.token_to_id

    def make_control(token_id: int) -> None:
        if not attrs[token_id] & ATTR_CONTROL:
            log.debug("token %d %r looks like a control token but is not typed so; treating it as one",
                        token_id, tok.tokens[token_id])
            attrs[token_id] |= ATTR_CONTROL

    for name, texts in _DETECT_BY_TEXT.items():
        found = [lookup[t] for t in texts if t in lookup]
        if ids[name] is None and found:
            ids[name] = found[0]
            make_control(ids[name])
    for token_id, attr in enumerate(attrs):
        if attr & ATTR_CONTROL and not attr & ATTR_UNUSED and "unused" in tok.tokens[token_id]:
            attrs[token_id] |= ATTR_UNUSED
    eog = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if ids[k] is not None}
    for text in _EOG_TEXTS:
        if text in lookup:
            eog.add(lookup[text])
            make_control(lookup[text])
    for text in _ALWAYS_RENDERED:
        if text in lookup:
            attrs[lookup[text]] = ATTR_USER_DEFINED
    eog.update(ids[k] for k in ("eos", "eot", "eom") if ids[k] is not None)
    eog_texts = {tok.tokens[i]: i for i in eog}
    # "<|end|>" closes a message, not the generation, in vocabularies that also have call/return tokens
    has_call = "<|call|>" in eog_texts or "<|calls|>" in eog_texts
    if "<|end|>" in eog_texts and has_call and ("<|return|>" in eog_texts or "<|flush|>" in eog_texts):
        eog.discard(eog_texts["<|end|>"])
        attrs[eog_texts["<|end|>"]] = ATTR_USER_DEFINED
    if "</s>" in eog_texts and ("<|tool_response>" in eog_texts or "<|plamo:eos|>" in eog_texts):
        eog.discard(eog_texts["</s>"])
        attrs[eog_texts["</s>"]] = ATTR_NORMAL
    return frozenset(eog)


def _special_splitter(md: dict[str, Any], tok: Tokenizer) -> pretokenize.SpecialTokenSplitter:
    attrs = tok.attrs
    special = [i for i, a in enumerate(attrs) if a & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN)]
    special.sort(key=lambda i: (-len(tok.tokens[i].encode("utf-8")), i))
    _apply_model_strip_rules(md, tok, special)
    return pretokenize.SpecialTokenSplitter([
        pretokenize.SpecialEntry(i, tok.tokens[i], bool(attrs[i] & (ATTR_CONTROL | ATTR_UNKNOWN)),
                                 bool(attrs[i] & ATTR_LSTRIP), bool(attrs[i] & ATTR_RSTRIP))
        for i in special])


def _apply_model_strip_rules(md: dict[str, Any], tok: Tokenizer, special: list[int]) -> None:
    """llama.cpp's per-model LSTRIP/RSTRIP attributes (chosen by name, pre-tokenizer, architecture)."""
    name = str(md.get(Keys.General.NAME) or "").lower()
    pre = str(md.get(_TK.PRE) or "")
    arch = str(md.get(Keys.General.ARCHITECTURE) or "")

    def set_attr(text: str, bit: int, on: bool) -> None:
        if text in tok.token_to_id:
            i = tok.token_to_id[text]
            tok.attrs[i] = tok.attrs[i] | bit if on else tok.attrs[i] & ~bit

    if any(p in pre for p in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or \
            any(a in arch for a in ("nomic-bert-moe", "jina-bert-v3")):
        set_attr("<mask>", ATTR_LSTRIP, True)
    elif "phi-3" in name or "phi3" in name:
        for i in special:
            tok.attrs[i] |= ATTR_RSTRIP
        set_attr("</s>", ATTR_RSTRIP, True)
        for text in ("<unk>", "<s>", "<|endoftext|>"):
            set_attr(text, ATTR_RSTRIP, False)
    elif "modern-bert" in name:
        set_attr("[MASK]", ATTR_LSTRIP, True)
