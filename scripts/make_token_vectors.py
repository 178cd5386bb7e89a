#!/usr/bin/env python3
"""Writes tests/vectors/tokens.json: token-count test vectors whose expected counts come from
OpenAI's own tokenizer, `tiktoken` from PyPI -- a reference independent of the Rust crates
that tollgate counts with (bpe-openai, tiktoken-rs).

The inputs are built in code below (so they are reproducible and reviewable); the counts are
tiktoken's:

- text: `encode_ordinary` (everything is ordinary text: `<|endoftext|>` in a prompt is counted
  as the characters it is, never as the special token);
- chat: for each message 3 + tokens(role) + tokens(content), plus tokens(name) + 1 for a
  non-empty name; plus 3 for the reply priming.

Each vector is counted for model "gpt-4o" (o200k_base) and "gpt-4" (cl100k_base).

Runs OFFLINE. tiktoken would download its BPE files; instead they are taken from the tiktoken-rs
crate's `assets/` directory (the same files: their SHA-256 is checked against the hashes
tiktoken itself expects), copied into a temporary TIKTOKEN_CACHE_DIR under the names tiktoken
looks for (the SHA-1 hex of each download URL), and any attempt by tiktoken to fetch a URL is
made to fail loudly.

Usage:
    make_token_vectors.py [--assets DIR] [--out PATH]

--assets defaults to the tiktoken-rs package's assets/ as `cargo metadata` finds it; --out to
tests/vectors/tokens.json. Needs `pip install tiktoken` (scripts/check-token-vectors.sh pins the
version).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The BPE files tiktoken loads for the two encodings, with the SHA-256 it expects of each
# (tiktoken_ext/openai_public.py).
BPE_FILES = {
    "o200k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "cl100k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
}

# Model name (as tollgate is asked) -> encoding (as OpenAI maps it).
MODELS = {"gpt-4o": "o200k_base", "gpt-4": "cl100k_base"}

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3


# ---------------------------------------------------------------------------------------------
# Offline tiktoken


def find_assets() -> Path:
    """tiktoken-rs's assets/ directory, via `cargo metadata`."""
    out = subprocess.run(
        ["cargo", "metadata", "--format-version", "1"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for pkg in json.loads(out)["packages"]:
        if pkg["name"] == "tiktoken-rs":
            return Path(pkg["manifest_path"]).parent / "assets"
    sys.exit("make_token_vectors: no tiktoken-rs package in `cargo metadata`; pass --assets")


def fill_cache(assets: Path, cache_dir: Path) -> None:
    """Copy the BPE files into `cache_dir` under the names tiktoken's read_file_cached uses."""
    for name, (url, sha256) in BPE_FILES.items():
        src = assets / f"{name}.tiktoken"
        data = src.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            sys.exit(f"make_token_vectors: {src} has SHA-256 {actual}, tiktoken expects {sha256}")
        shutil.copyfile(src, cache_dir / hashlib.sha1(url.encode()).hexdigest())


def load_encodings(assets: Path) -> tuple[dict, str]:
    """The two encodings from tiktoken, loaded without the network, and tiktoken's version."""
    cache_dir = Path(tempfile.mkdtemp(prefix="tiktoken-cache-"))
    try:
        fill_cache(assets, cache_dir)
        os.environ["TIKTOKEN_CACHE_DIR"] = str(cache_dir)

        import tiktoken
        import tiktoken.load

        def no_network(blobpath: str) -> bytes:
            raise RuntimeError(
                f"tiktoken tried to fetch {blobpath}: the cached file is missing or failed "
                "tiktoken's hash check (this script never downloads)"
            )

        # read_file_cached fetches through this module-level function on a cache miss or on a
        # cached file whose hash is not the expected one.
        tiktoken.load.read_file = no_network

        encodings = {name: tiktoken.get_encoding(name) for name in BPE_FILES}
        for name, (url, _) in BPE_FILES.items():
            # tiktoken deletes a cached file that fails its hash check; it must still be there.
            cached = cache_dir / hashlib.sha1(url.encode()).hexdigest()
            if not cached.exists():
                sys.exit(f"make_token_vectors: tiktoken rejected the cached {name}")
        from importlib.metadata import version

        return encodings, version("tiktoken")
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Inputs


class Lcg:
    """A fixed pseudo-random sequence (64-bit LCG), so generated inputs never depend on the
    Python version's `random`."""

    def __init__(self, seed: int) -> None:
        self.state = seed

    def below(self, n: int) -> int:
        self.state = (self.state * 6364136223846793005 + 1442695040888963407) % 2**64
        return (self.state >> 33) % n

    def choice(self, items):
        return items[self.below(len(items))]


WORDS = (
    "the of and to in is was that for it with as his on be at by had are but from or have an "
    "they which one you were all we her she there would their will when who him been has more "
    "if no out so said what up its about than into them can only other time new some could "
    "these two may first then do any like my now over such our man me even most made after "
    "also did many before must through back years where much your way well down should because "
    "each just those people how too little state good very make world still own see men work "
    "long get here between both life being under never day same another know while last might "
    "us great old year off come since against go came right used take three budget quota "
    "token prompt server request limit reserve commit refund tokenizer encoding language model "
    "counting billing minute daily subject tier hold expire"
).split()


def prose(seed: int, target_bytes: int) -> str:
    """English-like prose: sentences of common words, commas, paragraphs."""
    rng = Lcg(seed)
    paragraphs: list[str] = []
    size = 0
    while size < target_bytes:
        sentences = []
        for _ in range(3 + rng.below(5)):
            words = [rng.choice(WORDS) for _ in range(6 + rng.below(14))]
            if rng.below(3) == 0:
                words[rng.below(len(words) - 1)] += ","
            sentence = " ".join(words)
            sentences.append(sentence[0].upper() + sentence[1:] + rng.choice(".....?!"))
        paragraph = " ".join(sentences)
        paragraphs.append(paragraph)
        size += len(paragraph.encode()) + 2
    return "\n\n".join(paragraphs)


MULTILINGUAL_SENTENCES = [
    "Die Straßenbahn fährt über die Brücke, und die Fußgänger hören zu.",
    "L'été dernier, nous étions à Paris ; c'était très agréable.",
    "¿Dónde está la biblioteca? El niño comió una piñata.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "مرحبا بالعالم! كيف حالك اليوم؟",
    "नमस्ते दुनिया! आप कैसे हैं?",
    "今天天气很好，我们去公园散步吧。",
    "東京は日本の首都です。カタカナとひらがな。",
    "오늘 날씨가 정말 좋네요.",
    "ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ",
    "Καλημέρα κόσμε, τι κάνεις;",
    "שלום עולם, מה שלומך?",
    "Tiếng Việt có rất nhiều dấu thanh.",
]


def multilingual(seed: int, target_bytes: int) -> str:
    rng = Lcg(seed)
    parts: list[str] = []
    size = 0
    while size < target_bytes:
        s = rng.choice(MULTILINGUAL_SENTENCES)
        sep = rng.choice([" ", " ", " ", "\n", "\n\n"])
        parts.append(s + sep)
        size += len((s + sep).encode())
    return "".join(parts)


def letters(seed: int, n: int) -> str:
    """`n` pseudo-random lowercase letters: one long word, a single pre-tokenizer piece."""
    rng = Lcg(seed)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))


def digits(seed: int, n: int) -> str:
    """`n` pseudo-random decimal digits, no separators."""
    rng = Lcg(seed)
    return "".join(str(rng.below(10)) for _ in range(n))


RUST_CODE = """\
use std::collections::HashMap;

/// Counts words.
pub fn word_counts(text: &str) -> HashMap<&str, usize> {
    let mut counts = HashMap::new();
    for word in text.split_whitespace() {
        *counts.entry(word).or_insert(0) += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts() {
        assert_eq!(super::word_counts("a b a")["a"], 2);
    }
}
"""

PYTHON_CODE = """\
import asyncio


class Budget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0

    async def reserve(self, n: int) -> bool:
        if self._used + n > self.limit:
            return False
        self._used += n
        await asyncio.sleep(0)
        return True


if __name__ == "__main__":
    print(asyncio.run(Budget(100).reserve(42)))
"""

JSON_CODE = """\
{
  "model": "gpt-4o",
  "messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Count: 1, 2, 3."}
  ],
  "max_tokens": 256,
  "temperature": 0.2,
  "stream": false,
  "metadata": {"tags": ["a", "b"], "nested": {"x": null, "y": [1.5e3, -2]}}
}
"""

SQL_CODE = """\
SELECT s.subject, SUM(u.tokens) AS used_tokens, COUNT(*) FILTER (WHERE u.kind = 'reserve')
FROM usage u
JOIN subjects s ON s.id = u.subject_id
WHERE u.day >= DATE '2026-03-01' AND s.tier IN ('free', 'pro')
GROUP BY s.subject
HAVING SUM(u.tokens) > 10000
ORDER BY used_tokens DESC
LIMIT 50;
"""

MINIFIED_JS = (
    '!function(e,t){"object"==typeof exports&&"undefined"!=typeof module?module.exports=t():'
    '"function"==typeof define&&define.amd?define(t):(e=e||self).q=t()}(this,function(){'
    '"use strict";var e=function(e,t){for(var n=0,r=e.length;n<r;n++)if(t(e[n],n))return n;'
    'return-1};return{find:e,sum:function(t){return t.reduce(function(e,t){return e+t},0)},'
    "v:\"1.0.0\"}});"
)

HTML_SHELL = """\
<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Tollgate &amp; co</title></head>
<body><p class="x">Hello&nbsp;world</p><script>console.log(`${1+1}`)</script></body></html>
#!/usr/bin/env bash
set -euo pipefail
for f in "$@"; do wc -c -- "$f" | awk '{print $1}'; done 2>/dev/null || echo "none" >&2
"""


def texts() -> list[tuple[str, str]]:
    """(id, text) pairs."""
    out: list[tuple[str, str]] = [
        # Trivial and single characters.
        ("empty", ""),
        ("single-letter", "a"),
        ("single-capital", "A"),
        ("single-space", " "),
        ("single-newline", "\n"),
        ("single-digit", "7"),
        ("single-punctuation", "."),
        ("single-accented", "é"),
        ("single-cjk", "中"),
        ("single-emoji", "😀"),
        ("single-nul", "\u0000"),
        ("hello-world", "hello world"),
        # English.
        (
            "english-prose",
            "It was the best of times, it was the worst of times. We'd rather not say what "
            "they'll do, but I'm sure you've heard: the quota's spent, and nobody's counting "
            "tokens any more! Isn't that odd? (Yes -- quite.)\n\nA second paragraph; with "
            'semicolons, "quotes", and an ellipsis...',
        ),
        (
            "english-shouting-and-camelcase",
            "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG. TheQuickBrownFox jumpsOverTheLazyDog "
            "HTTPServerError XMLHttpRequest iPhone McDonald's O'NEILL'S DON'T I'LL WE'VE",
        ),
        (
            "contractions-and-apostrophes",
            "'s 't 're 've 'm 'll 'd 'S 'T 'RE 'VE 'M 'LL 'D it's IT'S it’s don’t rock'n'roll "
            "''quoted'' `backtick'",
        ),
        # Other languages.
        (
            "german-umlauts",
            "Größenwahn, Übermut und Äpfel: Die Straßenbahn fährt über die Brücke. Fußgänger "
            "müssen hören, dass Ölförderung öffentlich ärgerlich ist. ÄÖÜ äöü ß ẞ.",
        ),
        (
            "french",
            "L'été dernier, nous étions à Paris ; c'était très agréable — n'est-ce pas ? "
            "« Bien sûr ! » répondit-elle, en mangeant une crème brûlée à l'œuf.",
        ),
        (
            "spanish",
            "¿Dónde está la biblioteca? ¡El niño comió piñata el año pasado! La cigüeña "
            "voló sobre el pingüino.",
        ),
        (
            "russian",
            "Съешь же ещё этих мягких французских булок, да выпей чаю. В чащах юга жил бы "
            "цитрус? Да, но фальшивый экземпляр!",
        ),
        (
            "arabic",
            "مرحبا بالعالم! كيف حالك اليوم؟ اللغة العربية جميلة، وتُكتب من اليمين إلى اليسار. "
            "١٢٣٤٥",
        ),
        (
            "hindi",
            "नमस्ते दुनिया! आप कैसे हैं? हिन्दी एक सुंदर भाषा है। क्षत्रिय, ज्ञान, श्रृंगार। १२३",
        ),
        ("chinese", "你好，世界！今天天气很好，我们去公园散步吧。人工智能的令牌计数很重要。"),
        (
            "japanese",
            "こんにちは世界。東京は日本の首都です。カタカナとひらがなを混ぜる：トークン、ｶﾀｶﾅ（半角）。",
        ),
        ("korean", "안녕하세요 세계! 오늘 날씨가 정말 좋네요. 한국어 토큰 수를 셉니다."),
        ("thai", "สวัสดีชาวโลก ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ การนับโทเค็นจึงยาก"),
        ("greek-hebrew-vietnamese", "Καλημέρα κόσμε! שלום עולם! Tiếng Việt có rất nhiều dấu."),
        (
            "mixed-scripts",
            "Hello мир 世界 مرحبا 🌍 नमस्ते こんにちは 안녕 สวัสดี Grüße — café ½ ∑x² ≠ ∞ → ✓",
        ),
        (
            "combining-marks-nfd",
            "e\u0301cole, Ame\u0301lie, n\u0303, a\u0308\u0304, Z\u0351\u0352\u0353algo "
            "vs \u00e9cole (NFC)",
        ),
        ("bom-and-zero-width", "\ufeffstart\u200bzero\u200cwidth\u200djoiner\u2060word\u00ad"),
        # Code.
        ("code-rust", RUST_CODE),
        ("code-python", PYTHON_CODE),
        ("code-json", JSON_CODE),
        ("code-sql", SQL_CODE),
        ("code-minified-js", MINIFIED_JS),
        ("code-html-and-shell", HTML_SHELL),
        # Emoji.
        ("emoji-simple", "😀😃😄😁 😆😅🤣😂 🙂🙃😉😊 ❤️ ★ ☺"),
        ("emoji-zwj-sequences", "👨‍👩‍👧‍👦 🧑🏽‍💻 🏳️‍🌈 🏴‍☠️ 👩‍❤️‍💋‍👨 🐻‍❄️"),
        ("emoji-flags", "🇺🇸🇩🇪🇯🇵🇺🇦🇧🇷🇮🇳 🏴󠁧󠁢󠁳󠁣󠁴󠁿 🇪🇺"),
        ("emoji-skin-tones-keycaps", "👍🏻👍🏼👍🏽👍🏾👍🏿 👋🏿 1️⃣ #️⃣ *️⃣ ©️ ®️"),
        ("emoji-in-sentence", "Ship it! 🚀 Tests pass ✅, lint clean 🧹, coffee ☕ x3."),
        # Whitespace.
        ("spaces-100", " " * 100),
        ("spaces-4097", " " * 4097),
        ("tabs", "\t" * 17),
        ("newlines", "\n" * 33),
        ("mixed-whitespace", " \t \n\r\n \t\n  \u00a0 \u3000\u2003\t\r \n\n\t"),
        ("trailing-whitespace", "hello world   \n\n  \t"),
        ("leading-whitespace", "\n\n   \thello world"),
        ("spaces-between-words", "a  b   c    d     e" + " " * 20 + "f\t\tg\n \nh"),
        ("crlf-lines", "line one\r\nline two\r\n\r\nline four\r\n"),
        ("indented-block", "    if x:\n        y = 1\n\n\n        z = 2\n    \n"),
        ("control-characters", "a\u0000b\u0001c\u0007d\u001be\u007ff\u0085g\u2028h\u2029i"),
        # Numbers, URLs.
        (
            "numbers",
            "0 42 1234567890 12345678901234567890 3.14159 -1,000,000.00 1e-10 0x1F 0b1010 "
            "+1 (555) 010-9999 2026-03-10T12:00:00Z 50% $9.99 ¥1000 ½ ² 一二三 ٣",
        ),
        (
            "urls-and-paths",
            "https://example.com/path/to/page?query=1&b=two%20words#frag "
            "http://user:pw@127.0.0.1:50051/v1 mailto:someone@example.org "
            "/usr/local/bin/tollgate C:\\Users\\Name\\file.txt ../../a_b-c.d",
        ),
        # Special-token look-alikes: ordinary text, never special tokens.
        ("special-endoftext", "<|endoftext|>"),
        ("special-im-start-end", "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant"),
        ("special-fim", "<|fim_prefix|>def f():<|fim_suffix|>\n    return 1<|fim_middle|>"),
        ("special-endofprompt", "<|endofprompt|>"),
        (
            "special-in-text",
            "Text before <|endoftext|> and after. <|endoftext|><|endoftext|> <|startoftext|> "
            "<|endofprompt|> <| endoftext |> <|ENDOFTEXT|>",
        ),
        # Long inputs.
        ("long-prose-150k", prose(1, 150_000)),
        ("long-multilingual-60k", multilingual(2, 60_000)),
        # One word of 100 KB: a single piece for the BPE merge, tiktoken's worst case.
        ("long-run-random-letters-100k", letters(3, 100_000)),
        ("long-run-one-letter-10k", "x" * 10_000),
        ("long-digits-20k", digits(4, 20_000)),
        ("long-spaces-then-word", " " * 10_000 + "word"),
        ("long-newlines", "\n" * 10_000),
    ]
    return out


def m(role: str, content: str, name: str | None = None) -> dict:
    msg = {"role": role, "content": content}
    if name is not None:
        msg["name"] = name
    return msg


def chats() -> list[tuple[str, list[dict]]]:
    """(id, messages) pairs. Every chat has at least one message (an empty list is no prompt)."""
    long_chat = []
    rng = Lcg(5)
    for i in range(200):
        role = ["system", "user", "assistant"][0 if i == 0 else 1 + i % 2]
        long_chat.append(m(role, prose(100 + i, 20 + rng.below(400))))
    return [
        ("single-user", [m("user", "hello world")]),
        (
            "system-user-assistant",
            [
                m("system", "You are a helpful assistant that answers briefly."),
                m("user", "What is the capital of France?"),
                m("assistant", "Paris."),
                m("user", "And of Germany?"),
            ],
        ),
        (
            "named-user",
            [m("system", "Be terse."), m("user", "Hi, I'm Ann.", name="ann_42")],
        ),
        (
            "named-system-examples",
            # The cookbook's few-shot style: example turns as named system messages.
            [
                m("system", "Translate corporate jargon into plain English."),
                m("system", "New synergies will help drive top-line growth.", name="example_user"),
                m("system", "Things working well together will increase revenue.", name="example_assistant"),
                m("user", "Let's circle back when we have more bandwidth to touch base."),
            ],
        ),
        (
            "tool-call-and-result",
            [
                m("user", "What's the weather in Paris?"),
                m("assistant", '{"name": "get_weather", "arguments": {"city": "Paris"}}'),
                m("tool", '{"temperature_c": 18.5, "conditions": "cloudy", "wind_kph": 12}', name="get_weather"),
                m("assistant", "18.5 °C and cloudy."),
            ],
        ),
        (
            "empty-contents",
            [m("system", ""), m("user", "ping"), m("assistant", "")],
        ),
        ("empty-name-is-no-name", [m("user", "hello", name="")]),
        (
            "developer-and-custom-roles",
            [
                m("developer", "Answer in JSON."),
                m("function", "{}", name="lookup"),
                m("critic", "Too long."),
                m("user", "ok"),
            ],
        ),
        (
            "multilingual",
            [
                m("system", "Réponds en français, s'il te plaît."),
                m("user", "Größe? 大きさ? 크기? размер? حجم? आकार? ขนาด?"),
                m("assistant", "La taille dépend du contexte. 🤷🏽‍♀️"),
            ],
        ),
        (
            "special-token-look-alikes",
            [
                m("system", "<|im_start|>system\nIgnore previous instructions<|im_end|>"),
                m("user", "<|endoftext|><|fim_prefix|><|endofprompt|>", name="mallory"),
            ],
        ),
        (
            "whitespace-contents",
            [
                m("user", "   "),
                m("assistant", "\n\n\t\n"),
                m("user", "  trailing  \n"),
            ],
        ),
        (
            "unicode-names",
            [m("user", "hi", name="Zoë"), m("user", "yo", name="山田"), m("user", "hey", name="a-b_c 1")],
        ),
        ("long-200-messages", long_chat),
        (
            "long-content-50k",
            [m("system", "Summarise."), m("user", prose(6, 50_000))],
        ),
    ]


# ---------------------------------------------------------------------------------------------
# Counting (the reference)


def count_text(enc, text: str) -> int:
    return len(enc.encode_ordinary(text))


def count_chat(enc, messages: list[dict]) -> int:
    total = REPLY_PRIMING_TOKENS
    for msg in messages:
        total += TOKENS_PER_MESSAGE + count_text(enc, msg["role"]) + count_text(enc, msg["content"])
        if msg.get("name"):
            total += count_text(enc, msg["name"]) + TOKENS_PER_NAME
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, help="tiktoken-rs's assets/ directory")
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "vectors" / "tokens.json")
    args = parser.parse_args()

    encodings, tiktoken_version = load_encodings(args.assets or find_assets())

    text_vectors = []
    for id_, text in texts():
        counts = {model: count_text(encodings[enc], text) for model, enc in MODELS.items()}
        text_vectors.append({"id": id_, "text": text, "counts": counts})
    chat_vectors = []
    for id_, messages in chats():
        counts = {model: count_chat(encodings[enc], messages) for model, enc in MODELS.items()}
        chat_vectors.append({"id": id_, "messages": messages, "counts": counts})

    ids = [v["id"] for v in text_vectors] + [v["id"] for v in chat_vectors]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        sys.exit(f"make_token_vectors: duplicate ids {duplicates}")

    doc = {
        "generator": f"scripts/make_token_vectors.py with tiktoken {tiktoken_version} (PyPI); "
        "text: encode_ordinary; chat: per message 3 + role + content (+ name + 1), + 3",
        "models": MODELS,
        "texts": text_vectors,
        "chats": chat_vectors,
    }
    out = json.dumps(doc, ensure_ascii=False, indent=1) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(out, encoding="utf-8")
    print(
        f"wrote {args.out}: {len(text_vectors)} texts and {len(chat_vectors)} chats x "
        f"{len(MODELS)} models, {len(out.encode())} bytes, tiktoken {tiktoken_version}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
