"""Names shared across the package (kept compatible with LLaVA's own ``llava.constants``)."""

IGNORE_INDEX = -100
# LLaVA's in-text placeholder id for "an image goes here" (one per image, expanded later).
IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"
# Tokens of LLaVA-1.0's prompt format (--mm_use_im_start_end), kept so LLaVA scripts import;
# this toolkit uses the LLaVA-1.5 format and does not add them to the vocabulary.
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
IMAGE_PLACEHOLDER = "<image-placeholder>"
PAD_TOKEN = "<pad>"

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --dtype of the commands that load a model (infer, alt_text, convert, merge). auto is each one's
# default: float16 on a GPU and float32 on the CPU for inference (as released); as stored for convert and merge.
DTYPES = ("auto", "float32", "bfloat16", "float16")
