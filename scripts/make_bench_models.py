"""Random-weight GGUFs at the real shapes of models this machine cannot download (issue 17's
speed goal): the weights are seeded noise, the tokenizer is the qwen2 fixture's BPE padded to the
real vocabulary, everything else (shapes, hyper-parameters, tensor names) is the real model's.
Writes F16 GGUFs; scripts/make-bench-models quantizes them with llama-quantize.

    python scripts/make_bench_models.py --llama-src DIR --out DIR [NAME ...]
"""
import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name → (architecture, hyper-parameters)
SHAPES = {
    "qwen2.5-0.5b": ("qwen2", dict(layers=24, d=896, heads=14, kv=2, ff=4864, vocab=151936,
                                   theta=1e6, eps=1e-6, ctx=32768, bias=True)),
    "llama3.2-1b": ("llama", dict(layers=16, d=2048, heads=32, kv=8, ff=8192, vocab=128256,
                                  theta=5e5, eps=1e-5, ctx=131072, bias=False)),
    # A Mixtral-style mixture (GGUF `llama` with experts): 8 experts, top-2, 1.1 B parameters.
    "moe-8x-1b": ("llama", dict(layers=16, d=1024, heads=16, kv=4, ff=2560, vocab=32000,
                                theta=1e4, eps=1e-5, ctx=32768, bias=False, experts=8)),
}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--llama-src", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("names", nargs="*", default=list(SHAPES))
    a = p.parse_args()
    sys.path.insert(0, os.path.join(a.llama_src, "gguf-py"))
    import gguf

    tok = json.load(open(os.path.join(ROOT, "fixtures/families/qwen2/tokenizer.json"), encoding="utf-8"))
    vocab = {i: t for t, i in tok["model"]["vocab"].items()}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    os.makedirs(a.out, exist_ok=True)
    for name in a.names:
        arch, h = SHAPES[name]
        rng = np.random.default_rng(1234)
        path = os.path.join(a.out, f"{name}-f16.gguf")
        w = gguf.GGUFWriter(path, arch)
        w.add_name(f"{name} (random weights)")
        w.add_block_count(h["layers"])
        w.add_context_length(h["ctx"])
        w.add_embedding_length(h["d"])
        w.add_feed_forward_length(h["ff"])
        w.add_head_count(h["heads"])
        w.add_head_count_kv(h["kv"])
        w.add_rope_freq_base(h["theta"])
        w.add_layer_norm_rms_eps(h["eps"])
        w.add_vocab_size(h["vocab"])
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        tokens = [vocab.get(i, f"[PAD{i}]") for i in range(h["vocab"])]
        types = [gguf.TokenType.CONTROL if i == 0 else
                 (gguf.TokenType.NORMAL if i in vocab else gguf.TokenType.UNUSED) for i in range(h["vocab"])]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "llama-bpe")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(0)
        w.add_eos_token_id(0)
        w.add_add_bos_token(False)

        def tensor(tname, *shape, scale=0.02, dtype=np.float16):
            w.add_tensor(tname, (rng.standard_normal(shape, dtype=np.float32) * scale).astype(dtype))

        d, hd = h["d"], h["d"] // h["heads"]
        q, kv = h["heads"] * hd, h["kv"] * hd
        tensor("token_embd.weight", h["vocab"], d)
        w.add_tensor("output_norm.weight", np.ones(d, dtype=np.float32))
        experts = h.get("experts")
        if experts:
            w.add_expert_count(experts)
            w.add_expert_used_count(2)
            tensor("output.weight", h["vocab"], d)
        elif arch == "llama":
            # Llama 3's RoPE scaling divisors, as the converter computes them (factor 32).
            w.add_tensor("rope_freqs.weight", np.array(
                [1.0] * (hd // 4) + [32.0] * (hd // 4), dtype=np.float32))
        for i in range(h["layers"]):
            b = f"blk.{i}."
            for n in ("attn_norm", "ffn_norm"):
                w.add_tensor(b + n + ".weight", np.ones(d, dtype=np.float32))
            tensor(b + "attn_q.weight", q, d)
            tensor(b + "attn_k.weight", kv, d)
            tensor(b + "attn_v.weight", kv, d)
            tensor(b + "attn_output.weight", d, q)
            if h["bias"]:
                for n, rows in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
                    tensor(b + n + ".bias", rows, dtype=np.float32)
            if experts:
                tensor(b + "ffn_gate_inp.weight", experts, d, dtype=np.float32)
                tensor(b + "ffn_gate_exps.weight", experts, h["ff"], d)
                tensor(b + "ffn_up_exps.weight", experts, h["ff"], d)
                tensor(b + "ffn_down_exps.weight", experts, d, h["ff"])
            else:
                tensor(b + "ffn_gate.weight", h["ff"], d)
                tensor(b + "ffn_up.weight", h["ff"], d)
                tensor(b + "ffn_down.weight", d, h["ff"])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        print(path)


if __name__ == "__main__":
    main()
