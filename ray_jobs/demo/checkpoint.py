"""Build a tiny, seeded ALBERT + ViT twin-tower checkpoint in real Hugging Face format.

Nothing can be downloaded here, so the demo and the tests use this checkpoint; it is laid
out exactly like a real one (see :mod:`ray_jobs.model.checkpoint`), tokenizer included,
and loaded through the same code path.
"""

from __future__ import annotations

import json
import os
import random

from ray_jobs.model.checkpoint import MANIFEST_FILE, PROJECTION_FILE, TwinTowerConfig

_WORD_TEXT = """
a an the red green blue yellow black white small large tiny huge old new bright dark
cat dog bird fish horse car bus bike boat plane tree flower house street river mountain
beach city forest field road bridge sky cloud sun moon star person child man woman group
sitting standing running walking flying swimming eating playing looking holding near on
under over beside with of in at photo picture image view of close up night day morning
winter summer autumn spring rain snow light shadow colorful striped wooden metal glass
"""
WORDS = tuple(_WORD_TEXT.split())


def caption(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14)))


def _build_tokenizer(text_dir: str) -> int:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # A fixed vocabulary (trainers iterate hash maps and are not reproducible): the special
    # tokens, every demo word, and single characters as word starts and continuations.
    chars = sorted(set("".join(WORDS)) | set("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()"))
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS)), *chars, *(f"##{c}" for c in chars)]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )
    fast.save_pretrained(text_dir)
    return tok.get_vocab_size()


#: Architecture presets: the demo's tiny model, and one sized like ALBERT-base + ViT-S/16 at 224 px
#: (random weights; for benchmarks). Values are Hugging Face config fields.
PRESETS: dict[str, dict] = {
    "tiny": {
        "name": "tiny-albert-vit",
        "text": dict(
            embedding_size=32,
            hidden_size=64,
            num_hidden_layers=4,
            num_hidden_groups=4,
            num_attention_heads=4,
            intermediate_size=128,
        ),
        "image": dict(
            hidden_size=64,
            num_hidden_layers=6,
            num_attention_heads=4,
            intermediate_size=128,
            image_size=32,
            patch_size=8,
        ),
        "embed_dim": 32,
        "text_max_length": 32,
    },
    "albert-base-vit-s16": {
        "name": "albert-base-vit-s16-random",
        "text": dict(
            embedding_size=128,
            hidden_size=768,
            num_hidden_layers=12,
            num_hidden_groups=1,
            num_attention_heads=12,
            intermediate_size=3072,
        ),
        "image": dict(
            hidden_size=384,
            num_hidden_layers=12,
            num_attention_heads=6,
            intermediate_size=1536,
            image_size=224,
            patch_size=16,
        ),
        "embed_dim": 512,
        "text_max_length": 64,
    },
}


def build_demo_checkpoint(out_dir: str, *, seed: int = 0, preset: str = "tiny", name: str | None = None) -> str:
    """Write the checkpoint to *out_dir* and return it. The same arguments give the same bytes.

    In the tiny preset every ALBERT layer has its own weight group, so pipeline stages hold
    disjoint layers; the ALBERT-base preset shares one group across layers, as the real one does.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AlbertConfig, AlbertModel, ViTConfig, ViTModel

    spec = PRESETS[preset]
    name = name or spec["name"]
    text_dir, image_dir = os.path.join(out_dir, "text"), os.path.join(out_dir, "image")
    os.makedirs(text_dir, exist_ok=True)
    os.makedirs(image_dir, exist_ok=True)
    vocab = _build_tokenizer(text_dir)

    torch.manual_seed(seed)
    text_cfg = AlbertConfig(vocab_size=vocab, max_position_embeddings=128, pad_token_id=0, **spec["text"])
    AlbertModel(text_cfg, add_pooling_layer=False).save_pretrained(text_dir)
    image_cfg = ViTConfig(**spec["image"])
    image_size, hidden, image_hidden = image_cfg.image_size, text_cfg.hidden_size, image_cfg.hidden_size
    embed_dim, text_max_length = spec["embed_dim"], spec["text_max_length"]
    ViTModel(image_cfg, add_pooling_layer=False).save_pretrained(image_dir)
    with open(os.path.join(image_dir, "preprocessor_config.json"), "w") as fh:
        json.dump(
            {
                "image_processor_type": "ViTImageProcessor",
                "do_resize": True,
                "size": {"height": image_size, "width": image_size},
                "resample": 2,
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
            },
            fh,
            indent=2,
        )
    gen = torch.Generator().manual_seed(seed + 1)
    save_file(
        {
            "text_projection.weight": torch.randn(embed_dim, hidden, generator=gen) / hidden**0.5,
            "image_projection.weight": torch.randn(embed_dim, image_hidden, generator=gen) / image_hidden**0.5,
        },
        os.path.join(out_dir, PROJECTION_FILE),
    )
    cfg = TwinTowerConfig(name=name, embed_dim=embed_dim, text_max_length=text_max_length)
    with open(os.path.join(out_dir, MANIFEST_FILE), "w") as fh:
        fh.write(cfg.to_json())
    return out_dir
