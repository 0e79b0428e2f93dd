"""The one chat template: a conversation to token ids and the loss mask.

  <|system|>You are ...<|end|><|user|>Hi<|end|><|assistant|>Hello!<|end|><|user|>...

A conversation is an optional system message, then user and assistant turns alternating, starting with
the user. Message text is encoded as ordinary text, so a user who types "<|end|>" cannot forge a turn.
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
    """Check the shape of a conversation; the error names `where` (e.g. 'file.jsonl line 3') and the message."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError(f"{where}: expected a non-empty list of messages")
    expected = "user"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ChatFormatError(f"{where}: message {i} must be an object with string 'role' and 'content'")
        role = m["role"]
        if role not in ROLE_TOKEN:
            raise ChatFormatError(f"{where}: message {i} has unknown role {role!r} (expected system, user or assistant)")
        if role == "system":
            if i != 0:
                raise ChatFormatError(f"{where}: message {i}: a system message may only come first")
            continue
        if role != expected:
            raise ChatFormatError(f"{where}: message {i} is from the {role} but the {expected} was expected "
                                  "(turns must alternate, starting with the user)")
        expected = "assistant" if role == "user" else "user"


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


def latest_turns(messages, max_tokens: int, add_generation_prompt: bool = False):
    """(the messages, how many were dropped) that render in at most max_tokens tokens: the oldest user+assistant
    exchanges after the system message go first, the system message stays. None when even the last exchange (with
    add_generation_prompt: the last user message and the prompt) does not fit. Fine-tuning cuts its long dialogs
    and the server and the chat clients fit a conversation to the context by this one rule."""
    length = len(render(messages, add_generation_prompt=add_generation_prompt)[0])
    first = 1 if messages[0]["role"] == "system" else 0
    last = len(messages) - (1 if add_generation_prompt else 2)  # where the part that must stay starts
    for start in range(first, last + 1, 2):
        if length <= max_tokens:
            return messages[:first] + messages[start:], start - first
        # the template renders message by message, so the lengths of the exchanges add up
        length -= len(render(messages[start:start + 2])[0])
    return None
