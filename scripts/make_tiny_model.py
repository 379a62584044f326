"""Build a tiny random-weight Llama model directory that `vllm serve` can load offline.

    python scripts/make_tiny_model.py OUT_DIR        (default OUT_DIR: <repo>/.cache/tiny-llama)

Runs under the vLLM venv's python (it needs torch, transformers and tokenizers; see
scripts/vllm-cpu-env). The result is test data the project makes itself, no hub download:

* a byte-level BPE tokenizer (vocab 2048) trained with `tokenizers` on generated English-like
  sentences, Llama-3 style special tokens and chat template, saved as PreTrainedTokenizerFast;
* a randomly initialised LlamaForCausalLM (hidden 128, 2 layers, 4 heads, 2 KV heads,
  head_dim 32, max_position_embeddings 2048) in bfloat16, saved as safetensors.

Everything is seeded, so the same OUT_DIR content comes out on every machine. The model's text
is gibberish; the protocol, the token counts and the KV transfer it drives are real.

Idempotent: OUT_DIR/.pdlb-tiny-model-complete holds the recipe version; a complete OUT_DIR is
left alone. The directory is built beside OUT_DIR and renamed into place, so a killed build
never leaves a half-written model that looks complete.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from pathlib import Path

RECIPE = "tiny-llama r1"
STAMP = ".pdlb-tiny-model-complete"
SEED = 1234
VOCAB_SIZE = 2048

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
PAD = "<|pad|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, START_HEADER, END_HEADER, EOT]

# Llama-3 style: BOS, then one header + body + <|eot_id|> per message, then an open assistant
# header when a generation prompt is asked for.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

_WORD_TEXT = (
    "the a an one two three some many every this that these those my your our their "
    "cat dog bird fish horse river mountain city village forest ocean road bridge house "
    "garden window door table chair book letter story song music light shadow morning "
    "evening night day week year time water fire stone wind rain snow cloud sun moon star "
    "model server request token cache prefill decode batch queue latency throughput "
    "engine kernel memory block layer attention vector matrix network packet stream "
    "runs walks jumps sings reads writes builds breaks opens closes finds keeps sends "
    "moves waits starts stops grows falls rises turns holds brings carries answers asks "
    "quickly slowly quietly loudly gently often never always sometimes today tomorrow "
    "red green blue small large old new bright dark warm cold happy tired long short "
    "in on under over near behind before after with without through across into from "
    "and but or so because while when if then also still again"
)
_WORDS = _WORD_TEXT.split()


def _corpus(rng: random.Random, n: int = 4000) -> list[str]:
    """Generated sentences with punctuation, digits and code-ish bits for the BPE merges."""
    lines = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 18))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        sentence = " ".join(words)
        sentence = sentence[0].upper() + sentence[1:] + rng.choice([".", "!", "?", "...", ":"])
        if rng.random() < 0.1:
            sentence += f' {{"key": "{rng.choice(_WORDS)}", "n": {rng.randint(0, 9)}}}'
        lines.append(sentence)
    return lines


def _build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(random.Random(SEED)), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        additional_special_tokens=[EOS, START_HEADER, END_HEADER],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def _build_model(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = {name: tok.token_to_id(name) for name in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        bos_token_id=ids[BOS],
        eos_token_id=[ids[EOS], ids[EOT]],
        pad_token_id=ids[PAD],
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=[ids[EOS], ids[EOT]], pad_token_id=ids[PAD]
    )
    model.save_pretrained(out, safe_serialization=True)


def build(out: Path) -> bool:
    """Build the model at OUT unless it is already complete; return True if it was built."""
    stamp = out / STAMP
    if stamp.is_file() and stamp.read_text().strip() == RECIPE:
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _build_tokenizer(tmp)
    _build_model(tmp)
    (tmp / STAMP).write_text(RECIPE + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return True


def main(argv: list[str] | None = None) -> int:
    default = Path(__file__).resolve().parent.parent / ".cache" / "tiny-llama"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", type=Path, default=default)
    args = parser.parse_args(argv)
    out: Path = args.out_dir.resolve()
    started = time.monotonic()
    if build(out):
        print(f"make_tiny_model: built {out} in {time.monotonic() - started:.1f} s")
    else:
        print(f"make_tiny_model: {out} is complete ({RECIPE}); nothing to do")
    return 0


if __name__ == "__main__":
    sys.exit(main())
