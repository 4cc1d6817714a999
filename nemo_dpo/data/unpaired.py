"""KTO's data: unpaired examples, each with the mismatched completion its KL reference point is estimated from.

KTO (Ethayarajh et al. 2024) learns from single completions labelled desirable
or undesirable, and compares each log-ratio with a reference point: the policy's
KL divergence from the reference, estimated from mismatched prompt/completion
pairs. Each example therefore becomes one item of two sequences after its prompt,
in the places a pair has its chosen and rejected responses, so batching, packing,
context parallelism, the data-parallel split and the precomputed reference treat
it as they treat a pair:

- the example's own completion (``TokenizedPair.chosen``),
- its KL completion, another example's completion (``TokenizedPair.rejected``);

the label is the item's data reward on both sequences, 1.0 desirable and 0.0
undesirable (``chosen_reward`` / ``rejected_reward``), which the loss reads.

KL completions are made as TRL's KTOTrainer makes them: the examples, in reading
order, in chunks of ``model.micro_batch_size`` (TRL's
``per_device_train_batch_size``), each chunk's completions rotated by one,
(x1, y1) ... (xn, yn) -> (x1, yn), (x2, y1), ..., (xn, yn-1). They are fixed per
example, as TRL's KL dataset is, so they do not depend on the shuffle and the
reference's values can be precomputed.

Paired records give two examples each, as TRL's ``unpair_preference_dataset``
orders them: the unpaired records and the pairs' chosen responses (desirable)
in reading order, then the pairs' rejected responses (undesirable) in the same
order, so that a chunk rarely holds both answers to one prompt (its KL
completion would then not be mismatched).
"""

from nemo_dpo.data.preference_dataset import TokenizedPair, encode_prompt, encode_response, fit_pairs
from nemo_dpo.data.schemas import is_unpaired


def unpaired_examples(records: list) -> list:
    """``[{prompt, completion, label}]`` of a split's text records, pairs unpaired (see the module docstring)."""
    examples, undesirable = [], []
    for record in records:
        if is_unpaired(record):
            examples.append(record)
            continue
        examples.append({"prompt": record["prompt"], "completion": record["chosen"], "label": True})
        undesirable.append({"prompt": record["prompt"], "completion": record["rejected"], "label": False})
    return examples + undesirable


def kl_completions(completions: list, chunk: int) -> list:
    """Each completion's KL partner: the completions rotated by one within consecutive chunks of ``chunk`` (TRL's)."""
    rotated = []
    for start in range(0, len(completions), chunk):
        part = completions[start : start + chunk]
        rotated += part[-1:] + part[:-1]
    return rotated


def encode_examples(examples: list, tokenizer, chunk: int) -> list[TokenizedPair]:
    """Examples -> items (prompt, completion, KL completion; the label as both rewards), before any overflow policy."""
    prompts = [encode_prompt(example["prompt"], tokenizer) for example in examples]
    completions = [encode_response(example["completion"], tokenizer) for example in examples]
    items = []
    for example, prompt, completion, kl in zip(examples, prompts, completions, kl_completions(completions, chunk)):
        label = 1.0 if example["label"] else 0.0
        items.append(TokenizedPair(prompt, completion, kl, label, label))
    return items


def tokenize_examples(examples: list, tokenizer, max_seq_length: int, overflow: str, chunk: int,
                      progress=None) -> tuple[list[TokenizedPair], dict]:
    """Examples -> items fitted to ``max_seq_length`` as pairs are (``fit_pairs``: both sequences must fit); the
    statistics of ``tokenize_pairs`` (counting items as pairs) and how many are desirable."""
    items, stats = fit_pairs(encode_examples(examples, tokenizer, chunk), tokenizer, max_seq_length, overflow,
                             progress)
    stats["desirable"] = sum(item.chosen_reward == 1.0 for item in items)
    return items, stats
