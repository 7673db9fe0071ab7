"""A fast (`tokenizers`) twin of the ChatGLM3 tokenizer, loadable by `AutoTokenizer` with no remote code.

Built from a ChatGLM3 SentencePiece model (the real one or a tiny one): its pieces become a
byte-fallback BPE whose merges are ranked by the merged piece's score, text gets SentencePiece's
dummy prefix from the normalizer (no pre-tokenizer, so leading spaces come out as SentencePiece's),
and the nine special tokens follow the pieces. The chat template renders the ChatGLM3 format.

`sop` and `eop` are registered as `<sop>` / `<eop>`: an added token matches inside words, so the
literal names would split "people" into `p`, `eop`, `le`. The ids are the same as ChatGLM3's.
"""

from __future__ import annotations

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers import TokenizersBackend

from .chat_format import SPECIAL_TOKENS, TOOLS_SYSTEM_PROMPT

FAST_SPECIAL_NAMES = {"sop": "<sop>", "eop": "<eop>"}
FAST_SPECIAL_TOKENS = tuple(FAST_SPECIAL_NAMES.get(name, name) for name in SPECIAL_TOKENS)


def _in_jinja_quotes(text: str) -> str:
    """text escaped for a single-quoted Jinja string literal."""
    return text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")


# Per message: <|role|> + metadata + "\n", then " " + content when there is content. The normalizer
# gives each text chunk after a special token its dummy-prefix "▁", which stands for the metadata's
# own prefix; the explicit space stands for the content's (nothing merges across the "\n" byte).
# `tools` (a list of dicts; json.dumps(tools, indent=4, ensure_ascii=False) via transformers' tojson)
# becomes a system message placed first. A "tool" message (a tool's result) renders as an observation.
CHAT_TEMPLATE = """
{{- '[gMASK]<sop>' -}}
{#- vLLM and transformers pass OpenAI tools {"type": "function", "function": F}; ChatGLM3 was trained on F -#}
{%- set unwrapped = namespace(tools=[]) -%}
{%- for tool in tools or [] -%}
    {%- set unwrapped.tools = unwrapped.tools + [tool['function'] if tool['type'] == 'function' else tool] -%}
{%- endfor -%}
{%- set tools = unwrapped.tools -%}
{%- if tools -%}
    {{- '<|system|>\\n TOOLS_SYSTEM_PROMPT' -}}
    {{- tools | tojson(indent=4, ensure_ascii=False) -}}
{%- endif -%}
{%- for message in messages -%}
    {%- set role = 'observation' if message['role'] == 'tool' else message['role'] -%}
    {%- if role not in ['system', 'user', 'assistant', 'observation'] -%}
        {{- raise_exception('ChatGLM3 has no role ' ~ message['role']) -}}
    {%- endif -%}
    {{- '<|' ~ role ~ '|>' ~ (message['metadata'] or '') ~ '\\n' -}}
    {%- if message['content'] -%}
        {{- ' ' ~ message['content'] -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant|>' -}}
{%- endif -%}
""".replace("TOOLS_SYSTEM_PROMPT", _in_jinja_quotes(TOOLS_SYSTEM_PROMPT))


def read_pieces(model_file: str) -> list[tuple[str, float, int]]:
    """(piece, score, type) for each id of a SentencePiece model."""
    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise ValueError(f"{model_file}: a ChatGLM3 tokenizer is a SentencePiece BPE model, this one is not")
    return [(p.piece, p.score, p.type) for p in proto.pieces]


def bpe_merges(pieces: list[tuple[str, float, int]]) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, best-scored merged piece first."""
    normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    ids = {piece: i for i, (piece, _, kind) in enumerate(pieces) if kind == normal}
    ranked = []
    for piece, merged_id in ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-pieces[merged_id][1], merged_id, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_tokenizer_object(model_file: str) -> Tokenizer:
    """The `tokenizers.Tokenizer` that reproduces SentencePiece's ids (specials at num_pieces..)."""
    pieces = read_pieces(model_file)
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=bpe_merges(pieces), unk_token=pieces[0][0],
                              byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    tokenizer.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in FAST_SPECIAL_TOKENS])
    first_special = len(pieces)
    gmask, sop = first_special + SPECIAL_TOKENS.index("[gMASK]"), first_special + SPECIAL_TOKENS.index("sop")
    eos = spm.SentencePieceProcessor(model_file=model_file).eos_id()
    # Like the original tokenizer: plain text starts with `[gMASK] sop`; a pair ends with eos.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A", pair="[gMASK] <sop> $A $B </s>",
        special_tokens=[("[gMASK]", gmask), ("<sop>", sop), ("</s>", eos)],
    )
    return tokenizer


def build_fast_tokenizer(model_file: str, padding_side: str = "left") -> TokenizersBackend:
    """The transformers fast tokenizer for a ChatGLM3 `tokenizer.model`, with the chat template."""
    return TokenizersBackend(
        tokenizer_object=build_tokenizer_object(model_file),
        eos_token="</s>", pad_token="<unk>", unk_token="<unk>",
        padding_side=padding_side, clean_up_tokenization_spaces=False, chat_template=CHAT_TEMPLATE,
    )


__all__ = ["CHAT_TEMPLATE", "FAST_SPECIAL_TOKENS", "bpe_merges", "build_tokenizer_object",
           "build_fast_tokenizer"]
