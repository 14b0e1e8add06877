"""The tokenizer and chat template of a model served elsewhere (a cloud upstream), read from its GGUF file.

An upstream that reports no ``usage`` (llama.cpp's server, in a stream) is charged for
the text it delivered counted with its own model's tokenizer, and a request is held for
its prompt counted the same way. When a stream has to continue on an upstream through
its completions endpoint, the conversation is rendered with the model's own chat
template. Only the vocabulary is loaded (``vocab_only``): a few hundred milliseconds
once per file, and no weights.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from speculative.completion import encode_text

DEFAULT_CHAT_TEMPLATE_KEY = "tokenizer.chat_template"


class GgufTokenizer:
    """Counting and chat rendering with the vocabulary and template of one GGUF file."""

    def __init__(self, path: str):
        from llama_cpp import Llama

        self.path = path
        self._model = Llama(model_path=path, vocab_only=True, verbose=False)
        self._lock = threading.Lock()  # one llama.cpp vocabulary: calls are serialised
        self.template: str | None = self._model.metadata.get(DEFAULT_CHAT_TEMPLATE_KEY)

    def close(self) -> None:
        with self._lock:
            self._model.close()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        with self._lock:
            return self._model.tokenize(text.encode(), add_bos=add_special_tokens, special=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        with self._lock:
            return self._model.detokenize(list(ids)).decode("utf-8", "replace")

    def render_chat(self, messages: Sequence[Mapping[str, str]], *, continue_final: bool = False) -> str:
        """The conversation as the model's prompt: ready for its answer, or ending inside the last (assistant) message.

        ``continue_final`` renders the last message as the start of the model's own turn,
        cut right after its content, so the model goes on writing it (what llama.cpp's
        server and vLLM call continuing a final message).
        """
        if self.template is None:
            raise ValueError(f"{self.path} has no chat template")
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        eos = self._token_text(self._model.token_eos())
        bos = self._token_text(self._model.token_bos())
        formatter = Jinja2ChatFormatter(self.template, eos, bos, add_generation_prompt=not continue_final)
        rendered = formatter(messages=[dict(m) for m in messages]).prompt  # type: ignore[misc]
        if not continue_final:
            return rendered
        partial = messages[-1]["content"]
        cut = rendered.rfind(partial) if partial else -1
        if cut < 0:
            raise ValueError("the chat template does not keep the final message's text as it is")
        return rendered[: cut + len(partial)]

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        with self._lock:
            return self._model.detokenize([token], special=True).decode("utf-8", "replace")


_loaded: dict[str, GgufTokenizer] = {}
_loaded_lock = threading.Lock()


def gguf_tokenizer(path: str) -> GgufTokenizer:
    """The tokenizer of the GGUF at ``path``, loaded once per process."""
    tokenizer = _loaded.get(path)
    if tokenizer is None:
        with _loaded_lock:
            tokenizer = _loaded.get(path)
            if tokenizer is None:
                tokenizer = _loaded[path] = GgufTokenizer(path)
    return tokenizer


@atexit.register
def _close_all() -> None:
    """Free the vocabularies while llama.cpp is still loaded (its finalizers fail once the interpreter is torn down)."""
    with _loaded_lock:
        for tokenizer in _loaded.values():
            tokenizer.close()
        _loaded.clear()


def counts_with(tokenizer: Any, text: str) -> int:
    """How many tokens ``text`` is under ``tokenizer`` (no special tokens).

    Through ``speculative.completion.encode_text``: a transformers fast tokenizer's Rust call
    where that gives the same ids (a third of the time), and a prompt counted here is not
    encoded again when its request is built right after.
    """
    if not text:
        return 0
    return len(encode_text(tokenizer, text))
