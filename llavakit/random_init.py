"""Complete checkpoint folders with random weights, written by llavakit alone.

They have the Hugging Face layout (config.json, safetensors, tokenizer.json, processor files,
chat template), so both llavakit and transformers load them. Used for the quick-start demo
and for tests of the command line; real architectures for benchmarks build on the same code.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from .config import LlavaConfig
from .errors import ConfigError
from .processing.prompt import DEFAULT_TEMPLATES
from .weights import save_weights

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
_CORPUS = (
    "USER: ASSISTANT: What is in the picture? Describe the image. The picture shows a cat, a dog, a red "
    "ball, a blue sky, green trees, a small house and two people walking on the beach at sunset. "
    "There is a bright yellow sun above the sea and white clouds in the sky."
)

# name -> (text config, vision config) in transformers' spelling.
PRESETS = {
    "tiny": (
        dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    ),
}


def _tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on a few sentences; `<s>` prepended like Llama's.

    Its alphabet is printable ASCII only, so whatever a random model samples decodes to readable
    text (characters outside it are dropped on input).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator([_CORPUS] * 8 + [string.printable], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


def make_random_checkpoint(out: Path, preset: str = "tiny", layers: int | None = None, seed: int = 0,
                           dtype: torch.dtype = torch.float32) -> Path:
    """Write a checkpoint of `preset`'s architecture with random weights to `out`; return `out`."""
    from .model.llava import LlavaModel

    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; available presets: {', '.join(PRESETS)}.")
    text, vision = (dict(d) for d in PRESETS[preset])
    if layers is not None:
        text["num_hidden_layers"] = layers
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(vocab_size=400)
    image_id = tok.token_to_id("<image>")
    text.update(vocab_size=tok.get_vocab_size(), bos_token_id=1, eos_token_id=2, pad_token_id=3)
    config = {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "dtype": str(dtype)[6:],
        "image_token_index": image_id, "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "tie_word_embeddings": False,
        "text_config": text, "vision_config": vision,
    }
    cfg = LlavaConfig.from_hf(config)
    torch.manual_seed(seed)
    model = LlavaModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name:  # RMSNorm / LayerNorm scales
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    save_weights(model.to(dtype), out)
    tok.save(str(out / "tokenizer.json"))
    _write(out / "config.json", config)
    _write(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3})
    _write(out / "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                           "pad_token": "<pad>", "padding_side": "left",
                                           "tokenizer_class": "PreTrainedTokenizerFast"})
    side = vision["image_size"]
    _write(out / "preprocessor_config.json", {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": side},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": side, "width": side}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD,
        "do_convert_rgb": True,
    })
    _write(out / "processor_config.json", {
        "processor_class": "LlavaProcessor", "image_token": "<image>", "patch_size": vision["patch_size"],
        "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1,
    })
    _write(out / "chat_template.json", {"chat_template": DEFAULT_TEMPLATES[text["model_type"]]})
    return out


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
