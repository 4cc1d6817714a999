"""Preference data: the embedded default task, tokenizer, JSONL reading and batching."""
