"""The language-model module: continued pretraining of a causal LM (Hugging Face transformers + peft) on math text, its GSM8K feedback and evaluation, and corpus decontamination."""
