"""What the published Kandinsky 4.0 T2V Flash fixes, each defined once (docs/model.md).

Plain values, no torch: the library, the app's config schema and the cost model all read
them from here, and importing this module costs nothing.
"""

# docs/model.md "DiT hyper-parameters": the constructor arguments of the published DiT.
PUBLISHED_DIT_PARAMS = dict(
    in_visual_dim=16, in_text_dim=4096, out_visual_dim=16, time_dim=512, patch_size=(1, 2, 2),
    model_dim=3072, ff_dim=12288, num_blocks=21, axes_dims=(16, 24, 24),
)
# docs/model.md "State-dict keys": rows of each rope_embeddings.args_{i} table, i.e. the most
# positions per axis (frames, rows, columns) the RoPE covers.
ROPE_MAX_POSITIONS = 128
# docs/model.md "Text conditioning": every prompt becomes exactly this many T5 tokens.
TEXT_TOKENS = 224
# docs/model.md "Sampler": denoising steps of the distilled sampler.
NUM_STEPS = 4
# docs/model.md "Video geometry": the headline video, 12 s at 672×384 (width × height).
DEFAULT_TIME_LENGTH, DEFAULT_WIDTH, DEFAULT_HEIGHT = 12, 672, 384

# docs/model.md "Weights layout": file names and where the files are published.
DIT_FILENAME = "kandinsky4_distil_512.pt"
DIT_REPO = "ai-forever/kandinsky-4-t2v-flash"
COMPONENTS_REPO = "THUDM/CogVideoX-5b"
