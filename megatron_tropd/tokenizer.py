r"""One tokenizer interface over SentencePiece model files and Hugging Face tokenizer directories,
and the one place that turns a prompt (text or chat messages) into prompt token ids.

`load_tokenizer(path)` picks the backend from what the path holds:
- a file (say `tokenizer.model`), or a directory holding only `tokenizer.model`: SentencePiece;
- a directory with `tokenizer.json` or `tokenizer_config.json`: `AutoTokenizer`, local files only.

Chat formatting: a Hugging Face tokenizer with a chat template renders `messages` with it
(`add_generation_prompt=True`). A tokenizer without one uses the plain template: a line
`Role: content` per turn (role capitalised: System, User, Assistant), then an open assistant turn,
e.g. "System: Be brief.\nUser: 2+3?\nAssistant: " (SentencePiece's default normalisation folds the
newlines and the final space into its word-boundary marks).
"""

from pathlib import Path
from typing import Optional, Sequence

import sentencepiece

from megatron_tropd.errors import UserError

TEMPLATES = ("auto", "chat", "plain")
HF_FILES = ("tokenizer.json", "tokenizer_config.json")
SP_FILE = "tokenizer.model"


class TokenizerError(UserError):
    """A tokenizer that cannot be loaded or used, with a one-line reason."""


def plain_chat_text(messages: Sequence[dict]) -> str:
    """The plain template: `Role: content` lines, ending with an open `Assistant: ` turn."""
    turns = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    return turns + "Assistant: "


class Tokenizer:
    """What the trainer needs from a tokenizer; the backends below fill it in.

    Attributes:
        vocab_size: number of ids the tokenizer can produce (added tokens included).
        eos_id: end-of-sequence id; every tokenizer must have one (it ends responses).
        pad_id: padding id, the EOS id when the tokenizer defines none.
        bos_id: the id the tokenizer puts before a sequence, None when it puts none (a Hugging
            Face tokenizer whose bos token its own encoding never adds, like GPT-2's, counts as
            putting none).
        has_chat_template: whether the tokenizer has a chat template of its own (`encode_chat`).
        unk_id: the id of characters the vocabulary cannot spell, None when every text can be
            spelled (byte-level tokenizers).
    """

    has_chat_template = False
    unk_id: Optional[int] = None

    def __init__(self, path, vocab_size: int, eos_id: Optional[int], pad_id: Optional[int],
                 bos_id: Optional[int]):
        if eos_id is None:
            raise TokenizerError(f"{path}: the tokenizer defines no end-of-sequence token")
        self.path = str(path)
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.pad_id = eos_id if pad_id is None else pad_id
        self.bos_id = bos_id

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens and ids beyond the tokenizer's vocabulary skipped."""
        raise NotImplementedError

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        """Ids of `messages` ({role, content} dicts) rendered with the tokenizer's chat template,
        ready for the assistant's reply (only when `has_chat_template`)."""
        raise NotImplementedError

    def tokens(self) -> list[str]:
        """Every id's token string, in id order."""
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file):
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{model_file}: not a SentencePiece model ({_one_line(e)})")

        def optional(i):  # SentencePiece reports an absent special token as -1
            return i if i >= 0 else None

        super().__init__(model_file, self._sp.get_piece_size(), optional(self._sp.eos_id()),
                         optional(self._sp.pad_id()), optional(self._sp.bos_id()))
        self.unk_id = optional(self._sp.unk_id())

    def encode(self, text):
        return self._sp.encode(text)

    def decode(self, ids):
        # Control pieces (bos, eos, pad) decode to nothing, and so do ids of the model's vocabulary
        # beyond the tokenizer's (a student's vocabulary may be larger: it can sample them).
        return self._sp.decode([i for i in ids if i < self.vocab_size])

    def tokens(self):
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]


class HFTokenizer(Tokenizer):
    def __init__(self, directory):
        # Imported here: transformers takes seconds to import and SentencePiece users never need it.
        import transformers

        try:
            self._hf = transformers.AutoTokenizer.from_pretrained(str(directory),
                                                                  local_files_only=True)
        except Exception as e:  # transformers raises many types for unreadable directories
            raise TokenizerError(f"{directory}: cannot load the Hugging Face tokenizer "
                                 f"({type(e).__name__}: {_one_line(e)})")
        bos = self._hf.bos_token_id
        # A bos token that the tokenizer's own encoding never adds (GPT-2's is its eos) is not put
        # before prompts either: the model never saw it there.
        if bos is not None and self._hf.encode("a", add_special_tokens=True)[:1] != [bos]:
            bos = None
        super().__init__(directory, len(self._hf), self._hf.eos_token_id, self._hf.pad_token_id,
                         bos)
        self.has_chat_template = self._hf.chat_template is not None
        self.unk_id = self._hf.unk_token_id

    def encode(self, text):
        return self._hf.encode(text, add_special_tokens=False)

    def decode(self, ids):
        return self._hf.decode([i for i in ids if i < self.vocab_size], skip_special_tokens=True)

    def tokens(self):
        return self._hf.convert_ids_to_tokens(list(range(self.vocab_size)))

    def use_chat_template(self, template: str):
        """Render chats with `template` (Jinja, as in tokenizer_config.json) instead of the
        tokenizer's own."""
        self._hf.chat_template = template
        self.has_chat_template = True

    def encode_chat(self, messages):
        from jinja2 import TemplateError

        try:
            text = self._hf.apply_chat_template(list(messages), tokenize=False,
                                                add_generation_prompt=True)
        except TemplateError as e:  # templates reject, e.g., a system turn they do not support
            raise TokenizerError(f"chat template of {self.path} failed: {_one_line(e)}")
        # Rendering then encoding without special tokens is what `tokenize=True` does.
        return self.encode(text)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def check_same_tokens(student: Tokenizer, teacher: Tokenizer):
    """Distillation compares the two models' probabilities id by id, so both tokenizers must give
    every id the same token: a one-line `TokenizerError` at the first id where they differ."""
    a, b = student.tokens(), teacher.tokens()
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            raise TokenizerError(f"student and teacher tokenizers differ at id {i} ({x!r} in "
                                 f"{student.path}, {y!r} in {teacher.path}): distillation needs "
                                 f"the same tokenizer")
    if len(a) != len(b):
        raise TokenizerError(f"student and teacher tokenizers differ in size ({len(a)} ids in "
                             f"{student.path}, {len(b)} in {teacher.path}): distillation needs "
                             f"the same tokenizer")


def has_tokenizer(directory) -> bool:
    """Whether a checkpoint directory carries tokenizer files (a converted HF model does)."""
    return any((Path(directory) / name).is_file() for name in HF_FILES + (SP_FILE,))


def load_tokenizer(path) -> Tokenizer:
    """The tokenizer at `path`: a SentencePiece model file or a tokenizer directory."""
    path = Path(path)
    if path.is_file():
        return SentencePieceTokenizer(path)
    if not path.is_dir():
        raise TokenizerError(f"{path}: no such tokenizer file or directory")
    if any((path / name).is_file() for name in HF_FILES):
        return HFTokenizer(path)
    if (path / SP_FILE).is_file():
        return SentencePieceTokenizer(path / SP_FILE)
    raise TokenizerError(f"{path}: holds no tokenizer.json, tokenizer_config.json or "
                         f"tokenizer.model")


def load_chat_template(tokenizer: Tokenizer, path: str):
    """`--chat-template-file`: the Jinja chat template in `path` replaces the tokenizer's own."""
    if not isinstance(tokenizer, HFTokenizer):
        raise TokenizerError(f"--chat-template-file needs a Hugging Face tokenizer directory; "
                             f"{tokenizer.path} is a SentencePiece model")
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"--chat-template-file {path}: cannot read ({_one_line(e)})")
    tokenizer.use_chat_template(text)


def check_template(tokenizer: Tokenizer, template: str):
    """--prompt-template chat needs the tokenizer's own chat template (auto falls back to the
    plain one)."""
    if template == "chat" and not tokenizer.has_chat_template:
        raise TokenizerError(f"--prompt-template chat: the tokenizer {tokenizer.path} has no chat "
                             f"template (auto falls back to the plain template)")


def prompt_ids(tokenizer: Tokenizer, prompt: Optional[str] = None,
               messages: Optional[Sequence[dict]] = None, template: str = "auto") -> list[int]:
    """Prompt token ids from a `prompt` text or chat `messages` (exactly one of them).

    template: "chat" renders with the tokenizer's chat template (a prompt text becomes one user
    turn; a tokenizer without one is an error);
    "plain" encodes a prompt text as it is and flattens messages with the plain template; "auto"
    is "chat" when the tokenizer has a chat template, else "plain". The tokenizer's bos id is put
    first unless the template already did.
    """
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt and messages")
    check_template(tokenizer, template)
    if template == "auto":
        template = "chat" if tokenizer.has_chat_template else "plain"
    if template == "chat":
        if messages is None:
            messages = [{"role": "user", "content": prompt}]
        ids = tokenizer.encode_chat(messages)
    elif prompt is not None:
        ids = tokenizer.encode(prompt)
    else:
        ids = tokenizer.encode(plain_chat_text(messages))
    if tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
        ids = [tokenizer.bos_id] + ids
    return ids
