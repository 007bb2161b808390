"""BLIP-2 captions through transformers from a local folder, cached on disk (tiny random model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from ocl_bench.api.errors import DataError  # noqa: E402
from ocl_bench.datasets.generated.captions import Blip2Captioner, PromptSource, find_blip2  # noqa: E402

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def write_tiny_blip2(folder: Path) -> None:
    """A random Blip2ForConditionalGeneration + Blip2Processor saved as transformers does
    (config.json, model.safetensors, processor and tokenizer files)."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        GPT2Tokenizer,
        OPTConfig,
    )

    folder.mkdir(parents=True)
    words = ["<pad>", "</s>", "<unk>", "<image>", *LETTERS, *("Ġ" + c for c in LETTERS)]
    (folder / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(words)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = GPT2Tokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="</s>",
        unk_token="<unk>",
    )
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4}
    config = Blip2Config(
        vision_config=Blip2VisionConfig(
            intermediate_size=37, image_size=32, patch_size=8, **small
        ).to_dict(),
        qformer_config=Blip2QFormerConfig(
            intermediate_size=37, encoder_hidden_size=32, vocab_size=100, **small
        ).to_dict(),
        text_config=OPTConfig(
            vocab_size=len(words),
            ffn_dim=37,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=1,
            **small,
        ).to_dict(),
        num_query_tokens=4,
        image_token_index=3,
    )
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).save_pretrained(folder)
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        num_query_tokens=4,
    )
    processor.save_pretrained(folder)


@pytest.fixture(scope="module")
def blip2_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("blip2") / "model"
    write_tiny_blip2(folder)
    return folder


def test_blip2_caption_is_decoded_and_cached(blip2_folder, tmp_path, monkeypatch):
    captioner = Blip2Captioner(blip2_folder, cache_root=tmp_path)
    tok = captioner.processor.tokenizer
    said = tok("circle", add_special_tokens=False, return_tensors="pt").input_ids
    seen = []

    def generate(**inputs):
        seen.append(inputs["pixel_values"].shape)
        return said

    monkeypatch.setattr(captioner.model, "generate", generate)
    image = torch.rand(3, 48, 48)
    assert captioner(image) == "circle"
    assert seen == [(1, 3, 32, 32)]  # the processor resized the [0, 1] image to BLIP-2's size
    assert captioner(image) == "circle" and len(seen) == 1  # second time from the cache
    again = Blip2Captioner(blip2_folder, cache_root=tmp_path)  # a new process: disk cache
    monkeypatch.setattr(again.model, "generate", lambda **_: pytest.fail("not cached"))
    assert again(image) == "circle"
    assert isinstance(Blip2Captioner(blip2_folder, cache_root=tmp_path / "x")(image), str)


def test_blip2_source_finds_class_words_and_the_folder_rules(blip2_folder, monkeypatch):
    from ocl_bench.datasets.shapes import ShapesDataset

    shapes = ShapesDataset(ShapesDataset.Params(image_size=32, train_size=2), "train")
    monkeypatch.setenv("OCL_BENCH_BLIP2", str(blip2_folder))
    assert find_blip2() == blip2_folder
    source = PromptSource("blip2", shapes)
    source.captioner = lambda image: "two squares next to a circle"
    prompt = source(0)
    assert prompt.classes == ("square", "circle")
    assert prompt.text == "two squares next to a circle; square, circle"
    monkeypatch.setenv("OCL_BENCH_BLIP2", str(blip2_folder.parent / "nothing"))
    with pytest.raises(DataError, match="not a transformers BLIP-2 folder"):
        find_blip2()
