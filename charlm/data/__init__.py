"""Text to token ids: reading corpora (files, directories, globs, compressed), the tokenizer, the
token cache, and the batches and BPTT windows training reads."""
