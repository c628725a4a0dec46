"""Text <-> token ids for one model: encoding, chat templates, incremental detokenization.

Shared by the HTTP server and the offline `LLM` API, so both produce the same prompt
ids and the same text for the same tokens. Needs no HTTP.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# A UTF-8 character is at most 4 bytes, and every token carries at least one byte, so a
# run of more pending tokens than this that still decodes to U+FFFD is really invalid
# text, not a character cut in half: it is released as is.
MAX_PENDING_TOKENS = 4
# Prompt tokens used as left context when detokenizing the first outputs (tokenizers
# such as SentencePiece decode a leading space differently at the start of a text).
PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT = "\ufffd"


class TokenizerError(ValueError):
    """A prompt or chat conversation the tokenizer cannot turn into ids."""


class Tokenizer:
    """One model's tokenizer (a Hugging Face fast tokenizer) plus its chat template.

    `chat_template`, when given, is a Jinja template string or a path to a file with
    one; it overrides the template stored with the model.
    """

    def __init__(self, hf_tokenizer: Any, chat_template: str | None = None) -> None:
        self.hf = hf_tokenizer
        self.chat_template = _load_template(chat_template)
        self.vocab_size = len(hf_tokenizer)  # ids are in [0, vocab_size)
        self.eos_token_id: int | None = hf_tokenizer.eos_token_id
        self._byte_decoder = _byte_level_decoder(hf_tokenizer)  # char -> byte, or None
        self._token_strs: dict[int, str] = {}  # cache: id -> decoded token text
        self._special_ids = frozenset(hf_tokenizer.all_special_ids)
        # The Rust tokenizer, when HF's decode adds nothing to it (no space clean-up).
        self._backend = None
        if not getattr(hf_tokenizer, "clean_up_tokenization_spaces", True):
            self._backend = getattr(hf_tokenizer, "backend_tokenizer", None)

    @classmethod
    def from_dir(cls, model_dir: str | Path, chat_template: str | None = None) -> Tokenizer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(model_dir)), chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Same text as `hf.decode`; calls the Rust tokenizer directly when HF would
        not post-process (this runs twice per streamed step of every request)."""
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """The conversation as prompt text, via the chat template.

        Raises TokenizerError when there is no template or the template fails.
        """
        if self.chat_template is None and getattr(self.hf, "chat_template", None) is None:
            raise TokenizerError(
                "this model has no chat template; start the server with --chat-template"
            )
        if add_generation_prompt and continue_final_message:
            raise TokenizerError(
                "add_generation_prompt and continue_final_message cannot both be true"
            )
        if continue_final_message and messages[-1]["role"] != "assistant":
            raise TokenizerError("continue_final_message needs a final assistant message")
        kwargs = dict(template_kwargs or {})
        try:
            text = self.hf.apply_chat_template(
                messages,
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **kwargs,
            )
        except Exception as exc:  # jinja errors, template `raise_exception` calls
            raise TokenizerError(f"chat template failed: {exc}") from exc
        return str(text)

    def encode_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        """Prompt ids for a conversation; the template provides any special tokens."""
        return self.encode(self.render_chat(messages, **kwargs), add_special_tokens=False)

    def token_str(self, token_id: int) -> str:
        """One token's text on its own (may be U+FFFD for part of a character)."""
        s = self._token_strs.get(token_id)
        if s is None:
            s = self.hf.decode([token_id], skip_special_tokens=False)
            self._token_strs[token_id] = s
        return s

    def token_bytes(self, token_id: int) -> list[int]:
        """The token's exact bytes (byte-level BPE), else the UTF-8 of its text."""
        if self._byte_decoder is not None and token_id not in self._special_ids:
            piece = self.hf.convert_ids_to_tokens(token_id)
            if all(c in self._byte_decoder for c in piece):
                return [self._byte_decoder[c] for c in piece]
        return list(self.token_str(token_id).encode("utf-8"))

    def detokenizer(
        self, prompt_ids: list[int], skip_special_tokens: bool = True
    ) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)


class IncrementalDetokenizer:
    """Turns a stream of output token ids into text deltas, never splitting a character.

    Decodes a small window (a few tokens of left context plus the pending tokens) per
    call, so the cost is O(new tokens). Text is held back while it ends in a partial
    UTF-8 character (decodes to U+FFFD); `flush()` releases whatever is left.

    Example (byte-level BPE, "é" is two byte tokens 0xC3 0xA9):
        push([id("Hi")]) -> "Hi";  push([id(0xC3)]) -> "";  push([id(0xA9)]) -> "é"
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self.ids: list[int] = context  # left context + outputs not yet fully released
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] = already released context
        self.read_offset = len(context)  # ids[read_offset:] = not yet released

    def push(self, new_ids: list[int]) -> str:
        """Append output ids; return the newly complete text (possibly "")."""
        self.ids.extend(new_ids)
        return self._release(final=False)

    def flush(self) -> str:
        """Release the text still held back (at the end of a request)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.read_offset >= len(self.ids):
            return ""
        prefix = self._decode(self.read_offset)
        full = self._decode(len(self.ids))
        end = len(self.ids)
        if not final and full.endswith(REPLACEMENT):
            # Hold back the shortest run of trailing tokens that is a partial character.
            held = self._clean_cut(len(prefix))
            if held is None:
                return ""
            end, full = held
        delta = full[len(prefix) :]
        self._advance(end)
        return delta

    def _decode(self, end: int) -> str:
        return self.tokenizer.decode(self.ids[self.prefix_offset : end], self.skip_special_tokens)

    def _clean_cut(self, prefix_len: int) -> tuple[int, str] | None:
        """(end, text): the longest release that leaves at most MAX_PENDING_TOKENS
        trailing tokens held and does not end in a partial character; None = hold all.
        A run longer than that which still ends in U+FFFD is invalid text: released."""
        pending = len(self.ids) - self.read_offset
        for k in range(1, min(MAX_PENDING_TOKENS, pending) + 1):
            text = self._decode(len(self.ids) - k)
            if len(text) > prefix_len and not text.endswith(REPLACEMENT):
                return len(self.ids) - k, text
        if pending <= MAX_PENDING_TOKENS:
            return None
        return len(self.ids), self._decode(len(self.ids))

    def _advance(self, end: int) -> None:
        """Tokens up to `end` are released; the last released run becomes the next
        call's left context, and older tokens are dropped (bounded window)."""
        self.prefix_offset, self.read_offset = self.read_offset, end
        del self.ids[: self.prefix_offset]
        self.read_offset -= self.prefix_offset
        self.prefix_offset = 0


def _load_template(template: str | None) -> str | None:
    """A template string, or the contents of the file it names."""
    if template is None:
        return None
    if "{" not in template and "\n" not in template:
        path = Path(template)
        if not path.is_file():
            raise FileNotFoundError(f"chat template file not found: {template}")
        return path.read_text(encoding="utf-8")
    return template


def _byte_level_decoder(hf_tokenizer: Any) -> dict[str, int] | None:
    """GPT-2's unicode-char -> byte table, when the tokenizer is byte-level BPE."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None or type(decoder).__name__ != "ByteLevel":
        return None
    byte_values = list(range(ord("!"), ord("~") + 1))
    byte_values += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = byte_values[:]
    n = 0
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(byte_values, chars, strict=True)}
