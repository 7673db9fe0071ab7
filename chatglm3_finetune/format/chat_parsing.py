"""ChatGLM3 assistant replies parsed back: plain answers, tool calls and interpreter code (chat_format writes them).

An assistant message is `<|assistant|>` + metadata + "\\n" + text. A tool call has the tool's
name as metadata and a python block calling `tool_call` with keyword arguments; a code
interpreter turn has metadata `interpreter` and the code in a python block:

    get_weather
    ```python
    tool_call(city='Paris', days=3)
    ```

Parsing never evaluates code: `tool_call(...)` is read with `ast`, each argument value with
`ast.literal_eval` (JSON's true/false/null are accepted too), and nothing here raises on bad
model output: a reply that looks like a call but cannot be read keeps its text and says why in
`error`.
"""

from __future__ import annotations

import ast
import io
import keyword
import re
import tokenize
from dataclasses import dataclass
from typing import Any

from .chat_format import CALL_FUNCTION, FENCE, INTERPRETER
_CODE_LANGUAGES = ("python", "py", "")
_OPENING_FENCE = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\n")
_JSON_CONSTANTS = {"true": True, "false": False, "null": None}
# A first line not followed by a code block still counts as metadata when it reads like an ASCII
# function name (snake_case, camelCase, dotted or dashed, `[Optional]x`), not like a word.
_ASCII_NAME = re.compile(r"[A-Za-z0-9_.\-\[\]]+")
_TECHNICAL_NAME = re.compile(r"[_\[\]]|[a-z][A-Z]|\w[.\-]\w")


@dataclass
class ToolCall:
    name: str
    parameters: dict[str, Any]


@dataclass
class AssistantReply:
    metadata: str
    content: str
    tool_call: ToolCall | None = None
    code: str | None = None
    error: str | None = None

    @property
    def looks_like_call(self) -> bool:
        """Non-empty metadata (a tool or `interpreter`), or `tool_call(` in the text."""
        return bool(self.metadata) or f"{CALL_FUNCTION}(" in self.content


def split_metadata(text: str) -> tuple[str, str]:
    """(metadata, content) of a decoded assistant reply; both stripped of surrounding blanks.

    Raw model output always has the metadata line (empty for a plain answer, so the text starts
    with "\\n"), and then the split is exact. Text whose leading newline was stripped is read by
    a heuristic: a first line without blanks counts as metadata when a code block or
    `tool_call(` follows it, or when it reads like a function name (`get_weather`,
    `searchBooks`, `text-to-speech`, `interpreter`); otherwise ("Sure!\\n...") the whole text is
    the content.
    """
    head, newline, rest = text.partition("\n")
    name = head.strip()
    if not newline:
        return "", text.strip()
    if not name:
        return "", rest.strip()
    if any(ch.isspace() for ch in name):
        return "", text.strip()
    followed_by_call = rest.lstrip().startswith(FENCE) or f"{CALL_FUNCTION}(" in rest
    reads_like_function = _ASCII_NAME.fullmatch(name) and _TECHNICAL_NAME.search(name)
    if followed_by_call or name == INTERPRETER or reads_like_function:
        return name, rest.strip()
    return "", text.strip()


def parse_assistant_reply(text: str) -> AssistantReply:
    """Reads a generated reply (decoded with special tokens skipped) into an AssistantReply.

    - metadata `interpreter` + python block -> `code`;
    - other metadata + python block holding `tool_call(k=literal, ...)` -> `tool_call`;
    - no metadata and no `tool_call(` -> a plain answer in `content`;
    - anything else that looks like a call -> `error` says what is wrong, `content` keeps the text.
    """
    metadata, content = split_metadata(text)
    reply = AssistantReply(metadata=metadata, content=content)
    if not reply.looks_like_call:
        return reply
    if not metadata:
        reply.error = f"{CALL_FUNCTION}(...) without a tool name: the metadata line is empty"
        return reply
    code, error = _code_block(content)
    if error:
        reply.error = f"{metadata}: {error}"
    elif metadata == INTERPRETER:
        reply.code = code
    else:
        parameters, error = _parse_call_arguments(code)
        if error:
            reply.error = f"{metadata}: {error}"
        else:
            reply.tool_call = ToolCall(name=metadata, parameters=parameters)
    return reply


def _code_block(content: str) -> tuple[str | None, str | None]:
    """(code, None) for a text that is exactly one python block, else (None, why not)."""
    if not content.startswith(FENCE):
        return None, f"no {FENCE}python code block after the metadata line"
    opening = _OPENING_FENCE.match(content)
    if not opening:
        return None, f"the opening {FENCE} fence is not followed by a new line"
    if opening.group(1) not in _CODE_LANGUAGES:
        return None, f"the code block is {opening.group(1)!r}, not python"
    body = content[opening.end():]
    if body == FENCE:
        return "", None
    if body.endswith("\n" + FENCE):
        return body[: -len(FENCE) - 1], None
    if "\n" + FENCE in body:
        return None, f"text follows the closing {FENCE} fence"
    return None, f"the code block has no closing {FENCE} fence (generation cut short?)"


def _parse_call_arguments(code: str) -> tuple[dict[str, Any] | None, str | None]:
    """(parameters, None) for `tool_call(k=literal, ...)`, else (None, why not)."""
    try:
        call, renamed = _parse_call_expression(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        return None, f"the code is not a valid {CALL_FUNCTION}(...) expression ({_describe(exc)})"
    if not isinstance(call, ast.Call):
        return None, f"the code is not a {CALL_FUNCTION}(...) call"
    if not (isinstance(call.func, ast.Name) and call.func.id == CALL_FUNCTION):
        return None, f"the code calls {ast.unparse(call.func)!r}, not {CALL_FUNCTION}"
    if call.args:
        return None, f"{CALL_FUNCTION} has positional arguments; only keyword arguments are allowed"
    parameters: dict[str, Any] = {}
    for argument in call.keywords:
        if argument.arg is None:
            return None, f"{CALL_FUNCTION} unpacks **{ast.unparse(argument.value)}; write each keyword"
        key = renamed.get(argument.arg, argument.arg)
        if key in parameters:
            return None, f"{CALL_FUNCTION} repeats the keyword {key!r}"
        try:
            parameters[key] = _literal_value(argument.value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            return None, f"the value of {key!r} is not a literal: {_shorten(ast.unparse(argument.value))}"
    return parameters, None


def _parse_call_expression(code: str) -> tuple[ast.expr, dict[str, str]]:
    """The expression's AST, retrying with Python keywords used as argument names (`from=`)
    renamed to placeholders; returns the placeholder -> original name map."""
    try:
        return ast.parse(code.strip(), mode="eval").body, {}
    except SyntaxError as first_error:
        try:
            renamed_code, renamed = _rename_keyword_arguments(code.strip())
        except (SyntaxError, tokenize.TokenError):
            raise first_error from None
        if not renamed:
            raise
        try:
            return ast.parse(renamed_code, mode="eval").body, renamed
        except SyntaxError:
            raise first_error from None


def _rename_keyword_arguments(code: str) -> tuple[str, dict[str, str]]:
    """Replaces Python keywords written as argument names (`from='USD'`) by placeholders.

    Works on tokens, so string contents are never touched.
    """
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(code).readline)
              if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT,
                                tokenize.DEDENT, tokenize.ENDMARKER)]
    lines = code.split("\n")
    renamed: dict[str, str] = {}
    replacements = []
    for previous, token, following in zip(tokens, tokens[1:], tokens[2:]):
        if (token.type == tokenize.NAME and keyword.iskeyword(token.string)
                and previous.string in ("(", ",") and following.string == "="):
            placeholder = f"__{CALL_FUNCTION}_keyword_{len(renamed)}__"
            renamed[placeholder] = token.string
            replacements.append((token.start, token.end, placeholder))
    for (row, start), (_, end), placeholder in reversed(replacements):
        line = lines[row - 1]
        lines[row - 1] = line[:start] + placeholder + line[end:]
    return "\n".join(lines), renamed


def _literal_value(node: ast.expr) -> Any:
    """A literal's value; JSON's true/false/null (at any depth) are read as True/False/None."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        return ast.literal_eval(_JsonConstants().visit(node))


class _JsonConstants(ast.NodeTransformer):
    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in _JSON_CONSTANTS:
            return ast.copy_location(ast.Constant(_JSON_CONSTANTS[node.id]), node)
        return node


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):
        return f"{exc.msg} at line {exc.lineno}" if exc.lineno else exc.msg
    return type(exc).__name__


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
