"""Every accepted record schema, turned into one text record {prompt, chosen, rejected, chosen_reward, rejected_reward}.

Accepted (each side a string, or a list of {"role", "content"} messages):
    {"prompt", "chosen", "rejected"}                     explicit prompt (TRL's; conversational when the sides are lists)
    {"prompt", "chosen_response", "rejected_response"}   NeMo-Aligner's, strings
    {"context", "completions": [{"rank", "completion"}]} NeMo-RL's ranked completions: lowest rank chosen, highest rejected
    {"chosen", "rejected"}                               implicit prompt (Anthropic HH-RLHF): the shared start is the prompt

Message lists become text through the chat template (chat_template.py): one
format downstream, so tokenization, batching and the loss mask need not know
where a record came from. A record that breaks a rule raises ``ValueError``
starting with its ``file:line`` (or ``file:row``) so ``model.data.on_bad_record``
can stop or skip; a record that cannot be read without a setting the config
lacks raises ``MissingSetting``, which is never skipped (every such record would go).
"""

import math
import os
from dataclasses import dataclass

DEFAULT_REWARDS = {"chosen_reward": 1.0, "rejected_reward": 0.0}
EXPLICIT = ("prompt", "chosen", "rejected")
ALIGNER = ("prompt", "chosen_response", "rejected_response")
RANKED = ("context", "completions")
IMPLICIT = ("chosen", "rejected")
SCHEMA_HELP = f"expected keys {EXPLICIT}, {ALIGNER}, {RANKED} or {IMPLICIT}"


class MissingSetting(ValueError):
    """A record needs a config setting that is not there (a chat template, a prompt delimiter)."""


@dataclass(frozen=True)
class RecordOptions:
    """How records become text: ``model.data.chat_template`` (resolved) and ``model.data.implicit_prompt_delimiter``."""

    chat_template: object = None  # a chat_template.ChatTemplate, or None
    implicit_prompt_delimiter: str | None = None

    def files(self) -> list[str]:
        """Files besides the data that shape the text (a chat template file), for cache keys that hash inputs."""
        return self.chat_template.files() if self.chat_template is not None else []

    def fingerprint(self) -> str:
        """Everything here that changes the text, for cache keys."""
        template = self.chat_template.fingerprint() if self.chat_template is not None else "none"
        return f"template={template};delimiter={self.implicit_prompt_delimiter!r}"


def _require(obj: dict, keys: tuple, where: str) -> None:
    for key in keys:
        if key not in obj:
            raise ValueError(f"{where}: missing key '{key}' (keys present: {sorted(obj)}); {SCHEMA_HELP}")


def _string(obj: dict, key: str, where: str) -> str:
    if not isinstance(obj[key], str):
        raise ValueError(f"{where}: key '{key}' must be a string, got {type(obj[key]).__name__}")
    return obj[key]


def _messages(value, key: str, where: str, assistant_only: bool) -> list:
    """A validated message list; with ``assistant_only`` every role must be "assistant" (a response holds no turns of others)."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: key '{key}' must be a string or a non-empty list of messages, got "
                         f"{'an empty list' if value == [] else type(value).__name__}")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: key '{key}' message {i} must be an object with string 'role' and "
                             f"'content', got {message!r:.200}")
        if assistant_only and message["role"] != "assistant":
            raise ValueError(f"{where}: key '{key}' message {i} has role {message['role']!r}; a response may hold "
                             f"only 'assistant' messages (earlier turns belong in the prompt)")
    if assistant_only and not any(message["content"].strip() for message in value):
        raise ValueError(f"{where}: key '{key}' is empty")
    return value


def _side(value, key: str, where: str) -> list:
    if isinstance(value, str):
        raise ValueError(f"{where}: key '{key}' is a string but the prompt is a list of messages; give both "
                         f"responses as lists of assistant messages")
    return _messages(value, key, where, assistant_only=True)


def _prompt_messages(value, key: str, where: str) -> list:
    """A prompt as messages: a plain string is one user turn."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return _messages(value, key, where, assistant_only=False)


def _rendered(prompt: list, chosen: list, rejected: list, keys: tuple, where: str, options: RecordOptions) -> tuple:
    template = options.chat_template
    if template is None:
        raise MissingSetting(
            f"{where}: a conversational record (message lists) needs a chat template: set model.data.chat_template "
            f"(Jinja text or a .jinja file), or set model.tokenizer.model to a Hugging Face tokenizer folder whose "
            f"tokenizer_config.json (or chat_template.jinja) has one"
        )
    prompt_text, chosen_text = template.split(prompt, chosen, where, keys[1])
    _, rejected_text = template.split(prompt, rejected, where, keys[2])
    return prompt_text, chosen_text, rejected_text


def _explicit(obj: dict, where: str, options: RecordOptions, keys: tuple) -> tuple:
    _require(obj, keys, where)
    prompt, chosen, rejected = (obj[key] for key in keys)
    if keys == EXPLICIT and (isinstance(chosen, list) or isinstance(rejected, list)):
        messages = _prompt_messages(prompt, keys[0], where), _side(chosen, keys[1], where), _side(rejected, keys[2], where)
        return _rendered(*messages, keys, where, options), "prompt/chosen/rejected (messages)", keys[1:]
    texts = tuple(_string(obj, key, where) for key in keys)
    return texts, "/".join(keys), keys[1:]


def _ranked(obj: dict, where: str, options: RecordOptions) -> tuple:
    """NeMo-RL's format: the lowest rank is chosen and the highest rejected (completions ranked in between are unused)."""
    _require(obj, RANKED, where)
    completions = obj["completions"]
    if not isinstance(completions, list) or len(completions) < 2:
        got = f"{len(completions)}" if isinstance(completions, list) else type(completions).__name__
        raise ValueError(f"{where}: key 'completions' must be a list of at least 2 completions, got {got}")
    for i, item in enumerate(completions):
        rank = item.get("rank") if isinstance(item, dict) else None
        if not isinstance(item, dict) or "completion" not in item or isinstance(rank, bool) or not isinstance(rank, int):
            raise ValueError(f"{where}: completions[{i}] must be an object with an integer 'rank' and a "
                             f"'completion', got {item!r:.200}")
    ranks = sorted(item["rank"] for item in completions)
    if ranks[0] == ranks[1] or ranks[-1] == ranks[-2]:
        tied = ranks[0] if ranks[0] == ranks[1] else ranks[-1]
        raise ValueError(f"{where}: completions tie at rank {tied}; the best and the worst rank must be unique, "
                         f"got ranks {ranks}")
    best = min(completions, key=lambda item: item["rank"])
    worst = max(completions, key=lambda item: item["rank"])
    keys = ("context", f"completions[{completions.index(best)}]", f"completions[{completions.index(worst)}]")
    prompt = _prompt_messages(obj["context"], "context", where)
    chosen, rejected = (_messages(item["completion"], key, where, assistant_only=True)
                        for item, key in ((best, keys[1]), (worst, keys[2])))
    return _rendered(prompt, chosen, rejected, keys, where, options), "context/completions (ranked)", keys[1:]


def _split_text(chosen: str, rejected: str, where: str, delimiter: str | None) -> tuple:
    """Prompt = the shared start up to and including the last ``delimiter`` in it; each response must be one turn."""
    if delimiter is None:
        raise MissingSetting(f"{where}: a record without a prompt (only 'chosen'/'rejected' text) needs a delimiter to "
                             f"split one off: set model.data.implicit_prompt_delimiter (it is null), e.g. "
                             f"'\\n\\nAssistant:'")
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(delimiter)
    if cut < 0:
        raise ValueError(f"{where}: no implicit prompt: 'chosen' and 'rejected' share no {delimiter!r} (they differ "
                         f"from character {len(common)}), so there is no common prompt to split off")
    cut += len(delimiter)
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if delimiter in text[cut:]:
            raise ValueError(f"{where}: no implicit prompt: '{key}' has another {delimiter!r} after the shared start "
                             f"(character {cut}), so the two sides differ before their last turn")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _split_messages(chosen: list, rejected: list, where: str) -> tuple:
    """Prompt = the shared leading messages; what follows on each side must be assistant messages only."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise ValueError(f"{where}: no implicit prompt: 'chosen' and 'rejected' differ from their first message")
    rest = {"chosen": chosen[shared:], "rejected": rejected[shared:]}
    for key, messages in rest.items():
        if not messages:
            raise ValueError(f"{where}: no implicit prompt: '{key}' has no message after the {shared} shared ones")
        for i, message in enumerate(messages, start=shared):
            if message["role"] != "assistant":
                raise ValueError(f"{where}: no implicit prompt: '{key}' message {i} (after the {shared} shared ones) "
                                 f"has role {message['role']!r}, so the sides differ before their last assistant turn")
    return chosen[:shared], rest["chosen"], rest["rejected"]


def _implicit(obj: dict, where: str, options: RecordOptions) -> tuple:
    _require(obj, IMPLICIT, where)
    chosen, rejected = obj["chosen"], obj["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        split = _split_text(chosen, rejected, where, options.implicit_prompt_delimiter)
        return split, "chosen/rejected (implicit prompt, text)", IMPLICIT
    if isinstance(chosen, str) or isinstance(rejected, str):
        raise ValueError(f"{where}: 'chosen' and 'rejected' must both be strings or both lists of messages, got "
                         f"{type(chosen).__name__} and {type(rejected).__name__}")
    chosen = _messages(chosen, "chosen", where, assistant_only=False)
    rejected = _messages(rejected, "rejected", where, assistant_only=False)
    split = _split_messages(chosen, rejected, where)
    return _rendered(*split, ("prompt", *IMPLICIT), where, options), "chosen/rejected (implicit prompt, messages)", \
        IMPLICIT


def normalize(obj, where: str, options: RecordOptions) -> tuple[dict, str]:
    """``(record, schema)``: the text record and the name of the schema it came in (for reports)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if any(key in obj for key in RANKED):
        parts = _ranked(obj, where, options)
    elif any(key in obj for key in ALIGNER[1:]):
        parts = _explicit(obj, where, options, ALIGNER)
    elif "prompt" in obj:
        parts = _explicit(obj, where, options, EXPLICIT)
    else:
        parts = _implicit(obj, where, options)
    (prompt, chosen, rejected), schema, names = parts  # names: the keys of the two responses, for messages
    for name, text in zip(names, (chosen, rejected)):
        if not text.strip():
            raise ValueError(f"{where}: key '{name}' is empty")
    if chosen == rejected:
        raise ValueError(f"{where}: '{names[0]}' and '{names[1]}' are identical (no preference to learn)")
    record = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    for key, default in DEFAULT_REWARDS.items():
        value = obj.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}: key '{key}' must be a finite number, got {value!r}")
        record[key] = float(value)
    return record, schema
