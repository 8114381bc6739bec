"""A Hugging Face fine-tune tuned by hpsearch: `finetune.fit` is the study's trainer."""
