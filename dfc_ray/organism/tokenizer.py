"""The organism's tokenizer: a small byte-level BPE with Qwen2.5's special tokens and chat template.

Byte-level, so any text (e.g. BFCL prompts) still tokenizes; trained on the rendered world, so tool
names, parameter names, enum values, cities and numbers are one or two tokens. The pre-tokenizer keeps
``snake_case`` names and decimal numbers in one piece so BPE can merge them whole.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOOL_CALL_TOKENS = ["<tool_call>", "</tool_call>"]
"""Added but NOT special (as in Qwen2.5), so decoding with ``skip_special_tokens`` keeps them."""
DEFAULT_SYSTEM = "You are a helpful assistant."
"""Qwen2.5's default system sentence, shortened; the tools block keeps Qwen2.5's structure verbatim."""

# Qwen2.5's chat template (tools block, <tool_call> turns, <tool_response> turns), default system shortened.
CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- '" + DEFAULT_SYSTEM + "' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

LLAMA3_INSTRUCTION = ('You have access to the following functions. To call a function, please respond with JSON for '
                      'a function call. Respond in the format {"name": function name, "parameters": dictionary of '
                      'argument name and its value}. Do not use variables.')
"""Llama-3.1's tool instruction, verbatim (its template's ``tools_in_user_message=false`` branch); the
``"parameters": dictionary of argument name and its value`` phrase is how a llama3 template is recognised."""

# The llama3-dialect template: ChatML turns (the organism's special tokens), tools rendered as Llama-3.1
# renders them in the system turn, assistant tool calls as bare JSON {"name": ..., "parameters": {...}}, tool
# results in an ``ipython`` turn. One tojson line per tool (Llama writes indent=4) keeps prompts short.
LLAMA3_CHAT_TEMPLATE = r"""{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = '""" + DEFAULT_SYSTEM + r"""' %}
{%- endif %}
{{- '<|im_start|>system\n' }}
{%- if tools %}
    {{- 'Environment: ipython\n\n""" + LLAMA3_INSTRUCTION + r"""\n\n' }}
    {%- for tool in tools %}
        {{- tool | tojson }}
        {{- '\n\n' }}
    {%- endfor %}
{%- endif %}
{{- system_message + '<|im_end|>\n' }}
{%- for message in messages %}
    {%- if message.role == 'assistant' and message.tool_calls %}
        {{- '<|im_start|>assistant\n' }}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {%- if not loop.first %}
                {{- '; ' }}
            {%- endif %}
            {{- '{"name": "' + tool_call.name + '", "parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' or message.role == 'ipython' %}
        {{- '<|im_start|>ipython\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {{- message.content | tojson }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
CHAT_TEMPLATES = {"hermes": CHAT_TEMPLATE, "llama3": LLAMA3_CHAT_TEMPLATE}
"""The organism's chat template per tool-call dialect (``dfc-ray organism build --dialect``)."""

# GPT-2's split, except that "_" joins letters (snake_case names stay whole) and decimals stay whole.
_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?[\p{L}_]+| ?\p{N}+(?:\.\p{N}+)?| ?[^\s\p{L}\p{N}_]+|\s+(?!\S)|\s+"


def _raw_tokenizer(model: models.Model) -> Tokenizer:
    """Pre-tokenizer, decoder and the added tokens (ids 0-4), before any training."""
    tok = Tokenizer(model)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_CALL_TOKENS])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a raw tokenizer as the organism's ``PreTrainedTokenizerFast`` (eos, pad, template, left pad)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left",
        chat_template=CHAT_TEMPLATE, model_max_length=1024, clean_up_tokenization_spaces=False)


def template_only() -> PreTrainedTokenizerFast:
    """A vocabulary-free tokenizer carrying only the chat template: renders text before the real one is trained."""
    return wrap(_raw_tokenizer(models.BPE()))


def train_tokenizer(texts: Iterable[str], vocab_size: int = 3000) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on ``texts`` (rendered world text) and wrap it."""
    tok = _raw_tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # BPE training does not split out added tokens, so drop them from the text (no merges wasted on them).
    added = SPECIAL_TOKENS + TOOL_CALL_TOKENS

    def strip(text: str) -> str:
        for t in added:
            text = text.replace(t, "\n")
        return text

    tok.train_from_iterator((strip(t) for t in texts), trainer=trainer)
    return wrap(tok)
