"""LLaVA-NeXT (`llava_next`, LLaVA-1.6): any-resolution tiles, unpadded, a newline per feature row."""

from .base import CLIP_L14_336, Family

# LlavaNextConfig's default pinpoints (h, w); every published NeXT checkpoint uses them.
PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

FAMILY = Family(
    model_type="llava_next",
    display_name="LLaVA-NeXT",
    architecture="LlavaNextForConditionalGeneration",
    processor_class="LlavaNextProcessor",
    image_processor_type="LlavaNextImageProcessor",
    media=("image",),
    packing="anyres_unpad",
    video_packing=None,
    default_text_model_type="llama",
    default_vision_config=CLIP_L14_336,
    default_vision_feature_layer=-2,
    default_select_strategy="default",
    default_image_token_id=32000,
    default_pinpoints=PINPOINTS,
    forwards_text_tie=False,  # LlavaNextConfig keeps its own tie_word_embeddings
    original_aspect="anyres",
    mm_patch_merge_type="spatial_unpad",
    untiled_view="squash",  # `detail: low`: the base view alone (the reference never makes a one-tile NeXT image)
)
