import pytest
import sentencepiece as spm
import torch

from k4flash.text_encoder import T5TextEncoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EOS, PAD, UNK = 1, 0, 2
LONG_PROMPT = " ".join(["a red panda walks through the snowy forest"] * 40)  # ≈ 320 tokens


@pytest.fixture(scope="module")
def encoder(tiny_weights):
    return T5TextEncoder(tiny_weights / "text_encoder", tiny_weights / "tokenizer")


def test_embedding_shape_dtype_and_width(encoder):
    embeds = encoder(["A red panda eats bamboo in a snowy forest."])
    assert embeds.shape == (1, 224, 32) and embeds.dtype == torch.float32
    assert encoder.d_model == 32
    assert torch.isfinite(embeds).all()


def test_tokens_are_eos_terminated_and_right_padded(encoder):
    ids = encoder.tokenize(["a cat on the moon"])
    assert ids.shape == (1, 224)
    num_tokens = encoder.token_count("a cat on the moon")
    assert num_tokens == 6  # 5 whole-word pieces + EOS
    assert ids[0, num_tokens - 1] == EOS
    assert (ids[0, :num_tokens - 1] > UNK).all() and (ids[0, num_tokens:] == PAD).all()


def test_padding_is_not_masked(encoder):
    """docs/model.md "Text conditioning": the encoder runs without an attention mask, so padding changes every position."""
    prompt = ["a cat on the moon"]
    embeds = encoder(prompt)
    ids = encoder.tokenize(prompt)
    masked = encoder.encoder(input_ids=ids, attention_mask=(ids != PAD).long()).last_hidden_state
    unmasked = encoder.encoder(input_ids=ids).last_hidden_state
    assert torch.equal(embeds, unmasked)
    num_tokens = encoder.token_count(prompt[0])
    assert (embeds[:, :num_tokens] - masked[:, :num_tokens]).abs().max() > 1e-3
    # Padding positions are real outputs (not zeros), and they are all passed on.
    assert embeds[0, num_tokens:].abs().sum(dim=-1).min() > 0


def test_batch_rows_match_single_prompts(encoder):
    prompts = ["a dog runs on the beach at sunset", "Ünïcödé 日本語 🎉"]
    batch = encoder(prompts)
    assert batch.shape == (2, 224, 32)
    for row, prompt in zip(batch, prompts):
        torch.testing.assert_close(row[None], encoder([prompt]), rtol=1e-5, atol=1e-5)
    assert torch.equal(encoder("a dog runs on the beach at sunset"), encoder([prompts[0]]))


def test_long_prompt_is_truncated_to_224_with_eos(encoder):
    assert encoder.token_count(LONG_PROMPT) > 224
    ids = encoder.tokenize([LONG_PROMPT])
    assert ids.shape == (1, 224)
    assert (ids[0] != PAD).all() and ids[0, -1] == EOS
    assert encoder([LONG_PROMPT]).shape == (1, 224, 32)


def test_unknown_characters_become_unk_without_crashing(encoder):
    ids = encoder.tokenize(["日本語 🎉 \x00 \u200b café"])
    assert (ids == UNK).any()
    assert encoder([""]).shape == (1, 224, 32)
    assert encoder.token_count("") == 1  # just EOS


def test_tokenizer_matches_sentencepiece_and_fits_the_vocab(encoder, tiny_weights):
    """The fast tokenizer transformers builds from spiece.model must tokenise exactly like sentencepiece."""
    tokenizer = encoder.tokenizer
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id) == (EOS, PAD, UNK)
    assert len(tokenizer) <= encoder.encoder.config.vocab_size
    processor = spm.SentencePieceProcessor(model_file=str(tiny_weights / "tokenizer" / "spiece.model"))
    for prompt in ["The Astronaut rides a horse on the Moon, cinematic 4K.", "  extra   spaces\tand\nnewlines ",
                   "ｆｕｌｌｗｉｄｔｈ ﬁsh", "Ünïcödé 日本語 🎉 café", LONG_PROMPT]:
        assert tokenizer(prompt)["input_ids"] == processor.encode(prompt) + [EOS], prompt


def test_bfloat16_encoder(tiny_weights):
    encoder = T5TextEncoder(tiny_weights / "text_encoder", tiny_weights / "tokenizer", dtype=torch.bfloat16)
    assert encoder.encoder.dtype == torch.bfloat16
    embed = encoder(["a cat"])
    assert embed.dtype == torch.bfloat16
    # The same embedding as float32's, to bf16's precision (~3 significant digits), not just the same shape.
    full = T5TextEncoder(tiny_weights / "text_encoder", tiny_weights / "tokenizer")(["a cat"])
    assert full.abs().max() > 0.1
    torch.testing.assert_close(embed.float(), full, rtol=0.05, atol=0.05 * full.abs().max().item())


def test_custom_max_length(tiny_weights):
    encoder = T5TextEncoder(tiny_weights / "text_encoder", tiny_weights / "tokenizer", max_length=16)
    assert encoder(["a cat"]).shape == (1, 16, 32)


@pytest.mark.parametrize("max_length", [0, -3, 2.5])
def test_rejects_bad_max_length(tiny_weights, max_length):
    with pytest.raises(ValueError, match="max_length"):
        T5TextEncoder(tiny_weights / "text_encoder", tiny_weights / "tokenizer", max_length=max_length)


def test_rejects_bad_prompts(encoder):
    with pytest.raises(TypeError, match="prompts"):
        encoder([])
    with pytest.raises(TypeError, match="prompts"):
        encoder([1, 2])
    with pytest.raises(TypeError, match="prompt"):
        encoder.token_count(["a"])


def _storage_ptr(t):
    return t.untyped_storage().data_ptr()


def test_pack_parameters_makes_each_parameter_a_view_of_one_buffer(tiny_weights):
    from k4flash.host_memory import PACK_ALIGN, pack_parameters

    host = T5TextEncoder(tiny_weights / "text_encoder", tiny_weights / "tokenizer", offload="cpu")
    params = list(host.encoder.parameters())
    before = [p.detach().clone() for p in params]
    expected = host(["a red square"])
    allocations = []
    flat = pack_parameters(params, lambda n: allocations.append(n) or torch.empty(n, dtype=torch.uint8))
    assert len(allocations) == 1 and allocations[0] == flat.numel()
    # Exactly the parameters' bytes, each rounded up to the alignment: no power-of-two rounding.
    assert flat.numel() == sum(-(-p.numel() * p.element_size() // PACK_ALIGN) * PACK_ALIGN for p in params)
    assert {_storage_ptr(p) for p in params} == {_storage_ptr(flat)}
    assert all(torch.equal(p, b) and p.dtype == b.dtype and p.shape == b.shape for p, b in zip(params, before))
    assert torch.equal(host(["a red square"]), expected)


def test_block_streamer_pins_one_buffer_not_each_tensor(tiny_weights, monkeypatch):
    """On a GPU the streamer pins T5 as one buffer: per-tensor pin_memory() rounds each tensor up to a power of
    two in torch's caching host allocator. A stand-in for the pinned allocator lets it run here."""
    import k4flash.text_encoder as text_encoder
    from k4flash.text_encoder import BlockStreamer

    resident = T5TextEncoder(tiny_weights / "text_encoder", tiny_weights / "tokenizer")
    host = T5TextEncoder(tiny_weights / "text_encoder", tiny_weights / "tokenizer", offload="cpu")
    per_tensor, buffers = [], []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: per_tensor.append(self.shape) or self)
    monkeypatch.setattr(text_encoder, "pinned_host_bytes",
                        lambda n, owner: buffers.append(owner) or torch.empty(n, dtype=torch.uint8), raising=False)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: None)  # no CUDA here; the streams are not used
    streamer = BlockStreamer(host.encoder, "cuda")
    assert per_tensor == [] and buffers == [streamer]
    host_tensors = [t for stage in streamer.host for t in stage]
    assert {_storage_ptr(t) for t in host_tensors} == {_storage_ptr(streamer.host_buffer)}
    # The same embedding from the packed weights, streamed stage by stage (to the CPU here).
    host.streamer = BlockStreamer(host.encoder, "cpu", host_allocator=lambda n: torch.empty(n, dtype=torch.uint8))
    prompts = ["a red square", "two blue circles"]
    assert torch.equal(host(prompts), resident(prompts))
