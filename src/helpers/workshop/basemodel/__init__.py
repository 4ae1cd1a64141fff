"""The workshop's own tiny base model: drawn data, tokenizer, architecture, build, evaluation."""
