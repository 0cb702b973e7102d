"""LSA through `pipeline("text-generation")` on the tiny DeepSeek-V4 made in code (CPU, offline)."""

from transformers import pipeline

import fm_transformers as fm
from fm_transformers.tiny import tiny_deepseek_v4, tiny_tokenizer


def main():
    model = tiny_deepseek_v4(seed=0)
    fm.attach_memory_indexer(model, fm.MemoryIndexerModel.from_backbone(model, layers=[2, 4], num_heads=8, rank=32))
    generator = pipeline("text-generation", model=model, tokenizer=tiny_tokenizer())
    prompt = "Lookahead Sparse Attention keeps only the chunks the next tokens need. " * 4
    for name, options in [("stock", {}), ("lsa", {"cache_implementation": "lsa", "cache_config": {"tau": 16, "threshold": 0.0}})]:
        out = generator(prompt, max_new_tokens=32, do_sample=False, return_full_text=False, **options)
        print(f"{name:5s}: {out[0]['generated_text']!r}")


if __name__ == "__main__":
    main()
