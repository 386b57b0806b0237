// llama-logits: llama.cpp's logits on given token ids, teacher-forced, for the fixtures of
// fixtures/families (scripts/make-fixtures compiles it against the libllama that
// scripts/build-llamacpp builds). llama.cpp ships no tool that prints every position's logits
// for a fixed list of ids, and the fixtures' tests compare against exactly that.
//
//   llama-logits MODEL.gguf OUT.f32 ID [ID ...]
//
// OUT.f32 is tokens x vocabulary little-endian f32, the layout of the fixtures' logits.f32.
// One sequence, one batch, default context settings (f16 KV cache), two threads.
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <vector>

int main(int argc, char ** argv) {
    if (argc < 4) {
        std::fprintf(stderr, "usage: %s MODEL.gguf OUT.f32 ID [ID ...]\n", argv[0]);
        return 2;
    }
    std::vector<llama_token> ids;
    for (int i = 3; i < argc; ++i) {
        char * end = nullptr;
        long id = std::strtol(argv[i], &end, 10);
        if (*end != '\0' || id < 0) {
            std::fprintf(stderr, "llama-logits: '%s' is not a token id\n", argv[i]);
            return 2;
        }
        ids.push_back((llama_token) id);
    }
    llama_log_set([](ggml_log_level, const char *, void *) {}, nullptr);
    llama_backend_init();
    llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (model == nullptr) {
        std::fprintf(stderr, "llama-logits: cannot load %s\n", argv[1]);
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    for (llama_token id : ids) {
        if (id >= n_vocab) {
            std::fprintf(stderr, "llama-logits: id %d is outside the vocabulary of %d\n", id, n_vocab);
            return 2;
        }
    }
    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = (uint32_t) ids.size();
    cparams.n_threads = cparams.n_threads_batch = 2;
    llama_context * ctx = llama_init_from_model(model, cparams);
    if (ctx == nullptr) {
        std::fprintf(stderr, "llama-logits: cannot create a context for %s\n", argv[1]);
        return 1;
    }
    llama_batch batch = llama_batch_init((int32_t) ids.size(), 0, 1);
    for (size_t i = 0; i < ids.size(); ++i) {
        batch.token[i] = ids[i];
        batch.pos[i] = (llama_pos) i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = (int32_t) ids.size();
    if (llama_decode(ctx, batch) != 0) {
        std::fprintf(stderr, "llama-logits: llama_decode failed on %s\n", argv[1]);
        return 1;
    }
    FILE * out = std::fopen(argv[2], "wb");
    if (out == nullptr) {
        std::fprintf(stderr, "llama-logits: cannot write %s\n", argv[2]);
        return 1;
    }
    for (size_t i = 0; i < ids.size(); ++i) {
        const float * row = llama_get_logits_ith(ctx, (int32_t) i);
        if (std::fwrite(row, sizeof(float), (size_t) n_vocab, out) != (size_t) n_vocab) {
            std::fprintf(stderr, "llama-logits: short write to %s\n", argv[2]);
            return 1;
        }
    }
    if (std::fclose(out) != 0) {
        std::fprintf(stderr, "llama-logits: cannot write %s\n", argv[2]);
        return 1;
    }
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
