"""The tiny tokenizer: a word-level vocabulary for tests, the demo and CPU benchmarks.

A random tiny LLM needs a tokenizer that nothing has to download, yet is a *real* fast tokenizer
(``PreTrainedTokenizerFast``), so that the model code runs the same path as with a hub LLM: the
special tokens ``[SEG]`` and ``<image>`` are added to it and the embeddings resized, exactly as for
a pretrained model. Its vocabulary covers the prompt template and every word ``pipeline.synth``
writes; anything else becomes ``[UNK]`` (a word-level model has no sub-words to fall back on).
"""

from __future__ import annotations

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from pipeline.synth import ALONE, COLOURS, RELATIONS, SHAPES, TEXTURES

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "<s>", "</s>"
# Words of the prompt template (mllm.PROMPT / ANSWER) and of synthetic referring expressions, plus
# a few common RefCOCO words so that a real-data smoke run is not all [UNK].
_WORDS = (
    "please segment the object described as : it is . , ? ! ' - answer image"
    " that can be seen in picture on side near of at a an and with to from next behind front"
    " one two three other small large big middle center centre man woman person left right top bottom"
    " white black gray grey brown pink orange"
)


def tiny_vocabulary() -> list[str]:
    """Special tokens first (stable ids 0-3), then every word once, in a fixed order."""
    shapes = [*SHAPES, *(f"{shape}s" for shape in SHAPES)]  # "the largest of the red circles"
    words = [*_WORDS.split(), *COLOURS, *shapes, *RELATIONS, *TEXTURES, ALONE]  # the probes' words last
    return [PAD, UNK, BOS, EOS, *dict.fromkeys(words)]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Lower-cased, whitespace-and-punctuation split, word-level; ``<s>`` prepended like Llama's."""
    vocabulary = tiny_vocabulary()
    model = Tokenizer(WordLevel({word: i for i, word in enumerate(vocabulary)}, unk_token=UNK))
    model.normalizer = normalizers.Lowercase()
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    model.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocabulary.index(BOS))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=model, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS)
