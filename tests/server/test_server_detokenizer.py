"""Tokenizer + IncrementalDetokenizer: byte-level BPE (multi-byte characters split over
byte tokens) and a SentencePiece-style tokenizer (leading-space handling)."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tandem.server.tokenizer import Tokenizer

TEXT = "Hello wörld, café 你好! Ünïcödé ☃ done.\nO Romeo, Romeo! wherefore art thou Romeo?"


def _train(pre_tokenizer, decoder, vocab_size: int = 300, byte_level: bool = False):
    tok = RustTokenizer(models.BPE(unk_token=None if byte_level else "<unk>"))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_level else []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>", "<unk>"],
        initial_alphabet=alphabet,
    )
    tok.train_from_iterator([TEXT * 3], trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<eos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,  # as the built-in model: the fast decode path
    )
    return Tokenizer(hf, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")


@pytest.fixture(scope="module")
def byte_level():
    return _train(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(), 300, True)


@pytest.fixture(scope="module")
def metaspace():
    return _train(pre_tokenizers.Metaspace(), decoders.Metaspace())


def stream(tok: Tokenizer, prompt: list[int], ids: list[int], chunks: list[int]) -> list[str]:
    detok = tok.detokenizer(prompt)
    out, i = [], 0
    for n in chunks:
        out.append(detok.push(ids[i : i + n]))
        i += n
    out.append(detok.push(ids[i:]))
    out.append(detok.flush())
    return out


@pytest.mark.parametrize("name", ["byte_level", "metaspace"])
@pytest.mark.parametrize("seed", range(5))
def test_streamed_text_equals_full_decode(request, name, seed):
    tok: Tokenizer = request.getfixturevalue(name)
    ids = tok.encode(TEXT, add_special_tokens=False)
    rng = random.Random(seed)
    split = rng.randint(1, len(ids) // 2)
    while tok.decode(ids[:split]).endswith("\ufffd"):  # split between characters
        split += 1
    prompt, out_ids = ids[:split], ids[split:]
    chunks = [rng.randint(1, 4) for _ in range(len(out_ids))]
    parts = stream(tok, prompt, out_ids, chunks)
    full = tok.decode(ids)
    assert tok.decode(prompt) + "".join(parts) == full
    assert all("\ufffd" not in p for p in parts)  # no character split mid-stream


def test_multibyte_character_held_until_complete(byte_level):
    ids = byte_level.encode("€", add_special_tokens=False)
    assert len(ids) == 3  # one token per byte: "€" is not in the training text
    detok = byte_level.detokenizer(byte_level.encode("A", add_special_tokens=False))
    assert detok.push(ids[:1]) == ""
    assert detok.push(ids[1:2]) == ""
    assert detok.push(ids[2:]) == "€"
    assert [byte_level.token_bytes(i)[0] for i in ids] == list("€".encode())


def test_complete_text_released_while_a_new_character_is_pending(byte_level):
    ids = byte_level.encode("x€", add_special_tokens=False)
    detok = byte_level.detokenizer([])
    assert detok.push(ids[:2]) == "x"  # "x" + the first byte of "€"
    assert detok.push(ids[2:]) == "€"


def test_incomplete_character_flushed_at_the_end(byte_level):
    ids = byte_level.encode("ab€", add_special_tokens=False)
    detok = byte_level.detokenizer([])
    text = detok.push(ids[:-1])
    assert text == "ab"
    assert detok.flush() == "\ufffd"


def test_invalid_bytes_do_not_stall_the_stream(byte_level):
    lead = byte_level.encode("€", add_special_tokens=False)[0]
    detok = byte_level.detokenizer([])
    released = "".join(detok.push([lead]) for _ in range(8))
    assert released  # a run of lone lead bytes is released as replacement characters


def test_special_tokens_skipped(byte_level):
    eos = byte_level.eos_token_id
    hi = byte_level.encode("Hello", add_special_tokens=False)
    detok = byte_level.detokenizer([])
    assert detok.push(hi + [eos]) + detok.flush() == "Hello"
    keep = byte_level.detokenizer([], skip_special_tokens=False)
    assert keep.push(hi + [eos]) == "Hello<eos>"


def test_chat_template_errors_are_clear(byte_level):
    from tandem.server.tokenizer import TokenizerError

    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(TokenizerError, match="cannot both be true"):
        byte_level.render_chat(msgs, add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(TokenizerError, match="final assistant message"):
        byte_level.render_chat(msgs, add_generation_prompt=False, continue_final_message=True)
    broken = Tokenizer(byte_level.hf, chat_template="{{ raise_exception('nope') }}")
    with pytest.raises(TokenizerError, match="nope"):
        broken.render_chat(msgs)


def test_no_template_is_a_clear_error(byte_level):
    bare = Tokenizer(PreTrainedTokenizerFast(tokenizer_object=byte_level.hf.backend_tokenizer))
    with pytest.raises(ValueError, match="--chat-template"):
        bare.render_chat([{"role": "user", "content": "hi"}])


def test_template_file_and_missing_file(tmp_path, byte_level):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    tok = Tokenizer(byte_level.hf, chat_template=str(path))
    assert tok.render_chat([{"role": "user", "content": "x"}]) == "[x]"
    with pytest.raises(FileNotFoundError):
        Tokenizer(byte_level.hf, chat_template=str(tmp_path / "missing.jinja"))


@pytest.mark.parametrize("name", ["byte_level", "metaspace"])
def test_decode_matches_hugging_face(request, name):
    tok: Tokenizer = request.getfixturevalue(name)
    assert tok._backend is not None  # the Rust fast path is the one under test
    ids = tok.encode(TEXT, add_special_tokens=False) + [tok.eos_token_id]
    rng = random.Random(0)
    for _ in range(50):
        i = rng.randrange(len(ids))
        window = ids[i : i + rng.randint(1, 6)]
        for skip in (True, False):
            assert tok.decode(window, skip) == tok.hf.decode(window, skip_special_tokens=skip)
