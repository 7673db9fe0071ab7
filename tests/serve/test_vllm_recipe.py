"""docs/serving.md's vLLM recipe, checked as far as this machine can (vLLM itself is not installed):
a saved model folder is a native `GlmForCausalLM` whose fast tokenizer's chat template renders
OpenAI messages to the very ids this server builds, and whose generation config stops on the same
tokens; tools render alike whether vLLM hands the template OpenAI's wrappers or the recipe's
system message carries them."""

from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from chatglm3_finetune.format.chat_format import build_chat_input, tools_system_prompt
from chatglm3_finetune.serve.openai_protocol import openai_messages_to_chatglm
from chatglm3_finetune.format.tokenizer import load_tokenizer

WEATHER = {"name": "get_weather", "description": "The weather of a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! How can I help?"}, {"role": "user", "content": "What is 2 + 2?"}]


def template_ids(tokenizer, messages, tools=None) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


def test_saved_model_is_what_vllm_serves_with_our_prompt_and_stops(tiny_model_dir):
    assert AutoConfig.from_pretrained(tiny_model_dir).architectures == ["GlmForCausalLM"]
    ours = load_tokenizer(tiny_model_dir)
    fast = AutoTokenizer.from_pretrained(tiny_model_dir)  # what vLLM loads: no remote code
    assert template_ids(fast, CHAT) == build_chat_input(ours, openai_messages_to_chatglm(CHAT))
    stops = GenerationConfig.from_pretrained(tiny_model_dir).eos_token_id
    assert sorted(stops) == sorted(ours.stop_token_ids)  # eos, <|user|>, <|observation|>


def test_tools_from_vllm_or_the_recipes_system_message_render_like_this_servers_tools(tiny_model_dir):
    ours = load_tokenizer(tiny_model_dir)
    fast = AutoTokenizer.from_pretrained(tiny_model_dir)
    question = [{"role": "user", "content": "Weather in Paris?"}]
    tools = [{"type": "function", "function": WEATHER}]
    served_here = build_chat_input(ours, openai_messages_to_chatglm(question, tools))
    assert template_ids(fast, question, tools) == served_here  # what vLLM renders for a request's `tools`
    recipe = [{"role": "system", "content": tools_system_prompt([WEATHER])}] + question
    assert template_ids(fast, recipe) == served_here
