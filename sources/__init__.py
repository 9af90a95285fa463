"""Where captions and images come from, and the checks they pass before any training: the
four on-disk caption formats, image files, the built-in shapes data, the GPT-2 tokenizer."""
