"""Files shipped with sdjax: tokenizer vocabularies, model configs, the embedded default model."""
