"""A small BERT fine-tuned with LoRA adapters by Hugging Face's `Trainer`: `fit(params, trial)`.

The model is built from a config (no hub download), its weights frozen, and PEFT's LoRA
adapters on the attention's query and value (plus the classifier head) are what trains: the
way a large pretrained model is fine-tuned, at a size a CPU runs in seconds. hpsearch's
`HpsearchCallback` is all the glue: it reports each epoch's evaluation, stops a pruned trial,
and keeps `Trainer`'s checkpoints where a dead trial's retry resumes from them.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    PrinterCallback,
    Trainer,
    TrainingArguments,
)

from hf_finetune import task
from search.integrations.huggingface import HpsearchCallback

if TYPE_CHECKING:
    import search


def build_model(params: dict[str, Any], vocab_size: int) -> torch.nn.Module:
    """A 2-layer BERT of width `hidden` (seeded: every trial starts from the same weights)
    with LoRA adapters of rank `lora_rank`; only the adapters and the head train."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size, hidden_size=params["hidden"],
                        num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * params["hidden"],
                        max_position_embeddings=task.MAX_LENGTH, num_labels=2)
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=params["lora_rank"],
                      lora_alpha=2 * params["lora_rank"], lora_dropout=0.0,
                      target_modules=["query", "value"])
    return get_peft_model(BertForSequenceClassification(config), lora)


def accuracy(prediction: Any) -> dict[str, float]:
    logits, labels = prediction
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def fit(params: dict[str, Any], trial: search.Trial) -> dict[str, float]:
    """Fine-tune for `trial.epochs` epochs (from the last checkpoint, on a retry) and return
    the held-out evaluation: `eval_accuracy` is the study's objective. Under `hpsearch
    retrain` (`trial.final`) train on train+held-out and return the test set's accuracy."""
    if trial.threads:
        torch.set_num_threads(trial.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)  # a trial's output, not a log
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    tokenize = task.tokenizer()
    train, held_out = task.splits(params["train_size"], params["held_out_size"], tokenize,
                                  final=trial.final)
    model = build_model(params, len(tokenize))
    hp = HpsearchCallback(trial)  # reports, prunes, and puts the checkpoints in the trial folder
    args = TrainingArguments(
        output_dir=hp.output_dir, num_train_epochs=trial.epochs, learning_rate=params["lr"],
        # batch_size is the global batch: under `resources` each rank takes its share
        per_device_train_batch_size=params["batch_size"] // trial.world_size,
        per_device_eval_batch_size=256, ddp_find_unused_parameters=False,
        warmup_steps=params["warmup_ratio"], weight_decay=params["weight_decay"],
        eval_strategy="epoch", save_total_limit=1,
        save_strategy="epoch" if hp.output_dir else "no",  # no trial folder under retrain
        logging_strategy="epoch", report_to="none", disable_tqdm=True, seed=0,
        use_cpu=trial.device == "cpu", dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                      compute_metrics=accuracy, callbacks=[hp])
    trainer.remove_callback(PrinterCallback)  # its log lines: hpsearch shows the reports
    trainer.train(resume_from_checkpoint=hp.resume_from)
    result = trainer.evaluate()
    if trial.final:  # hpsearch retrain: the test set, once
        return {"test_accuracy": result["eval_accuracy"], "test_loss": result["eval_loss"]}
    return result
