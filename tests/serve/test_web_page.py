"""web/chat.html in a real headless Chromium against a live api_server (scripted model): the answer
streams in, the history goes with every request, tool calls are shown and their typed results go
back as `tool` messages, and Clear starts over. Needs Debian's chromium at /usr/bin/chromium
(`apt-get install -y chromium`); it is driven by the playwright package, never `playwright install`.
"""

import json
import os
import threading

import pytest

from api_server import create_app
from chatglm3_finetune.serve.chat_engine import ChatModel
from chatglm3_finetune.format.chat_format import render_tool_call
from chatglm3_finetune.format.chat_format import Message, build_chat_input, tools_system_prompt
from test_api_server import WEATHER_TOOL, ScriptedModel, ServerThread, reply_ids

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} is absent: install Debian's browser with "
                                       f"`apt-get update && apt-get install -y chromium`")
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_chat_page_streams_keeps_history_handles_tool_calls_and_clears(browser, tiny_tokenizer):
    tok = tiny_tokenizer
    model = ScriptedModel(filler_id=tok.encode_text("ok")[-1], vocab_size=len(tok))
    greeting = "Hello! How can I help you today?"
    thought, call = "I need the weather in Paris.", render_tool_call("getCurrentWeather", {"city": "Paris"})
    model.replies += [
        reply_ids(tok, ("", greeting)),
        reply_ids(tok, ("", thought), ("getCurrentWeather", call), stop="<|observation|>"),
        reply_ids(tok, ("", "It is 18 degrees in Paris.")),
        reply_ids(tok, ("", "Fresh start.")),
    ]
    release = threading.Event()
    model.pause_at = (6, release)  # the first answer stops half-way until the test has seen it there
    expect = sync_api.expect

    with ServerThread(create_app(ChatModel(model, tok), "scripted-page")) as server:
        page = browser.new_page()
        page.goto(server.base_url + "/")
        expect(page.locator("#model-name")).to_contain_text("scripted-page")
        page.click("#settings summary")
        page.fill("#tools", json.dumps([WEATHER_TOOL]))
        answers = page.locator(".message.assistant .content")

        page.fill("#input", "Hello")
        page.press("#input", "Enter")
        expect(answers.last).not_to_be_empty(timeout=20_000)
        partial = answers.last.text_content()
        assert greeting.startswith(partial) and partial != greeting, partial  # streamed, not all at once
        release.set()
        model.pause_at = None
        expect(answers.last).to_have_text(greeting, timeout=20_000)

        page.fill("#input", "Weather in Paris?")
        page.click("#send")
        expect(page.locator(".tool-call-title")).to_have_text('getCurrentWeather({"city": "Paris"})',
                                                              timeout=20_000)
        expect(answers.last).to_have_text(thought)
        page.fill(".observation-input", '{"temperature_c": 18}')
        page.click(".send-observation")
        expect(answers.last).to_have_text("It is 18 degrees in Paris.", timeout=20_000)
        expect(page.locator(".message.tool .content")).to_have_text('{"temperature_c": 18}')

        system = Message("system", "", tools_system_prompt([WEATHER_TOOL["function"]]), False)
        assert model.prompts[2] == build_chat_input(tok, [
            system, Message("user", "", "Hello", False), Message("assistant", "", greeting, False),
            Message("user", "", "Weather in Paris?", False), Message("assistant", "", thought, False),
            Message("assistant", "getCurrentWeather", call, False),
            Message("observation", "", '{"temperature_c": 18}', False)])

        page.click("#clear")
        expect(page.locator("#messages .message")).to_have_count(0)
        page.fill("#input", "New topic")
        page.press("#input", "Enter")
        expect(answers.last).to_have_text("Fresh start.", timeout=20_000)
        assert model.prompts[3] == build_chat_input(tok, [system, Message("user", "", "New topic", False)])
        page.close()


def test_chat_page_asks_for_the_api_key_and_sends_it(browser, tiny_tokenizer):
    tok = tiny_tokenizer
    model = ScriptedModel(filler_id=tok.encode_text("ok")[-1], vocab_size=len(tok))
    model.replies.append(reply_ids(tok, ("", "Authorized answer.")))
    expect = sync_api.expect
    with ServerThread(create_app(ChatModel(model, tok), "keyed", api_key="page-key")) as server:
        page = browser.new_page()
        prompts = []

        def answer(dialog):
            prompts.append(dialog.message)
            dialog.accept("wrong" if len(prompts) == 1 else "page-key")

        page.on("dialog", answer)
        page.goto(server.base_url + "/")
        expect(page.locator("#model-name")).to_contain_text("keyed", timeout=20_000)
        assert "No API key provided" in prompts[0] and "Incorrect API key" in prompts[1]
        page.fill("#input", "Hello")
        page.press("#input", "Enter")
        expect(page.locator(".message.assistant .content").last).to_have_text("Authorized answer.", timeout=20_000)
        assert len(prompts) == 2  # the key is kept
        page.close()
