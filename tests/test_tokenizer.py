"""The tokenizer rebuilt from GGUF metadata against an independent, slow pure-Python twin of llama.cpp's
byte-level BPE tokenization (llama-vocab.cpp, pre-tokenizer type "smollm"), plus the chat template.

The twin follows llama.cpp step by step:
  (a) split the text on control tokens (always parsed as specials in prompts);
  (b) pre-tokenize with llama.cpp's regex list for LLAMA_VOCAB_PRE_TYPE_SMOLLM: first every `\\p{N}`
      character on its own, then the GPT-2 regex on each remaining piece (matches and gaps both kept);
  (c) map each piece's UTF-8 bytes through GPT-2's byte-to-unicode table;
  (d) merge adjacent symbols by rank (lowest-rank pair first, leftmost on ties, repeat), then look
      symbols up in the vocabulary; a symbol missing from it falls back, as in llama.cpp, to looking up
      each byte of its UTF-8 text as a one-byte token, dropping misses.

Vocabulary quirk: six byte-characters are missing from this vocabulary (the ASCII controls 0x04, 0x06,
0x13, 0x14, 0x16, 0x1d; the other 15 missing bytes never occur in UTF-8 text or only in unassigned planes).
llama.cpp and the rebuilt tokenizer both drop such characters, so they cannot round-trip.
"""

from __future__ import annotations

import pytest

regex = pytest.importorskip("regex", reason="the twin pre-tokenizer needs the `regex` package (\\p{..})")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from skvrt.chat_template import render_chat  # noqa: E402
from skvrt.errors import InputError  # noqa: E402

# --------------------------------------------------------------------------------------------- the twin
_GPT2_RE = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
_DIGIT_RE = regex.compile(r"\p{N}")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_B2U = _bytes_to_unicode()
# Characters whose byte has no token in this vocabulary (see the module docstring).
_DROPPED = {"\x04", "\x06", "\x13", "\x14", "\x16", "\x1d"}


def _split_keep(pattern, text: str) -> list[str]:
    """Matches of `pattern` and the gaps between them, in order (llama.cpp keeps both)."""
    out, pos = [], 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            out.append(text[pos:m.start()])
        if m.end() > m.start():
            out.append(m.group())
        pos = m.end()
    if pos < len(text):
        out.append(text[pos:])
    return out


class TwinTokenizer:
    def __init__(self, tokens: list[str], types: list[int], merges: list[str]):
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.ranks = {}
        for r, m in enumerate(merges):
            a, b = m.split(" ")
            self.ranks[(a, b)] = r
        self.specials = sorted((t for t, ty in zip(tokens, types) if ty in (3, 4)), key=len, reverse=True)

    def _split_specials(self, text: str) -> list[tuple[bool, str]]:
        out = []
        while text:
            best = None
            for s in self.specials:
                k = text.find(s)
                if k >= 0 and (best is None or k < best[0]):  # longest first, so ties keep the longest
                    best = (k, s)
            if best is None:
                out.append((False, text))
                break
            k, s = best
            if k:
                out.append((False, text[:k]))
            out.append((True, s))
            text = text[k + len(s):]
        return out

    def _bpe(self, word: str) -> list[int]:
        syms = list(word)
        while len(syms) > 1:
            best = None
            for i in range(len(syms) - 1):
                r = self.ranks.get((syms[i], syms[i + 1]))
                if r is not None and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            syms[i:i + 2] = [syms[i] + syms[i + 1]]
        ids = []
        for s in syms:
            if s in self.vocab:
                ids.append(self.vocab[s])
            else:  # llama.cpp: look each UTF-8 byte of the symbol up as a one-byte token; drop misses
                for b in s.encode("utf-8"):
                    one = bytes([b]).decode("latin-1") if b < 0x80 else None
                    if one is not None and one in self.vocab:
                        ids.append(self.vocab[one])
        return ids

    def encode(self, text: str) -> list[int]:
        ids = []
        for is_special, frag in self._split_specials(text):
            if is_special:
                ids.append(self.vocab[frag])
                continue
            for piece in _split_keep(_DIGIT_RE, frag):
                for word in _split_keep(_GPT2_RE, piece):
                    ids.extend(self._bpe("".join(_B2U[b] for b in word.encode("utf-8"))))
        return ids


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def reader(default_gguf):
    from skvrt.gguf_import import open_gguf

    return open_gguf(default_gguf)


@pytest.fixture(scope="module")
def rebuilt(reader):
    from skvrt.gguf_import import build_tokenizer

    return build_tokenizer(reader)


@pytest.fixture(scope="module")
def twin(reader):
    f = reader.fields
    return TwinTokenizer(f["tokenizer.ggml.tokens"].contents(), f["tokenizer.ggml.token_type"].contents(),
                         f["tokenizer.ggml.merges"].contents())


CASES = [
    "", " ", "  ", "a", "Hello world", "Hello, world!", " Hello", "Hello ", "hello   ", "trailing spaces  \n",
    "What is the capital of France?", "I'm sure you've seen it; we'll see, they'd say. It's John's.",
    "DON'T SHOUT", "4", " 4", "  4", "   123", "x  42y", "3.14159", "1,000,000", "2024-06-01T12:30:00Z",
    "phone: +1 (555) 010-9999", "v1.2.3-rc4", "Pi is 3.14 and e is 2.718",
    "²", " ²", "x² + y² = z²", "٣", "١٢٣ ٤٥", "१२", "  १२३", "Ⅻ and ⅷ", "½ cup", "①②③",
    "😀", "👍🏽", "👨‍👩‍👧‍👦 family", "🏳️‍🌈", "a😀b", " 🎉🎉 ",
    "中文测试", "東京は日本の首都です。", "한국어 문장입니다", "مرحبا بالعالم", "Привет, мир!", "Ελληνικά",
    "עברית", "ภาษาไทย", "Tiếng Việt có dấu", "naïve café résumé", "straße", "e\u0301", "\u00a0nbsp\u00a0",
    "def f(x):\n\treturn x * 2\n", "for (int i = 0; i < n; ++i) {\n    sum += a[i];\n}",
    "if a==b:\n        pass\n\n", "<div class=\"x\">hi</div>", "SELECT * FROM t WHERE id = 7;",
    "\n", "\n\n\n", "\t\t", " \n \n", "a\r\nb", "   \t  x",
    "<|im_start|>user\nhi<|im_end|>", "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more", "<|im_end|><|im_end|>", "<|im_start", "< |im_start|>", "<file_sep>x<filename>",
    "$$$ !!! ??? ...", "a--b__c", "email@example.com", "http://example.com/path?q=1&r=2#frag",
    "ALLCAPS and camelCase and snake_case", "mixed 12ab34 cd5 6", "\u200b zero width", "'s 't 're",
]


def test_enough_cases():
    assert len(CASES) >= 60


@pytest.mark.parametrize("text", CASES)
def test_rebuilt_matches_twin(rebuilt, twin, text):
    assert rebuilt.encode(text, add_special_tokens=True).ids == twin.encode(text)


@pytest.mark.parametrize("text", CASES)
def test_roundtrip_decode(rebuilt, text):
    assert rebuilt.decode(rebuilt.encode(text).ids, skip_special_tokens=False) == text


def test_control_tokens_are_single_ids(rebuilt):
    assert rebuilt.encode("<|im_start|>").ids == [1]
    assert rebuilt.encode("<|im_end|>").ids == [2]
    assert rebuilt.encode("<|endoftext|>").ids == [0]
    assert rebuilt.get_vocab_size() == 49152


_chars = st.characters(blacklist_categories=("Cs", "Cn"))  # assigned code points in Python's Unicode tables
_pieces = st.one_of(
    st.text(_chars, max_size=12),
    st.sampled_from([" ", "  ", "   ", "\n", "\n\n", "\t", "1", "23", "²", "٣", "<|im_start|>", "<|im_end|>",
                     "'s", "'ll", "😀", "\u200d", "é", "中", "a", "Z", ".", "  7"]),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(_pieces, max_size=8).map("".join))
def test_random_unicode_matches_twin_and_roundtrips(rebuilt, twin, text):
    ids = rebuilt.encode(text).ids
    assert ids == twin.encode(text)
    expected = "".join(c for c in text if c not in _DROPPED)
    assert rebuilt.decode(ids, skip_special_tokens=False) == expected


# '"' and '{' merge into one token; a missing byte between them keeps them apart in llama.cpp (found by the
# random test above: `tokenizers` alone dropped the byte before merging)
MISSING_BYTE_CASES = ["\x1d", "a\x1db", "x\x04\x06\x13\x14\x16y", '"\x16{', '"\x04{', "  \x16", "\x16  ", "1\x1d2"]


def test_bytes_missing_from_vocab_are_dropped_like_llama_cpp(rebuilt, twin):
    for text in MISSING_BYTE_CASES:
        assert rebuilt.encode(text).ids == twin.encode(text), repr(text)
        assert rebuilt.decode(rebuilt.encode(text).ids) == "".join(c for c in text if c not in _DROPPED)


def test_a_folder_converted_by_an_older_skvrt_gets_its_tokenizer_rebuilt(default_gguf, rebuilt, twin, tmp_path,
                                                                        monkeypatch):
    from tokenizers import Tokenizer, pre_tokenizers

    from skvrt import store
    from skvrt.gguf_import import tokenizer_is_current

    old = Tokenizer.from_str(rebuilt.to_str())
    old.pre_tokenizer = pre_tokenizers.Sequence([old.pre_tokenizer[0], old.pre_tokenizer[1]])  # revision 1: no cut at missing bytes
    old.save(str(tmp_path / "tokenizer.json"))
    assert old.encode('"\x16{').ids != twin.encode('"\x16{')
    assert not tokenizer_is_current(tmp_path)
    store._refresh_tokenizer(lambda: default_gguf, tmp_path)
    assert tokenizer_is_current(tmp_path)
    new = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in MISSING_BYTE_CASES + CASES:
        assert new.encode(text).ids == twin.encode(text), repr(text)
    store._refresh_tokenizer(lambda: pytest.fail("a current folder must not be rebuilt"), tmp_path)


# -------------------------------------------------------------------------------------- converted folder
@pytest.fixture(scope="module")
def hf_tokenizer(converted_default):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(converted_default))


def test_transformers_loads_same_tokenizer(hf_tokenizer, twin, converted_default):
    from skvrt.gguf_import import tokenizer_is_current

    assert tokenizer_is_current(converted_default)
    for text in CASES + MISSING_BYTE_CASES:
        assert hf_tokenizer(text, add_special_tokens=True)["input_ids"] == twin.encode(text), repr(text)


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three primes."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Écris un haïku sur la mer 🌊"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "  spaces  \n\nand lines  "}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(reader, hf_tokenizer, messages, gen):
    template = reader.fields["tokenizer.chat_template"].contents()
    ours = render_chat(template, messages, add_generation_prompt=gen, bos_token=hf_tokenizer.bos_token,
                       eos_token=hf_tokenizer.eos_token)
    theirs = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert ours == theirs


def test_capital_of_france_is_37_tokens(reader, rebuilt):
    template = reader.fields["tokenizer.chat_template"].contents()
    text = render_chat(template, [{"role": "user", "content": "What is the capital of France?"}])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>assistant\n")
    assert len(rebuilt.encode(text).ids) == 37


def test_template_raise_exception_is_input_error():
    t = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}" \
        "{% endif %}{{ messages[0]['content'] }}"
    assert render_chat(t, [{"role": "user", "content": "ok"}]) == "ok"
    with pytest.raises(InputError, match="first message must be from the user"):
        render_chat(t, [{"role": "assistant", "content": "no"}])


def test_template_syntax_error_is_input_error():
    with pytest.raises(InputError, match="does not compile"):
        render_chat("{% for m in messages %}{{ m['content'] }", [{"role": "user", "content": "x"}])


def test_template_tojson_and_loopcontrols():
    t = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m | tojson }}{% endfor %}"
    out = render_chat(t, [{"role": "user", "content": "é<>"}, {"role": "user", "content": "skip"}])
    assert out == '{"role": "user", "content": "é<>"}'


def test_template_sandbox_blocks_unsafe_access():
    with pytest.raises(InputError, match="unsafe"):
        render_chat("{{ messages.__class__.__mro__ }}", [{"role": "user", "content": "x"}])
