"""Chat templates: conversations (lists of {"role", "content"} messages) rendered to text as Hugging Face does.

A template is Jinja, from ``model.data.chat_template`` (inline text or a file) or,
when that is null, from the Hugging Face tokenizer folder in
``model.tokenizer.model`` (``chat_template.jinja``, else ``tokenizer_config.json``'s
``chat_template``). It is rendered in jinja2's immutable sandbox with the
variables Hugging Face passes (``messages``, ``add_generation_prompt``,
``bos_token``, ``eos_token``, ``tools`` where a record has tool definitions;
``documents`` is none) and its helpers
(``raise_exception``, the ``tojson`` filter, loop controls), with trim_blocks and
lstrip_blocks. There is no ``strftime_now``, so a rendering never depends on the
day (templates that use it fall back to their fixed date): the same data must
give the same tokens on every rank, in every epoch and after every restart.

Splitting a conversation into prompt and response:
    prompt text   = render(prompt, add_generation_prompt=True)
    side text     = render(prompt + response, add_generation_prompt=False)
    response text = side text minus its start, which must be the prompt text
so the response is exactly what the template adds for the assistant's turn(s),
without the assistant header that the generation prompt already holds.
"""

import hashlib
import json
import os

from jinja2 import TemplateError, TemplateSyntaxError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from nemo_dpo.data.schemas import RecordOptions
from nemo_dpo.data.tokenizer import special_token_texts
from nemo_dpo.files import read_json_object

TEMPLATE_FILE = "chat_template.jinja"  # where recent transformers save it, next to tokenizer_config.json


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env


class ChatTemplate:
    """A compiled template and the tokenizer's special-token texts it may print."""

    def __init__(self, source: str, origin: str, special_tokens: dict):
        self.source, self.origin = source, origin  # origin: the file it was read from, or the config key
        self.special_tokens = {name: text for name, text in special_tokens.items() if text is not None}
        try:
            self._template = _environment().from_string(source)
        except TemplateSyntaxError as err:
            raise ValueError(f"{origin}: not a valid Jinja chat template (line {err.lineno}: {err.message})") from err

    def files(self) -> list[str]:
        """The file the template came from (for cache keys that hash inputs), if any."""
        return [self.origin] if os.path.isfile(self.origin) else []

    def fingerprint(self) -> str:
        text = json.dumps([self.source, self.special_tokens], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def render(self, messages: list, add_generation_prompt: bool, tools: list | None = None) -> str:
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=tools, documents=None,
            **self.special_tokens,
        )

    def split(self, prompt: list, response: list, where: str, key: str, tools: list | None = None) -> tuple[str, str]:
        """(prompt text, response text) of one side; ValueError naming ``where`` if the template fails or does not split."""
        try:
            prompt_text = self.render(prompt, add_generation_prompt=True, tools=tools)
            side_text = self.render(prompt + response, add_generation_prompt=False, tools=tools)
        except Exception as err:  # the template is user code: whatever it raises is this record's problem
            raise ValueError(f"{where}: the chat template ({self.origin}) failed on '{key}': "
                             f"{type(err).__name__}: {err}") from err
        if not side_text.startswith(prompt_text):
            at = len(os.path.commonprefix([prompt_text, side_text]))
            raise ValueError(
                f"{where}: the chat template ({self.origin}) does not extend the prompt: prompt + '{key}' rendered "
                f"with add_generation_prompt=false does not start with the prompt rendered with "
                f"add_generation_prompt=true (they differ at character {at}: {prompt_text[at:at + 40]!r} vs "
                f"{side_text[at:at + 40]!r}); the template's generation prompt must be the start of the assistant's "
                f"turn, and earlier turns must render the same whatever follows them"
            )
        return prompt_text, side_text[len(prompt_text):]


def _looks_like_jinja(text: str) -> bool:
    return "{{" in text or "{%" in text


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def template_source(setting: str | None, tokenizer_model: str | None) -> tuple[str, str] | None:
    """(template text, where it came from), or None when neither the config nor the tokenizer folder has one."""
    if setting is not None:
        if not isinstance(setting, str):
            raise ValueError(f"model.data.chat_template: expected Jinja text or a file path, got {setting!r}")
        if _looks_like_jinja(setting):
            return setting, "model.data.chat_template"
        if os.path.isfile(setting):
            return _read(setting), setting
        raise ValueError(f"model.data.chat_template: {setting!r} is neither Jinja text (it has no '{{{{' or '{{%') "
                         f"nor an existing file")
    if tokenizer_model is None or not os.path.isdir(tokenizer_model):
        return None
    jinja_file = os.path.join(tokenizer_model, TEMPLATE_FILE)
    if os.path.isfile(jinja_file):
        return _read(jinja_file), jinja_file
    config_file = os.path.join(tokenizer_model, "tokenizer_config.json")
    template = read_json_object(config_file).get("chat_template")
    if isinstance(template, list):  # several named templates: the default one is for chat
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None:
        return None
    if not isinstance(template, str):
        raise ValueError(f"{config_file}: chat_template must be a string (or named templates with a 'default'), "
                         f"got {type(template).__name__}")
    return template, config_file


def record_options(model_cfg) -> RecordOptions:
    """What ``model.data`` and ``model.tokenizer`` say about turning records into text."""
    source = template_source(model_cfg.data.chat_template, model_cfg.tokenizer.model)
    template = None if source is None else ChatTemplate(*source, special_token_texts(model_cfg.tokenizer.model))
    return RecordOptions(template, model_cfg.data.implicit_prompt_delimiter)
