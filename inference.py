#!/usr/bin/env python3
"""Talk to a fine-tuned ChatGLM3 model, or evaluate it on a data file.

    python inference.py --model BASE --pt-checkpoint output/pt         # chat loop on stdin
    python inference.py --pt-checkpoint CKPT --model BASE              # (the reference's style)
    python inference.py --tokenizer BASE --model FULL_CHECKPOINT       # a fully fine-tuned model
    python inference.py --model BASE --lora ADAPTER --prompt "Hello"   # one answer
    python inference.py --model BASE --pt-checkpoint CKPT --input test.jsonl --output preds.jsonl
    python inference.py --model BASE --lora ADAPTER --input DATASET_FOLDER --split test --output preds.jsonl

Chat loop: type a message; `clear` starts over, `exit` or end of input quits. When the model
calls a tool (or writes interpreter code) the call is shown parsed and you type the observation
(the tool's or the code's output), which goes back to the model as an observation message. A
reply may hold several assistant messages (ToolAlpaca-style: a thought, then the call): the
first streams as it is generated, each is kept in the history as its own message.

File mode reads any training format (recognised from the first record, see README "1. Data") and
writes every input record, as this project's record, with a `prediction` field to --output: the
generated text for a prompt/response record; for a conversation a list with one entry per assistant, tool and
interpreter turn ({"turn", "role", "text", "content", "tool_call", "code", "error"}), each
generated from the conversation before that turn. Metrics (rouge-1, rouge-2, rouge-l, bleu-4,
plus tool-call metrics for conversations) are printed and written to OUTPUT.metrics.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from chatglm3_finetune.format.chat_parsing import AssistantReply

from chatglm3_finetune.format.chat_format import render_interpreter_code, render_tool_call
from chatglm3_finetune.model.loading import ModelLoadError
from chatglm3_finetune.compat import UntestedVersionError
from chatglm3_finetune.data import strict_json
from chatglm3_finetune.data.paths import file_problem
from chatglm3_finetune.data.records import DataError
from chatglm3_finetune.format.chat_format import Message, tools_system_prompt

DEFAULT_BATCH_SIZE = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="base model folder, or a fully fine-tuned checkpoint (default: the base "
                                       "that --pt-checkpoint or --lora names)")
    model.add_argument("--tokenizer", help="tokenizer folder (default: the model, prefix or adapter folder)")
    model.add_argument("--pt-checkpoint", help="P-Tuning v2 prefix folder (this toolkit's or the original format)")
    model.add_argument("--pt-pre-seq-len", type=int, help="expected prefix length (read from the checkpoint; "
                                                          "checked when given)")
    model.add_argument("--lora", help="LoRA adapter folder (peft)")
    model.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    model.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                       help="auto: bf16/fp16 on a GPU, fp32 on the CPU")
    model.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own code")
    generation = parser.add_argument_group("generation")
    generation.add_argument("--max-new-tokens", type=int, default=256)
    generation.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
    generation.add_argument("--temperature", type=float, default=0.8, help="with --do-sample")
    generation.add_argument("--top-p", type=float, default=0.8, help="with --do-sample")
    chat = parser.add_argument_group("chat")
    chat.add_argument("--system", help="a system message that starts the conversation")
    chat.add_argument("--tools", help="JSON file with a list of tools, rendered into the system prompt as in training")
    chat.add_argument("--prompt", help="answer this one message and exit")
    files = parser.add_argument_group("files")
    files.add_argument("--input", help="data (.jsonl, .json, .parquet or a datasets folder) in any training format: "
                                       "prompt/response, conversations, OpenAI messages, ShareGPT or Alpaca")
    files.add_argument("--split", help="the split of an --input dataset folder that holds several")
    files.add_argument("--output", help="where --input's predictions go (JSON lines)")
    files.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    files.add_argument("--max-source-length", type=int, default=1024,
                       help="prompt/response records: prompt cap in tokens, [gMASK] sop included (as in training)")
    args = parser.parse_args(argv)
    if not (args.model or args.pt_checkpoint or args.lora):
        parser.error("--model is required (or --pt-checkpoint/--lora, whose base model is then used)")
    if bool(args.input) != bool(args.output):
        parser.error("--input and --output go together")
    if args.input and args.prompt:
        parser.error("choose one of --prompt and --input/--output")
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.max_source_length < 3:
        parser.error("--batch-size and --max-new-tokens must be at least 1, --max-source-length at least 3")
    return args


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 2


def read_tools(path: str) -> list:
    problem = file_problem(path, "tools file")
    if problem:
        raise DataError(f"--tools {problem}")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            tools = strict_json.loads(f.read())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    except (strict_json.StrictJsonError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: {e}") from None
    if not isinstance(tools, list):
        raise DataError(f"{path}: --tools needs a JSON list of tools (as in a record's \"tools\")")
    return tools


def system_messages(system: str | None, tools: list | None) -> list[Message]:
    """What starts every conversation: the tools prompt (first, as in training), then --system."""
    messages = []
    if tools:
        messages.append(Message("system", "", tools_system_prompt(tools), False))
    if system:
        messages.append(Message("system", "", system, False))
    return messages


# ---- showing replies --------------------------------------------------------------------------------

def describe_call(reply: AssistantReply) -> str | None:
    """How a parsed tool call or interpreter code is shown; None for a plain answer."""
    if reply.tool_call is not None:
        arguments = json.dumps(reply.tool_call.parameters, ensure_ascii=False)
        return f"[tool call] {reply.tool_call.name} {arguments}"
    if reply.code is not None:
        return f"[code interpreter]\n{reply.code}"
    return None


def reply_text(reply: AssistantReply) -> str:
    """A reply as one printable text: the call, or the content (malformed calls as text)."""
    shown = describe_call(reply)
    if shown is None and reply.error:
        shown = f"{reply.metadata}\n{reply.content}".strip() + f"\n[could not read the call: {reply.error}]"
    return shown if shown is not None else reply.content


def stream_reply(chat, history: list[Message], options: dict, out):
    """Generates the next reply (a chat_engine.ChatReply); its first message streams to `out` when it
    is a plain answer, calls (and any later messages) are shown once complete."""
    from chatglm3_finetune.serve.chat_engine import ChatReply, MetadataSplitter

    out.write("Assistant: ")
    out.flush()
    splitter, text, first = MetadataSplitter(), "", ""
    with chat.stream(chat.chat_input_ids(history), **options) as stream:
        for piece in stream:
            text += piece
            segment = chat.reply_segments(stream.token_ids, text)[0]  # stops growing once complete
            shown = splitter.feed(segment[len(first):])
            first = segment
            if splitter.metadata == "" and shown:
                out.write(shown)
                out.flush()
        segments = chat.reply_segments(stream.token_ids, stream.text)
    reply = ChatReply.from_texts(segments, stream.finish_reason or "stop")
    # from_texts leaves a blank message out: then reply.segments[0] is not the one that streamed
    streamed = splitter.metadata == "" and bool(segments[0].strip())
    if streamed and reply.segments[0].error:
        out.write(f"\n[could not read the call: {reply.segments[0].error}]")
    rest = [reply_text(message) for message in reply.segments[1 if streamed else 0:]]
    if rest:
        out.write(("\n" if streamed else "") + "\n".join(rest))
    out.write("\n")
    out.flush()
    return reply


def history_messages(replies: list[AssistantReply]) -> tuple[list[Message], str | None]:
    """The reply's messages as training renders them, up to its first call, and the prompt for that
    call's observation (None when the reply holds no call). Messages after a call were written
    without its observation, so they are dropped."""
    messages = []
    for reply in replies:
        if reply.tool_call is not None:
            call = reply.tool_call
            messages.append(Message("assistant", call.name, render_tool_call(call.name, call.parameters), True))
            return messages, "Observation: "
        if reply.code is not None:
            messages.append(Message("assistant", "interpreter", render_interpreter_code(reply.code), True))
            return messages, "Interpreter output: "
        messages.append(Message("assistant", reply.metadata, reply.content, True))
    return messages, None


def read_line(prompt: str, stdin, out) -> str | None:
    out.write(prompt)
    out.flush()
    line = stdin.readline()
    return None if line == "" else line.rstrip("\n")


def chat_loop(chat, start: list[Message], options: dict, stdin=None, out=None) -> int:
    stdin, out = stdin or sys.stdin, out or sys.stdout
    out.write("Chat with the model: 'clear' starts over, 'exit' (or end of input) quits.\n")
    history = list(start)
    while True:
        line = read_line("\nUser: ", stdin, out)
        if line is None or line.strip() == "exit":
            out.write("\n")
            return 0
        if line.strip() == "clear":
            history = list(start)
            out.write("(conversation cleared)\n")
            continue
        if not line.strip():
            continue
        history.append(Message("user", "", line, False))
        while True:  # the model may call tools (or run code) before it answers
            messages, prompt = history_messages(stream_reply(chat, history, options, out).segments)
            history += messages
            if prompt is None:
                break
            observation = read_line(prompt, stdin, out)
            if observation is None:
                out.write("\n")
                return 0
            history.append(Message("observation", "", observation, False))


def answer_prompt(chat, start: list[Message], prompt: str, options: dict) -> int:
    reply = chat.reply(start + [Message("user", "", prompt, False)], **options)
    print("\n".join(reply_text(segment) for segment in reply.segments))
    return 0


# ---- file mode ----------------------------------------------------------------------------------------

def generate_texts(chat, prompts: list[list[int]], batch_size: int, options: dict) -> list[str]:
    """Generated text per prompt, in batches of similar lengths (less padding), in input order.
    Each text is one message: generation stops at `<|assistant|>` too (see evaluation_stop_token_ids)."""
    from chatglm3_finetune.evaluate.evaluation import evaluation_stop_token_ids

    stops = evaluation_stop_token_ids(chat.tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    texts: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        completions = chat.generate_completions([prompts[i] for i in batch], stop_token_ids=stops, **options)
        for i, completion in zip(batch, completions):
            texts[i] = completion.text
        print(f"generated {min(start + batch_size, len(order))}/{len(order)}", file=sys.stderr, flush=True)
    return texts


def evaluate_file(chat, train_format: str, records: list[dict], output: str, batch_size: int,
                  max_source_length: int, options: dict) -> dict:
    from chatglm3_finetune.evaluate.evaluation import build_eval_items, prediction_rows, score_items, write_jsonl

    items = build_eval_items(chat.tokenizer, records, train_format, max_source_length)
    texts = generate_texts(chat, [item.prompt_ids for item in items], batch_size, options)
    metrics = score_items(items, texts)
    if os.path.dirname(output):
        os.makedirs(os.path.dirname(output), exist_ok=True)
    write_jsonl(prediction_rows(records, items, texts), output)
    with open(output + ".metrics.json", "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")
    return metrics


# ---- main ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        tools = read_tools(args.tools) if args.tools else None
        if args.input:
            from chatglm3_finetune.evaluate.evaluation import read_eval_records

            if os.path.abspath(args.input) == os.path.abspath(args.output):
                raise DataError("--output must not be the --input file")
            data = read_eval_records(args.input, args.split)
            print(data.describe(), file=sys.stderr, flush=True)
            train_format, records = data.record_format, [record for _, record in data.records]
        from chatglm3_finetune.serve.chat_engine import load_chat_model

        chat = load_chat_model(args.model, args.tokenizer, args.pt_checkpoint, args.pt_pre_seq_len, args.lora,
                               args.device, args.dtype, args.trust_remote_code)
    except (DataError, ModelLoadError, UntestedVersionError) as e:
        return fail(str(e))
    options = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample,
               "temperature": args.temperature, "top_p": args.top_p}
    start = system_messages(args.system, tools)
    if args.input:
        metrics = evaluate_file(chat, train_format, records, args.output, args.batch_size, args.max_source_length,
                                options)
        print(json.dumps(metrics, indent=2))
        print(f"predictions: {args.output}\nmetrics: {args.output}.metrics.json")
        return 0
    if args.prompt is not None:
        return answer_prompt(chat, start, args.prompt, options)
    return chat_loop(chat, start, options)


if __name__ == "__main__":
    sys.exit(main())
