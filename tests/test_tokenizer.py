"""The stdlib tokenizer shipped in bundles gives open_clip's ids on many captions, odd unicode included."""

import random

import ftfy
import pytest
from open_clip.tokenizer import SimpleTokenizer, default_bpe

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


def test_module_imports_stdlib_only():
    import ast
    import sys
    from pathlib import Path

    import edge_msd.bench.tokenizer as mod

    tree = ast.parse(Path(mod.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= set(sys.stdlib_module_names) | {"__future__"}, names
