"""Fixtures of the training tests: the tiny backbone, needle documents, their label dumps, a trained indexer.

Everything expensive is built once per session and shared read-only; tests that write take their own tmp_path.
The settings are small enough that the whole folder runs in well under three minutes on two CPU cores.
"""

import pytest
import torch
from training_helpers import DOC_TOKENS, SPLIT_SHARD_BYTES, as_documents, dump_config, small_train_config

from fm_transformers.tiny import tiny_deepseek_v4
from fm_transformers.training.dump import dump_labels
from fm_transformers.training.synthetic import needle_documents
from fm_transformers.training.trainer import train


@pytest.fixture(scope="session")
def backbone():
    return tiny_deepseek_v4(seed=0)


@pytest.fixture(scope="session")
def train_documents():
    return as_documents(needle_documents(16, DOC_TOKENS, seed=0))


@pytest.fixture(scope="session")
def heldout_documents():
    return as_documents(needle_documents(6, DOC_TOKENS, seed=1000))


@pytest.fixture(scope="session")
def train_labels(backbone, train_documents, tmp_path_factory):
    directory = tmp_path_factory.mktemp("labels") / "train"
    dump_labels(backbone, train_documents, directory, dump_config(), "tiny-seed-0")
    return directory


@pytest.fixture(scope="session")
def split_train_labels(backbone, train_documents, tmp_path_factory):
    """The training documents dumped with a shard budget below one document: every document in several parts."""
    directory = tmp_path_factory.mktemp("labels") / "split"
    dump_labels(backbone, train_documents, directory, dump_config(shard_bytes=SPLIT_SHARD_BYTES), "tiny-seed-0")
    return directory


@pytest.fixture(scope="session")
def heldout_labels(backbone, heldout_documents, tmp_path_factory):
    directory = tmp_path_factory.mktemp("labels") / "heldout"
    dump_labels(backbone, heldout_documents, directory, dump_config(), "tiny-seed-0")
    return directory


@pytest.fixture(scope="session")
def other_backbone_labels(heldout_documents, tmp_path_factory):
    """Labels of the same documents from a tiny backbone with other weights (same dimensions)."""
    directory = tmp_path_factory.mktemp("labels") / "other"
    dump_labels(tiny_deepseek_v4(seed=1), heldout_documents[:2], directory, dump_config(), "tiny-seed-1")
    return directory


@pytest.fixture(scope="session")
def trained(train_labels, heldout_labels, tmp_path_factory):
    """(output directory, summary) of one full training run with held-out evaluation."""
    output_dir = tmp_path_factory.mktemp("indexer")
    summary = train(small_train_config(train_labels, output_dir, eval_data=str(heldout_labels)))
    return output_dir, summary


@pytest.fixture(scope="session", autouse=True)
def one_cpu_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared machine idle threads spin against others."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
