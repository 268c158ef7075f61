"""LLaVA-1.5 (`llava`): one CLIP tile per image, its features in a flat row."""

from .base import CLIP_L14_336, Family

FAMILY = Family(
    model_type="llava",
    display_name="LLaVA-1.5",
    architecture="LlavaForConditionalGeneration",
    processor_class="LlavaProcessor",
    image_processor_type="LlavaImageProcessor",  # CLIP's, plus the original `pad` to a square
    media=("image",),
    packing="flat",
    video_packing=None,
    default_text_model_type="llama",
    default_vision_config=CLIP_L14_336,
    default_vision_feature_layer=-2,
    default_select_strategy="default",
    default_image_token_id=32000,
    forwards_text_tie=True,
    original_aspect="pad|square|resize",
    mm_patch_merge_type="flat",
)
