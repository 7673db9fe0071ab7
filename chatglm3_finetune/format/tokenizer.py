"""The ChatGLM3 tokenizer, without remote code.

A SentencePiece model plus nine special tokens appended right after its pieces
(`[MASK]` .. `<|observation|>`; at 64789..64797 for the real ChatGLM3 model).
Text is encoded by SentencePiece alone, segment by segment, so every segment gets
its own dummy-prefix piece; special tokens are never parsed out of text.

Load it from any folder holding a ChatGLM3 `tokenizer.model`, with or without the
original `tokenizer_config.json` (which names a remote class that we do not need):

    tokenizer = load_tokenizer("path/to/chatglm3-6b")
"""

from __future__ import annotations

import json
import os
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer

from .chat_format import ROLE_TOKENS, SPECIAL_TOKENS

TOKENIZER_MODEL_FILE = "tokenizer.model"


class ChatGLM3Tokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": TOKENIZER_MODEL_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, padding_side: str = "left", **kwargs):
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        self.num_pieces = self.sp.get_piece_size()
        self.special_token_ids = {tok: self.num_pieces + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.special_id_tokens = {i: tok for tok, i in self.special_token_ids.items()}
        for name in ("eos_token", "pad_token", "unk_token", "bos_token", "extra_special_tokens",
                     "additional_special_tokens", "tokenizer_class", "auto_map", "chat_template"):
            kwargs.pop(name, None)
        super().__init__(
            eos_token="</s>", pad_token="<unk>", unk_token="<unk>",
            padding_side=padding_side, clean_up_tokenization_spaces=False, **kwargs,
        )

    # --- vocabulary -----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.num_pieces + len(SPECIAL_TOKENS)

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp.id_to_piece(i): i for i in range(self.num_pieces)}
        vocab.update(self.special_token_ids)
        return vocab

    def get_command(self, token: str) -> int:
        """Id of a special token by name, e.g. get_command("<|user|>")."""
        return self.special_token_ids[token]

    def role_token_id(self, role: str) -> int:
        return self.special_token_ids[ROLE_TOKENS[role]]

    @property
    def stop_token_ids(self) -> list[int]:
        """Generation ends on eos, `<|user|>` or `<|observation|>`."""
        return [self.eos_token_id, self.get_command("<|user|>"), self.get_command("<|observation|>")]

    # --- encoding -------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        """SentencePiece ids of one text segment (with its dummy prefix), no special tokens."""
        return self.sp.encode(text)

    def tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        if token in self.special_token_ids:
            return self.special_token_ids[token]
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        if index in self.special_id_tokens:
            return self.special_id_tokens[index]
        if 0 <= index < self.num_pieces:
            return self.sp.id_to_piece(index)
        return ""

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        out, pieces = [], []
        for token in tokens:
            if token in self.special_token_ids:
                if pieces:
                    out.append(self.sp.decode_pieces(pieces))
                    pieces = []
                out.append(token)
            else:
                pieces.append(token)
        if pieces:
            out.append(self.sp.decode_pieces(pieces))
        return "".join(out)

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        text, run = [], []
        for i in token_ids:
            i = int(i)
            if i in self.special_id_tokens or i >= self.vocab_size or i < 0:
                if run:
                    text.append(self.sp.decode(run))
                    run = []
                if not skip_special_tokens and i in self.special_id_tokens:
                    text.append(self.special_id_tokens[i])
            elif skip_special_tokens and i in (self.sp.eos_id(), self.sp.bos_id(), self.sp.unk_id()):
                continue
            else:
                run.append(i)
        if run:
            text.append(self.sp.decode(run))
        return "".join(text)

    def token_text(self, token_id: int) -> str:
        """How one token prints in the sanity check: special tokens by name, pieces as text."""
        if token_id in self.special_id_tokens:
            return self.special_id_tokens[token_id]
        return self.sp.decode([token_id])

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        prefix = [self.get_command("[gMASK]"), self.get_command("sop")]
        ids = prefix + list(token_ids_0)
        if token_ids_1 is not None:
            ids += list(token_ids_1) + [self.eos_token_id]
        return ids

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return [1 if i in self.special_id_tokens else 0 for i in token_ids_0]
        mask = [1, 1] + [0] * len(token_ids_0)
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 3 if pair else 2

    # --- saving and loading ---------------------------------------------------------
    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None):
        name = (filename_prefix + "-" if filename_prefix else "") + TOKENIZER_MODEL_FILE
        target = os.path.join(save_directory, name)
        if os.path.abspath(self.vocab_file) != os.path.abspath(target):
            shutil.copyfile(self.vocab_file, target)
        return (target,)

    def save_pretrained(self, save_directory, **kwargs):
        """Writes tokenizer.model (read back by `load_tokenizer` as this class) plus tokenizer.json,
        chat_template.jinja and a tokenizer_config.json that `AutoTokenizer.from_pretrained` loads
        with no remote code as the equivalent generic fast tokenizer, chat template included."""
        from .fast_tokenizer import build_fast_tokenizer

        os.makedirs(save_directory, exist_ok=True)
        build_fast_tokenizer(self.vocab_file, padding_side=self.padding_side).save_pretrained(save_directory)
        self.save_vocabulary(save_directory)
        config_file = os.path.join(save_directory, "tokenizer_config.json")
        with open(config_file) as f:
            config = json.load(f)
        with open(os.path.join(save_directory, "chat_template.jinja")) as f:
            config["chat_template"] = f.read()  # also for readers that predate chat_template.jinja
        config["special_tokens"] = self.special_token_ids
        with open(config_file, "w") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        return (os.path.join(save_directory, TOKENIZER_MODEL_FILE), config_file)

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):
        return load_tokenizer(path, **kwargs)


def load_tokenizer(path: str, **kwargs) -> ChatGLM3Tokenizer:
    """The ChatGLM3 tokenizer from a folder (or a tokenizer.model file path)."""
    vocab_file = path if os.path.isfile(path) else os.path.join(path, TOKENIZER_MODEL_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing (no such folder)")
    if not os.path.isfile(vocab_file):
        raise FileNotFoundError(f"no {TOKENIZER_MODEL_FILE} in {path}: give a ChatGLM3 folder that holds the "
                                f"SentencePiece model")
    padding_side = kwargs.pop("padding_side", None)
    config_file = os.path.join(os.path.dirname(vocab_file), "tokenizer_config.json")
    if padding_side is None and os.path.isfile(config_file):
        with open(config_file) as f:
            padding_side = json.load(f).get("padding_side")
    return ChatGLM3Tokenizer(vocab_file, padding_side=padding_side or "left", **kwargs)
