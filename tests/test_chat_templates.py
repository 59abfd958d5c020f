"""A packaged model whose GGUF ships without a chat template gets its published one on load, and its
end-of-turn token closes training answers and stops generation."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from evals import models
from evals.generation import _stop_ids
from evals.prompts import render_prompt
from train.data import end_of_turn

TURNS = [{"role": "system", "content": "Route the request."}, {"role": "user", "content": "Where is ORD-1?"},
         {"role": "assistant", "content": '{"name": "get_order_status"}'}, {"role": "user", "content": "And ORD-2?"}]


@pytest.fixture()
def gemma_style_tokenizer():
    """A word-level tokenizer with Gemma 3's special tokens and no chat template of its own."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    words = ["user", "model", "Route", "the", "request.", "Where", "is", "ORD-1?"]
    tok = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(specials + words + ["[UNK]"])},
                                         unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    return tokenizer


def test_gemma3_template_puts_the_system_text_in_the_first_user_turn(gemma_style_tokenizer):
    gemma_style_tokenizer.chat_template = models.GEMMA3_CHAT_TEMPLATE
    assert render_prompt(gemma_style_tokenizer, TURNS) == (
        "<bos><start_of_turn>user\nRoute the request.\n\nWhere is ORD-1?<end_of_turn>\n"
        '<start_of_turn>model\n{"name": "get_order_status"}<end_of_turn>\n'
        "<start_of_turn>user\nAnd ORD-2?<end_of_turn>\n<start_of_turn>model\n")


def test_without_a_system_turn_the_first_user_turn_is_as_written(gemma_style_tokenizer):
    gemma_style_tokenizer.chat_template = models.GEMMA3_CHAT_TEMPLATE
    assert render_prompt(gemma_style_tokenizer, TURNS[1:2]) == (
        "<bos><start_of_turn>user\nWhere is ORD-1?<end_of_turn>\n<start_of_turn>model\n")


def test_end_of_turn_closes_answers_and_stops_generation(gemma_style_tokenizer):
    assert end_of_turn(gemma_style_tokenizer) == "<end_of_turn>"
    eot = gemma_style_tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert eot in _stop_ids(gemma_style_tokenizer)
    assert gemma_style_tokenizer.eos_token_id in _stop_ids(gemma_style_tokenizer)


def test_a_packaged_model_without_a_template_gets_its_known_one_on_load(tiny_model, tmp_path, monkeypatch):
    # A converted cache folder (as evals.models leaves it) whose tokenizer has no chat template.
    folder = models.model_cache_dir(tmp_path) / "packaged-tiny"
    shutil.copytree(tiny_model, folder)
    config = folder / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"chat_template"', '"unused_template"'))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    monkeypatch.setitem(models.PACKAGED, "packaged-tiny",
                        models.PackagedModel("unused", lambda _: Path("unused"), chat_template="{{ 'known' }}"))
    _, tokenizer = models.load_model("packaged-tiny", tmp_path)
    assert tokenizer.chat_template == "{{ 'known' }}"
    # A model that has its own template keeps it.
    _, own = models.load_model(tiny_model, tmp_path)
    assert own.chat_template != "{{ 'known' }}"
