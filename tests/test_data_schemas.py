"""Each record schema becomes the same text record, and each way a record can be wrong is a file:line error or a skip."""

import json

import pytest
from chat_fixtures import CHATML

from nemo_dpo.data.chat_template import ChatTemplate
from nemo_dpo.data.preference_dataset import read_preference_pairs
from nemo_dpo.data.schemas import MissingSetting, RecordOptions

TEMPLATE = ChatTemplate(CHATML, "test template", {"eos_token": "<|im_end|>"})
OPTIONS = RecordOptions(TEMPLATE, "\n\nAssistant:")
SYSTEM = "<|im_start|>system\nYou pick words.<|im_end|>\n"


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def read(tmp_path, rows, policy="error", options=OPTIONS):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), read_preference_pairs(str(path), policy, options)


def test_conversational_record_renders_prompt_and_assistant_turn(tmp_path):
    row = {"prompt": [user("Hi"), bot("Hello"), user("Pick a fruit")], "chosen": [bot("apple")],
           "rejected": [bot("tiger")], "chosen_reward": 3}
    _, data = read(tmp_path, [row])
    prompt = SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n" \
                      "<|im_start|>user\nPick a fruit<|im_end|>\n<|im_start|>assistant\n"
    assert data.records == [{"prompt": prompt, "chosen": "apple<|im_end|>\n", "rejected": "tiger<|im_end|>\n",
                             "chosen_reward": 3.0, "rejected_reward": 0.0}]
    assert data.schemas == {"prompt/chosen/rejected (messages)": 1}


def test_a_string_prompt_is_one_user_turn(tmp_path):
    _, data = read(tmp_path, [{"prompt": "Pick a fruit", "chosen": [bot("apple")], "rejected": [bot("tiger")]}])
    assert data.records[0]["prompt"] == SYSTEM + "<|im_start|>user\nPick a fruit<|im_end|>\n<|im_start|>assistant\n"


def test_ranked_completions_lowest_rank_chosen_highest_rejected(tmp_path):
    row = {"context": [user("Pick a fruit")], "completions": [
        {"rank": 2, "completion": [bot("red")]},
        {"rank": 0, "completion": [bot("apple")]},
        {"rank": 5, "completion": [bot("tiger")]},
    ]}
    _, data = read(tmp_path, [row])
    assert (data.records[0]["chosen"], data.records[0]["rejected"]) == ("apple<|im_end|>\n", "tiger<|im_end|>\n")
    assert data.schemas == {"context/completions (ranked)": 1}


def test_implicit_prompt_of_text_and_of_messages(tmp_path):
    text = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: fruit?\n\nAssistant: apple",
            "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: fruit?\n\nAssistant: tiger"}
    messages = {"chosen": [user("hi"), bot("hello"), user("fruit?"), bot("apple")],
                "rejected": [user("hi"), bot("hello"), user("fruit?"), bot("tiger")]}
    _, data = read(tmp_path, [text, messages])
    assert data.records[0] == {"prompt": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: fruit?\n\nAssistant:",
                               "chosen": " apple", "rejected": " tiger", "chosen_reward": 1.0, "rejected_reward": 0.0}
    assert data.records[1]["prompt"] == TEMPLATE.render(messages["chosen"][:3], add_generation_prompt=True)
    assert (data.records[1]["chosen"], data.records[1]["rejected"]) == ("apple<|im_end|>\n", "tiger<|im_end|>\n")
    assert data.schemas == {"chosen/rejected (implicit prompt, text)": 1, "chosen/rejected (implicit prompt, messages)": 1}


def test_implicit_text_splits_inside_a_shared_response_start(tmp_path):
    """The last delimiter in the common prefix: responses that start alike keep their own whole text."""
    row = {"chosen": "\n\nHuman: q\n\nAssistant: I think yes", "rejected": "\n\nHuman: q\n\nAssistant: I think no"}
    _, data = read(tmp_path, [row])
    assert (data.records[0]["prompt"], data.records[0]["chosen"]) == ("\n\nHuman: q\n\nAssistant:", " I think yes")


BAD = [
    ({"prompt": [user("q")], "chosen": [user("a")], "rejected": [bot("b")]},
     "key 'chosen' message 0 has role 'user'; a response may hold only 'assistant' messages"),
    ({"prompt": [user("q")], "chosen": [bot("a"), {"role": "tool", "content": "x"}], "rejected": [bot("b")]},
     "key 'chosen' message 1 has role 'tool'"),
    ({"prompt": [user("q")], "chosen": "a", "rejected": [bot("b")]},
     "key 'chosen' is a string but the prompt is a list of messages"),
    ({"prompt": [user("q")], "chosen": [], "rejected": [bot("b")]},
     "key 'chosen' must be a string or a non-empty list of messages, got an empty list"),
    ({"prompt": [{"role": "user"}], "chosen": [bot("a")], "rejected": [bot("b")]},
     "key 'prompt' message 0 must be an object with string 'role' and 'content'"),
    ({"prompt": [user("q")], "chosen": [bot("  ")], "rejected": [bot("b")]}, "key 'chosen' is empty"),
    ({"prompt": [user("q")], "chosen": [bot("a")], "rejected": [bot("a")]}, "'chosen' and 'rejected' are identical"),
    ({"prompt": [{"role": "robot", "content": "q"}], "chosen": [bot("a")], "rejected": [bot("b")]},
     "the chat template (test template) failed on 'chosen': TemplateError: unknown role robot"),
    ({"context": [user("q")], "completions": [{"rank": 0, "completion": [bot("a")]}]},
     "key 'completions' must be a list of at least 2 completions, got 1"),
    ({"context": [user("q")], "completions": [{"rank": 1, "completion": [bot("a")]}, {"rank": 1, "completion": [bot("b")]}]},
     "completions tie at rank 1; the best and the worst rank must be unique, got ranks [1, 1]"),
    ({"context": [user("q")], "completions": [{"rank": 0, "completion": [bot("a")]}, {"rank": 2, "completion": [bot("b")]},
                                              {"rank": 2, "completion": [bot("c")]}]},
     "completions tie at rank 2"),
    ({"context": [user("q")], "completions": [{"rank": "0", "completion": [bot("a")]}, {"rank": 1, "completion": []}]},
     "completions[0] must be an object with an integer 'rank' and a 'completion'"),
    ({"context": [user("q")], "completions": [{"rank": 0, "completion": [bot("a")]}, {"rank": 1, "completion": [user("b")]}]},
     "key 'completions[1]' message 0 has role 'user'"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
     "no implicit prompt: 'chosen' and 'rejected' share no '\\n\\nAssistant:' (they differ from character 9)"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: x\n\nHuman: more\n\nAssistant: z", "rejected": "\n\nHuman: a\n\nAssistant: y"},
     "no implicit prompt: 'chosen' has another '\\n\\nAssistant:' after the shared start (character 22)"),
    ({"chosen": "\n\nHuman: a\n\nAssistant:", "rejected": "\n\nHuman: a\n\nAssistant: y"}, "key 'chosen' is empty"),
    ({"chosen": [user("a"), bot("x")], "rejected": [user("b"), bot("y")]},
     "no implicit prompt: 'chosen' and 'rejected' differ from their first message"),
    ({"chosen": [user("a"), bot("x"), user("c"), bot("z")], "rejected": [user("a"), bot("y")]},
     "no implicit prompt: 'chosen' message 2 (after the 1 shared ones) has role 'user'"),
    ({"chosen": [user("a"), bot("x")], "rejected": [user("a"), bot("x"), bot("y")]},
     "no implicit prompt: 'chosen' has no message after the 2 shared ones"),
    ({"chosen": "x", "rejected": [bot("y")]}, "'chosen' and 'rejected' must both be strings or both lists of messages"),
    ({"rejected": "y"}, "missing key 'chosen' (keys present: ['rejected'])"),
]


@pytest.mark.parametrize("row, message", BAD)
def test_bad_records_name_file_line_and_the_problem(tmp_path, row, message):
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    with pytest.raises(ValueError) as err:
        read(tmp_path, [good, row])
    path = str(tmp_path / "d.jsonl")
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value), str(err.value)
    _, data = read(tmp_path, [good, row, good], "skip")
    assert len(data.records) == 2 and len(data.skipped) == 1 and data.skipped[0].startswith(f"{path}:2: ")


def test_a_template_that_does_not_extend_the_prompt_is_named(tmp_path):
    """Rendering the generation prompt differently from the start of the assistant turn cannot be split."""
    template = ChatTemplate("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                            "{% if add_generation_prompt %}ASSISTANT:{% endif %}", "odd.jinja", {})
    with pytest.raises(ValueError, match=r"d.jsonl:1: the chat template \(odd.jinja\) does not extend the prompt: "
                                         r"prompt \+ 'chosen' rendered with add_generation_prompt=false does not start "
                                         r"with the prompt .* differ at character 9: 'ASSISTANT:' vs '\[assistant\] a"):
        read(tmp_path, [{"prompt": [user("q")], "chosen": [bot("a")], "rejected": [bot("b")]}],
             options=RecordOptions(template))


@pytest.mark.parametrize("row, setting", [
    ({"prompt": "q", "chosen": [bot("a")], "rejected": [bot("b")]}, "model.data.chat_template"),
    ({"chosen": [user("q"), bot("a")], "rejected": [user("q"), bot("b")]}, "model.data.chat_template"),
    ({"chosen": "H: q A: a", "rejected": "H: q A: b"}, "model.data.implicit_prompt_delimiter"),
])
def test_a_missing_setting_stops_even_with_skip_and_names_the_key(tmp_path, row, setting):
    with pytest.raises(MissingSetting, match=rf"d.jsonl:1: .*set {setting}"):
        read(tmp_path, [row], "skip", RecordOptions())
