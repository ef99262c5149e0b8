"""The stdlib tokenizer shipped in bundles gives open_clip's ids on many captions, odd unicode included."""

import random

import ftfy
import pytest
from open_clip.tokenizer import SimpleTokenizer, default_bpe

import edge_msd.bench.tokenizer as tok_module
from edge_msd.bench.tokenizer import Tokenizer

CAPTIONS = [
    "A photo of a CAT.", "Naïve café — “quoted” ‘text’ ﬁne ＦＵＬＬ width", "emoji 🐱🚀👩‍👩‍👧 ok",
    "&amp;amp; &lt;b&gt; &NTILDE; &#39; &#x263a;", "<b>html &amp; tags</b>", "tab\tnew\nline\r\nx\u2028y",
    "Ångström Ελληνικά Русский 日本語のテキスト 한국어 العربية",
    "it's they're we've I'm you'll he'd", "ſt 'ſ",
    "\x1b[31mred\x1b[0m", "\x93c1 quotes\x94", "zero\u200bwidth\ufeffbom", "a" * 300, "x " * 200,
    "12345 3.14 ¼ ² Ⅻ", "", "   ", "e\u0301 combining", "ǅemal ĳs", "😀" * 50,
    "<start_of_text>hi<end_of_text>", "don''t", "Ｕﾀｰﾝ", "\u00a0nbsp\u3000ideo", "İstanbul ß ẞ",
    "a\u0000b\u0007c",
    "a man riding a horse " * 10,
]


@pytest.fixture(scope="module")
def tokenizers():
    return SimpleTokenizer(context_length=32), Tokenizer(default_bpe(), 32)


def _random_captions(n: int) -> list[str]:
    rng = random.Random(0)
    words = ["a", "dog", "Café", "naïve", "über", "日本", "🐶", "2024", "x-ray", "it's", "&amp;", "ｆｕｌｌ",
             "“hi”", "ﬁsh", "Ωmega", "\t", "  ", "co-op", "e.g.", "#tag", "@user", "100%", "C++", "🇫🇷"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def test_same_ids_as_open_clip(tokenizers):
    ref, mine = tokenizers
    for caption in CAPTIONS + _random_captions(500):
        assert mine(caption)[0] == ref(caption)[0].tolist(), caption


def test_random_unicode_same_ids_unless_mojibake(tokenizers):
    """Random code points; only ftfy's mojibake repair (documented, not reproduced) may differ."""
    ref, mine = tokenizers
    rng = random.Random(1)
    pool = [chr(c) for c in [*range(32, 0x250), *range(0x370, 0x500), *range(0x2000, 0x2070),
                             *range(0x3000, 0x3100), *range(0xFF00, 0xFFF0), *range(0x1F300, 0x1F650)]]
    checked = 0
    for _ in range(800):
        caption = "".join(rng.choice(pool + [" "] * 20) for _ in range(rng.randint(1, 40)))
        if ftfy.fix_text(caption) != ftfy.fix_text(caption, fix_encoding=False):
            continue
        assert mine(caption)[0] == ref(caption)[0].tolist(), repr(caption)
        checked += 1
    assert checked > 300


def test_long_caption_truncated_with_eot(tokenizers):
    _, mine = tokenizers
    row = mine("a man riding a horse " * 20)[0]
    assert len(row) == 32 and row[0] == mine.sot_token_id and row[-1] == mine.eot_token_id


def _random_unicode(rng: random.Random, n: int) -> list[str]:
    """Strings over all of Unicode: lone and paired surrogates, unassigned and recent code points, a few
    spaces and ASCII letters so that words form."""
    def char() -> str:
        r = rng.random()
        if r < 0.1:
            return chr(rng.randint(0xD800, 0xDFFF))  # a lone surrogate (or half of a pair)
        if r < 0.15:
            return " "
        if r < 0.3:
            return rng.choice("abcxyz'&;#<>")
        return chr(rng.choice([rng.randint(0, 0x2FFFF), rng.randint(0, 0x10FFFF)]))

    return ["".join(char() for _ in range(rng.randint(1, 30))) for _ in range(n)]


def _no_mojibake(text: str) -> bool:
    return ftfy.fix_text(text) == ftfy.fix_text(text, fix_encoding=False)


def test_any_str_gives_open_clips_ids(tokenizers):
    """Never a crash (lone surrogates included) and open_clip's ids, except ftfy's mojibake repair."""
    ref, mine = tokenizers
    assert mine.encode("a\ud83d\ude00b \udc00 \ud800") == ref.encode("a\ud83d\ude00b \udc00 \ud800")
    checked = 0
    for text in _random_unicode(random.Random(2), 600):
        if _no_mojibake(text):
            assert mine(text)[0] == ref(text)[0].tolist(), repr(text)
            checked += 1
    assert checked > 500


def _newer_letter() -> str | None:
    """A letter that `regex` knows and this Python's unicodedata does not (None if there is none)."""
    import unicodedata

    import regex

    letter = regex.compile(r"\p{L}")
    return next((chr(c) for c in range(0x250, 0x30000)
                 if unicodedata.category(chr(c)) == "Cn" and letter.match(chr(c))), None)


def test_without_regex_same_ids_up_to_newer_unicode(tokenizers, monkeypatch):
    """The stdlib pattern matches open_clip on every character this Python's Unicode tables know; a letter
    newer than those tables is the documented difference (split off its word)."""
    import unicodedata

    import regex

    ref, mine = tokenizers
    known = regex.compile(r"[\p{Cn}\p{Cs}]")  # unassigned for regex: the same category in both tables
    monkeypatch.setattr(tok_module, "_regex_pattern", lambda: None)
    checked = 0
    for text in _random_unicode(random.Random(3), 600) + CAPTIONS:
        newer = any(unicodedata.category(c) == "Cn" and not known.match(c) for c in text)
        if _no_mojibake(text) and not newer:
            assert mine(text)[0] == ref(text)[0].tolist(), repr(text)
            checked += 1
    assert checked > 300
    assert mine("a\u0345b")[0] == ref("a\u0345b")[0].tolist()  # U+0345: neither letter nor symbol in regex
    new = _newer_letter()
    if new is None:
        pytest.skip(f"Python's Unicode {unicodedata.unidata_version} knows every letter regex knows")
    assert tok_module.pre_tokenize(f"ab{new}cd") == ["ab", new, "cd"]
    monkeypatch.undo()
    assert tok_module.pre_tokenize(f"ab{new}cd") == [f"ab{new}cd"] == ref.pat.findall(f"ab{new}cd")


def test_vocab_name_must_stay_in_the_folder(tmp_path):
    import json

    meta = {"vocab": "../../etc/vocab.txt.gz", "context_length": 8, "sot_token": 49406, "eot_token": 49407}
    (tmp_path / "tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="must be a file name"):
        Tokenizer.from_dir(tmp_path)


def test_module_imports_stdlib_only():
    """Module level: the standard library only (the benchmark binary); `regex` only inside a function."""
    import ast
    import sys
    from pathlib import Path

    tree = ast.parse(Path(tok_module.__file__).read_text())

    def imported(nodes) -> set[str]:
        names = {a.name.split(".")[0] for n in nodes if isinstance(n, ast.Import) for a in n.names}
        return names | {n.module.split(".")[0] for n in nodes if isinstance(n, ast.ImportFrom) and n.module}

    # edge_msd: the bundle format's file names (edge_msd.contract.format), itself standard library only
    allowed = set(sys.stdlib_module_names) | {"__future__", "edge_msd"}
    assert imported(tree.body) <= allowed
    assert imported(ast.walk(tree)) <= allowed | {"regex"}
    import subprocess

    blocked = "import sys\nfor m in ('numpy', 'regex', 'torch'): sys.modules[m] = None\n"
    listing = "print(sorted(m for m in sys.modules if m.startswith('edge_msd')))"
    probe = blocked + "import edge_msd.bench.tokenizer\n" + listing
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "edge_msd.contract.numerics" not in done.stdout  # the format alone, no numpy behind it
