"""SODA tokenization: the token-id layout, the text tokenizer, the Mimi codec and shard preparation."""
