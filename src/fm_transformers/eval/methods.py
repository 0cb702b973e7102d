"""The four methods of the paper's comparison (REFERENCE.md section 4), each a generate function that decodes
with its own cache and records the CSA bytes that cache held on the device.

Full is the stock cache. LSA, recency-only and random share one LSAConfig, so they run under the same
per-sequence resident budget and differ only in the policy that fills it: the memory indexer, the newest
chunks, or chunks drawn at random. Bytes are read off the cache tensors after each generation.

Two more rows when a refresh config is given (see LSAConfig.refresh_layers): "lsa+refresh", the memory
indexer with refresh layers, and "refresh only", the same refresh with no level-1 prediction at all, which
shows what the memory indexer adds to it (fewer chunks fetched inside the window, or accuracy).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..cache import OffloadedLookaheadCache
from ..config import POLICY_OPTIONS
from ..policies import MemoryIndexerPolicy, RandomPolicy, RecencyPolicy, ResidentPolicy
from ..report import stock_csa_bytes
from .vocab import EOS, PAD

METHODS = ("full", "lsa", "recency", "random")


@dataclass
class Method:
    """A named generate function, the CSA device bytes of each generation it ran, and the chunks it fetched
    from the pool per generated token and CSA layer."""

    name: str
    generate: Callable = None
    csa_device_bytes: list[int] = field(default_factory=list)
    chunks_fetched: int = 0
    tokens_generated: int = 0

    def mean_csa_bytes(self) -> float:
        return sum(self.csa_device_bytes) / max(len(self.csa_device_bytes), 1)

    def fetched_per_token(self) -> float:
        return self.chunks_fetched / max(self.tokens_generated, 1)


def _generate(model, input_ids, max_new_tokens, cache=None):
    output = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), past_key_values=cache,
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD, eos_token_id=EOS, return_dict_in_generate=True,
    )
    return output.sequences[:, input_ids.shape[1] :], output.past_key_values


def full_method() -> Method:
    method = Method("full")

    def generate(model, input_ids, max_new_tokens):
        tokens, cache = _generate(model, input_ids, max_new_tokens)
        method.csa_device_bytes.append(stock_csa_bytes(cache, model.config.layer_types))
        return tokens

    method.generate = generate
    return method


def policy_method(name: str, make_policy: Callable[[torch.nn.Module], ResidentPolicy], lsa_config: dict) -> Method:
    method = Method(name)

    def generate(model, input_ids, max_new_tokens):
        cache = OffloadedLookaheadCache(model, lsa_config, policy=make_policy(model))
        tokens, cache = _generate(model, input_ids, max_new_tokens, cache)
        report = cache.memory_report()
        method.csa_device_bytes.append(report["csa_device_bytes"])
        method.chunks_fetched += report["chunks_fetched"] / len(cache.csa_layers)
        method.tokens_generated += tokens.numel()
        return tokens

    method.generate = generate
    return method


def comparison_methods(indexer, lsa_config: dict, seed: int = 0, refresh_config: dict | None = None) -> list[Method]:
    """Full, LSA (the given memory indexer), recency-only and random, the last three under `lsa_config`'s budget;
    with `refresh_config` (options that override `lsa_config`, refresh_layers among them) also LSA with refresh
    and refresh only. `lsa_config`'s policy options (threshold, indexer_layers) configure the memory indexer's
    policy; the other methods have no use for them."""
    cache_config = {name: value for name, value in lsa_config.items() if name not in POLICY_OPTIONS}

    def memory_indexer(model):
        threshold, layers = lsa_config.get("threshold"), lsa_config.get("indexer_layers")
        return MemoryIndexerPolicy(indexer, threshold=threshold, layers=layers)

    methods = [full_method(), policy_method("lsa", memory_indexer, cache_config)]
    if refresh_config is not None:
        refreshing = {**cache_config, **refresh_config}
        methods += [
            policy_method("lsa+refresh", memory_indexer, refreshing),
            policy_method("refresh only", lambda model: RecencyPolicy(window=0), refreshing),
        ]
    return methods + [
        policy_method("recency", lambda model: RecencyPolicy(window=1 << 40), cache_config),
        policy_method("random", lambda model: RandomPolicy(fraction=1.0, seed=seed), cache_config),
    ]
