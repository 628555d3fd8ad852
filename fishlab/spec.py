"""Constants of the S2 Pro specification (../shared/spec), in one place.

Everything here is a fact of the model or its file formats, not a tunable. Sizes of the model are never
typed in: they follow from a config (see `fishlab.config` and `fishlab.manifest`).
"""

# --- checkpoint files (spec s2pro-model.md §3.1, s2pro-codec.md §8) ---
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CODEC_FILE = "codec.pth"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
QUANT_FILE = "quantization.json"  # fishlab's readable description of a quantized checkpoint

MODEL_TYPE = "fish_qwen3_omni"
TEXT_MODEL_TYPE = "fish_qwen3"
AUDIO_DECODER_MODEL_TYPE = "fish_qwen3_audio_decoder"
# fishlab's own config.json type for a plain text LM of the slow-AR family (the trained proxy model)
TEXT_LM_MODEL_TYPE = "fishlab_text_lm"

# HF -> internal name rule (spec §3.2)
HF_TEXT_PREFIX = "text_model.model."
HF_AUDIO_PREFIX = "audio_decoder."
HF_CODEBOOK_EMB = "audio_decoder.codebook_embeddings."

# Codec buffers that the real codec.pth carries but no module consumes (codec spec §8.1).
CODEC_STALE_BUFFER_SUFFIXES = ("freqs_cis", "causal_mask")

# --- generation (spec §8, §10) ---
RAS_WINDOW = 10
RAS_HIGH_TEMPERATURE = 1.0
RAS_HIGH_TOP_P = 0.9
DEFAULT_TOP_K = 30
API_TEMPERATURE = 0.8
API_TOP_P = 0.8
API_MAX_NEW_TOKENS = 1024
API_CHUNK_LENGTH = 200

# --- prompt format (spec §9) ---
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VOICE = "<|voice|>"
SYSTEM_TTS = "convert the provided text to speech"
SYSTEM_CLONE = "convert the provided text to speech reference to the following:\n\nText:\n"
CLONE_SPEECH_HEADER = "\n\nSpeech:\n"

# --- dtypes: bytes per element of the dtype names used in checkpoints ---
DTYPE_BYTES = {
    "float64": 8, "float32": 4, "bfloat16": 2, "float16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1,
    "bool": 1,
}
# safetensors header dtype codes <-> our names
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}

# Narration text of the plan, used for reference/clone samples.
NARRATION = ("Good morning. I want to tell you something about the universe. Every atom in your body came "
             "from a star that exploded. We are all made of star stuff.")

# --- the single-file GGUF that s2.cpp loads (spec gguf-s2cpp.md) ---
GGUF_ARCH = "fish-speech"                 # general.architecture; arch-scoped keys use it with a hyphen
GGUF_S2_NS = "fish_speech"                # S2-specific keys use an underscore namespace
GGUF_CODEC_TENSOR_PREFIX = "c."           # codec tensors: c.encoder.* / c.decoder.* / c.quantizer.*
GGUF_CODEC_QUANTIZER_TYPE = "downsample_residual_vector_quantize"
# built but unused in the reference (codec spec §7: no weights); s2.cpp's header still states it
GGUF_CODEC_DECODER_TRANSFORMER_LAYERS = (4, 0, 0, 0)
GGUF_CODEC_TRANSFORMER_BLOCK_SIZE = 8192  # codec.transformer.block_size (the encoder stage transformers)
GGUF_CODEC_RVQ_BLOCK_SIZE = 2048          # codec.rvq_transformer.block_size (pre/post module)
GGUF_CODEC_N_LOCAL_HEADS = -1             # "same as n_head", written as i32

# --- the hub (the base model's own card: license other + name + link) ---
HUB_BASE_MODEL = "fishaudio/s2-pro"
HUB_LICENSE_TITLE = "Fish Audio Research License"
HUB_LICENSE_NAME = "fish-audio-research-license"
HUB_LICENSE_LINK = "https://huggingface.co/fishaudio/s2-pro/blob/main/LICENSE.md"
