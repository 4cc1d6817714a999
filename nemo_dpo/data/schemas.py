"""Every accepted record schema, turned into one text record: a pair {prompt, chosen, rejected, chosen_reward,
rejected_reward}, or an unpaired example {prompt, completion, label} (KTO's data).

Accepted (each side a string, or a list of {"role", "content"} messages):
    {"prompt", "chosen", "rejected"}                     explicit prompt (TRL's; conversational when the sides are lists)
    {"prompt", "chosen_response", "rejected_response"}   NeMo-Aligner's, strings
    {"context", "completions": [{"rank", "completion"}]} NeMo-RL's ranked completions: lowest rank chosen, highest rejected
    {"conversations", "chosen", "rejected"}              LLaMA-Factory's sharegpt preference records: {"from", "value"}
                                                         turns, the answers one turn each; "system", "tools" optional
    {"instruction", "input", "chosen", "rejected"}       Alpaca-style preference records (LLaMA-Factory's alpaca):
                                                         strings; "input", "system", "history" optional
    {"chosen", "rejected"}                               implicit prompt (Anthropic HH-RLHF): the shared start is the prompt
    {"prompt", "completion", "label"}                    TRL's unpaired preference format: one completion, label true
                                                         (desirable) or false (undesirable); conversational when the
                                                         completion is a list of assistant messages

Message lists become text through the chat template (chat_template.py): one
format downstream, so tokenization, batching and the loss mask need not know
where a record came from. A record that breaks a rule raises ``ValueError``
starting with its ``file:line`` (or ``file:row``) so ``model.data.on_bad_record``
can stop or skip; a record that cannot be read without a setting the config
lacks raises ``MissingSetting``, which is never skipped (every such record would go).
"""

import json
import math
import os
from dataclasses import dataclass

DEFAULT_REWARDS = {"chosen_reward": 1.0, "rejected_reward": 0.0}
EXPLICIT = ("prompt", "chosen", "rejected")
ALIGNER = ("prompt", "chosen_response", "rejected_response")
RANKED = ("context", "completions")
SHAREGPT = ("conversations", "chosen", "rejected")
ALPACA = ("instruction", "chosen", "rejected")
IMPLICIT = ("chosen", "rejected")
UNPAIRED = ("prompt", "completion", "label")
SCHEMA_HELP = (f"expected keys {EXPLICIT}, {ALIGNER}, {RANKED}, {SHAREGPT}, {ALPACA} (+ 'input'), {IMPLICIT} or, "
               f"unpaired, {UNPAIRED}")
# sharegpt's speakers ("from", LLaMA-Factory's tags) -> chat-template roles. A function_call turn is the assistant
# calling a tool (its value, the call's JSON, is the message), an observation is the tool's answer.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "observation": "tool", "function_call": "assistant",
                  "system": "system"}


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


def _template(where: str, options: RecordOptions):
    """The chat template conversational records need (MissingSetting, naming the settings, when there is none)."""
    if options.chat_template is None:
        raise MissingSetting(
            f"{where}: a conversational record (message lists) needs a chat template: set model.data.chat_template "
            f"(Jinja text or a .jinja file), or set model.tokenizer.model to a Hugging Face tokenizer folder whose "
            f"tokenizer_config.json (or chat_template.jinja) has one (sharegpt and Alpaca records are conversations too)"
        )
    return options.chat_template


def _rendered(prompt: list, chosen: list, rejected: list, keys: tuple, where: str, options: RecordOptions,
              tools: list | None = None) -> tuple:
    template = _template(where, options)
    prompt_text, chosen_text = template.split(prompt, chosen, where, keys[1], tools)
    _, rejected_text = template.split(prompt, rejected, where, keys[2], tools)
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


def _sharegpt_turn(turn, key: str, where: str) -> dict:
    """One sharegpt turn, {"from", "value"} (or already {"role", "content"}), as a message."""
    if isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str):
        if turn["from"] not in SHAREGPT_ROLES:
            raise ValueError(f"{where}: key '{key}' is from {turn['from']!r}; sharegpt turns are from one of "
                             f"{list(SHAREGPT_ROLES)}")
        return {"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]}
    if isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str):
        return {"role": turn["role"], "content": turn["content"]}
    raise ValueError(f"{where}: key '{key}' must be a turn {{\"from\": ..., \"value\": ...}} with string values, got "
                     f"{turn!r:.200}")


def _tools(value, where: str) -> list | None:
    """A record's tool definitions for the chat template's ``tools``: a list, or the JSON text of one (LLaMA-Factory)."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as err:
            raise ValueError(f"{where}: key 'tools' is a string but not JSON ({err})") from err
    value = [value] if isinstance(value, dict) else value
    if not isinstance(value, list) or not all(isinstance(tool, dict) for tool in value):
        raise ValueError(f"{where}: key 'tools' must be a list of tool definitions (objects), or its JSON text")
    return value


def _system_turn(obj: dict, where: str) -> list:
    """The record's "system" prompt as a leading system message (none when absent or empty)."""
    if obj.get("system") in (None, ""):
        return []
    return [{"role": "system", "content": _string(obj, "system", where)}]


def _sharegpt(obj: dict, where: str, options: RecordOptions) -> tuple:
    """LLaMA-Factory's sharegpt preference ("ranking") record: the conversation so far, then one answer on each side."""
    _require(obj, SHAREGPT, where)
    turns = obj["conversations"]
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: key 'conversations' must be a non-empty list of turns, got "
                         f"{'an empty list' if turns == [] else type(turns).__name__}")
    prompt = _system_turn(obj, where) + [_sharegpt_turn(turn, f"conversations[{i}]", where)
                                         for i, turn in enumerate(turns)]
    if prompt[-1]["role"] == "assistant":
        raise ValueError(f"{where}: the last turn of 'conversations' is the assistant's; it must be the turn that "
                         f"'chosen' and 'rejected' answer (from human or observation)")
    sides = []
    for key in SHAREGPT[1:]:
        given = obj[key] if isinstance(obj[key], list) else [obj[key]]
        messages = [_sharegpt_turn(turn, key, where) for turn in given]
        sides.append(_messages(messages, key, where, assistant_only=True))
    rendered = _rendered(prompt, *sides, SHAREGPT, where, options, _tools(obj.get("tools"), where))
    return rendered, "conversations/chosen/rejected (sharegpt)", SHAREGPT[1:]


def _alpaca(obj: dict, where: str, options: RecordOptions) -> tuple:
    """An Alpaca-style preference record: the instruction (and input) is the user's turn after the system prompt and
    any history ([query, answer] pairs), each answer one assistant turn."""
    _require(obj, ALPACA, where)
    instruction, chosen, rejected = (_string(obj, key, where) for key in ALPACA)
    extra = _string(obj, "input", where) if obj.get("input") is not None else ""
    query = "\n".join(part for part in (instruction, extra) if part)
    if not query.strip():
        raise ValueError(f"{where}: keys 'instruction' and 'input' are empty")
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise ValueError(f"{where}: key 'history' must be a list of [query, answer] pairs")
    prompt = _system_turn(obj, where)
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(text, str) for text in pair)):
            raise ValueError(f"{where}: history[{i}] must be a [query, answer] pair of strings, got {pair!r:.200}")
        prompt += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt.append({"role": "user", "content": query})
    sides = [_messages([{"role": "assistant", "content": text}], key, where, assistant_only=True)
             for key, text in zip(ALPACA[1:], (chosen, rejected))]
    return _rendered(prompt, *sides, ALPACA, where, options), "instruction/input/chosen/rejected (Alpaca)", ALPACA[1:]


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


def is_unpaired(record: dict) -> bool:
    """Whether a text record is an unpaired example (KTO's data) rather than a pair."""
    return "completion" in record


def _unpaired(obj: dict, where: str, options: RecordOptions) -> tuple[dict, str]:
    """TRL's unpaired preference record: a prompt, one completion and whether it is desirable."""
    _require(obj, UNPAIRED, where)
    label = obj["label"]
    if not isinstance(label, bool):
        raise ValueError(f"{where}: key 'label' must be true (desirable) or false (undesirable), got {label!r:.100}")
    prompt, completion = obj["prompt"], obj["completion"]
    if isinstance(prompt, list) and isinstance(completion, str):
        raise ValueError(f"{where}: key 'completion' is a string but the prompt is a list of messages; give the "
                         f"completion as a list of assistant messages")
    if isinstance(completion, list):
        messages = _prompt_messages(prompt, "prompt", where), _side(completion, "completion", where)
        prompt, completion = _template(where, options).split(*messages, where, "completion")
        schema = "prompt/completion/label (messages)"
    else:
        prompt, completion = _string(obj, "prompt", where), _string(obj, "completion", where)
        schema = "prompt/completion/label"
    if not completion.strip():
        raise ValueError(f"{where}: key 'completion' is empty")
    return {"prompt": prompt, "completion": completion, "label": label}, schema


def normalize(obj, where: str, options: RecordOptions) -> tuple[dict, str]:
    """``(record, schema)``: the text record and the name of the schema it came in (for reports)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "completion" in obj or "label" in obj:
        return _unpaired(obj, where, options)
    if any(key in obj for key in RANKED):
        parts = _ranked(obj, where, options)
    elif "conversations" in obj:
        parts = _sharegpt(obj, where, options)
    elif "instruction" in obj:
        parts = _alpaca(obj, where, options)
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
