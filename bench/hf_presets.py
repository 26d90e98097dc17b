"""Tiny, seeded Hugging Face dual encoders saved with ``save_pretrained``, tokenizer and processor beside.

Nothing can be downloaded here, so tests and benchmarks build checkpoints of every supported
family with ``transformers``' own config and model classes (random weights, fixed seed) and
the family's own tokenizer and image-processor classes, built from a local vocabulary.
Real checkpoints (``openai/clip-vit-base-patch16``, ``google/siglip-base-patch16-224``, ...)
have exactly this layout.
"""

from __future__ import annotations

import os

from ray_jobs.demo.checkpoint import WORDS

_CHARS = sorted(set("".join(WORDS)) | set("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()"))


def _clip_tokenizer(model_max_length: int):
    """A real ``CLIPTokenizer`` (byte-level BPE, ``</w>`` word ends) over a small merge table."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab: dict[str, int] = {}
    for tok in ("<|startoftext|>", "<|endoftext|>"):
        vocab[tok] = len(vocab)
    for ch in bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted(set(WORDS)):
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            merged = symbols[0] + symbols[1]
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(merged, len(vocab))
            symbols = [merged, *symbols[2:]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _wordpiece_tokenizer(specials: dict[str, str], model_max_length: int, cls_class=None):
    """A WordPiece tokenizer (``[CLS] text [SEP]``-style template) with the given special tokens.

    *specials* maps role (pad, unk, cls, sep, mask, bos, eos) to the token; vocab ids follow
    the order of *specials*, so the pad id matches the model config."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = [*specials.values(), *sorted(set(WORDS)), *_CHARS, *(f"##{c}" for c in _CHARS)]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=specials["unk"]))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    first, last = specials.get("cls", specials.get("bos")), specials.get("sep", specials.get("eos"))
    template = " ".join(t for t in (first, "$A", last) if t)
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in (first, last) if t]
    )
    kwargs = {f"{role}_token": token for role, token in specials.items()}
    cls = cls_class or PreTrainedTokenizerFast
    return cls(tokenizer_object=tok, model_max_length=model_max_length, **kwargs)


_BERT_SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
_ROBERTA_SPECIALS = {"bos": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>"}
_SIGLIP_SPECIALS = {"pad": "<pad>", "eos": "</s>", "unk": "<unk>"}


def _clip_processor(size: int, crop: int):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop})


def _save(out_dir: str, model, tokenizer, image_processor) -> str:
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    return out_dir


_TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32)
_TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)

#: CLIP presets: "tiny" for tests, "vit-b-16" sized like openai/clip-vit-base-patch16 (random weights).
CLIP_PRESETS = {
    "tiny": dict(
        text=dict(_TINY_TEXT, max_position_embeddings=77),
        vision=dict(_TINY_VISION, patch_size=8),
        projection_dim=16,
        image=(36, 32),  # shortest edge, crop
    ),
    "vit-b-16": dict(
        text=dict(
            hidden_size=512,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=8,
            max_position_embeddings=77,
        ),
        vision=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=16,
        ),
        projection_dim=512,
        image=(224, 224),
    ),
}


def build_clip(out_dir: str, *, seed: int = 0, preset: str = "tiny") -> str:
    """A ``CLIPModel`` checkpoint with a ``CLIPTokenizer`` and a CLIP image processor."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    spec = CLIP_PRESETS[preset]
    tokenizer = _clip_tokenizer(spec["text"]["max_position_embeddings"])
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    bos = tokenizer.convert_tokens_to_ids("<|startoftext|>")
    config = CLIPConfig(
        text_config=dict(spec["text"], vocab_size=len(tokenizer), eos_token_id=eos, bos_token_id=bos, pad_token_id=eos),
        vision_config=spec["vision"],
        projection_dim=spec["projection_dim"],
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    # saved the way a user saves CLIP: the whole processor (transformers 5 writes processor_config.json)
    CLIPProcessor(image_processor=_clip_processor(*spec["image"]), tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir


def _siglip_text_config(tokenizer) -> dict:
    """The tiny text tower of SigLIP and SigLIP 2: max-length padding, last-token pooling, no BOS."""
    return dict(
        _TINY_TEXT,
        vocab_size=len(tokenizer),
        max_position_embeddings=16,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


def build_siglip(out_dir: str, *, seed: int = 0) -> str:
    """A ``SiglipModel`` checkpoint. Stand-in tokenizer: a WordPiece one with SigLIP's special tokens
    (the real one is SentencePiece); the model pads to max length and pools the last token as SigLIP does."""
    import torch
    from transformers import SiglipConfig, SiglipModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tokenizer = _wordpiece_tokenizer(_SIGLIP_SPECIALS, 16)
    config = SiglipConfig(
        text_config=_siglip_text_config(tokenizer),
        vision_config=dict(_TINY_VISION, patch_size=8),
    )
    torch.manual_seed(seed)
    processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    return _save(out_dir, SiglipModel(config), tokenizer, processor)


def build_siglip2(out_dir: str, *, seed: int = 0) -> str:
    """A ``Siglip2Model`` checkpoint with its NaFlex image processor (aspect ratio kept, at most 24 patches,
    on a 4 x 4 grid of position embeddings). Stand-in tokenizer: a WordPiece one (the real one is Gemma's)."""
    import torch
    from transformers import Siglip2Config, Siglip2Model
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    tokenizer = _wordpiece_tokenizer(_SIGLIP_SPECIALS, 16)
    vision = {k: v for k, v in _TINY_VISION.items() if k != "image_size"}
    config = Siglip2Config(
        text_config=_siglip_text_config(tokenizer),
        vision_config=dict(vision, patch_size=8, num_patches=16),
    )
    torch.manual_seed(seed)
    processor = Siglip2ImageProcessorPil(patch_size=8, max_num_patches=24, do_convert_rgb=True)
    return _save(out_dir, Siglip2Model(config), tokenizer, processor)


def build_chinese_clip(out_dir: str, *, seed: int = 0) -> str:
    """A ``ChineseCLIPModel`` checkpoint with a BERT WordPiece tokenizer and its image processor."""
    import torch
    from transformers import BertTokenizer, ChineseCLIPConfig, ChineseCLIPModel
    from transformers.models.chinese_clip.image_processing_pil_chinese_clip import ChineseCLIPImageProcessorPil

    tokenizer = _wordpiece_tokenizer(_BERT_SPECIALS, 52, cls_class=BertTokenizer)
    config = ChineseCLIPConfig(
        text_config=dict(_TINY_TEXT, vocab_size=len(tokenizer), max_position_embeddings=64, pad_token_id=0),
        vision_config=dict(_TINY_VISION, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    processor = ChineseCLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    return _save(out_dir, ChineseCLIPModel(config), tokenizer, processor)


#: VisionTextDualEncoder variants: (text model_type, vision model_type)
DUAL_VARIANTS = {
    "bert-vit": ("bert", "vit"),
    "albert-clip": ("albert", "clip_vision_model"),
    "roberta-siglip": ("roberta", "siglip_vision_model"),
    "xlm-roberta-vit": ("xlm-roberta", "vit"),
}


def build_dual_encoder(out_dir: str, *, variant: str = "bert-vit", seed: int = 0) -> str:
    """A ``VisionTextDualEncoderModel`` (text encoder + vision encoder + projections)."""
    import torch
    from transformers import AutoConfig, VisionTextDualEncoderConfig, VisionTextDualEncoderModel
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    text_type, vision_type = DUAL_VARIANTS[variant]
    roberta = text_type in ("roberta", "xlm-roberta")
    tokenizer = _wordpiece_tokenizer(_ROBERTA_SPECIALS if roberta else _BERT_SPECIALS, 40)
    text_kwargs = dict(_TINY_TEXT, vocab_size=len(tokenizer), max_position_embeddings=64)
    if roberta:
        text_kwargs.update(pad_token_id=tokenizer.pad_token_id, max_position_embeddings=66)
    if text_type == "albert":
        text_kwargs.update(embedding_size=16, num_hidden_groups=1)
    text_cfg = AutoConfig.for_model(text_type, **text_kwargs)
    vision_cfg = AutoConfig.for_model(vision_type, **dict(_TINY_VISION, patch_size=8))
    config = VisionTextDualEncoderConfig.from_vision_text_configs(vision_cfg, text_cfg, projection_dim=16)
    torch.manual_seed(seed)
    model = VisionTextDualEncoderModel(config)
    if vision_type == "clip_vision_model":
        processor = _clip_processor(35, 32)
    else:
        processor = ViTImageProcessorPil(size={"height": 32, "width": 32}, resample=3, do_convert_rgb=True)
    return _save(out_dir, model, tokenizer, processor)


BUILDERS = {
    "clip": build_clip,
    "siglip": build_siglip,
    "siglip2": build_siglip2,
    "chinese_clip": build_chinese_clip,
    **{f"dual-{v}": (lambda out, v=v, **kw: build_dual_encoder(out, variant=v, **kw)) for v in DUAL_VARIANTS},
}
