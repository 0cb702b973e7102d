"""Constants and builders shared by the training tests (fixtures live in conftest.py)."""

from fm_transformers.document import Document
from fm_transformers.training.dump import DumpConfig
from fm_transformers.training.labels import LabelConfig
from fm_transformers.training.trainer import TrainConfig

TARGET_LAYERS = (4, 6, 7)
DOC_TOKENS = 320
TAU = 16
SPLIT_SHARD_BYTES = 12_000  # a document of the tiny dump is about 42 KB: four parts or so


def as_documents(records: list[dict]) -> list[Document]:
    return [Document(record["id"], record["input_ids"]) for record in records]


def dump_config(**overrides) -> DumpConfig:
    settings = {"target_layers": TARGET_LAYERS, "labels": LabelConfig(tau=TAU), "chunk_size": 128, "docs_per_shard": 4}
    settings.update(overrides)
    return DumpConfig(**settings)


def small_train_config(data, output_dir, **overrides) -> TrainConfig:
    settings = {
        "data": str(data),
        "output_dir": str(output_dir),
        "num_heads": 8,
        "rank": 64,
        "max_steps": 300,
        "batch_size": 32,
        "learning_rate": 3e-3,
        "cpu": True,
    }
    settings.update(overrides)
    return TrainConfig(**settings)
