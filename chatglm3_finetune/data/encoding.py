"""Validated records to ChatGLM3 training ids: `input_ids`/`labels` for multi-turn and
prompt/response records, length caps with what they cut, and the sanity check printout."""

from __future__ import annotations

from dataclasses import dataclass

from ..format.chat_format import conversation_messages, encode_message, prefix_ids
from .records import MULTI_TURN

IGNORE_INDEX = -100  # the label of a position that is not trained (cross-entropy's ignore index)
TRUNCATION_POLICIES = ("keep", "drop", "error")


@dataclass
class EncodedRecord:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False  # a length cap cut the record
    lost_targets: bool = False  # the cut removed supervised targets
    lost_stop: bool = False  # the cut removed the final stop target (the eos)

    def as_dict(self) -> dict:
        return {"input_ids": self.input_ids, "labels": self.labels, "truncated": self.truncated,
                "lost_targets": self.lost_targets, "lost_stop": self.lost_stop,
                "num_targets": sum(label != IGNORE_INDEX for label in self.labels)}


def shift_mask_to_labels(input_ids: list[int], loss_mask: list[bool]) -> list[int]:
    # The mask says whether the prediction made AT a position is trained, and that prediction is
    # the NEXT token: so token i is a target when position i-1 is masked in. This is why the token
    # after an assistant message (`<|user|>`, `<|observation|>` or the eos) is learned: it is how
    # the model learns to stop.
    return [IGNORE_INDEX] + [tok if trained else IGNORE_INDEX for tok, trained in zip(input_ids[1:], loss_mask[:-1])]


def encode_multi_turn(tokenizer, record: dict, max_seq_length: int | None = None) -> EncodedRecord:
    ids = prefix_ids(tokenizer)
    mask = [False] * len(ids)
    for message in conversation_messages(record):
        message_ids = encode_message(tokenizer, message.role, message.metadata, message.text)
        ids += message_ids
        mask += [message.loss] * len(message_ids)
    ids.append(tokenizer.eos_token_id)
    mask.append(False)
    labels = shift_mask_to_labels(ids, mask)
    encoded = EncodedRecord(ids, labels)
    if max_seq_length is not None and len(ids) > max_seq_length:
        cut = labels[max_seq_length:]
        encoded = EncodedRecord(
            ids[:max_seq_length], labels[:max_seq_length], truncated=True,
            lost_targets=any(label != IGNORE_INDEX for label in cut),
            lost_stop=labels[-1] != IGNORE_INDEX,
        )
    return encoded


def encode_prompt_response(tokenizer, record: dict, max_source_length: int | None = None,
                           max_target_length: int | None = None) -> EncodedRecord:
    source = prefix_ids(tokenizer) + tokenizer.encode_text(record["prompt"])
    target = tokenizer.encode_text(record["response"])
    truncated = lost_targets = False
    if max_source_length is not None and len(source) > max_source_length:
        source, truncated = source[:max_source_length], True
    if max_target_length is not None and len(target) > max_target_length:
        target, truncated, lost_targets = target[:max_target_length], True, True
    target = target + [tokenizer.eos_token_id]
    return EncodedRecord(source + target, [IGNORE_INDEX] * len(source) + target, truncated, lost_targets)


@dataclass(frozen=True)
class LengthLimits:
    max_seq_length: int | None = None  # multi-turn
    max_source_length: int | None = None  # input-output
    max_target_length: int | None = None  # input-output


# The smallest useful caps: [gMASK] sop and one token; one response token (the eos comes on top).
SMALLEST_CAPS = {"max_seq_length": 3, "max_source_length": 3, "max_target_length": 1}


def length_cap_problem(limits: LengthLimits) -> str | None:
    """What is wrong with a set cap, naming its flag (--max_seq_length ...); None when all are usable."""
    for name, smallest in SMALLEST_CAPS.items():
        value = getattr(limits, name)
        if value is not None and value < smallest:
            return f"--{name} must be at least {smallest} tokens, got {value}"
    return None


def encode_record(tokenizer, record: dict, train_format: str, limits: LengthLimits) -> EncodedRecord:
    if train_format == MULTI_TURN:
        return encode_multi_turn(tokenizer, record, limits.max_seq_length)
    return encode_prompt_response(tokenizer, record, limits.max_source_length, limits.max_target_length)


SANITY_CHECK_HEAD, SANITY_CHECK_TAIL = 48, 16  # tokens shown of a long record: its start and its end


def sanity_check_lines(tokenizer, input_ids: list[int], labels: list[int], full: bool = False) -> list[str]:
    """One line per token (text, id, label); a long record shows its first and last tokens unless `full`."""
    shown = range(len(input_ids))
    if not full and len(input_ids) > SANITY_CHECK_HEAD + SANITY_CHECK_TAIL + 1:
        shown = [*range(SANITY_CHECK_HEAD), None, *range(len(input_ids) - SANITY_CHECK_TAIL, len(input_ids))]
    hidden = len(input_ids) - SANITY_CHECK_HEAD - SANITY_CHECK_TAIL
    lines = ["Sanity Check >>>>>>>>>>>>>"]
    for i in shown:
        if i is None:
            lines.append(f"... {hidden} tokens not shown (--full_sanity_check shows every token) ...")
            continue
        lines.append(f"{tokenizer.token_text(input_ids[i])!r}: {input_ids[i]:6d} -> {labels[i]:6d}")
    lines.append("<<<<<<<<<<<<< Sanity Check")
    return lines


def print_sanity_check(tokenizer, input_ids: list[int], labels: list[int], full: bool = False) -> None:
    print("\n".join(sanity_check_lines(tokenizer, input_ids, labels, full)), flush=True)
