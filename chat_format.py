"""The one chat template: a conversation to token ids and the loss mask.

  <|system|>You are ...<|end|><|user|>Hi<|end|><|assistant|>Hello!<|end|><|user|>...

A conversation is a non-empty list of system, user and assistant messages in any order, each rendered in place
as the Jinja template below renders it, so it takes what OpenAI's API and vLLM take: the assistant may speak
first (a support bot's greeting), a role may speak twice in a row, a system message may come later (a summary,
an injected instruction), and the last message may be the assistant's (a generation prompt then starts a new
assistant message). Message text is encoded as ordinary text, so a user who types "<|end|>" cannot forge a turn.
Fine-tuning, evaluation, the server and the chat clients all render through `render`, and cut a conversation
longer than the context by `latest_turns`.
"""

from tokenizer import CHAT_SPECIAL_TOKENS, encode

SYSTEM, USER, ASSISTANT, END = (CHAT_SPECIAL_TOKENS[t] for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"))
ROLE_TOKEN = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

# The same template for Hugging Face tools (tokenizer_config.json "chat_template"), so they render
# byte-identical prompts.
JINJA_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class ChatFormatError(ValueError):
    pass


def validate(messages, where: str = "conversation") -> None:
    """Check that `messages` is a conversation: a non-empty list of objects, each with a known role and string
    content, in any order. The error names `where` (e.g. 'file.jsonl line 3') and the message."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError(f"{where}: expected a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ChatFormatError(f"{where}: message {i} must be an object with string 'role' and 'content'")
        if m["role"] not in ROLE_TOKEN:
            raise ChatFormatError(f"{where}: message {i} has unknown role {m['role']!r} (expected system, user or "
                                  "assistant)")


def join_text_parts(texts) -> str:
    """A message's content given as text parts: their texts joined by newlines, as vLLM joins them (the server and
    the fine-tuning readers take parts alike)."""
    return "\n".join(texts)


def leading_system(messages) -> int:
    """How many system messages open the conversation: they stay when it is cut to the context."""
    return next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))


def render(messages, add_generation_prompt: bool = False, train_on_prompt: bool = False):
    """(ids, mask): mask[i] is True where token i is trained on (predicted from the tokens before it).

    By default only the assistant's content and its closing <|end|> are trained on; train_on_prompt
    trains on every token. A message with "weight": 0 (OpenAI's fine-tuning files: an example reply not to
    learn) is never trained on. With add_generation_prompt the ids end with <|assistant|>, ready to generate.
    """
    validate(messages)
    ids, mask = [], []
    for m in messages:
        content = encode(m["content"])
        learned = m.get("weight", 1) != 0
        trained = learned and (train_on_prompt or m["role"] == "assistant")
        ids += [ROLE_TOKEN[m["role"]]] + content + [END]
        mask += [learned and train_on_prompt] + [trained] * (len(content) + 1)
    if add_generation_prompt:
        ids.append(ASSISTANT)
        mask.append(train_on_prompt)
    return ids, mask


def cut_points(messages) -> list[int]:
    """Where `latest_turns` may start the kept part after the leading system messages: right after them (nothing
    dropped), and at each user message that follows a message of another role, where an exchange starts (a run of
    user messages is one question, and a reply never stays without its question)."""
    head = leading_system(messages)
    return [head] + [i for i in range(head + 1, len(messages))
                     if messages[i]["role"] == "user" and messages[i - 1]["role"] != "user"]


def latest_turns(messages, max_tokens: int, add_generation_prompt: bool = False):
    """(the messages, how many were dropped) that render in at most max_tokens tokens, or None: the leading system
    messages stay, and the oldest messages after them go first, up to the earliest cut point that fits. The last
    exchange (from the last cut point on: its user messages and all after them) always stays, None when even it
    does not fit. Fine-tuning cuts its long dialogs, and the server and the chat clients fit a conversation to the
    context, by this one rule."""
    length = len(render(messages, add_generation_prompt=add_generation_prompt)[0])
    head = start = leading_system(messages)
    for cut in cut_points(messages):
        # the template renders message by message, so the messages' lengths add up
        length -= sum(len(render(messages[i:i + 1])[0]) for i in range(start, cut))
        start = cut
        if length <= max_tokens:
            return messages[:head] + messages[cut:], cut - head
    return None
