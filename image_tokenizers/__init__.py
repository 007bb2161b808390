"""Image tokenizer plugins (kind "tokenizer"): images to discrete token ids and back."""
