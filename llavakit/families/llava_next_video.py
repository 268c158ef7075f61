"""LLaVA-NeXT-Video (`llava_next_video`): LLaVA-NeXT's any-res images, plus videos whose frames are
pooled spatially (`spatial_pool_mode` average / max / conv, `spatial_pool_stride`) before the projector."""

from .base import CLIP_L14_336, Family
from .llava_next import PINPOINTS

FAMILY = Family(
    model_type="llava_next_video",
    display_name="LLaVA-NeXT-Video",
    architecture="LlavaNextVideoForConditionalGeneration",
    processor_class="LlavaNextVideoProcessor",
    image_processor_type="LlavaNextImageProcessor",
    media=("image", "video"),
    packing="anyres_unpad",
    video_packing="pool_stride",
    default_text_model_type="llama",
    default_vision_config=CLIP_L14_336,
    default_vision_feature_layer=-2,
    default_select_strategy="default",
    default_image_token_id=32001,
    default_video_token_id=32000,
    default_pinpoints=PINPOINTS,
    forwards_text_tie=True,  # LlavaNextVideoConfig forwards a tied text config
    video_processor_type="LlavaNextVideoVideoProcessor",
    untiled_view="squash",
    chat_template="llava_next_video",  # for checkpoints without one: the published template
)
