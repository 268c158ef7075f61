"""LLaVA-OneVision (`llava_onevision`): NeXT's tiles capped at anyres_max_N, SigLIP + Qwen2, and video."""

from .base import Family

# LlavaOnevisionConfig's tower: SigLIP-so400m without its last layer.
SIGLIP_SO400M_MINUS_ONE = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                               num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14)
# LlavaOnevisionConfig's 36 pinpoints (h, w): every grid up to 6x6 tiles of 384 px.
PINPOINTS = tuple((h, w) for h in range(384, 2305, 384) for w in range(384, 2305, 384))

FAMILY = Family(
    model_type="llava_onevision",
    display_name="LLaVA-OneVision",
    architecture="LlavaOnevisionForConditionalGeneration",
    processor_class="LlavaOnevisionProcessor",
    image_processor_type="LlavaOnevisionImageProcessor",
    media=("image", "video"),
    packing="anyres_unpad_max_tiles",
    video_packing="pool_bilinear_newline",
    default_text_model_type="qwen2",
    default_vision_config=SIGLIP_SO400M_MINUS_ONE,
    default_vision_feature_layer=-1,
    default_select_strategy="full",
    default_image_token_id=151646,
    default_video_token_id=151647,
    default_pinpoints=PINPOINTS,
    default_vision_aspect_ratio="anyres_max_9",
    forwards_text_tie=True,
    original_aspect=r"anyres_max_\d+",
    mm_patch_merge_type="spatial_unpad",
    video_processor_type="LlavaOnevisionVideoProcessor",
)
