"""open_clip's CLIP BPE tokenizer with the standard library only (it ships to the device in the bundle).

Gives the same ids as ``open_clip.SimpleTokenizer`` (clean="lower") for any ``str``: the same BPE
merges and byte mapping; the text fixes ftfy applies by default (HTML entities, C1 controls,
ligatures, character width, curly quotes, line breaks, surrogates, terminal escapes, control
characters, NFC), then open_clip's double ``html.unescape``, whitespace collapsing and lower-casing;
and open_clip's pre-tokenising pattern, run by the ``regex`` package when it is installed (as it is
wherever open_clip is), else rebuilt from this Python's ``unicodedata``.

Known differences: ftfy's mojibake repair (text decoded in the wrong codec, e.g. "sÃ³" → "só") is not
reproduced; feed the tokenizer correctly decoded UTF-8 text. Without ``regex``, characters that this
Python's Unicode tables (``unicodedata.unidata_version``) do not know yet but ``regex``'s do (letters
and digits added in later Unicode versions) count as symbols, not as letters or digits: they are split
off their word (``pip install regex`` removes the difference).
"""

from __future__ import annotations

import gzip
import html
import html.entities
import json
import re
import unicodedata
from functools import lru_cache
from pathlib import Path

from edge_msd.contract.format import TOKENIZER_JSON

SOT, EOT = "<start_of_text>", "<end_of_text>"
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")

# ---- ftfy's default fixes (ftfy 6, fix_text), stdlib versions --------------------------------
_ENTITY_RE = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_ANSI_RE = re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")
_CONTROL = {i: None for i in [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070),
                              0xFEFF, *range(0xFFF9, 0xFFFD)]}
_LIGATURES = {ord(k): v for k, v in {
    "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž",
    "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj", "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl",
    "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st"}.items()}
_WIDTH = {0x3000: " ", **{i: unicodedata.normalize("NFKC", chr(i)) for i in range(0xFF01, 0xFFF0)
                          if unicodedata.normalize("NFKC", chr(i)) != chr(i)}}
_QUOTES = {0x02BC: "'", **{i: "'" for i in range(0x2018, 0x201C)}, **{i: '"' for i in range(0x201C, 0x2020)}}
_SURROGATE_PAIR_RE = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_MAX_SEGMENT = 1_000_000  # ftfy's max_decode_length: lines longer than this are fixed in pieces


@lru_cache(maxsize=1)
def _entities() -> dict[str, str]:
    out = {}
    for name, char in html.entities.html5.items():
        if name.endswith(";"):
            out["&" + name] = char
            if name == name.lower() and html.unescape("&" + name.upper()) == "&" + name.upper():
                out["&" + name.upper()] = char.upper()
    return out


def _unescape_entity(m: re.Match) -> str:
    text = m.group(0)
    if text in _entities():
        return _entities()[text]
    if text.startswith("&#"):
        out = html.unescape(text)
        return text if ";" in out else out
    return text


def _c1(ch: str) -> str:
    try:
        return bytes([ord(ch)]).decode("cp1252")
    except UnicodeDecodeError:  # ftfy's "sloppy" cp1252 keeps undefined bytes as they are
        return ch


def _join_surrogates(m: re.Match) -> str:
    high, low = map(ord, m.group(0))
    return chr(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))


def _fix_surrogates(text: str) -> str:
    """Surrogate pairs → the character they encode; lone surrogates → U+FFFD (they cannot be UTF-8)."""
    if _SURROGATE_RE.search(text):
        text = _SURROGATE_RE.sub("\ufffd", _SURROGATE_PAIR_RE.sub(_join_surrogates, text))
    return text


def _fix_segment(text: str, unescape: bool) -> str:
    while True:
        orig = text
        if unescape:
            text = _ENTITY_RE.sub(_unescape_entity, text)
        text = re.sub("[\x80-\x9f]", lambda m: _c1(m.group(0)), text)
        text = text.translate(_LIGATURES).translate(_WIDTH).translate(_QUOTES)
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        text = re.sub("[\u2028\u2029\x85]", "\n", text)
        text = _fix_surrogates(text)
        text = _ANSI_RE.sub("", text).translate(_CONTROL)
        text = unicodedata.normalize("NFC", text)
        if text == orig:
            return text


def fix_text(text: str) -> str:
    """ftfy.fix_text's default fixes, line by line, without mojibake repair."""
    out, unescape = [], True
    pos = 0
    while pos < len(text):
        end = min(text.find("\n", pos) + 1 or len(text), pos + _MAX_SEGMENT)
        segment = text[pos:end]
        unescape = unescape and "<" not in segment  # ftfy: a literal '<' means real HTML from here on
        out.append(_fix_segment(segment, unescape))
        pos = end
    return "".join(out)


def clean(text: str) -> str:
    """open_clip's clean="lower": ftfy, two html.unescape, collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


# ---- pre-tokenising: open_clip's pattern; `regex` when installed, else the stdlib rebuild below ----------
PATTERN = r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@lru_cache(maxsize=1)
def _regex_pattern():  # noqa: ANN202 - a regex.Pattern, or None without the package
    """open_clip's compiled pattern with its own engine, whose Unicode tables may be newer than Python's."""
    try:
        import regex  # imported here: the benchmark binary ships without it
    except ImportError:
        return None
    return regex.compile(PATTERN, regex.IGNORECASE)


def _is_letter(ch: str) -> bool:
    return unicodedata.category(ch).startswith("L")


def _is_skipped(ch: str) -> bool:
    r"""Whitespace, and what regex's IGNORECASE keeps out of both ``[\p{L}]`` and ``[^\s\p{L}\p{N}]``:
    a non-letter whose case variant is a letter (U+0345, which folds to iota)."""
    return ch.isspace() or any(_is_letter(c) for c in {ch.casefold(), ch.upper()} if len(c) == 1)


def _is_number(ch: str) -> bool:
    return unicodedata.category(ch).startswith("N")


def pre_tokenize(text: str) -> list[str]:
    """Split ``text`` like open_clip: with ``regex`` exactly; without it by this Python's unicodedata."""
    pattern = _regex_pattern()
    return pattern.findall(text) if pattern is not None else _pre_tokenize_stdlib(text)


def _pre_tokenize_stdlib(text: str) -> list[str]:
    out, i, n = [], 0, len(text)
    while i < n:
        for word in (SOT, EOT, *CONTRACTIONS):
            # regex's IGNORECASE lets 'ſ' (long s) match 's' in "'s"
            if text[i : i + len(word)].replace("ſ", "s") == word:
                out.append(text[i : i + len(word)])
                i += len(word)
                break
        else:
            ch = text[i]
            j = i + 1
            if _is_letter(ch):
                while j < n and _is_letter(text[j]):
                    j += 1
            elif _is_number(ch):
                pass
            elif _is_skipped(ch):
                i = j
                continue
            else:
                while j < n and not (_is_skipped(text[j]) or _is_letter(text[j]) or _is_number(text[j])):
                    j += 1
            out.append(text[i:j])
            i = j
    return out


def bytes_to_unicode() -> dict[int, str]:
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


class Tokenizer:
    """CLIP BPE tokenizer: ``tokenizer(["a cat"])`` → rows of ``context_length`` int ids (0-padded)."""

    def __init__(self, vocab_path: str | Path, context_length: int = 77):
        with gzip.open(vocab_path) as f:
            merges_text = f.read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in merges_text[1 : 49152 - 256 - 2 + 1]]
        self.byte_encoder = bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.sot_token_id, self.eot_token_id = self.encoder[SOT], self.encoder[EOT]
        self.context_length = context_length
        self.cache: dict[str, str] = {SOT: SOT, EOT: EOT}

    @classmethod
    def from_dir(cls, folder: str | Path) -> Tokenizer:
        """Load a bundle's tokenizer/ folder (vocab + tokenizer.json)."""
        folder = Path(folder)
        meta = json.loads((folder / TOKENIZER_JSON).read_text(encoding="utf-8"))
        vocab = meta["vocab"]
        if Path(str(vocab)).name != vocab or vocab in ("", ".", ".."):  # stays inside the bundle's folder
            raise ValueError(f"{folder / TOKENIZER_JSON}: vocab {vocab!r} must be a file name in that folder")
        tok = cls(folder / vocab, meta["context_length"])
        if (tok.sot_token_id, tok.eot_token_id) != (meta["sot_token"], meta["eot_token"]):
            raise ValueError(f"{folder}: vocabulary does not give the sot/eot ids in {TOKENIZER_JSON}")
        return tok

    def forget(self) -> None:
        """Empty the word cache (a cold tokenizer without reloading the vocabulary)."""
        self.cache = {SOT: SOT, EOT: EOT}

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = (*token[:-1], token[-1] + "</w>")
        while len(word) > 1:
            pairs = set(zip(word, word[1:], strict=False))
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        ids = []
        for token in pre_tokenize(clean(text)):
            mapped = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(mapped).split(" "))
        return ids

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> list[list[int]]:
        """Token rows: sot, ids, eot, zero padding; a too-long row is cut and ends with eot."""
        length = context_length or self.context_length
        rows = []
        for text in [texts] if isinstance(texts, str) else texts:
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self.eot_token_id
            rows.append(ids + [0] * (length - len(ids)))
        return rows
