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


# The released inference script's settings: the llava_v1 prompt with its trailing newline, 3 beams, 256 new
# tokens, one padded view; the defaults of mcmdpo_inference.py and of every saved generation_config.json.
INFERENCE_DEFAULTS = dict(conv_mode="llava_v1", prompt_newline=True, batch_size=8, num_beams=3, temperature=0.0,
                          max_new_tokens=256, image_aspect_ratio="pad")

# --dtype of the commands that load a model (infer, alt_text, convert, merge). auto is each one's default:
# for inference bfloat16 on a GPU that has it, float32 on the CPU (float16, the released script's, when asked);
# as stored for convert and merge.
DTYPES = ("auto", "float32", "bfloat16", "float16")
