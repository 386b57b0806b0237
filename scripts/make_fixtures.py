"""The tiny reference models of fixtures/families/ (run through scripts/make-fixtures).

For each family: a byte-level BPE tokenizer trained on a fixed text (512 tokens; GPT-2's
pre-tokenizer, so its GGUF says tokenizer.ggml.pre = "gpt-2"), a model of the family's
transformers class with a few small layers and seeded random weights (biases and norm weights
randomised too, so that they matter), saved as safetensors; llama.cpp's convert_hf_to_gguf.py
turns the directory into model-f32.gguf; transformers' f32 logits on fixed token ids
(teacher-forced) are the golden, `logits.f32` (little-endian, tokens × vocab) beside `ids.json`.
llama.cpp's `llama-quantize` writes Q8_0 and Q4_K_M copies, and llama.cpp's logits on the same
ids from each GGUF (`llama-logits`, scripts/llama_logits.cpp) are `llamacpp-<type>.f32`.
Everything is seeded: a second run writes the same bytes.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import PreTrainedTokenizerFast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fixtures", "families")
VOCAB = 512
TOKENS = 40
SEED = 1234

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
              bos_token_id=0, eos_token_id=0, initializer_range=0.1)


MOE = dict(num_experts_per_tok=2)


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(**COMMON))


def llama3():
    # Llama 3's frequency-dependent RoPE scaling (a rope_freqs tensor in GGUF), with a short
    # original context so that the 16-wide heads have pairs in all three bands.
    from transformers import LlamaConfig, LlamaForCausalLM
    scaling = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
    config = dict(COMMON, rope_theta=500000.0)
    return LlamaForCausalLM(LlamaConfig(**config, rope_scaling=scaling))


def mistral():
    # No sliding window: llama.cpp's converter then writes it as plain llama (the notes).
    from transformers import MistralConfig, MistralForCausalLM
    return MistralForCausalLM(MistralConfig(**COMMON, sliding_window=None))


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Qwen2ForCausalLM(Qwen2Config(**COMMON, use_sliding_window=False))


def qwen2_yarn():
    # YaRN, as Qwen2.5 and Qwen3 enable it for long contexts: factor 4 over an original context
    # of 64 tokens, so the 16-wide heads have pairs kept, interpolated, and ramped between.
    from transformers import Qwen2Config, Qwen2ForCausalLM
    scaling = dict(type="yarn", factor=4.0, original_max_position_embeddings=64)
    return Qwen2ForCausalLM(Qwen2Config(**COMMON, use_sliding_window=False, rope_scaling=scaling))


def qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM
    return Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=16, use_sliding_window=False))


def olmo2():
    from transformers import Olmo2Config, Olmo2ForCausalLM
    return Olmo2ForCausalLM(Olmo2Config(**COMMON))


def mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM
    config = dict(COMMON, intermediate_size=64)
    return MixtralForCausalLM(MixtralConfig(**config, **MOE, num_local_experts=4, sliding_window=None))


def qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(**COMMON, **MOE, num_experts=4, moe_intermediate_size=64,
                                              shared_expert_intermediate_size=96, decoder_sparse_step=1,
                                              mlp_only_layers=[], use_sliding_window=False))


def qwen3_moe():
    # Top-k weights renormalised, as in the released Qwen3-MoE models (and llama.cpp's qwen3moe).
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**COMMON, **MOE, num_experts=4, moe_intermediate_size=64,
                                              head_dim=16, decoder_sparse_step=1, mlp_only_layers=[],
                                              use_sliding_window=False, norm_topk_prob=True))


def phi3():
    # Written with a GPT-2 tokenizer, as Phi-4 is (the converter then needs no tokenizer.model).
    from transformers import Phi3Config, Phi3ForCausalLM
    return Phi3ForCausalLM(Phi3Config(**COMMON, pad_token_id=0))


def phi3_longrope():
    # Phi-3's LongRoPE (the 128k models, Phi-3.5): per-frequency factors, the short ones within
    # the original context and the long ones beyond it, with cos and sin scaled by
    # sqrt(1 + ln(s) / ln(original)). The 40 fixture tokens stay within the 64-token original
    # context, where transformers and llama.cpp (whose n_ctx is the 40 tokens) both take the
    # short factors.
    from transformers import Phi3Config, Phi3ForCausalLM
    scaling = dict(type="longrope", short_factor=[1.0, 1.02, 1.05, 1.1, 1.3, 1.7, 2.2, 3.0],
                   long_factor=[1.0, 1.1, 1.4, 2.0, 3.5, 6.0, 9.0, 12.0])
    return Phi3ForCausalLM(Phi3Config(**COMMON, pad_token_id=0, rope_scaling=scaling,
                                      original_max_position_embeddings=64))


def gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM
    # Tied head, as every Gemma 2 is: llama.cpp's converter drops an lm_head for this family.
    config = dict(COMMON, bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True)
    # Eager attention: transformers' SDPA path leaves out the attention soft-cap.
    return Gemma2ForCausalLM(Gemma2Config(**config, head_dim=16, sliding_window=8,
                                          query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
                                          final_logit_softcapping=30.0,
                                          hidden_activation="gelu_pytorch_tanh",
                                          attn_implementation="eager"))


def olmoe():
    # llama.cpp expects OLMoE's key norm at full width: as many key/value heads as heads.
    from transformers import OlmoeConfig, OlmoeForCausalLM
    config = dict(COMMON, num_key_value_heads=4, intermediate_size=64)
    return OlmoeForCausalLM(OlmoeConfig(**config, **MOE, num_experts=4))


FAMILIES = {f.__name__: f for f in (llama, llama3, mistral, qwen2, qwen2_yarn, qwen3, olmo2, phi3, phi3_longrope, gemma2,
                                     mixtral, qwen2_moe, qwen3_moe, olmoe)}
# Families whose converter reads a SentencePiece model (Gemma-style: no dummy prefix).
SENTENCEPIECE = {"gemma2"}


def corpus():
    # A committed snapshot of the project's docs, so that the tokenizers (and with them every
    # fixture) do not change when the docs do.
    with open(os.path.join(OUT, "corpus.txt"), encoding="utf-8") as f:
        return [f.read()]


def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token=None)


def sentencepiece_tokenizer(directory):
    """A SentencePiece BPE model with Gemma's special pieces, and transformers' tokenizer over it."""
    import sentencepiece as spm
    from transformers import GemmaTokenizer
    # The model records its trainer's input and output paths: relative ones, for the same bytes.
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        with open("corpus.txt", "w", encoding="utf-8") as f:
            f.write("\n".join(corpus()))
        spm.SentencePieceTrainer.train(
            input="corpus.txt", model_prefix="sp", vocab_size=VOCAB, model_type="bpe",
            byte_fallback=True, add_dummy_prefix=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
            num_threads=1, seed_sentencepiece_size=100000, shuffle_input_sentence=False,
            minloglevel=2)
        os.chdir(here)
        shutil.copy(os.path.join(tmp, "sp.model"), os.path.join(directory, "tokenizer.model"))
    GemmaTokenizer(os.path.join(directory, "tokenizer.model")).save_pretrained(directory)
    # And transformers' fast tokenizer.json converted from it, as Gemma's own directories have.
    from transformers import GemmaTokenizerFast
    GemmaTokenizerFast(vocab_file=os.path.join(directory, "tokenizer.model"),
                       from_slow=True).save_pretrained(directory)


def randomise_extras(model):
    """Biases and norm weights start at 0 and 1; make them random so the fixture tests them."""
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif "norm" in name:
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.1)


def convert(src, model_dir, out):
    """llama.cpp's converter, with the BPE pre-tokenizer named: a freshly trained tokenizer
    has no entry in its table of known tokenizations, and its pre-tokenizer is GPT-2's."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(1, sys.argv[1] + '/gguf-py');"
        "import conversion.base as b; b.TextModel.get_vocab_base_pre = lambda self, t: 'gpt-2';"
        "import convert_hf_to_gguf as c; sys.argv = ['convert', sys.argv[2], '--outfile', sys.argv[3],"
        " '--outtype', 'f32']; c.main()"
    )
    done = subprocess.run([sys.executable, "-c", code, src, model_dir, out], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"make-fixtures: convert_hf_to_gguf.py failed on {model_dir}:\n{done.stderr[-4000:]}")


# llama-quantize's types for the quantized copies. With rows of 64 and 128 values the k-quants
# of Q4_K_M cannot be used, and llama-quantize falls back as it does for any such model (Q5_0,
# Q5_1, Q8_0 per tensor): the copies are what a user of these shapes gets.
QUANTIZED = ("Q8_0", "Q4_K_M")


def llamacpp_goldens(out, bin_dir, ids):
    """Quantized copies of out/model-f32.gguf, and llama.cpp's logits on `ids` from each GGUF."""
    for qtype in QUANTIZED:
        done = subprocess.run([os.path.join(bin_dir, "llama-quantize"), os.path.join(out, "model-f32.gguf"),
                               os.path.join(out, f"model-{qtype.lower()}.gguf"), qtype],
                              capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"make-fixtures: llama-quantize {qtype} failed in {out}:\n{done.stderr[-4000:]}")
    for name in ("f32",) + tuple(q.lower() for q in QUANTIZED):
        done = subprocess.run([os.path.join(bin_dir, "llama-logits"), os.path.join(out, f"model-{name}.gguf"),
                               os.path.join(out, f"llamacpp-{name}.f32")] + [str(i) for i in ids],
                              capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"make-fixtures: llama-logits failed on {out}/model-{name}.gguf:\n{done.stderr[-4000:]}")


def make(family, src, bin_dir):
    torch.manual_seed(SEED)
    model = FAMILIES[family]().float().eval()
    randomise_extras(model)
    out = os.path.join(OUT, family)
    with tempfile.TemporaryDirectory() as tmp:
        hf = os.path.join(tmp, "hf")
        model.save_pretrained(hf, safe_serialization=True)
        if family in SENTENCEPIECE:
            sentencepiece_tokenizer(hf)
        else:
            tokenizer().save_pretrained(hf)
        if family.startswith("phi3"):
            path = os.path.join(hf, "tokenizer_config.json")
            with open(path) as f:
                config = json.load(f)
            config["tokenizer_class"] = "GPT2Tokenizer"
            with open(path, "w") as f:
                json.dump(config, f, indent=2)
        gguf = os.path.join(tmp, "model-f32.gguf")
        convert(src, hf, gguf)
        ids = [model.config.bos_token_id] + torch.randint(3, VOCAB, (TOKENS - 1,), generator=torch.Generator().manual_seed(SEED + 2)).tolist()
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float().numpy()
        if os.path.exists(out):
            shutil.rmtree(out)
        os.makedirs(out)
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer.model",
                     "tokenizer_config.json"):
            if os.path.exists(os.path.join(hf, name)):
                shutil.copy(os.path.join(hf, name), out)
        shutil.copy(gguf, out)
    with open(os.path.join(out, "ids.json"), "w") as f:
        json.dump({"ids": ids, "about": "token ids run teacher-forced; logits.f32 is transformers' "
                   "f32 output, tokens x vocab, little-endian"}, f)
        f.write("\n")
    logits.astype("<f4").tofile(os.path.join(out, "logits.f32"))
    llamacpp_goldens(out, bin_dir, ids)
    size = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))
    print(f"{family}: {out} ({size / 1e6:.2f} MB), logits range {logits.min():.3f}..{logits.max():.3f}",
          file=sys.stderr)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--llama-src", required=True)
    p.add_argument("--llama-bin", required=True, help="llama.cpp's bin directory: llama-quantize, llama-logits")
    p.add_argument("families", nargs="*", default=sorted(FAMILIES))
    a = p.parse_args()
    torch.use_deterministic_algorithms(True)
    for family in a.families:
        if family not in FAMILIES:
            sys.exit(f"make-fixtures: unknown family {family!r} (known: {', '.join(sorted(FAMILIES))})")
        make(family, a.llama_src, a.llama_bin)


if __name__ == "__main__":
    main()
