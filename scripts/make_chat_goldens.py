"""Chat-template goldens (issue 17): each family's real Hugging Face chat template, as the
llama.cpp source tree keeps it (models/templates/), rendered by transformers'
`apply_chat_template` over fixed conversations. Writes fixtures/chat/<name>.jinja and
fixtures/chat/goldens.json; `crates/quarry-tokenize` renders the same and compares.

Run through scripts/make-fixtures' environment:
    ~/.cache/quarry/fixtures-venv/bin/python scripts/make_chat_goldens.py --llama-src DIR
"""
import argparse
import datetime
import json
import os
import shutil

import transformers.utils.chat_template_utils as ctu
from transformers.utils.chat_template_utils import render_jinja_template

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fixtures", "chat")
# The date templates that print one (Llama 3) see: fixed, so the goldens do not age.
TODAY = datetime.datetime(2026, 12, 4, 9, 30, 0)

# Family → (template file in llama.cpp's tree, BOS text, EOS text).
TEMPLATES = {
    "qwen2": ("Qwen-Qwen2.5-7B-Instruct.jinja", "", "<|im_end|>"),
    "qwen3": ("Qwen-Qwen3-0.6B.jinja", "", "<|im_end|>"),
    "llama3": ("meta-llama-Llama-3.2-3B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>"),
    "mistral": ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "<s>", "</s>"),
    "phi3": ("microsoft-Phi-3.5-mini-instruct.jinja", "<s>", "<|endoftext|>"),
    "gemma2": ("google-gemma-2-2b-it.jinja", "<bos>", "<eos>"),
}

CONVERSATIONS = [
    ([{"role": "system", "content": "You are a terse assistant."},
      {"role": "user", "content": "What is the capital of France?"},
      {"role": "assistant", "content": "Paris."},
      {"role": "user", "content": "And of Japan?  Answer in one word.\n"}], True),
    ([{"role": "user", "content": "Hello there"}], True),
    ([{"role": "user", "content": "Count: 1, 2, 3"},
      {"role": "assistant", "content": "4, 5, 6"}], False),
    ([{"role": "system", "content": "Be kind."},
      {"role": "user", "content": "日本語で？ <b>tags</b> & \"quotes\""}], True),
]


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--llama-src", required=True)
    a = p.parse_args()
    os.makedirs(OUT, exist_ok=True)
    # transformers' strftime_now reads the clock; the goldens use TODAY.
    real = ctu.datetime if hasattr(ctu, "datetime") else None

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return TODAY

    ctu.datetime = Frozen
    goldens = []
    for family, (name, bos, eos) in TEMPLATES.items():
        shutil.copy(os.path.join(a.llama_src, "models", "templates", name), os.path.join(OUT, f"{family}.jinja"))
        with open(os.path.join(OUT, f"{family}.jinja"), encoding="utf-8") as f:
            source = f.read()
        for messages, add_generation_prompt in CONVERSATIONS:
            entry = {"template": family, "bos": bos, "eos": eos, "messages": messages,
                     "add_generation_prompt": add_generation_prompt}
            try:
                rendered, _ = render_jinja_template(
                    conversations=[messages], chat_template=source,
                    add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos)
                entry["rendered"] = rendered[0]
            except Exception as e:  # the template refuses the conversation (raise_exception)
                entry["error"] = str(e)
            goldens.append(entry)
    if real is not None:
        ctu.datetime = real
    with open(os.path.join(OUT, "goldens.json"), "w", encoding="utf-8") as f:
        json.dump({"today": TODAY.strftime("%Y-%m-%d"), "goldens": goldens}, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"{len(goldens)} renderings of {len(TEMPLATES)} templates into {OUT}")


if __name__ == "__main__":
    main()
