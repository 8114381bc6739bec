"""The example's text task and tokenizer, made here: nothing is downloaded.

Sentences of filler words with three opinion words among them; the label says whether most
of those are positive. The vocabulary is known, so the tokenizer is a word-level one built
from it with Hugging Face's `tokenizers`, wrapped as a `PreTrainedTokenizerFast` that
`Trainer` and the model take as they would a hub tokenizer.
"""

from __future__ import annotations

import random

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

POSITIVE = ("good great fine superb lovely brilliant pleasant charming splendid happy "
            "wonderful delightful excellent neat clever").split()
NEGATIVE = ("bad awful poor dreadful nasty dull boring ugly terrible sad horrible grim "
            "clumsy weak broken").split()
FILLER = ("the a this that film movie book meal trip day story plot actor cast scene song "
          "show place room view music ending start middle part was is felt seemed looked "
          "quite very rather really so and but with of in on at for its my our their "
          "first last whole long short old new").split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
OPINIONS = 3  # per sentence: an odd count, so a majority always exists
MAX_LENGTH = 24


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer of the task's vocabulary: `[CLS] words… [SEP]`, padded."""
    vocab = {word: i for i, word in enumerate(SPECIAL + POSITIVE + NEGATIVE + FILLER)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]),
                                                 ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]",
                                   unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                   model_max_length=MAX_LENGTH)


def sentences(count: int, seed: int) -> tuple[list[str], list[int]]:
    """`count` sentences and their labels (1: mostly positive), from `seed`."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(count):
        words = [rng.choice(FILLER) for _ in range(rng.randint(6, 14))]
        positive = rng.randint(0, OPINIONS)
        for i in range(OPINIONS):
            words.insert(rng.randrange(len(words) + 1),
                         rng.choice(POSITIVE if i < positive else NEGATIVE))
        texts.append(" ".join(words))
        labels.append(int(positive * 2 > OPINIONS))
    return texts, labels


class TextDataset(torch.utils.data.Dataset):
    """Tokenized sentences as `Trainer` takes them: input_ids, attention_mask, labels."""

    def __init__(self, texts: list[str], labels: list[int],
                 tokenize: PreTrainedTokenizerFast) -> None:
        self.encoded = tokenize(texts, padding="max_length", truncation=True,
                                max_length=MAX_LENGTH, return_tensors="pt")
        self.labels = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.encoded["input_ids"][i],
                "attention_mask": self.encoded["attention_mask"][i],
                "labels": self.labels[i]}


def splits(train: int, held_out: int, tokenize: PreTrainedTokenizerFast, *,
           final: bool = False) -> tuple[TextDataset, TextDataset]:
    """The training sentences and the held-out ones the search evaluates on (drawn from
    other seeds). `final` (`hpsearch retrain`): train on both, evaluate on a test set that no
    trial of the search has seen."""
    texts, labels = sentences(train, seed=1)
    if not final:
        return (TextDataset(texts, labels, tokenize),
                TextDataset(*sentences(held_out, seed=2), tokenize))
    more_texts, more_labels = sentences(held_out, seed=2)
    return (TextDataset(texts + more_texts, labels + more_labels, tokenize),
            TextDataset(*sentences(held_out, seed=3), tokenize))
