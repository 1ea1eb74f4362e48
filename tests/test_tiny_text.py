"""The tiny model's word tokenizer."""

import torch

from compact_search.models.tiny import data
from compact_search.models.tiny.text import UNKNOWN_TOKEN, WordTokenizer


def test_tokenizer_is_deterministic_and_knows_every_grammar_word():
    specs = data.sample_scene_specs(200, torch.Generator().manual_seed(2), split="all")
    prompts = [s.prompt for s in specs]
    first, second = WordTokenizer().encode(prompts), WordTokenizer().encode(prompts)
    assert torch.equal(first, second)
    unknown = WordTokenizer().vocabulary.index(UNKNOWN_TOKEN)
    assert not (first == unknown).any()


def test_tokenizer_pads_maps_unknown_words_and_ignores_case_and_commas():
    tokenizer = WordTokenizer(max_length=8)
    ids = tokenizer.encode(["A Red circle, zebra", ""])
    vocabulary = tokenizer.vocabulary
    assert [vocabulary[i] for i in ids[0, :4]] == ["a", "red", "circle", UNKNOWN_TOKEN]
    assert (ids[0, 4:] == tokenizer.pad_id).all()
    assert (ids[1] == tokenizer.pad_id).all()
    assert ids.shape == (2, 8)


def test_distinct_prompts_get_distinct_ids():
    tokenizer = WordTokenizer()
    ids = tokenizer.encode(["a red circle moves left", "a blue circle moves left"])
    assert not torch.equal(ids[0], ids[1])
