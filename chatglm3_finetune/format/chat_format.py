"""The ChatGLM3 conversation format, the one contract that training data, inference, evaluation,
the server and the fast tokenizer's chat template share: special and role tokens, roles, messages,
the tools prompt, how tool calls and interpreter code are written, and how messages become prompt ids.

A message for role R with metadata M and text T is `<|R|>` + encode(M + "\\n") + encode(T), each
segment with SentencePiece's own dummy prefix; a sequence starts with `[gMASK] sop`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# The nine special tokens, appended right after the SentencePiece pieces (64789.. in ChatGLM3-6B).
SPECIAL_TOKENS = (
    "[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
)
ROLE_TOKENS = {
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "observation": "<|observation|>",
}
ROLES = ("system", "user", "assistant", "tool", "interpreter", "observation")
NATIVE_ROLES = ("system", "user", "assistant", "observation")
NEVER_SUPERVISED_ROLES = ("system", "user")
INTERPRETER = "interpreter"
CALL_FUNCTION = "tool_call"
TOOLS_SYSTEM_PROMPT = (
    "Answer the following questions as best as you can. You have access to the following tools:\n"
)
FENCE = "```"


def render_tool_call(name: str, parameters: dict[str, Any]) -> str:
    """The text of a tool-call message (its metadata is `name`), exactly as ChatGLM3 trains it.

    Keys must be Python identifiers (keywords such as `from` are tolerated by the parser) for
    the call to parse back; values are written with `repr`.
    """
    del name  # the name is the message's metadata, not part of its text
    arguments = ", ".join(f"{key}={value!r}" for key, value in parameters.items())
    return f"{FENCE}python\n{CALL_FUNCTION}({arguments})\n{FENCE}"


def render_interpreter_code(code: str) -> str:
    """The text of a code-interpreter message (its metadata is `interpreter`)."""
    return f"{FENCE}python\n{code}\n{FENCE}"


@dataclass(frozen=True)
class Message:
    role: str  # system, user, assistant or observation: ChatGLM3's native roles
    metadata: str
    text: str
    loss: bool


def tools_system_prompt(tools: list) -> str:
    return TOOLS_SYSTEM_PROMPT + json.dumps(tools, indent=4, ensure_ascii=False)


def observation_text(observation) -> str:
    return observation if isinstance(observation, str) else json.dumps(observation, ensure_ascii=False)


def conversation_messages(record: dict) -> list[Message]:
    """The native ChatGLM3 messages of a (validated) multi-turn record."""
    messages = []
    if record.get("tools"):
        messages.append(Message("system", "", tools_system_prompt(record["tools"]), False))
    for turn in record["conversations"]:
        role = turn["role"]
        loss = False if role in NEVER_SUPERVISED_ROLES else turn.get("loss", True)
        if role == "tool":
            messages.append(Message("assistant", turn["name"], render_tool_call(turn["name"], turn["parameters"]), loss))
            if "observation" in turn:  # always in training data; a chat request may not have the result yet
                messages.append(Message("observation", "", observation_text(turn["observation"]), False))
        elif role == "interpreter":
            messages.append(Message("assistant", "interpreter", render_interpreter_code(turn["content"]), loss))
            messages.append(Message("observation", "", observation_text(turn["observation"]), False))
        else:
            messages.append(Message(role, "", turn["content"], loss))
    return messages


def encode_message(tokenizer, role: str, metadata: str, text: str) -> list[int]:
    """`<|role|>` + encode(metadata + "\\n") + encode(text), each segment with its own dummy prefix."""
    return [tokenizer.role_token_id(role)] + tokenizer.encode_text(metadata + "\n") + tokenizer.encode_text(text)


def prefix_ids(tokenizer) -> list[int]:
    return [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]


def build_chat_input(tokenizer, messages: list[Message]) -> list[int]:
    """Prompt ids for generation: `[gMASK] sop`, the messages, then `<|assistant|>`."""
    ids = prefix_ids(tokenizer)
    for message in messages:
        ids += encode_message(tokenizer, message.role, message.metadata, message.text)
    return ids + [tokenizer.role_token_id("assistant")]
